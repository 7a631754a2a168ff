"""benchmarks/bench_e2e.py: the e2e configs' length settings, and its --toy size run through the trainer on the CPU
(what CI runs) writing the results JSON with throughput and the profiled window's breakdown."""

from __future__ import annotations

import importlib.util
import json
import os

import gin
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", os.path.join(ROOT, "benchmarks", "bench_e2e.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


@pytest.mark.parametrize("task, half, full", [("retrieval", (2049, 4097), (4097, 4097)),
                                              ("ranking", (1217, 2177), (2177, 2177))])
def test_length_settings_of_the_e2e_configs(bench, task, half, full):
    """half is the configs' own U[L/2, L]; uniform puts every sequence at L (history, candidates, held-out event)."""
    from hstu.training.config import parse_gin

    args = parse_gin([os.path.join(ROOT, bench.CONFIGS[task])])
    config = args.dataset.synthetic_options
    assert (config["min_length"], config["max_length"]) == half
    for lengths, (low, high) in (("half", half), ("uniform", full)):
        options = bench.synthetic_options(args, lengths)
        assert (options["min_length"], options["max_length"], options["mean_length"]) == (low, high, (low + high) / 2)
        assert options["num_items"] == 1_000_000 and options["length_distribution"] == "uniform"


@pytest.mark.parametrize("argv, message", [(["--profile-steps", "2", "--warmup", "2"], "--profile-steps=2"),
                                           (["--steps", "0"], "--steps")])
def test_bad_counts_are_refused_naming_the_option(bench, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.main(["--toy"] + argv)
    assert message in capsys.readouterr().err


def test_toy_run_writes_throughput_and_breakdown(bench, tmp_path):
    out = tmp_path / "e2e.json"
    result = bench.main(["--toy", "--lengths", "half", "--out", str(out), "--run-root", str(tmp_path / "runs"),
                         "--data-root", str(tmp_path / "data")])
    with open(out) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert result["card"] == "cpu" and result["torch"] and result["toy"]
    assert [(r["task"], r["lengths"], r["pipeline"]) for r in result["runs"]] == [
        ("retrieval", "half", "none"), ("ranking", "half", "none")]
    for row in result["runs"]:
        assert row["tokens_per_s_per_gpu"] > 0 and row["tflops_per_gpu"] is None  # no TFLOP/s or MFU on CPU
        breakdown = row["breakdown"]
        assert breakdown["time"] == "cpu" and breakdown["steps"] == row["profiled_steps"] == 1
        assert sum(breakdown["share"].values()) == pytest.approx(1.0)
        for category in ("attention", "embeddings", "optimizer", "gemm", "other"):
            assert breakdown["ms_per_step"][category] > 0, category
        with open(os.path.join(row["run_dir"], "train_log.jsonl")) as f:
            steps = [json.loads(line)["step"] for line in f]
        assert steps == list(range(1, row["warmup_steps"] + row["steps"] + 1))
