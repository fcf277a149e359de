"""The paper's experiments as commands (experiments.py sweep / fractions / ablations / study) and what it makes of
them (tables, JSON summaries, figures, report.md): the α sweep (§4.1, Fig. 3), training fractions (Fig. 2)
and ablations (Table 2). End to end on tiny random weights with the released rationales (LIMIT=4), and on
hand-made results wherever the numbers (selection on valid, mean ± std over seeds) must come out exact."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cli
import eval as evaluation
import experiments
import tinyllm
import train
from conftest import REPO, download

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
# enough to move a random model in one step, short targets and answers: a run takes about a second
TRAIN_ARGS = "--batch_size=4 --max_new_tokens=4 --max_target_tokens=16 --lr=1e-3"
RELEASE = "flan-t5-xl=release:flan-t5-xl llama-2=release:llama-2"


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, assets, tiny_t5) -> dict[str, Path]:
    """The OBQA release (splits and rationale files) and the released rationales of 4 training examples."""
    root = tmp_path_factory.mktemp("experiments")
    download("obqa", root / "data", base_url=str(assets / "tinyllm_release"), rationales=True)
    tinyllm.rationales(tinyllm.RationalesConfig(teachers=RELEASE, data=str(root / "data"), cache=str(root / "cache"),
                                                limit=4, device="cpu"))
    return {"student": tiny_t5, "data": root / "data", "cache": root / "cache"}


def experiment_flags(workspace: dict[str, Path], out: Path, **flags: str) -> list[str]:
    """The command-line flags of an experiment on the tiny student, LIMIT=4, with `flags` on top."""
    values = dict(student=workspace["student"], data=workspace["data"], cache=workspace["cache"], out=out, limit=4,
                  device="cpu", train_args=TRAIN_ARGS)
    values.update(flags)
    return [f"--{key}={value}" for key, value in values.items()]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk (the first chunk of every PNG)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG: {head!r}"
    return struct.unpack(">II", head[16:24])


def expected_size(kind: str) -> tuple[int, int]:
    width, height = evaluation.FIGURE_SIZES[kind]
    return round(width * evaluation.FIGURE_DPI), round(height * evaluation.FIGURE_DPI)


def check_figure(path: Path, kind: str, printed: str) -> None:
    """A PNG of its kind's size with matplotlib; without it, no file and the line saying how to install it."""
    if HAS_MATPLOTLIB:
        assert png_size(path) == expected_size(kind), path
    else:
        assert not path.exists() and f"{path}: not drawn, {evaluation.MATPLOTLIB_HINT}" in printed


def trained_config(run: Path) -> dict:
    """The train.py config a finished run was trained with, from its train.json; an experiment has dropped its
    last/ (the resume state, which holds the same config)."""
    assert not (run / "last").exists(), f"{run}: a finished experiment run keeps no last/"
    return json.loads((run / "train.json").read_text())["config"]


def write_results(folder: Path, valid: float, test: float, method: str = "tinyllm") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({
        "test": {"accuracy": test, "n": 100}, "valid": {"accuracy": valid, "n": 100}, "model": str(folder / "best"),
        "method": method, "dataset": "obqa", "scoring": "generate"}))


@pytest.fixture
def no_training(monkeypatch):
    """Every run is finished already: training, evaluation or rationales would be a bug."""
    def fail(cfg):
        raise AssertionError(f"nothing should run here, but {type(cfg).__name__} {getattr(cfg, 'out', '')} did")

    for module, name in ((train, "train"), (evaluation, "evaluate"), (tinyllm, "rationales")):
        monkeypatch.setattr(module, name, fail)


# ---------------------------------------------------------------------------------------------------
# the α sweep (§4.1, Fig. 3)

def make(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_make_sweep_two_by_two_end_to_end_then_make_report(workspace, tmp_path):
    """`make sweep SWEEP=...` trains and evaluates the 4 combinations, writes sweep.json with every run's α,
    valid and test, prints the table with the best on valid, draws the Fig. 3 heatmap; `make report` links it."""
    out = tmp_path / "out"
    common = [f"STUDENT={workspace['student']}", f"DATA={workspace['data']}", f"CACHE={workspace['cache']}",
              f"OUT={out}", "LIMIT=4", "DEVICE=cpu"]
    printed = make("sweep", *common, "SWEEP=flan-t5-xl=0,1 llama-2=0.5,2", f"TRAIN_ARGS={TRAIN_ARGS}")
    root = out / "obqa"
    names = ["flan-t5-xl=0,llama-2=0.5", "flan-t5-xl=0,llama-2=2", "flan-t5-xl=1,llama-2=0.5", "flan-t5-xl=1,llama-2=2"]
    assert sorted(p.name for p in (root / "sweep").iterdir()) == names
    summary = json.loads((root / "sweep.json").read_text())
    assert [row["alpha"] for row in summary["rows"]] == [{"flan-t5-xl": a, "llama-2": b} for a in (0, 1) for b in (0.5, 2)]
    for row, name in zip(summary["rows"], names):
        run = root / "sweep" / name
        results = json.loads((run / "results.json").read_text())
        assert Path(row["folder"]) == run and row["runs"] == 1
        assert (row["valid"], row["test"]) == (results["valid"]["accuracy"], results["test"]["accuracy"])
        assert trained_config(run)["alpha"] == row["alpha_flag"] == name.replace(",", " ")  # each run its own α
        assert f"| {row['alpha']['flan-t5-xl']:g} | {row['alpha']['llama-2']:g} | {row['valid'] * 100:.2f} |" in printed
    best = max(summary["rows"], key=lambda row: row["valid"])
    assert summary["best"]["alpha"] == best["alpha"] and "← best on valid" in printed
    assert (root / "sweep.md").read_text().strip() in printed
    check_figure(root / "sweep.png", "sweep", printed)

    printed = make("report", f"OUT={out}")
    report = (root / "report.md").read_text()
    assert "python experiments.py sweep" in report and "[sweep.md](sweep.md)" in report and "[sweep.json](sweep.json)" in report
    assert (root / "sweep.md").read_text().strip() in report
    assert ("![α per teacher (§4.1, Fig. 3)](sweep.png)" in report) == HAS_MATPLOTLIB
    for name in names:
        training_png = root / "sweep" / name / "training.png"
        # without matplotlib, one line for all the training curves (asserted below), not one per run
        assert png_size(training_png) == expected_size("training") if HAS_MATPLOTLIB else not training_png.exists()
        assert f"- `sweep/{name}`: [{'training.png' if HAS_MATPLOTLIB else 'metrics.jsonl'}]" in report
    if not HAS_MATPLOTLIB:
        assert f"training curves: not drawn, {evaluation.MATPLOTLIB_HINT}" in printed


def test_a_killed_sweep_resumes_without_redoing_what_finished(workspace, tmp_path, monkeypatch):
    """Killed while evaluating its second run: started again, the first run is kept as is (not trained or
    evaluated again, results.json untouched) and the second is only evaluated; a run whose training had
    saved last/ but not finished continues from it (--resume) instead of starting over."""
    cfg = cli.parse_flags(experiments.SweepConfig, experiment_flags(workspace, tmp_path, sweep="flan-t5-xl=0,1 llama-2=1"))
    first, second = tmp_path / "obqa" / "sweep" / "flan-t5-xl=0,llama-2=1", tmp_path / "obqa" / "sweep" / "flan-t5-xl=1,llama-2=1"
    real_train, real_evaluate = train.train, evaluation.evaluate
    trained, evaluated, kill = [], [], [True]

    class Killed(Exception):
        """The process dying (a kill): here an exception that nothing in the pipeline catches."""

    def counted_train(train_cfg):
        trained.append(train_cfg)
        return real_train(train_cfg)

    def killed_evaluate(eval_cfg):
        evaluated.append(eval_cfg.out)
        if eval_cfg.out == str(second) and kill:
            kill.clear()
            raise Killed  # once: after the second run's training ended
        return real_evaluate(eval_cfg)

    monkeypatch.setattr(train, "train", counted_train)
    monkeypatch.setattr(experiments, "evaluate", killed_evaluate)
    with pytest.raises(Killed):
        experiments.sweep(cfg)
    assert [t.out for t in trained] == [str(first), str(second)] and not (second / "results.json").exists()
    finished = (first / "results.json").stat().st_mtime_ns
    trained.clear(), evaluated.clear()

    summary = experiments.sweep(cfg)
    assert trained == [] and evaluated == [str(second)]  # the second is evaluated, nothing is trained again
    assert (first / "results.json").stat().st_mtime_ns == finished
    assert [row["folder"] for row in summary["rows"]] == [str(first), str(second)]

    assert not (first / "last").exists() and not (second / "last").exists()  # finished: the resume state dropped

    # killed after its last/ was saved but before training ended (no train.json): continued, not redone
    shutil.rmtree(second)
    real_finish = train.finish

    def killed_finish(*args, **kwargs):
        raise Killed  # after the last step's save, before train.json

    monkeypatch.setattr(train, "finish", killed_finish)
    with pytest.raises(Killed):
        experiments.sweep(cfg)
    assert (second / "last" / "trainer_state.pt").is_file() and not (second / "train.json").exists()
    steps = (second / "metrics.jsonl").read_text()
    monkeypatch.setattr(train, "finish", real_finish)
    trained.clear(), evaluated.clear()
    experiments.sweep(cfg)
    assert [(t.out, t.resume) for t in trained] == [(str(second), 1)] and evaluated == [str(second)]
    assert (second / "metrics.jsonl").read_text() == steps  # no step trained again
    assert (first / "results.json").stat().st_mtime_ns == finished
    assert (second / "results.json").is_file() and not (second / "last").exists()


SWEEP_SCORES = {(0, 0): (0.30, 0.35), (0, 1): (0.50, 0.40), (1, 0): (0.40, 0.45), (1, 1): (0.45, 0.60)}  # (valid, test)


def test_the_sweep_chooses_on_valid_where_valid_and_test_disagree(tmp_path, no_training, capsys):
    """a=0 b=1 is best on valid (50) and a=1 b=1 on test (60): the sweep picks a=0 b=1."""
    for (a, b), (valid, test) in SWEEP_SCORES.items():
        write_results(tmp_path / "obqa" / "sweep" / f"a={a},b={b}", valid, test)
    cfg = experiments.SweepConfig(teachers="a=release:x b=release:y", sweep="a=0,1 b=0,1", out=str(tmp_path))
    summary = experiments.sweep(cfg)
    assert summary["best"]["alpha"] == {"a": 0, "b": 1} and summary["best"]["alpha_flag"] == "a=0 b=1"
    assert (summary["best"]["valid"], summary["best"]["test"]) == (0.50, 0.40)
    assert max(summary["rows"], key=lambda row: row["test"])["alpha"] == {"a": 1, "b": 1}  # what test would pick
    assert json.loads((tmp_path / "obqa" / "sweep.json").read_text()) == summary
    printed = capsys.readouterr().out
    assert "| 0 | 1 | 50.00 | 40.00 | ← best on valid |" in printed and "| 1 | 1 | 45.00 | 60.00 | |" in printed
    assert 'best on valid: ALPHA="a=0 b=1"' in printed


def test_sweep_grid_and_flags_are_checked_before_anything_runs(tmp_path, no_training):
    def sweep(*flags: str) -> None:
        experiments.sweep(cli.parse_flags(experiments.SweepConfig, ["--teachers=a=release:x b=release:y",
                                                                f"--out={tmp_path}", *flags]))

    assert experiments.sweep_grid(experiments.SweepConfig(alphas="0.01,0.1 1"), ["a", "b"]) == {"a": [0.01, 0.1, 1],
                                                                                         "b": [0.01, 0.1, 1]}
    with pytest.raises(SystemExit, match="--sweep gives no α for b: an explicit grid names every teacher"):
        sweep("--sweep=a=0.1,1")
    with pytest.raises(SystemExit, match="--sweep: 'c=1' is not name=α,α,... for a teacher"):
        sweep("--sweep=a=1 b=1 c=1")
    with pytest.raises(SystemExit, match="--alphas: -1 is not an α >= 0"):
        sweep("--alphas=1 -1")
    with pytest.raises(SystemExit, match="--train_args: --alpha is set by the experiment itself"):
        sweep("--train_args=--epochs=2 --alpha=a=3")
    with pytest.raises(SystemExit, match="unknown flag --epoch"):
        sweep("--train_args=--epoch=2")
    with pytest.raises(SystemExit, match="--splits must include valid"):
        sweep("--eval_args=--splits=test")
    with pytest.raises(SystemExit, match="a seed appears twice"):
        sweep("--seeds=0 1 0")


# ---------------------------------------------------------------------------------------------------
# seeds: mean ± sample standard deviation

def test_experiment_rows_over_seeds_give_the_mean_and_sample_standard_deviation(tmp_path, no_training, capsys):
    """A sweep row over seed<N>/ folders, hand-made: valid 20, 40, 60 -> 40.00 ± 20.00."""
    for seed, (valid, test) in enumerate(((0.2, 0.1), (0.4, 0.1), (0.6, 0.4))):
        write_results(tmp_path / "obqa" / "sweep" / "a=1" / f"seed{seed}", valid, test)
    cfg = experiments.SweepConfig(teachers="a=release:x", alphas="1", seeds="0 1 2", out=str(tmp_path))
    summary = experiments.sweep(cfg)
    row = summary["rows"][0]
    assert row["runs"] == 3 and summary["seeds"] == [0, 1, 2]
    assert row["valid"] == pytest.approx(0.4) and row["valid_std"] == pytest.approx(0.2)
    assert row["test"] == pytest.approx(0.2) and row["test_std"] == pytest.approx(statistics.stdev([0.1, 0.1, 0.4]))
    printed = capsys.readouterr().out
    assert "| 1 | 40.00 ± 20.00 | 20.00 ± 17.32 | ← best on valid |" in printed
    assert "mean ± sample standard deviation (n − 1) over seeds 0, 1, 2" in printed


def test_fractions_with_seeds_end_to_end(workspace, tmp_path, capsys):
    """Fig. 2 with SEEDS: fractions/<method>/<fraction>/seed<N>/, each trained on its fraction with its seed;
    the table and fractions.json hold the mean and standard deviation of the seeds' results."""
    cfg = cli.parse_flags(experiments.FractionsConfig, experiment_flags(
        workspace, tmp_path, teachers="llama-2=release:llama-2", fractions="1 0.5", methods="dss finetune",
        seeds="0 1"))
    summary = experiments.fractions(cfg)
    assert [(row["run"], row["fraction"]) for row in summary["rows"]] == [
        ("dss-llama-2", 0.5), ("dss-llama-2", 1.0), ("finetune", 0.5), ("finetune", 1.0)]
    for row in summary["rows"]:
        tests = []
        for seed in (0, 1):
            run = tmp_path / "obqa" / "fractions" / row["run"] / f"{row['fraction']:g}" / f"seed{seed}"
            config = trained_config(run)
            assert (config["method"], config["train_fraction"], config["seed"]) == (row["method"], row["fraction"], seed)
            tests.append(json.loads((run / "results.json").read_text())["test"]["accuracy"])
        assert row["runs"] == 2 and row["test"] == pytest.approx(statistics.fmean(tests))
        assert row["test_std"] == pytest.approx(statistics.stdev(tests))
    printed = capsys.readouterr().out
    assert "| Method | 50% of train | 100% of train |" in printed and "| DSS-llama-2 |" in printed
    assert "full fine-tuning on all of train (Fig. 2's dotted line)" in printed
    check_figure(tmp_path / "obqa" / "fractions.png", "fractions", printed)


# ---------------------------------------------------------------------------------------------------
# ablations (Table 2)

def test_ablations_with_release_teachers_say_they_cannot_be_re_prompted(tmp_path, no_training, capsys):
    root = tmp_path / "obqa" / "ablations"
    for name, accuracy in (("tinyllm", 0.60), ("without-a", 0.50), ("without-b", 0.55)):
        write_results(root / name, accuracy, accuracy)
    summary = experiments.ablations(experiments.AblationsConfig(teachers="a=release:flan-t5-xl b=release:llama-2",
                                                        out=str(tmp_path)))
    assert [row["name"] for row in summary["rows"]] == ["tinyllm", "without-a", "without-b", "k0", "teacher_forcing0"]
    printed = capsys.readouterr().out
    assert "| w/o a | b | `cache` | 50.00 | 50.00 | -10.00 |" in printed
    for label in ("w/o in-context examples (--k=0)", "w/o teacher forcing (--teacher_forcing=0)"):
        assert (f"| {label} | a, b | — | n/a | n/a |  | not run: a=release:flan-t5-xl, b=release:llama-2 cannot "
                "be re-prompted") in printed


def test_ablations_with_a_live_teacher_re_prompt_into_their_own_caches(workspace, tmp_path):
    """A local model as the teacher: --k=0 and --teacher_forcing=0 rationales go into cache-k0/ and
    cache-teacher_forcing0/, each row trains on its cache, and without the only teacher is fine-tuning."""
    cache = tmp_path / "cache"
    teachers = f"tiny={workspace['student']}"
    tinyllm.rationales(tinyllm.RationalesConfig(teachers=teachers, data=str(workspace["data"]), cache=str(cache),
                                                limit=4, device="cpu", max_new_tokens=8))
    cfg = cli.parse_flags(experiments.AblationsConfig, experiment_flags(
        workspace, tmp_path / "out", teachers=teachers, cache=cache, rationales_args="--max_new_tokens=8"))
    summary = experiments.ablations(cfg)
    rows = {row["name"]: row for row in summary["rows"]}
    assert list(rows) == ["tinyllm", "without-tiny", "k0", "teacher_forcing0"]
    main = tinyllm.load_rationales(cache, "obqa", "tiny")
    for name, settings in (("k0", {"k": 0, "teacher_forcing": True}), ("teacher_forcing0", {"k": 2, "teacher_forcing": False})):
        assert rows[name]["cache"] == f"{cache}-{name}"
        made = tinyllm.load_rationales(f"{cache}-{name}", "obqa", "tiny")
        assert made.keys() == main.keys()
        for id_, record in made.items():
            assert {key: record["settings"][key] for key in settings} == settings
            assert record["prompt_sha256"] != main[id_]["prompt_sha256"]  # re-prompted, not copied
        config = trained_config(tmp_path / "out" / "obqa" / "ablations" / name)
        assert (config["cache"], config["method"], config["teachers"]) == (f"{cache}-{name}", "tinyllm", teachers)
    assert trained_config(tmp_path / "out" / "obqa" / "ablations" / "without-tiny")["method"] == "finetune"
    assert all(row["test"] is not None for row in rows.values())


# ---------------------------------------------------------------------------------------------------
# figures and the report, from hand-made results of every experiment

def run_every_summary(out: Path) -> None:
    """Finished runs of Table 1 and of every experiment (nothing left to train) and one training log; then
    each command and `make report`."""
    root = out / "obqa"
    for (a, b), (valid, test) in SWEEP_SCORES.items():
        write_results(root / "sweep" / f"a={a},b={b}", valid, test)
    for run in ("tinyllm", "finetune"):
        for fraction, accuracy in (("0.5", 0.4), ("1", 0.5)):
            write_results(root / "fractions" / run / fraction, accuracy, accuracy + (run == "tinyllm") * 0.1, run)
    for name, accuracy in (("tinyllm", 0.6), ("without-a", 0.5), ("without-b", 0.55)):
        write_results(root / "ablations" / name, accuracy, accuracy)
    write_results(root / "finetune", 0.5, 0.5, "finetune")
    for seed, accuracy in enumerate((0.55, 0.65)):
        write_results(root / "tinyllm" / f"seed{seed}", accuracy, accuracy)
    log = [{"step": s, "loss": {"answer": 3.0 / s, "a": 4.0 / s, "b": 5.0 / s}} for s in range(1, 5)]
    (root / "tinyllm" / "seed0" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in log + [{"step": 4, "valid_accuracy": 0.55}]))
    teachers = "a=release:flan-t5-xl b=release:llama-2"
    experiments.sweep(experiments.SweepConfig(teachers=teachers, sweep="a=0,1 b=0,1", out=str(out)))
    experiments.fractions(experiments.FractionsConfig(teachers=teachers, fractions="0.5 1", methods="tinyllm finetune",
                                              out=str(out)))
    experiments.ablations(experiments.AblationsConfig(teachers=teachers, out=str(out)))
    evaluation.main(["table", f"--out={out}"])
    experiments.main(["report", f"--out={out}"])


FIGURES = {"table.png": "table", "sweep.png": "sweep", "fractions.png": "fractions", "ablations.png": "ablations",
           "tinyllm/seed0/training.png": "training"}


def test_every_figure_is_a_png_of_its_size_and_the_report_links_it(tmp_path, no_training):
    pytest.importorskip("matplotlib", reason="the optional plots need matplotlib (requirements-extra.txt)")
    run_every_summary(tmp_path)
    root = tmp_path / "obqa"
    report = (root / "report.md").read_text()
    for name, kind in FIGURES.items():
        assert png_size(root / name) == expected_size(kind), name
        assert f"({name})" in report, name
    for name in ("table", "sweep", "fractions", "ablations"):
        assert f"[{name}.md]({name}.md)" in report and (root / f"{name}.md").read_text().strip() in report


def test_without_matplotlib_every_table_prints_and_each_plot_says_how_to_install_it(tmp_path, no_training,
                                                                                    monkeypatch, capsys):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.patches"):
        monkeypatch.setitem(sys.modules, module, None)  # `import matplotlib...` now raises ImportError
    run_every_summary(tmp_path)
    root = tmp_path / "obqa"
    printed = capsys.readouterr().out
    for name in FIGURES:
        assert not (root / name).exists(), name
    for name in ("table", "sweep", "fractions", "ablations"):
        assert (root / f"{name}.md").read_text().strip() in printed  # the table itself, printed
        assert f"{root / name}.png: not drawn, {evaluation.MATPLOTLIB_HINT}" in printed
    assert f"training curves: not drawn, {evaluation.MATPLOTLIB_HINT}" in printed
    assert "pip install matplotlib" in evaluation.MATPLOTLIB_HINT
    report = (root / "report.md").read_text()
    assert "![" not in report and "[ablations.md](ablations.md)" in report
    assert "- `tinyllm/seed0`: [metrics.jsonl](tinyllm/seed0/metrics.jsonl)" in report


# ---------------------------------------------------------------------------------------------------
# the study: methods × datasets × seeds, one pooled paired verdict

def write_predictions(folder: Path, correct: dict[str, bool], valid: float = 0.5) -> None:
    """A finished run with hand-made per-question test correctness."""
    folder.mkdir(parents=True, exist_ok=True)
    test = sum(correct.values()) / len(correct)
    (folder / "results.json").write_text(json.dumps({"test": {"accuracy": test, "n": len(correct)},
                                                     "valid": {"accuracy": valid, "n": 10}, "method": "x"}))
    (folder / "predictions.jsonl").write_text("".join(
        json.dumps({"split": "test", "id": i, "correct": c}) + "\n" for i, c in correct.items()))


def test_study_analysis_on_hand_made_predictions(tmp_path, no_training, capsys):
    """Per question, each method's correctness is averaged over the seeds that both methods finished; the
    difference TinyLLM − fine-tuning per dataset and pooled is the plain mean of those, its interval and p
    those of the per-question differences (within-dataset bootstrap, sign flips)."""
    root = tmp_path / "study"
    obqa = {"finetune": [[1, 0, 0, 1, 0, 1], [1, 1, 0, 1, 0, 1]], "tinyllm": [[1, 1, 0, 1, 1, 1], [1, 1, 1, 0, 0, 1]]}
    arc = {"finetune": [[0, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0]], "tinyllm": [[0, 1, 1, 1], [1, 0, 0, 1]]}
    for dataset, runs in (("obqa", obqa), ("arc", arc)):
        for method, seeds in runs.items():
            for seed, correct in enumerate(seeds):
                write_predictions(root / dataset / method / f"seed{seed}",
                                  {f"{dataset}-{i}": bool(c) for i, c in enumerate(correct)})
    cfg = experiments.StudyConfig(datasets="obqa arc", seeds="0 1 2", out=str(tmp_path), train=0, resamples=4000)
    summary = experiments.study(cfg)
    # by hand: obqa over seeds 0 and 1; arc over seeds 0 and 1 only (tinyllm has no seed 2)
    obqa_diff = np.array([(a + b) / 2 - (c + d) / 2 for a, b, c, d in zip(*obqa["tinyllm"], *obqa["finetune"])])
    arc_diff = np.array([(a + b) / 2 - (c + d) / 2 for a, b, c, d in zip(*arc["tinyllm"], *arc["finetune"][:2])])
    analysis = summary["analysis"]
    assert analysis["datasets"]["obqa"]["diff"] == pytest.approx(100 * obqa_diff.mean())
    assert analysis["datasets"]["arc"]["diff"] == pytest.approx(100 * arc_diff.mean())
    pooled = analysis["pooled"]
    assert pooled["n"] == 10 and pooled["diff"] == pytest.approx(100 * np.concatenate([obqa_diff, arc_diff]).mean())
    fixed = pooled["runs_fixed"]  # these trained runs held fixed: the questions resampled, sign flips
    assert (fixed["low"], fixed["high"]) == pytest.approx(evaluation.bootstrap_interval([obqa_diff, arc_diff], 4000))
    assert fixed["p"] == pytest.approx(evaluation.sign_flip_p(np.concatenate([obqa_diff, arc_diff]), 4000))
    # the headline: seeds resampled too, over each method's runs of the seeds both finished (arc: 0 and 1)
    strata = [tuple(np.array(runs[m][:2], float) for m in ("finetune", "tinyllm")) for runs in (obqa, arc)]
    assert (pooled["low"], pooled["high"]) == pytest.approx(evaluation.seed_bootstrap_interval(strata, 4000))
    assert (pooled["p"], pooled["relabellings"]) == pytest.approx(evaluation.seed_permutation_p(strata, 4000))
    assert pooled["relabellings"] == 36  # C(4, 2) relabellings of each dataset's four runs, every combination
    assert summary["seeds_used"] == {"obqa": 2, "arc": 2}
    # each seed alone: its own two runs per dataset, pooled with every question weighing the same
    own = {f"seed{s}": {d: 100 * (np.mean(runs["tinyllm"][s]) - np.mean(runs["finetune"][s]))
                        for d, runs in (("obqa", obqa), ("arc", arc))} for s in (0, 1)}
    for diffs in own.values():
        diffs["pooled"] = (6 * diffs["obqa"] + 4 * diffs["arc"]) / 10
    assert summary["per_seed"].keys() == own.keys()
    assert all(summary["per_seed"][seed] == pytest.approx(own[seed]) for seed in own)
    row = next(r for r in summary["rows"] if (r["dataset"], r["run"]) == ("arc", "finetune"))
    assert row["runs"] == 3 and row["test"] == pytest.approx(statistics.fmean([0.5, 0.75, 0.0]))
    printed = capsys.readouterr().out
    assert "| **pooled** |" in printed  # seed 2 asked for: every row but arc's fine-tuning lacks it
    assert ("not finished yet (the same command continues): obqa/finetune/seed2, obqa/tinyllm/seed2, arc/tinyllm/seed2"
            in printed)
    assert "TinyLLM − Fine-tune" in printed and "pooled over 10 test questions of 2 datasets, 2 seeds per method" in printed
    verdict = next(line for line in printed.splitlines() if line.startswith("**"))
    interval = f"[{pooled['low']:+.2f}, {pooled['high']:+.2f}]"
    assert verdict.startswith("**Interim, 9 of 12 runs in: ")  # seed 2 asked for, three of its runs missing
    assert (pooled["low"] <= 0 <= pooled["high"]) == verdict.startswith("**Interim, 9 of 12 runs in: no difference")
    assert f"95% CI with the seeds resampled {interval}, seed-level p = {pooled['p']:.3g}" in verdict
    # stability (exploratory): each method's standard deviation of test accuracy over those seeds
    obqa_std = [np.std([100 * np.mean(c) for c in obqa[m]], ddof=1) for m in ("finetune", "tinyllm")]
    stability = analysis["datasets"]["obqa"]["stability"]
    assert (stability["first_std"], stability["last_std"]) == pytest.approx(obqa_std)
    assert f"obqa {obqa_std[0]:.2f} / {obqa_std[1]:.2f} points, ratio {obqa_std[1] / obqa_std[0]:.2f} [" in printed
    assert (f"per seed, each seed's own runs (Δ test, points): seed0: obqa {own['seed0']['obqa']:+.2f}, "
            f"arc {own['seed0']['arc']:+.2f}, pooled {own['seed0']['pooled']:+.2f}; seed1: ") in printed
    saved = json.loads((root / "study.json").read_text())
    assert saved["analysis"]["pooled"]["diff"] == pytest.approx(pooled["diff"])
    check_figure(root / "study.png", "study", printed)


def test_study_list_flags_are_split_as_their_rules_split_them():
    """--datasets and --methods, comma- or space-separated (cli.split_list, as the flags' rules read them)."""
    for datasets in ("obqa,riddle", "obqa riddle", "obqa, riddle"):
        assert experiments.study_datasets(experiments.StudyConfig(datasets=datasets)) == ["obqa", "riddle"]
    assert experiments.study_datasets(experiments.StudyConfig(dataset="arc")) == ["arc"]
    assert experiments.method_runs("finetune,tinyllm", []) == [("finetune", "finetune", ""), ("tinyllm", "tinyllm", "")]
    with pytest.raises(cli.UserError, match="give each method once"):
        experiments.method_runs("finetune,finetune", [])


def test_study_before_any_run_writes_the_empty_table(tmp_path, no_training, capsys):
    """--train=0 on an out folder no run has written yet: the table of what is missing, not a write error."""
    cfg = experiments.StudyConfig(datasets="obqa arc", seeds="0 1", out=str(tmp_path / "fresh"), train=0, resamples=10)
    summary = experiments.study(cfg)
    assert summary["analysis"]["pooled"] is None
    assert ("not finished yet (the same command continues): obqa/finetune/seed0, obqa/finetune/seed1, "
            "obqa/tinyllm/seed0, obqa/tinyllm/seed1, arc/finetune/seed0, arc/finetune/seed1, arc/tinyllm/seed0, "
            "arc/tinyllm/seed1") \
        in capsys.readouterr().out
    assert json.loads((tmp_path / "fresh" / "study" / "study.json").read_text())["rows"]


def test_the_committed_study_rebuilds_its_table_and_the_readme_quotes_its_verdict(tmp_path, no_training, monkeypatch):
    """results/study/ as committed: the command written into its study.json (nothing is trained: --train=0)
    rebuilds study.md and study.json exactly from the runs' predictions, and the README's Results section
    quotes the pooled verdict sentence and the whole table of it, so neither can drift from the runs."""
    committed = REPO / "results" / "study"
    shutil.copytree(committed, tmp_path / "results" / "study",
                    ignore=shutil.ignore_patterns("study.md", "study.json", "study.png"))
    summary = json.loads((committed / "study.json").read_text())
    command = shlex.split(summary["command"])
    assert command[:3] == ["python", "experiments.py", "study"] and "--out=results" in command and "--train=0" in command
    monkeypatch.chdir(tmp_path)
    experiments.main(command[2:])
    rebuilt = tmp_path / "results" / "study"
    assert (rebuilt / "study.md").read_text() == (committed / "study.md").read_text()
    assert json.loads((rebuilt / "study.json").read_text()) == summary
    assert (rebuilt / "study.png").is_file() == HAS_MATPLOTLIB
    table = (committed / "study.md").read_text().splitlines()
    readme = " ".join((REPO / "README.md").read_text().split())
    verdict = table[2]
    assert verdict.startswith("**") and " ".join(verdict.split()) in readme
    quoted = [line for line in table if line.startswith(("| ", "per seed", "stability"))]
    assert len(quoted) >= 6 and all(" ".join(line.split()) in readme for line in quoted)  # the table, whole


def test_question_scores_of_a_row_with_and_without_seeds(tmp_path):
    """A row's runs by seed name ("" when the row is one run without seeds), each {question id: correct} on the
    split asked for, by the metric asked for."""
    def predictions(folder: Path, rows: list[dict]) -> None:
        folder.mkdir(parents=True)
        (folder / "results.json").write_text("{}")
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    rows = [{"split": "test", "id": "a", "correct": True, "correct_norm": False},
            {"split": "valid", "id": "v", "correct": False, "correct_norm": True},
            {"split": "test", "id": "b", "correct": False, "correct_norm": True}]
    predictions(tmp_path / "single", rows)
    assert experiments.question_scores(tmp_path / "single", "accuracy") == {"": {"a": True, "b": False}}
    assert experiments.question_scores(tmp_path / "single", "accuracy_norm") == {"": {"a": False, "b": True}}
    assert experiments.question_scores(tmp_path / "single", "accuracy", "valid") == {"": {"v": False}}
    predictions(tmp_path / "seeded" / "seed10", rows[:1])
    predictions(tmp_path / "seeded" / "seed2", rows[1:])
    predictions(tmp_path / "seeded" / "seed_old", rows)  # not a seed<N>/ folder: not a run of the row
    (tmp_path / "seeded" / "seed3").mkdir()  # not finished: no results.json
    scores = experiments.question_scores(tmp_path / "seeded", "accuracy")
    assert list(scores.items()) == [("seed2", {"b": False}), ("seed10", {"a": True})]  # by N, as load_run orders
    assert experiments.question_scores(tmp_path / "nothing", "accuracy") == {}


def test_paired_runs_on_the_seeds_both_finished():
    """The seeds both methods finished, sorted, with each method's runs as (seeds, questions) floats in sorted
    question order; one seed is enough; no common seed is None; runs of different questions are an error."""
    first = {"seed1": {"q2": False, "q1": True}, "seed0": {"q1": False, "q2": False}, "seed7": {"q1": True, "q2": True}}
    last = {"seed0": {"q2": True, "q1": True}, "seed1": {"q1": True, "q2": False}}
    seeds, first_runs, last_runs = experiments.paired_runs(first, last)
    assert seeds == ["seed0", "seed1"]
    assert first_runs.tolist() == [[0.0, 0.0], [1.0, 0.0]] and last_runs.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    seeds, first_runs, last_runs = experiments.paired_runs({"": {"q": True}}, {"": {"q": False}})
    assert seeds == [""] and first_runs.tolist() == [[1.0]] and last_runs.tolist() == [[0.0]]
    assert experiments.paired_runs({"seed0": {"q": True}}, {"seed1": {"q": True}}) is None
    with pytest.raises(cli.UserError, match="^study: the runs of one dataset scored different test questions: "
                                            "evaluate all with the same --limit$"):
        experiments.paired_runs({"seed0": {"q1": True}}, {"seed0": {"q2": True}})


def test_study_analysis_hands_its_resamples_and_seed_to_every_statistic():
    """Each interval and p of study_analysis is the statistic's own on the same strata, with the same resamples
    and seed (not the defaults: seed 3 gives other numbers than seed 0); the stability of a dataset whose
    first method's runs are all alike has no finite ratio bound (None in JSON), and needs two runs of each."""
    rng = np.random.default_rng(8)
    strata = {name: ((rng.random((6, n)) < 0.45).astype(float), (rng.random((6, n)) < 0.5).astype(float))
              for name, n in (("obqa", 50), ("arc", 30))}  # C(12, 6)^2 relabellings: drawn, from the seed
    analysis = experiments.study_analysis(strata, 700, seed=3)
    pairs = list(strata.values())
    pooled = analysis["pooled"]
    assert (pooled["low"], pooled["high"]) == evaluation.seed_bootstrap_interval(pairs, 700, 3)
    assert (pooled["p"], pooled["relabellings"]) == evaluation.seed_permutation_p(pairs, 700, 3)
    assert pooled["relabellings"] == 0
    diffs = [last.mean(axis=0) - first.mean(axis=0) for first, last in pairs]
    assert (pooled["runs_fixed"]["low"], pooled["runs_fixed"]["high"]) == evaluation.bootstrap_interval(diffs, 700, 3)
    assert pooled["runs_fixed"]["p"] == evaluation.sign_flip_p(np.concatenate(diffs), 700, 3)
    first_acc, last_acc = (100 * runs.mean(axis=1) for runs in strata["arc"])
    stability = analysis["datasets"]["arc"]["stability"]
    assert (stability["ratio_low"], stability["ratio_high"]) == evaluation.std_ratio_interval(first_acc, last_acc, 700, 3)
    other = experiments.study_analysis(strata, 700, seed=0)  # so the equalities above can tell the seeds apart
    assert all(other["pooled"][key] != pooled[key] for key in ("low", "high", "p"))
    assert all(other["pooled"]["runs_fixed"][key] != pooled["runs_fixed"][key] for key in ("low", "high", "p"))
    assert other["datasets"]["arc"]["stability"] != analysis["datasets"]["arc"]["stability"]
    alike = {"obqa": (np.tile(strata["obqa"][0][:1], (6, 1)), strata["obqa"][1])}
    stability = experiments.study_analysis(alike, 700, seed=3)["datasets"]["obqa"]["stability"]
    assert stability["first_std"] == 0.0 and stability["last_std"] > 0
    assert stability["ratio_low"] is None and stability["ratio_high"] is None  # every drawn ratio is infinite
    one_run = {"obqa": (strata["obqa"][0][:1], strata["obqa"][1])}
    assert experiments.study_analysis(one_run, 700)["datasets"]["obqa"]["stability"] is None


def test_the_verdict_sentence_on_hand_made_intervals():
    """"better" or "worse" only when the seed-aware interval excludes 0 (an end at exactly 0 does not), the
    difference's size then, the seeds counted per dataset when they differ, singular and plural; "Interim" with
    the runs in while fewer than planned are."""
    def pooled(diff: float, low: float, high: float) -> dict:
        return dict(n=1010, diff=diff, low=low, high=high, p=0.0123,
                    runs_fixed=dict(low=low + 1, high=high - 1, p=0.000456))

    comparison = "TinyLLM − Fine-tune"
    assert experiments.verdict(comparison, pooled(2.5, 0.5, 4.5), {"obqa": 1}, (2, 2)) == (
        "**TinyLLM is better than Fine-tune by 2.50 points** (pooled over 1,010 test questions of 1 dataset, 1 seed "
        "per method on each; 95% CI with the seeds resampled [+0.50, +4.50], seed-level p = 0.0123; with these "
        "trained runs held fixed [+1.50, +3.50], p = 0.000456).")
    assert experiments.verdict(comparison, pooled(-2.5, -4.5, -0.5), {"obqa": 2, "arc": 1}, (7, 8)) == (
        "**Interim, 7 of 8 runs in: TinyLLM is worse than Fine-tune by 2.50 points** (pooled over 1,010 test "
        "questions of 2 datasets, 2 seeds of obqa and 1 seed of arc; 95% CI with the seeds resampled [-4.50, -0.50], "
        "seed-level p = 0.0123; with these trained runs held fixed [-3.50, -1.50], p = 0.000456).")
    no_difference = ("**No difference established: TinyLLM − Fine-tune = {:+.2f} points** (pooled over 1,010 test "
                     "questions of 2 datasets, 3 seeds per method on each; 95% CI with the seeds resampled")
    for diff, low, high in ((2.3, -0.9, 5.6), (1.0, 0.0, 2.0), (-1.0, -2.0, 0.0), (0.2, -0.5, 0.5)):
        sentence = experiments.verdict(comparison, pooled(diff, low, high), {"obqa": 3, "arc": 3}, (12, 12))
        assert sentence.startswith(no_difference.format(diff) + f" [{low:+.2f}, {high:+.2f}]"), sentence
    interim = experiments.verdict(comparison, pooled(2.3, -0.9, 5.6), {"obqa": 3, "arc": 3}, (12, 16))
    assert interim.startswith("**Interim, 12 of 16 runs in: no difference established: TinyLLM − Fine-tune = +2.30 "
                              "points** (pooled over 1,010 test questions of 2 datasets, 3 seeds per method on each;")


@pytest.fixture(scope="session")
def two_datasets(workspace, assets) -> dict[str, Path]:
    """The workspace with ARC beside OBQA: its release and the released rationales of 4 training examples."""
    download("arc", workspace["data"], base_url=str(assets / "tinyllm_release"), rationales=True)
    tinyllm.rationales(tinyllm.RationalesConfig(dataset="arc", teachers=RELEASE, data=str(workspace["data"]),
                                                cache=str(workspace["cache"]), limit=4, device="cpu"))
    return workspace


def test_make_study_two_datasets_two_seeds_resumes_after_a_kill(two_datasets, tmp_path, monkeypatch):
    """experiments.py study trains fine-tuning and TinyLLM on two datasets with two seeds, seed by seed; killed while
    evaluating its sixth run, `make study` with the same variables trains and evaluates only what is missing
    (finished runs' files untouched), then writes study.{json,md,png} over all 8 runs."""
    workspace = two_datasets
    cfg = cli.parse_flags(experiments.StudyConfig, experiment_flags(workspace, tmp_path, datasets="obqa arc",
                                                                    seeds="0 1"))
    root = tmp_path / "study"
    order = [root / d / m / f"seed{s}" for s in (0, 1) for d in ("obqa", "arc") for m in ("finetune", "tinyllm")]
    real_evaluate, evaluated = evaluation.evaluate, []

    class Killed(Exception):
        pass

    def killed_evaluate(eval_cfg):
        evaluated.append(Path(eval_cfg.out))
        if len(evaluated) == 6:
            raise Killed
        return real_evaluate(eval_cfg)

    monkeypatch.setattr(experiments, "evaluate", killed_evaluate)
    with pytest.raises(Killed):
        experiments.study(cfg)
    assert evaluated == order[:6]  # seed by seed: whole seeds first
    kept = {run: (run / "results.json").stat().st_mtime_ns for run in order[:5]}
    steps = {run: (run / "metrics.jsonl").read_text() for run in order[:6]}

    printed = make("study", f"STUDENT={workspace['student']}", f"DATA={workspace['data']}",
                   f"CACHE={workspace['cache']}", f"OUT={tmp_path}", "LIMIT=4", "DEVICE=cpu", "DATASETS=obqa arc",
                   "SEEDS=0 1", f"TRAIN_ARGS={TRAIN_ARGS}")
    assert "5 of 8 runs finished already (kept), 3 to run" in printed
    assert all((run / "results.json").stat().st_mtime_ns == mtime for run, mtime in kept.items())
    assert all((run / "metrics.jsonl").read_text() == text for run, text in steps.items())  # run 6 only evaluated
    for run in order:
        config = trained_config(run)
        assert (config["dataset"], config["method"], config["seed"]) == (run.parent.parent.name, run.parent.name,
                                                                            int(run.name[4:]))
    summary = json.loads((root / "study.json").read_text())
    assert summary["datasets"] == ["obqa", "arc"] and summary["methods"] == ["finetune", "tinyllm"]
    assert summary["seeds_used"] == {"obqa": 2, "arc": 2} and summary["analysis"]["pooled"]["n"] == 8
    assert "| **pooled** |" in (root / "study.md").read_text()
    check_figure(root / "study.png", "study", printed)
