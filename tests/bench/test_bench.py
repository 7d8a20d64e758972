"""The benchmark scripts behind `gradleak bench`: each runs end to end on a tiny case and writes
the JSON its README table is made from. (Timings are printed by the scripts, never asserted.)"""

from __future__ import annotations

import json

import pytest

from gradleak.cli.main import main


def test_bench_lists_its_benchmarks_and_passes_options_through(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "quality", "--help"])
    assert e.value.code == 0 and "--seeds" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["bench", "nonexistent"])
    assert e.value.code == 2


@pytest.mark.slow
def test_bench_memory_measures_each_switch_in_its_own_process(tmp_path, capsys):
    out = tmp_path / "memory.json"
    assert main(["bench", "memory", "--batch", "2", "--size", "32", "--iters", "1", "--channels", "8",
                 "--variants", "fp32,checkpointing", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["fp32", "checkpointing"]
    for r in rows:
        assert "error" not in r, r
        assert r["s_per_it"] > 0 and r["peak_mb"] >= r["before_mb"] > 0 and r["channels"] == 8
    assert "attack's share MB" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_quality_records_thresholds_in_iteration_order(tmp_path, capsys):
    out = tmp_path / "quality.json"
    assert main(["bench", "quality", "--batches", "2", "--iters", "20", "--every", "5", "--variant", "default",
                 "--seeds", "0,1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["batch"], r["seed"], r["channels"]) for r in rows] == [(2, 0, 128), (2, 1, 128)]
    for r in rows:
        iterations = [i for i, *_ in r["curve"]]
        assert iterations == [5, 10, 15, 20] and r["final_ssim"] == r["curve"][-1][1]
        seconds = [c[3] for c in r["curve"]]
        assert seconds == sorted(seconds) and r["final_psnr"] == r["curve"][-1][2] > 0
        reached = [r["reached"][t] for t in ("0.8", "0.9", "0.95")]
        hits = [hit[0] for hit in reached if hit is not None]
        assert hits == sorted(hits)  # a higher threshold is never reached earlier
        for t, hit in zip((0.8, 0.9, 0.95), reached):  # reached exactly at the first reading above it
            first = next((i for i, v, *_ in r["curve"] if v >= t), None)
            assert (hit[0] if hit else None) == first
    assert "SSIM 0.95" in capsys.readouterr().out
    # --from redraws the same table and a figure from the recorded results, running nothing
    figure = tmp_path / "curves.png"
    assert main(["bench", "quality", "--from", str(out), "--from", str(out), "--plot", str(figure)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 ")]
    assert len(table) == 4 and f"{rows[1]['final_ssim']:.3f}"[:4] in table[1]
    assert figure.stat().st_size > 10_000


def test_bench_quality_from_refuses_a_file_it_did_not_write(tmp_path):
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"results": [{"batch": 8}]}))
    with pytest.raises(SystemExit, match="expected {'results': \\[...\\]} with batch, variant"):
        main(["bench", "quality", "--from", str(bad)])
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="expected a JSON file written by 'bench quality --json'"):
        main(["bench", "quality", "--from", str(bad)])


@pytest.mark.slow
def test_bench_quality_resumes_an_interrupted_run_and_skips_a_finished_one(tmp_path, one_thread):
    from gradleak.bench import quality

    common = dict(batch=2, variant="default", every=5, device="cpu", out=tmp_path, size=16)
    whole = quality.run(iters=20, **common)
    assert whole["finished"] == "iterations" and [c[0] for c in whole["curve"]] == [5, 10, 15, 20]
    folder = tmp_path / "b2-16px-default-s0"
    assert quality.run(iters=20, **common) == whole  # finished: read back, not rerun
    assert json.loads((folder / "run.json").read_text()) == whole
    # an interrupted run: its record and checkpoint stop at iteration 10, unfinished (as after a kill)
    first = quality.run(iters=10, **{**common, "out": tmp_path / "part"})
    part = tmp_path / "part" / "b2-16px-default-s0"
    state = json.loads((part / "run.json").read_text())
    state["finished"] = None
    (part / "run.json").write_text(json.dumps(state))
    resumed = quality.run(iters=20, **{**common, "out": tmp_path / "part"})
    assert [c[0] for c in resumed["curve"]] == [5, 10, 15, 20]
    assert resumed["curve"][:2] == first["curve"]  # history kept, not recomputed
    assert resumed["curve"][2][3] > first["curve"][-1][3]  # the clock goes on from the checkpoint
    # the same seed continued from the checkpoint lands where the uninterrupted run did
    assert resumed["final_ssim"] == pytest.approx(whole["final_ssim"], abs=1e-4)
    stopped = quality.run(iters=20, **{**common, "out": tmp_path / "target"}, target=-1.0)
    assert stopped["finished"] == "target" and stopped["iterations"] == 5
    assert quality.run(iters=20, **{**common, "out": tmp_path / "target"}, target=-1.0) == stopped
    # a larger budget continues a finished run from its checkpoint
    longer = quality.run(iters=30, **common)
    assert [c[0] for c in longer["curve"]] == [5, 10, 15, 20, 25, 30] and longer["curve"][:4] == whole["curve"]


@pytest.mark.slow
def test_bench_step_reports_phases_floor_and_ratio(tmp_path):
    out = tmp_path / "step.json"
    assert main(["bench", "step", "--batch", "2", "--iters", "2", "--rounds", "1", "--channels", "8",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["phases_ms"]) == {"generator forward", "victim forward", "gradient (create_graph)",
                                      "matching loss", "backward to generator", "optimizer step"}
    assert data["ratio"] == pytest.approx(data["attack_ms"] / data["floor_ms"])
    assert all(v > 0 for v in data["phases_ms"].values())
    # the work against the machine: counted FLOPs over the floor's time, against the measured GEMM peak
    assert data["gflop_per_step"] > 0 and data["gemm_peak_gflops"] > 0
    assert data["achieved_gflops"] == pytest.approx(data["gflop_per_step"] / (data["floor_ms"] / 1000))
    assert data["fraction_of_peak"] == pytest.approx(data["achieved_gflops"] / data["gemm_peak_gflops"])


def test_bench_adaptive_and_labels_under_defenses_write_their_rows(tmp_path, one_thread):
    out = tmp_path / "adaptive.json"
    assert main(["bench", "adaptive", "--model", "lenet", "--batch", "1", "--iters", "1", "--rounds", "1",
                 "--channels", "8", "--threads", "1", "--defenses", "prune:0.9,dpsgd:1.0", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["defense"] for r in rows] == ["prune:0.9", "dpsgd:1.0"]
    assert all(r["unaware_s"] > 0 and r["adaptive_s"] > 0 and r["ratio"] > 0 for r in rows)
    out = tmp_path / "labels.json"
    assert main(["bench", "labels", "--victims", "lenet", "--states", "untrained", "--batch-sizes", "1", "8",
                 "--unique-sizes", "--trials", "1", "--threads", "1", "--defenses", "none,prune:0.9",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["defense"] for r in rows} == {"none", "prune:0.9"}
    # batch 1: iDLG's one negative bias entry is also the largest, so it survives top-k pruning
    assert all(r["accuracy"] == 1.0 for r in rows if r["batch"] == 1 and r["strategy"] == "idlg")


def test_bench_imprint_counts_exact_recoveries_and_the_checks_score(tmp_path, capsys):
    out = tmp_path / "imprint.json"
    assert main(["bench", "imprint", "--model", "lenet", "--batches", "8", "--bins", "256", "--activations", "relu",
                 "--evasion", "0,2", "--protocols", "fedsgd,fedavg:1x8", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["protocol"], r["noise"]) for r in rows] == [("fedsgd", 0.0), ("fedsgd", 2.0), ("fedavg:1x8", 0.0),
                                                          ("fedavg:1x8", 2.0)]
    clean, noisy, delta, _ = rows
    assert clean["exact"] >= 6 and clean["check_score"] == pytest.approx(1.0) and clean["flagged"]
    assert noisy["exact"] < clean["exact"] and 0.3 < noisy["check_score"] < 0.6
    assert delta["exact"] >= clean["exact"] - 1  # a one-step delta keeps the images (the block's gain)
    with pytest.raises(SystemExit) as bad:
        main(["bench", "imprint", "--protocols", "fedavg:x"])
    assert bad.value.code == 2
    assert "PSNR >= 40 dB" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_audit_splits_the_wall_time_into_runs_and_overhead(tmp_path):
    out = tmp_path / "audit.json"
    assert main(["bench", "audit", "--backends", "local", "--batch-sizes", "1", "--defenses", "none", "--attacks",
                 "cinet", "--iterations", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["backend"] == "local" and row["runs"] == 2 and row["failed"] == 0
    assert row["overhead_s"] == pytest.approx(row["wall_s"] - row["runs_s"])
    assert 0 <= row["overhead_share"] <= 1


def test_every_quality_variant_is_a_valid_cinet_config():
    from gradleak.attacks import CINetConfig
    from gradleak.bench.quality import VARIANTS
    from gradleak.config import from_dict

    configs = {name: from_dict(CINetConfig, dict(v)) for name, v in VARIANTS.items()}
    assert configs["grow50"].grow == 50 and configs["soft-sign-adam"].update == "soft-sign-adam"


@pytest.mark.slow
def test_bench_quality_with_shared_batchnorm_statistics_keeps_its_own_run_folder(tmp_path, one_thread):
    """``--share-bn-stats``: the demo client uploads its BatchNorm statistics; the run gets its own
    resumable folder (``-bn``) and is named ``+bn`` in the table, beside the plain run."""
    from gradleak.bench.common import demo_case

    _, update, _, _ = demo_case(2, share_bn_stats=True)
    assert update.buffers and all(k.endswith(("running_mean", "running_var")) for k in update.buffers)
    assert not demo_case(2)[1].buffers
    args = ["bench", "quality", "--batches", "2", "--iters", "4", "--every", "2", "--variant", "default",
            "--out", str(tmp_path / "runs")]
    assert main(args + ["--share-bn-stats", "--json", str(tmp_path / "bn.json")]) == 0
    assert main(args + ["--json", str(tmp_path / "plain.json")]) == 0
    bn, plain = (json.loads((tmp_path / f"{n}.json").read_text())["results"][0] for n in ("bn", "plain"))
    assert bn["share_bn_stats"] and not plain["share_bn_stats"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["b2-32px-default-s0", "b2-32px-default-s0-bn"]
    assert bn["curve"] != plain["curve"]  # the statistics term changes the run
    assert main(["bench", "quality", "--from", str(tmp_path / "bn.json")]) == 0
