"""Label-recovery benchmark: strategy x victim x batch size -> label accuracy and time.

Victims: LeNet (sigmoid), ConvNet (ReLU), CIFAR ResNet-18 with ReLU and with sigmoid, each
untrained (seed 42) and briefly trained (plain SGD on built-in photos, done here). Batches are
drawn from gradleak's built-in photos (offline) with their labels modulo 10, so they hold repeated
labels; each update is one FedSGD gradient in train-mode BatchNorm. Every strategy sees only the
server's model and the update; the truth is used for scoring alone.

Usage:
    gradleak bench labels --quick            # 1 trial, batch sizes 1, 8, 32 (about a minute)
    gradleak bench labels --out labels.json  # 3 trials, batch sizes 1..128 (a few minutes)
    gradleak bench labels --defenses none,prune:0.9,quantize:4,sign,noise:1e-3 --states untrained \
        --batch-sizes 1 8 32 --unique-sizes          # label recovery from defended updates

Rows "8u" hold batches of 8 distinct labels (what Yin et al. assume); the other rows draw labels
with repeats. Prints a Markdown table (mean accuracy over trials; "-" where the strategy refused every trial
because its assumptions did not hold; milliseconds per call) and writes every measurement as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gradleak.attacks.label_scoring import scored_labels
from gradleak.data import builtin_batch
from gradleak.defenses import defended_update, split_defenses
from gradleak.errors import GradleakError
from gradleak.labels import label_accuracy, recover_labels
from gradleak.labels.ilrg import ilrg
from gradleak.models import build_model
from gradleak.reporting.tables import markdown
from gradleak.types import ModelSpec, ServerState

VICTIMS: dict[str, dict[str, Any]] = {
    "lenet": dict(name="lenet", activation="sigmoid"),
    "convnet": dict(name="convnet", activation="relu"),
    "resnet18-relu": dict(name="resnet18", activation="relu"),
    "resnet18-sigmoid": dict(name="resnet18", activation="sigmoid"),
}
STRATEGIES = ("idlg", "yin", "llg", "ilrg-paper", "ilrg", "bias-count", "auto", "scored")
"""Registered strategies, plus ``ilrg-paper``: iLRG as published (``ilrg(..., shrinkage="paper")``), and
``scored``: every strategy's multiset scored by a short matching run (:mod:`gradleak.attacks.label_scoring`,
defense-aware; seconds per update, not milliseconds)."""
POOL = 512  # built-in photos (20 ImageNet + scikit-image photos, then crops) the batches are drawn from


def train_briefly(model: torch.nn.Module, *, steps: int, lr: float, batch_size: int = 32) -> float:
    """A few plain SGD steps on built-in photos (a different slice than the test batches); the last loss."""
    data = builtin_batch(256, source="photos", offset=POOL)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1234)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randperm(data.images.shape[0], generator=g)[:batch_size]
        loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def draw(pool_labels: torch.Tensor, n: int, *, seed: int, unique: bool) -> torch.Tensor:
    """Indices of a batch of ``n`` from the pool; with ``unique`` no two share a label."""
    order = torch.randperm(pool_labels.numel(), generator=torch.Generator().manual_seed(seed))
    if not unique:
        return order[:n]
    picked, seen = [], set()
    for i in order.tolist():
        if int(pool_labels[i]) not in seen:
            picked.append(i)
            seen.add(int(pool_labels[i]))
        if len(picked) == n:
            break
    return torch.tensor(picked)


def run(*, trials: int, batch_sizes: list[int], unique_sizes: list[int], victims: list[str], states: list[str],
        steps: int, lr: float, defenses: tuple[str, ...] | list[str] = ("none",),
        strategies: tuple[str, ...] | list[str] = STRATEGIES) -> list[dict[str, Any]]:
    pool = builtin_batch(POOL, source="photos")
    rows: list[dict[str, Any]] = []
    for victim in victims:
        for state in states:
            spec = ModelSpec(**VICTIMS[victim])
            model = build_model(spec, seed=42)
            train_loss = train_briefly(model, steps=steps, lr=lr) if state == "trained" else None
            model.train(spec.bn_mode == "train")
            server = ServerState.from_spec(model, spec)
            cases = [(n, False) for n in batch_sizes] + [(n, True) for n in unique_sizes]
            for n, unique in sorted(cases):
                for trial in range(trials):
                    idx = draw(pool.labels, n, seed=1000 * trial + n, unique=unique)
                    images, labels = pool.images[idx], pool.labels[idx]
                    size = f"{n}u" if unique else n
                    for defense in defenses:
                        try:
                            update = defended_update(server, images, labels, defense=defense,
                                                     generator=torch.Generator().manual_seed(trial))
                        except GradleakError as e:  # e.g. DP-SGD on train-mode BatchNorm
                            print(f"  {victim} {defense}: skipped ({e})", file=sys.stderr)
                            continue
                        for strategy in strategies:
                            base = dict(victim=victim, state=state, batch=size, trial=trial, strategy=strategy,
                                        defense=defense, train_loss=train_loss)
                            t0 = time.perf_counter()
                            try:
                                if strategy == "ilrg-paper":
                                    result = ilrg(server, update, shrinkage="paper")
                                elif strategy == "scored":
                                    result = scored_labels(server, update, seed=trial)
                                else:
                                    result = recover_labels(server, update, strategy=strategy)
                            except GradleakError as e:
                                rows.append(dict(base, accuracy=None, seconds=time.perf_counter() - t0, error=str(e)))
                                continue
                            rows.append(dict(base, used=result.strategy, accuracy=label_accuracy(result.labels, labels),
                                             seconds=time.perf_counter() - t0, warnings=result.warnings,
                                             info=_jsonable(result.info), distinct=int(labels.unique().numel())))
                print(f"  {victim:16s} {state:9s} N={size!s:<4s} done", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    defenses = list(dict.fromkeys(r.get("defense", "none") for r in rows))
    keys = sorted({(r["victim"], r["state"], r["batch"], r.get("defense", "none")) for r in rows},
                  key=lambda k: (list(VICTIMS).index(k[0]), k[1] != "untrained", defenses.index(k[3]),
                                 int(str(k[2]).rstrip("u")), str(k[2]).endswith("u")))
    many = len(defenses) > 1
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]
    head = ["victim", "state"] + (["defense"] if many else []) + ["N", *strategies]
    body = []
    for victim, state, n, defense in keys:
        cells = []
        for s in strategies:
            sel = [r for r in rows if (r["victim"], r["state"], r["batch"], r["strategy"], r.get("defense", "none"))
                   == (victim, state, n, s, defense)]
            ok = [r["accuracy"] for r in sel if r["accuracy"] is not None]
            ms = 1000 * statistics.mean(r["seconds"] for r in sel)
            if not ok:
                cells.append(f"- ({ms:.0f} ms)")
            else:
                mark = "" if len(ok) == len(sel) else f" [{len(sel) - len(ok)}/{len(sel)} refused]"
                used = {r.get("used") for r in sel if r["accuracy"] is not None}
                via = f" via {'/'.join(sorted(u for u in used if u))}" if s == "auto" else ""
                cells.append(f"{statistics.mean(ok):.3f} ({ms:.0f} ms){mark}{via}")
        body.append([victim, state] + ([defense] if many else []) + [str(n), *cells])
    return markdown(head, body)


def _strategies(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown or not chosen:
        raise SystemExit(f"--strategies: expected some of {', '.join(STRATEGIES)}, got {text!r}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 trial, batch sizes 1, 8, 32")
    parser.add_argument("--trials", type=int, default=None, help="trials per cell (default 3, quick 1)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--unique-sizes", type=int, nargs="*", default=[8],
                        help="batch sizes also drawn with distinct labels (rows 'Nu'; Yin et al. needs them)")
    parser.add_argument("--victims", nargs="+", choices=list(VICTIMS), default=list(VICTIMS))
    parser.add_argument("--states", nargs="+", choices=["untrained", "trained"], default=["untrained", "trained"])
    parser.add_argument("--train-steps", type=int, default=20, help="SGD steps of the 'trained' victims")
    parser.add_argument("--train-lr", type=float, default=0.05)
    parser.add_argument("--defenses", default="none",
                        help="comma-separated defense settings applied on the client (default none)")
    parser.add_argument("--strategies", default=",".join(s for s in STRATEGIES if s != "scored"),
                        help=f"comma-separated, of {', '.join(STRATEGIES)} (default: all but scored, which runs "
                             "a short attack per candidate)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("bench-results/labels.json"), help="JSON output")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("gradleak").setLevel(logging.ERROR)  # fallbacks are in each result's warnings
    trials = args.trials or (1 if args.quick else 3)
    sizes = args.batch_sizes or ([1, 8, 32] if args.quick else [1, 8, 32, 64, 128])
    t0 = time.perf_counter()
    rows = run(trials=trials, batch_sizes=sizes, unique_sizes=args.unique_sizes, victims=args.victims,
               states=args.states, steps=args.train_steps, lr=args.train_lr,
               defenses=split_defenses(args.defenses), strategies=_strategies(args.strategies))
    text = table(rows)
    print(text)
    total = time.perf_counter() - t0
    print(f"\n{trials} trial(s) per cell; total {total:.0f} s; torch threads {args.threads}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "trials": trials, "batch_sizes": sizes,
                                    "train_steps": args.train_steps, "train_lr": args.train_lr,
                                    "seconds": total, "rows": rows, "table": text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
