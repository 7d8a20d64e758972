"""Every ``gradleak ...`` command shown in README.md and docs/*.md parses with the real argument parser.

A dry parse, no run: a renamed flag, a removed subcommand, an unknown preset or attack, or a
benchmark option that no longer exists breaks the build instead of the reader's copy-paste. Lines
written as a synopsis (``[case flags]``, ``A|B``, ``...``) are not commands and are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from gradleak.attacks import ATTACKS
from gradleak.cli.main import build_parser
from gradleak.config import split_preset

ROOT = Path(__file__).parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


SYNOPSIS = re.compile(r"\[|\.\.\.|\w\|\w|\s\|\s|<[a-z-]+>|\s[A-Z]{1,4}(?=\s|$)")
"""Synopsis notation: ``[optional]``, ``...``, ``a|b``, ``<name>``, a placeholder such as ``N``, ``DIR`` or ``NAME``."""


def commands(text: str) -> list[str]:
    """The ``gradleak`` commands of a Markdown text: fenced code blocks (continuation lines joined) and inline spans."""
    out = []
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    spans = [" ".join(span.split()) for span in re.findall(r"`(gradleak [^`]+)`", prose)]
    for block in [*re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S), *spans]:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().split(" # ")[0].strip()
            for part in re.split(r"\s*(?:&&|;)\s*", line):
                if part.startswith("gradleak ") and not SYNOPSIS.search(part):
                    out.append(" ".join(part.split()))
    return out


ALL = [(doc.relative_to(ROOT).as_posix(), cmd) for doc in DOCS for cmd in commands(doc.read_text())]


def _check(argv: list[str]) -> None:
    """Parse ``argv`` as ``main`` would, then check what the parser cannot: presets, attacks, bench options."""
    parser = build_parser()
    err = io.StringIO()
    if len(argv) == 1 or (argv[0] != "bench" and argv[-1].startswith("--") and "=" not in argv[-1]):
        # a reference in prose (`gradleak sweep`, `gradleak compare --seconds`): the subcommand and flag exist
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        assert argv[0] in sub.choices, f"unknown subcommand {argv[0]!r}"
        if len(argv) > 1:
            assert argv[-1] in sub.choices[argv[0]]._option_string_actions, f"gradleak {argv[0]}: no flag {argv[-1]}"
            argv = argv[:-1]
        if len(argv) == 1:
            return
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                raise AssertionError(err.getvalue().strip().splitlines()[-1]) from None
            return
    for name in filter(None, (getattr(args, "attack", None), *str(getattr(args, "attacks", "") or "").split(","))):
        if name != "auto":
            ATTACKS.get(name.strip())
    presets = getattr(args, "preset", None)
    for text in presets if isinstance(presets, list) else [presets] if presets else []:
        attack, preset = split_preset(text) if ":" in text else (getattr(args, "attack", None) or "cinet", text)
        if preset is not None:
            ATTACKS.get(attack).preset(preset)
    if args.command == "bench":
        import importlib

        module = importlib.import_module(f"gradleak.bench.{args.name}")
        with pytest.MonkeyPatch.context() as m:
            m.setattr(argparse.ArgumentParser, "parse_args", _strict_parse_only)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                try:
                    module.main(list(args.options))
                except _Parsed:
                    return
                except SystemExit:
                    raise AssertionError(f"bench {args.name}: {err.getvalue().strip()}") from None


class _Parsed(Exception):
    """Raised once a benchmark's options parsed: it is not run."""


_real_parse = argparse.ArgumentParser.parse_args


def _strict_parse_only(self, args=None, namespace=None):
    _real_parse(self, args, namespace)
    raise _Parsed


def test_the_docs_hold_commands_to_check():
    assert len(ALL) >= 40, ALL
    assert {doc for doc, _ in ALL} >= {"README.md", "docs/audit.md", "docs/sweep.md"}


@pytest.mark.parametrize("doc, command", ALL, ids=[f"{d}:{c[:60]}" for d, c in ALL])
def test_every_documented_command_parses(doc, command):
    _check(shlex.split(command)[1:])


def test_the_check_fails_on_a_renamed_flag_preset_or_bench_option():
    readme = (ROOT / "README.md").read_text()
    good = next(c for c in commands(readme) if c.startswith("gradleak audit "))
    _check(shlex.split(good)[1:])
    renamed = good.replace("--batch-sizes", "--batch-size-list")
    assert renamed != good
    for bad in (renamed, "gradleak demo --preset cinet:no-such-preset", "gradleak compare --attacks cinet,nope",
                "gradleak bench quality --no-such-option 1", "gradleak frobnicate"):
        with pytest.raises((AssertionError, Exception)):
            _check(shlex.split(bad)[1:])
    assert commands("```bash\ngradleak audit --model lenet \\\n  --batch-sizes 1 && gradleak list\n```") == [
        "gradleak audit --model lenet --batch-sizes 1", "gradleak list"]
    assert commands("```\ngradleak audit [case flags] --out DIR\n```") == []
