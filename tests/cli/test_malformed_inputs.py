"""The CLI's promise on bad input, as a table: exit 2, one line naming what was expected, nothing left behind.

Each row crafts one malformed input (an update, model-state or truth file with a bad header value,
a ``--set`` value, a data folder, a sweep grid, a run folder) and runs the command on it.
"""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gradleak.cli.main import main

SMALL = ["--model", "lenet", "--batch-size", "2"]
MALFORMED_INPUTS = 70
"""How many malformed inputs the table holds; README.md states the same number (checked below)."""


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("client")
    assert main(["simulate", *SMALL, "--out", str(out)]) == 0
    return out


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["gradleak"])


def _write(path: Path, tensors: dict[str, torch.Tensor], header: dict | str) -> Path:
    save_file(tensors, str(path), metadata={"gradleak": header if isinstance(header, str) else json.dumps(header)})
    return path


def _update(client: Path, tmp: Path, **changes) -> Path:
    tensors, header = _read(client / "update.safetensors")
    header = {k: v for k, v in {**header, **changes}.items() if v is not _DROP}
    return _write(tmp / "u.safetensors", tensors, header)


def _model(client: Path, tmp: Path, spec) -> Path:
    tensors, header = _read(client / "model.safetensors")
    header["spec"] = spec
    return _write(tmp / f"m{next(_COUNT)}.safetensors", tensors, header)


def _truth(client: Path, tmp: Path, images=None, labels=None) -> Path:
    tensors, header = _read(client / "truth.safetensors")
    if images is not None:
        tensors["images"] = images(tensors["images"])
    if labels is not None:
        tensors["labels"] = labels(tensors["labels"])
    return _write(tmp / f"t{next(_COUNT)}.safetensors", tensors, header)


_DROP = object()
_COUNT = itertools.count()
HEADER_CASES = [  # (field, value, message)
    ("num_samples", "abc", "num_samples: expected an integer, got 'abc'"),
    ("num_samples", [2], "num_samples: expected an integer"),
    ("num_samples", None, "num_samples: expected an integer, got None"),
    ("num_samples", 2.7, "num_samples: expected an integer, got 2.7"),
    ("num_samples", 10**12, "num_samples from 1 to 1000000"),
    ("num_samples", 0, "num_samples from 1 to 1000000, got 0"),
    ("num_samples", _DROP, "expected 'num_samples' in the header"),
    ("local_steps", "3", "local_steps: expected an integer, got '3'"),
    ("num_clients", "2", "num_clients: expected an integer"),
    ("local_lr", "0.1", "local_lr: expected a number or null"),
    ("local_lr", -1.0, "positive header local_lr"),
    ("metadata", [1, 2], "metadata: expected dict"),
    ("kind", "weights", "kind: expected one of 'gradient', 'delta'"),
    ("protocol", 3, "protocol: expected one of"),
    ("defenses", "noise", "defenses: expected a list of strings"),
    ("format", "other/1", "expected header format"),
    ("parameters", [], "parameters: expected dict"),
]


@pytest.mark.parametrize("field, value, message", HEADER_CASES, ids=[f"{f}={v!r}"[:30] for f, v, _ in HEADER_CASES])
def test_a_bad_update_header_exits_2_naming_the_field(client, tmp_path, capsys, field, value, message):
    bad = _update(client, tmp_path, **{field: value})
    out = tmp_path / "run"
    assert main(["attack", "--update", str(bad), "--model-state", str(client / "model.safetensors"),
                 "--out", str(out), "--no-progress"]) == 2
    _one_line(capsys, message)
    assert not out.exists()


def _one_line(capsys, message: str) -> None:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert message in err, err


def _other_cases(client: Path, tmp: Path) -> list[tuple[list[str], str]]:
    u, m = str(client / "update.safetensors"), str(client / "model.safetensors")
    tensors, header = _read(client / "update.safetensors")
    first = next(iter(tensors))
    int_update = _write(tmp / "int.safetensors", {**tensors, first: tensors[first].to(torch.int32)}, header)
    bool_update = _write(tmp / "bool.safetensors", {**tensors, first: tensors[first] > 0}, header)
    nan_update = _write(tmp / "nan.safetensors", {**tensors, first: tensors[first] * float("nan")}, header)
    zero_update = _write(tmp / "zero.safetensors", {k: torch.zeros_like(v) for k, v in tensors.items()}, header)
    text_header = _write(tmp / "text.safetensors", tensors, "not json")
    list_header = _write(tmp / "list.safetensors", tensors, "[1, 2]")
    (tmp / "pickle.safetensors").write_bytes(pickle.dumps(tensors))
    mt, mh = _read(client / "model.safetensors")
    nan_model = _write(tmp / "nanmodel.safetensors", {k: v * float("nan") if v.is_floating_point() else v
                                                      for k, v in mt.items()}, mh)
    folder = tmp / "images" / "cat"
    folder.mkdir(parents=True)
    (folder / "fake.png").write_text("not an image")
    (tmp / "images" / "dog").mkdir()
    (tmp / "images" / "dog" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    (tmp / "grid.json").write_text(json.dumps({"model": "lenet", "attacks": ["cinet"], "batch_sizes": ["1"]}))
    (tmp / "grid2.json").write_text(json.dumps({"model": "lenet", "attacks": [{"name": "cinet", "set": {"lr": "x"}}],
                                                "batch_sizes": [1]}))
    (tmp / "notjson").mkdir()
    (tmp / "notjson" / "config.json").write_text("{not json")
    (tmp / "listcfg").mkdir()
    (tmp / "listcfg" / "config.json").write_text("[1]")
    (tmp / "cmp-notjson").mkdir()
    (tmp / "cmp-notjson" / "compare.json").write_text("{not json")
    (tmp / "cmp-nofiles").mkdir()
    (tmp / "cmp-nofiles" / "compare.json").write_text(json.dumps(
        {"attacks": ["cinet"], "iterations": 2, "seconds": None, "presets": {}, "overrides": {}, "labels": "recovered",
         "device": "cpu", "seed": 0, "case": {}}))
    (tmp / "afile").write_text("x")
    base = ["attack", "--update", u, "--model-state", m, "--no-progress"]
    out = ["--out", str(tmp / "out")]
    return [
        (["attack", "--update", str(int_update), "--model-state", m, *out], "expected floating-point values, got torch.int32"),
        (["attack", "--update", str(bool_update), "--model-state", m, *out], "expected floating-point values, got torch.bool"),
        (["attack", "--update", str(nan_update), "--model-state", m, *out], "expected finite values"),
        (["attack", "--update", str(text_header), "--model-state", m, *out], "JSON header is malformed"),
        (["attack", "--update", str(list_header), "--model-state", m, *out], "expected a JSON object as header"),
        (["attack", "--update", str(tmp / "pickle.safetensors"), "--model-state", m, *out], "expected a safetensors file"),
        (["attack", "--update", str(tmp), "--model-state", m, *out], "expected a safetensors file, got"),
        (["attack", "--update", "/dev/zero", "--model-state", m, *out], "(not a regular file)"),
        (["attack", "--update", str(tmp / "missing.safetensors"), "--model-state", m, *out], "(not found)"),
        (["attack", "--update", str(zero_update), "--model-state", m, *out], "tensors that are all zero"),
        (["attack", "--update", u, "--model-state", m, "--out", "/proc/gradleak-out"],
         "expected a place where folders can be made"),
        (["attack", "--update", u, "--model-state", str(_model(client, tmp, "lenet")), *out],
         "expected the model spec as a JSON object"),
        (["attack", "--update", u, "--model-state", str(_model(client, tmp, {"image_size": 32})), *out], "'name' (required)"),
        (["attack", "--update", u, "--model-state", str(_model(client, tmp, {"name": "lenet", "image_size": "32"})), *out],
         "image_size: expected an integer, got '32'"),
        (["attack", "--update", u, "--model-state", str(_model(client, tmp, {"name": "lenet", "image_size": 60000})), *out],
         "image_size: expected an integer from 1 to 4096, got 60000"),
        (["attack", "--update", u, "--model-state", str(nan_model), *out], "expected finite weights"),
        ([*base, "--truth", str(_truth(client, tmp, images=lambda x: x * float("nan"))), *out], "expected finite images"),
        ([*base, "--truth", str(_truth(client, tmp, images=lambda x: x * 255)), *out], "expected images in [0, 1]"),
        ([*base, "--truth", str(_truth(client, tmp, images=lambda x: (x * 255).to(torch.uint8))), *out],
         "expected float images"),
        ([*base, "--truth", str(_truth(client, tmp, labels=lambda y: y * 0 - 1)), *out], "expected labels 0 to 9, got -1"),
        ([*base, "--truth", str(_truth(client, tmp, labels=lambda y: y * 0 + 10)), *out], "expected labels 0 to 9, got 10"),
        ([*base, "--truth", str(_truth(client, tmp, labels=lambda y: y.float())), *out], "expected integer class labels"),
        ([*base, "--set", "spectral=maybe", *out], "expected true or false, got 'maybe'"),
        ([*base, "--set", "iterations=-1", *out], "iterations: expected >= 0, got -1"),
        ([*base, "--set", "lr=0", *out], "lr: expected > 0, got 0.0"),
        ([*base, "--set", "channels=0", *out], "channels: expected 1 to 4096"),
        ([*base, "--set", "nosuch=1", *out], "unknown option(s) nosuch"),
        ([*base, "--set", "noequals", *out], "expected KEY=VALUE"),
        ([*base, "--set", "generator_factory=os:system", "--attack", "gias", *out], "is not accepted"),
        ([*base, "--out", str(tmp / "afile")], "expected a folder, got an existing file"),
        (["attack", "--resume", str(tmp / "notjson")], "is not readable JSON"),
        (["attack", "--resume", str(tmp / "listcfg")], "expected a run's config"),
        (["simulate", *SMALL, "--data", "folder", "--data-root", str(tmp / "images"), "--out", str(tmp / "s1")],
         "expected readable images"),
        (["simulate", *SMALL, "--defense", "noise:abc", "--out", str(tmp / "s2")], "noise"),
        (["simulate", *SMALL, "--protocol", "fedavg,fedsgd", "--out", str(tmp / "s3")], "expected one setting"),
        (["simulate", "--model", "lenet", "--batch-size", "900", "--out", str(tmp / "s4")], "at most 824 images"),
        (["simulate", *SMALL, "--out", str(tmp / "afile")], "expected a folder, got an existing file"),
        (["sweep", str(tmp / "grid.json"), "--out", str(tmp / "sw1")], "expected integers, got '1'"),
        (["sweep", str(tmp / "grid2.json"), "--out", str(tmp / "sw2")], "lr: expected a number, got 'x'"),
        (["sweep", str(_grid(tmp, "sw3", iterations="lots")), "--out", str(tmp / "sw3")],
         "sweep iterations: expected an integer or null, got 'lots'"),
        (["sweep", str(_grid(tmp, "sw4", num_cpus="many")), "--out", str(tmp / "sw4")],
         "sweep num_cpus: expected a number, got 'many'"),
        (["sweep", str(_grid(tmp, "sw5", batch_sizes=[0])), "--out", str(tmp / "sw5")],
         "sweep batch_sizes: expected values of at least 1, got 0"),
        (["compare", *SMALL, "--attacks", "cinet,nope", "--out", str(tmp / "c1")], "unknown attack 'nope'"),
        (["compare", "--resume", str(tmp / "cmp-notjson")], "is not readable JSON"),
        (["compare", "--resume", str(tmp / "cmp-nofiles")], "expected a comparison's settings"),
        (["compare", *SMALL, "--attacks", "", "--out", str(tmp / "c2")], "--attacks: expected comma-separated"),
        (["labels", "--update", str(int_update), "--model-state", m], "expected floating-point values"),
        (["labels", "--update", u, "--model-state", m, "--truth", str(_truth(client, tmp, labels=lambda y: y * 0 + 99))],
         "expected labels 0 to 9, got 99"),
    ]


def _bn_cases(tmp: Path) -> list[tuple[list[str], str]]:
    """Shared BatchNorm statistics that do not fit the model, and the terms asked for where they cannot apply."""
    client = tmp / "bn-client"
    assert main(["simulate", "--model", "convnet", "--batch-size", "2", "--share-bn-stats", "--out", str(client)]) == 0
    tensors, header = _read(client / "update.safetensors")
    name = next(iter(header["buffers"]))
    renamed = {("nosuch." + k if k == name else k): v for k, v in tensors.items()}
    renamed_header = {**header, "buffers": {("nosuch." + k if k == name else k): v for k, v in header["buffers"].items()}}
    short = {**tensors, name: tensors[name][:-1]}
    short_header = {**header, "buffers": {**header["buffers"], name: [len(tensors[name]) - 1]}}
    m = str(client / "model.safetensors")
    out = ["--out", str(tmp / "out"), "--no-progress"]
    return [
        (["attack", "--update", str(_write(tmp / "bn1.safetensors", renamed, renamed_header)), "--model-state", m, *out],
         "expected names of the model's running statistics"),
        (["attack", "--update", str(_write(tmp / "bn2.safetensors", short, short_header)), "--model-state", m, *out],
         f"'{name}': expected shape"),
        (["attack", "--update", str(_write(tmp / "bn3.safetensors", tensors, {**header, "buffers": [1]})),
          "--model-state", m, *out], "buffers: expected dict"),
        (["simulate", *SMALL, "--share-bn-stats", "--out", str(tmp / "s5")], "BatchNorm layers in train mode"),
        (["compare", *SMALL, "--clients", "2", "--attacks", "ig", "--set", "ig.features=1", "--dry-run",
          "--out", str(tmp / "c3")], "feature term: expected one client's update"),
    ]


def _grid(tmp: Path, name: str, **changes) -> Path:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"model": "lenet", "attacks": ["cinet"], "batch_sizes": [1], **changes}))
    return path


def test_malformed_inputs_exit_2_with_one_line_and_leave_nothing(client, tmp_path, capsys):
    cases = _other_cases(client, tmp_path) + _bn_cases(tmp_path)
    assert len(cases) + len(HEADER_CASES) == MALFORMED_INPUTS  # the README's count
    for argv, message in cases:
        assert main(argv) == 2, argv
        _one_line(capsys, message)
    for made in ("out", "s1", "s2", "s3", "s4", "s5", "c1", "c2", "sw1", "sw2", "sw3", "sw4", "sw5"):
        assert not (tmp_path / made).exists(), made  # a clean error leaves no folder behind


def test_the_readme_states_the_tables_count():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert f"`tests/cli/test_malformed_inputs.py` holds {MALFORMED_INPUTS} such inputs" in readme
