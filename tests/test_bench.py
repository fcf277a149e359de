"""Smoke test of `make bench` (tests/bench.py) in quick mode: tiny random configs, one repetition, seconds.

It checks that every comparison runs end to end and that the printed table and OUT/bench.json have the documented
structure. It asserts nothing about speed: timings on a shared test machine mean nothing.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
ENTRY_KEYS = {"name", "ours", "transformers", "ratio", "unit", "device"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[str, dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run([sys.executable, str(REPO / "tests" / "bench.py"), "--device=cpu", f"--out={out}",
                             "--quick=1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout, json.loads((out / "bench.json").read_text()), out


def test_bench_json_has_one_entry_per_measurement(quick_run):
    _, report, _ = quick_run
    machine, entries = report["machine"], report["entries"]
    assert {"torch", "transformers", "cpu", "cpu_count", "torch_threads", "loadavg_start", "loadavg_end",
            "peaks"} <= machine.keys()
    assert machine["quick"] is True and machine["device"] == "cpu"
    for entry in entries:
        assert ENTRY_KEYS <= entry.keys(), entry
        assert entry["device"] == "cpu"
        if entry["unit"] == "MiB":  # a tiny quick-mode call may add no page to the resident set at all
            assert entry["ours"] >= 0 and entry["transformers"] >= 0, entry
        else:
            assert entry["ours"] > 0 and entry["transformers"] > 0, entry
        if entry["transformers"] > 0:
            assert math.isclose(entry["ratio"], entry["ours"] / entry["transformers"], rel_tol=1e-9), entry
        assert entry["reps"] >= 1 and len(entry["load"]) == 2
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), names
    speed = [e for e in entries if e["unit"] in ("tokens/s", "new tokens/s", "examples/s", "rationales/s")]
    # training on two T5 sizes collapses to one tiny config in quick mode; generation for both families at two
    # batch sizes; the jobs: train.py's TinyLLM step and rank scoring for both students, rationales at two sizes
    assert sum(e["name"].startswith("train ") for e in speed) == 1
    jobs = [e for e in speed if e["name"].startswith("job: ")]
    assert [e["unit"] for e in jobs] == ["examples/s"] * 4 + ["rationales/s"] * 2 + ["examples/s"] * 2
    # TinyLLM's step time over fine-tuning's, on OBQA and PubMedQA lengths: both columns are ours
    cost = [e for e in jobs if "over fine-tuning" in e["name"]]
    assert [e["name"].split()[-2] for e in cost] == ["obqa", "pubmedqa"]
    assert all(math.isclose(e["time_over_finetune"], 1 / e["ratio"]) for e in cost), cost
    assert all(e["shapes"]["slots_tinyllm"] > e["shapes"]["slots_finetune"] for e in cost), cost
    # the same rationales row for row (greedy, fp32, each row stopped at its length) and the same option scores
    assert all(e["same_output"] == 1.0 for e in jobs if "rank" in e["name"] or "rationales" in e["name"]), jobs
    generation = [e for e in speed if e["name"].startswith("generate ")]
    assert len(generation) == 4 and all(e["unit"] == "new tokens/s" for e in generation)
    # greedy decoding with the same weights and EOS disabled: both produce every token, the same ones
    assert all(e["same_tokens"] for e in generation), [(e["name"], e["same_tokens"]) for e in generation]
    for e in speed:
        low, high = e["ours_spread"]
        assert low <= e["ours"] <= high
    memory = [e for e in entries if e["unit"] == "MiB"]
    assert {e["name"].removesuffix(" | peak memory") for e in memory} == {e["name"] for e in speed}
    assert all(e["ours"] >= 0 and e["transformers"] >= 0 for e in memory)
    achieved = [e for e in entries if e["unit"] in ("GFLOP/s", "GB/s")]
    assert {e["name"].rsplit(" | ", 1)[0] for e in achieved} == {e["name"] for e in speed if e not in jobs}


def test_bench_prints_the_table(quick_run):
    stdout, report, out = quick_run
    header = next(line for line in stdout.splitlines() if line.startswith("| benchmark"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "benchmark", "ours", "transformers", "ours/transformers", "unit", "reps"]
    for entry in report["entries"]:
        assert f"| {entry['name']} " in stdout
    assert str(out / "bench.json") in stdout


def test_bench_rejects_unknown_flags(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tests" / "bench.py"), f"--out={tmp_path}", "--speed=1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--speed" in result.stderr
