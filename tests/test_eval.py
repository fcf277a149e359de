"""eval.py: accuracy from hand-made outputs, rank scoring, results files, the Table-1 table, and the
whole pipeline (rationales -> train -> eval, the three CLIs the Makefile runs) on tiny random models."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import eval as evaluation
import prompts
import student as students
import train
from conftest import REPO



EXAMPLES = [data.Example("q1", "Which is red?", ("grass", "blood", "sky"), 1),
            data.Example("q2", "Which is cold?", ("ice", "fire"), 0),
            data.Example("q3", "Which swims?", ("fish", "rock", "cat", "dog"), 0),
            data.Example("q4", "Which flies?", ("stone", "bird"), 1)]


class HandMadeStudent(students.Student):
    """A student whose greedy outputs and option scores are given by hand."""

    kind = "hand"

    def __init__(self, outputs: dict[str, str], scores: dict[str, list[float]] | None = None):
        model = torch.nn.Linear(1, 1)
        super().__init__(model, tokenizer=None, device=torch.device("cpu"), bf16=False, objective=model)
        self.outputs, self.scores = outputs, scores or {}
        self.by_prompt = {}

    def encode_prompt(self, text: str) -> list[int]:
        ex = next(e for e in EXAMPLES if e.question in text)
        self.by_prompt[ex.id] = ex
        return [EXAMPLES.index(ex)]

    def encode_target(self, text: str) -> list[int]:
        return [hash(text) % 1000]

    def generate(self, prompt_rows: list[list[int]], max_new_tokens: int) -> list[str]:
        return [self.outputs[EXAMPLES[row[0]].id] for row in prompt_rows]

    def encode_option(self, text: str) -> list[int]:
        return [hash(text) % 1000]

    def score_options(self, prompt_rows, options):
        return [self.scores[EXAMPLES[row[0]].id] for row in prompt_rows]


def test_accuracy_of_hand_made_outputs():
    student = HandMadeStudent({"q1": "blood", "q2": "fire", "q3": "fish", "q4": "I do not know"})
    records = students.predict(student, EXAMPLES, "generate")
    assert [r["prediction"] for r in records] == [1, 1, 0, None]
    assert [r["correct"] for r in records] == [True, False, True, False]
    assert students.accuracy(records) == 0.5
    assert students.accuracy(records, "correct_generate") == 0.5 and students.accuracy([]) == 0.0
    assert [r["id"] for r in records] == ["q1", "q2", "q3", "q4"]  # input order, whatever the batching
    assert students.predict(student, EXAMPLES, "generate", batch_size=1) == records


def test_acc_norm_divides_each_options_score_by_its_bytes_one_byte_too():
    """acc_norm per UTF-8 byte of each option's text: "a" (1 byte, -1.0) against "bc" (2 bytes, -1.6 in all,
    -0.8 a byte) — the sum picks "a", per byte "bc"."""
    example = data.Example("b1", "Which is first?", ("a", "bc"), 1)

    class OneByteOption(HandMadeStudent):
        def encode_prompt(self, text: str) -> list[int]:
            return [0]

        def score_options(self, prompt_rows, options):
            return [[-1.0, -1.6]]

    record = students.predict(OneByteOption({}), [example], "rank")[0]
    assert record["lengths"] == [1, 2] and (record["prediction_sum"], record["prediction_norm"]) == (0, 1)
    assert record["correct_norm"] and not record["correct_sum"]


def test_predict_without_settings_scores_like_make_eval():
    """predict's defaults are eval.py's (EvalConfig): generate, 32 questions a batch, prompts of up to 1,024 tokens
    before 64 new ones."""
    cfg, seen = evaluation.EvalConfig(), {"batches": []}

    class Recording(HandMadeStudent):
        def prompt_limit(self, limit: int, reserve: int) -> int:
            seen["limit"] = (limit, reserve)
            return super().prompt_limit(limit, reserve)

        def generate(self, prompt_rows, max_new_tokens):
            seen["batches"].append(len(prompt_rows))
            seen["new"] = max_new_tokens
            return super().generate(prompt_rows, max_new_tokens)

    records = students.predict(Recording({"q1": "blood", "q2": "ice", "q3": "cat", "q4": "bird"}), EXAMPLES * 10)
    assert seen == {"limit": (cfg.max_input_tokens, cfg.max_new_tokens), "batches": [cfg.batch_size, 8],
                    "new": cfg.max_new_tokens}
    assert cfg.scoring == "generate" and all("output" in r and "scores" not in r for r in records)


def test_rank_scoring_picks_the_most_likely_option():
    scores = {"q1": [-5.0, -1.0, -3.0], "q2": [-2.0, -0.5], "q3": [-9.0, -1.0, -8.0, -7.0], "q4": [-4.0, -3.0]}
    records = students.predict(HandMadeStudent({}, scores), EXAMPLES, "rank", batch_size=3)
    assert [r["prediction"] for r in records] == [1, 1, 1, 1]
    assert students.accuracy(records) == 0.5
    assert records[0]["scores"] == scores["q1"]
    with pytest.raises(SystemExit, match="--scoring='best': expected generate or rank"):
        students.predict(HandMadeStudent({}), EXAMPLES, "best")


def test_rank_sum_and_norm_disagree_on_a_hand_made_case():
    """lm-evaluation-harness's acc (summed log-likelihood) favours short options; acc_norm divides by the
    option's length in UTF-8 bytes. q1's options are 5, 5 and 3 bytes; q3's 4, 4, 3, 3."""
    scores = {"q1": [-5.0, -6.0, -4.0], "q2": [-2.0, -4.0], "q3": [-4.0, -9.0, -3.5, -7.0], "q4": [-4.0, -3.0]}
    records = students.predict(HandMadeStudent({}, scores), EXAMPLES, "rank")
    assert [r["lengths"] for r in records][0] == [5, 5, 3]
    assert [r["prediction_sum"] for r in records] == [2, 0, 2, 1]  # q1: -4 is the largest sum ("sky")
    assert [r["prediction_norm"] for r in records] == [0, 0, 0, 1]  # q1: -5/5 = -1.0 > -4/3; q3: -1.0 > -3.5/3
    assert [r["correct_sum"] for r in records] == [False, True, False, True]
    assert [r["correct_norm"] for r in records] == [False, True, True, True]
    assert [r["prediction"] for r in records] == [r["prediction_sum"] for r in records]  # rank's own is acc
    results = evaluation.split_results(records)
    assert results == {"accuracy": 0.5, "n": 4, "accuracy_sum": 0.5, "accuracy_norm": 0.75}


def test_generate_and_rank_in_one_run():
    gold = {"q1": "blood", "q2": "fire", "q3": "fish", "q4": "bird"}
    scores = {"q1": [-5.0, -6.0, -4.0], "q2": [-2.0, -4.0], "q3": [-4.0, -9.0, -3.5, -7.0], "q4": [-4.0, -3.0]}
    records = students.predict(HandMadeStudent(gold, scores), EXAMPLES, "generate,rank")
    results = evaluation.split_results(records)
    assert results == {"accuracy": 0.75, "n": 4, "accuracy_generate": 0.75, "accuracy_sum": 0.5,
                       "accuracy_norm": 0.75}
    assert records[1]["output"] == "fire" and records[1]["scores"] == scores["q2"]


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_rank_scores_equal_one_forward_per_option(kind, request):
    """One prompt pass per question (T5: the encoder once, options as decoder rows over it; decoder-only:
    the prompt prefilled once, options continuing from its cache) gives the log-likelihood of running the
    prompt and each option's tokens as one sequence, the way per-option scoring does."""
    from test_train import padded_token_losses

    student = students.load_student(str(request.getfixturevalue(f"tiny_{kind}")), torch.device("cpu"), bf16=False)
    records = students.predict(student, EXAMPLES, "rank", batch_size=3)  # padded prompts, a 3 + 1 split
    for ex, record in zip(EXAMPLES, records):
        prompt = student.fit_prompt(ex, students.ANSWER_TASK, prompts.ANSWER_PREFIX, 1024)
        options = [student.encode_option(option) for option in ex.options]
        assert record["tokens"] == [len(o) for o in options] and min(record["tokens"]) > 0
        expected = -padded_token_losses(student, [(prompt, option) for option in options])
        assert record["scores"] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-4)
        assert record["prediction"] == max(range(len(ex.options)), key=record["scores"].__getitem__)


def test_evaluate_writes_results_and_predictions(tmp_path, monkeypatch, capsys):
    gold = {ex.id: ex.answer_text for ex in EXAMPLES}
    monkeypatch.setattr(evaluation, "load_student", lambda *a, **k: HandMadeStudent(gold))
    monkeypatch.setattr(evaluation.data, "load_split", lambda dataset, split, data_dir, limit=None:
                        EXAMPLES[:limit] if split == "test" else EXAMPLES[:1])
    cfg = train.parse_flags(evaluation.EvalConfig, ["--model=some/model", "--method=finetune",
                                                    f"--out={tmp_path}", "--limit=3"])
    evaluation.evaluate(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test"] == {"accuracy": 1.0, "n": 3, "accuracy_generate": 1.0}
    assert results["valid"] == {"accuracy": 1.0, "n": 1, "accuracy_generate": 1.0}
    assert results["model"] == "some/model" and results["method"] == "finetune"
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [(p["split"], p["id"], p["correct"]) for p in predictions] == [
        ("test", "q1", True), ("test", "q2", True), ("test", "q3", True), ("valid", "q1", True)]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("obqa test: accuracy 1.0000, accuracy_generate 1.0000 (n=3)") and out[1].startswith("obqa valid: accuracy")
    assert out[-1].startswith(f"results: {tmp_path / 'results.json'}")


def test_table_is_shaped_like_table_1(tmp_path):
    accuracies = {"inference": 0.30, "finetune": 0.50, "kd": 0.48, "dss-flan-t5-xl": 0.52, "dss-llama-2": 0.55,
                  "tinyllm": 0.60}
    for run, acc in accuracies.items():
        (tmp_path / "obqa" / run).mkdir(parents=True)
        results = {"test": {"accuracy": acc, "n": 500}, "valid": {"accuracy": acc, "n": 500},
                   "model": f"out/obqa/{run}/best", "method": run.split("-")[0]}
        (tmp_path / "obqa" / run / "results.json").write_text(json.dumps(results))
    text = evaluation.table(evaluation.TableConfig(dataset="obqa", out=str(tmp_path)))
    assert text.splitlines() == [
        "obqa test, accuracy: accuracy (each run's --scoring)", "| Method | obqa |", "|---|---:|",
        "| Inference | 30.00 |", "| Fine-tune | 50.00 |", "| KD | 48.00 |",
        "| DSS-flan-t5-xl | 52.00 |", "| DSS-llama-2 | 55.00 |", "| TinyLLM | 60.00 |",
        "| Δ_FF | +20.00% (+10.00 pts) |",  # (60 - 50) / 50
        "| Δ_Distill | +9.09% (+5.00 pts) |",  # vs the best distillation baseline, DSS-llama-2
        "", "Paired differences on the test questions (points; 95% paired bootstrap interval, 10,000 resamples, "
        "seed 0; exact McNemar p; b / c = questions only the first / only the second gets right):",
        "", "accuracy:", "| comparison | Δ | 95% CI | McNemar p | b / c |", "|---|---:|---:|---:|---:|",
        f"| TinyLLM − Fine-tune | no {tmp_path}/obqa/tinyllm/predictions.jsonl or {tmp_path}/obqa/finetune/"
        "predictions.jsonl: run `make eval` | | | |",
        f"| TinyLLM − DSS-llama-2 | no {tmp_path}/obqa/tinyllm/predictions.jsonl or {tmp_path}/obqa/dss-llama-2/"
        "predictions.jsonl: run `make eval` | | | |"]
    with pytest.raises(SystemExit, match="no results in"):
        evaluation.table(evaluation.TableConfig(dataset="arc", out=str(tmp_path)))
    assert evaluation.delta(0.25, 0.0) == "n/a (+25.00 pts)"  # a baseline at 0% has no relative Δ


def write_results(folder: Path, accuracy: float, method: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"test": {"accuracy": accuracy, "n": 100},
                                                     "valid": {"accuracy": accuracy, "n": 100}, "method": method}))


def test_table_over_seeds_shows_the_mean_and_sample_standard_deviation(tmp_path):
    """SEEDS: a run folder of seed<N>/ runs is one row, its mean ± sample standard deviation (50, 60, 70 ->
    60.00 ± 10.00); Δ compares means; one seed is a single run; a results.json beside seed folders is ignored."""
    for seed, accuracy in enumerate((0.50, 0.60, 0.70)):
        write_results(tmp_path / "obqa" / "tinyllm" / f"seed{seed}", accuracy, "tinyllm")
    write_results(tmp_path / "obqa" / "tinyllm", 0.99, "tinyllm")  # an older run without SEEDS
    write_results(tmp_path / "obqa" / "finetune", 0.50, "finetune")
    write_results(tmp_path / "obqa" / "kd" / "seed0", 0.48, "kd")  # SEEDS="0"
    text = evaluation.table(evaluation.TableConfig(dataset="obqa", out=str(tmp_path)))
    assert "| TinyLLM | 60.00 ± 10.00 |" in text and "| Fine-tune | 50.00 |" in text and "| KD | 48.00 |" in text
    assert "| Δ_FF | +20.00% (+10.00 pts) |" in text
    assert "mean ± sample standard deviation (n − 1) over seeds 0, 1, 2" in text
    assert "| TinyLLM − Fine-tune | not paired: repeated over SEEDS" in text


def test_make_table_runs_each_trained_row_once_per_seed():
    """SEEDS on `make table`: a seed<N>/ run folder and --seed per seed; inference (greedy, no seed) once."""
    def dry_run(*args: str) -> str:
        return subprocess.run(["make", "-n", "--no-print-directory", "table", "TABLE_METHODS=inference tinyllm",
                               "TEACHERS=a=release:x", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout

    seeded = dry_run("SEEDS=0 1")
    for run in ("tinyllm", "dss-a"):
        for seed in (0, 1):
            assert f"--out=out/obqa/{run}/seed{seed} " in seeded and f"--model=out/obqa/{run}/seed{seed}/best" in seeded
    assert "--seed=0 " in seeded and "--seed=1 " in seeded
    # twice: the first pass checks every run (--check_only=1), the second runs it
    assert seeded.count("--method=inference") == 2 and "--out=out/obqa/inference " in seeded
    assert seeded.count("--check_only=1") == seeded.count("--check_only= ") > 0
    plain = dry_run()
    assert "--out=out/obqa/tinyllm " in plain and "seed0" not in plain


def test_pipeline_end_to_end_with_release_teachers(tiny_t5, assets, serve_folder, tmp_path):
    """`make rationales && make train && make eval`: the same three commands, with LIMIT=8, the paper's
    released rationales as teachers, the tiny T5 as STUDENT and the data from a loopback server."""
    server = serve_folder(assets / "tinyllm_release")
    env = {**os.environ, "TINYLLM_DATA_URL": server.url, "TINYLLM_HOME": str(tmp_path / "home"),
           "OMP_NUM_THREADS": "1"}
    teachers = "flan-t5-xl=release:flan-t5-xl llama-2=release:llama-2"
    common = ["--dataset=obqa", f"--data={tmp_path / 'data'}", "--limit=8", "--device=cpu"]
    run = tmp_path / "out" / "obqa" / "tinyllm"

    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    cli(str(REPO / "tinyllm.py"), "rationales", f"--teachers={teachers}", f"--cache={tmp_path / 'cache'}",
        "--splits=train", *common)
    out = cli(str(REPO / "train.py"), f"--student={tiny_t5}", f"--teachers={teachers}", "--alpha=", "--method=tinyllm",
              "--teacher=", f"--cache={tmp_path / 'cache'}", f"--out={run}", "--resume=0", "--batch_size=4",
              "--max_new_tokens=8", "--lr=1e-3", "--log_every=1", *common)
    assert "tasks answer, flan-t5-xl, llama-2" in out and "step 2/2 | answer" in out
    assert out.strip().splitlines()[-1].startswith(f"checkpoint: {run / 'best'}")
    out = cli(str(REPO / "eval.py"), f"--model={run / 'best'}", "--method=tinyllm", f"--out={run}",
              "--max_new_tokens=8", "--scoring=rank,generate", *common)
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["n"] == 8 and results["valid"]["n"] == 8
    # each accuracy by hand from the predictions and the gold answers in the data: rank's (the first scoring, so
    # `accuracy`) takes the option of highest summed log-likelihood, generate's parses the greedy text
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    counts = []
    for split in ("valid", "test"):
        gold = {ex.id: ex for ex in data.load_split("obqa", split, tmp_path / "data", limit=8)}
        records = [r for r in predictions if r["split"] == split]
        assert sorted(r["id"] for r in records) == sorted(gold)
        ranked = sum(max(range(len(r["scores"])), key=r["scores"].__getitem__) == gold[r["id"]].answer for r in records)
        generated = sum(prompts.parse_answer(r["output"], gold[r["id"]].options) == gold[r["id"]].answer
                        for r in records)
        assert results[split]["accuracy"] == results[split]["accuracy_sum"] == ranked / 8
        assert results[split]["accuracy_generate"] == generated / 8
        counts.append(ranked)
    assert 0 < sum(counts) < 16, counts  # chance level on 16 questions: counts that a wrong one would miss
    assert out.strip().splitlines()[-1].startswith(f"results: {run / 'results.json'}")
    out = cli(str(REPO / "eval.py"), "table", "--dataset=obqa", f"--out={tmp_path / 'out'}")
    assert "| TinyLLM |" in out


def test_paired_statistics_against_direct_computation():
    """Hand-made predictions on 500 questions: 40 only ours gets right, 25 only the baseline, 300 both."""
    ours = [True] * 40 + [False] * 25 + [True] * 300 + [False] * 135
    base = [False] * 40 + [True] * 25 + [True] * 300 + [False] * 135
    p, b, c = evaluation.mcnemar_exact(ours, base)
    assert (b, c) == (40, 25)
    direct = 2 * sum(math.comb(65, i) for i in range(26)) / 2 ** 65  # P(X <= 25), X ~ Binomial(65, 1/2), two-sided
    assert p == pytest.approx(direct, rel=1e-12) and 0.05 < p < 0.1
    assert evaluation.mcnemar_exact([True, False], [True, False]) == (1.0, 0, 0)  # no discordant pair
    assert evaluation.mcnemar_exact([True] * 6, [False] * 6)[0] == pytest.approx(2 / 64)  # 2 · 0.5^6

    diff, low, high = evaluation.paired_bootstrap(ours, base, resamples=4000, seed=0)
    assert diff == pytest.approx(3.0)  # (40 - 25) / 500
    d = np.array(ours, float) - np.array(base, float)
    half = 1.96 * d.std() / np.sqrt(len(d)) * 100  # the normal approximation of the same interval
    assert low < diff < high and (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert evaluation.paired_bootstrap(ours, base, 4000, 0) == (diff, low, high)  # fixed seed: reproducible
    assert evaluation.paired_bootstrap(ours, ours, 2000, 0) == (0.0, 0.0, 0.0)
    assert evaluation.paired_bootstrap([True] * 9, [False] * 9, 2000, 0) == (100.0, 100.0, 100.0)


def test_table_metric_columns_and_paired_rows(tmp_path):
    """Runs with rank and generate metrics: --metric picks the columns, the paired rows pair predictions by id."""
    correct = {"finetune": [1, 1, 0, 0, 1, 0], "dss-t1": [1, 0, 1, 0, 0, 0], "tinyllm": [1, 1, 1, 1, 0, 0]}
    for run, flags in correct.items():
        folder = tmp_path / "obqa" / run
        folder.mkdir(parents=True)
        acc = sum(flags) / len(flags)
        split = {"accuracy": acc, "n": 6, "accuracy_sum": acc, "accuracy_norm": 0.5, "accuracy_generate": 0.25}
        (folder / "results.json").write_text(json.dumps(
            {"test": split, "valid": split, "method": run.split("-")[0], "eval_seconds": 60.0}))
        (folder / "train.json").write_text(json.dumps({"seconds": 3600.0}))
        records = [{"split": "test", "id": f"q{i}", "correct": bool(f), "correct_sum": bool(f),
                    "correct_norm": i < 3, "correct_generate": i == 0} for i, f in reversed(list(enumerate(flags)))]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = evaluation.table(evaluation.TableConfig(dataset="obqa", out=str(tmp_path),
                                                   metric="accuracy_sum,accuracy_norm", resamples=2000))
    lines = text.splitlines()
    assert lines[0] == ("obqa test, accuracy_sum: rank, summed log-likelihood (acc); "
                        "accuracy_norm: rank, per byte (acc_norm)")
    assert lines[1:5] == ["| Method | accuracy_sum | accuracy_norm | wall time |", "|---|---:|---:|---:|",
                          "| Fine-tune | 50.00 | 50.00 | 1:01:00 |", "| DSS-t1 | 33.33 | 50.00 | 1:01:00 |"]
    assert "| Δ_FF | +33.33% (+16.67 pts) | +0.00% (+0.00 pts) |  |" in lines
    sum_rows = lines[lines.index("accuracy_sum:") + 3:lines.index("accuracy_sum:") + 5]
    assert sum_rows[0].startswith("| TinyLLM − Fine-tune | +16.67 | [") and sum_rows[0].endswith("| 1 | 2 / 1 |")
    assert sum_rows[1].startswith("| TinyLLM − DSS-t1 | +33.33 |") and sum_rows[1].endswith(" / 0 |")
    norm_rows = lines[lines.index("accuracy_norm:") + 3:]
    assert norm_rows[0] == "| TinyLLM − Fine-tune | +0.00 | [+0.00, +0.00] | 1 | 0 / 0 |"
    with pytest.raises(SystemExit, match="--metric=acc: 'acc' is not one of"):
        evaluation.table(evaluation.TableConfig(dataset="obqa", out=str(tmp_path), metric="acc"))
    # space-separated, as the flag's rule accepts it: the same table
    assert evaluation.table(evaluation.TableConfig(dataset="obqa", out=str(tmp_path),
                                                   metric="accuracy_sum accuracy_norm", resamples=2000)) == text


# ---------------------------------------------------------------------------------------------------
# the study's pooled statistics, against direct computation on hand-made differences

def test_stratified_bootstrap_keeps_each_dataset_whole():
    """Each dataset is resampled within itself: with a constant difference inside each dataset every resample
    has the same pooled mean, so the interval is that mean exactly (10 questions at +1, 30 at 0: 25 points);
    resampling the 40 questions together would put it anywhere from 0 to 100."""
    strata = [np.ones(10), np.zeros(30)]
    assert evaluation.bootstrap_interval(strata, resamples=2000) == pytest.approx((25.0, 25.0))
    low, high = evaluation.bootstrap_interval([np.concatenate(strata)], resamples=2000)
    assert low < 20 and high > 30  # the unstratified interval of the same questions


def test_stratified_bootstrap_matches_the_normal_interval():
    """Large strata of seed-averaged differences: the percentile interval is the pooled mean ± 1.96 standard
    errors, SE = sqrt(Σ_k n_k var_k) / N (the variance of a stratified mean), within a tenth of a point."""
    rng = np.random.default_rng(1)
    strata = [rng.choice([-1, -1 / 3, 0, 1 / 3, 1], size=n, p=p)
              for n, p in ((1500, [.1, .2, .4, .2, .1]), (2500, [.05, .15, .4, .25, .15]))]
    total = sum(len(d) for d in strata)
    mean = sum(d.sum() for d in strata) / total
    se = math.sqrt(sum(len(d) * d.var() for d in strata)) / total
    low, high = evaluation.bootstrap_interval(strata, resamples=10_000)
    assert low == pytest.approx(100 * (mean - 1.96 * se), abs=0.1)
    assert high == pytest.approx(100 * (mean + 1.96 * se), abs=0.1)
    # one stratum: the paired bootstrap of the table's comparisons, the same numbers
    ours, base = rng.random(300) < 0.6, rng.random(300) < 0.5
    diff, low1, high1 = evaluation.paired_bootstrap(list(ours), list(base), seed=3)
    assert (low1, high1) == evaluation.bootstrap_interval([ours.astype(float) - base], seed=3)
    assert diff == pytest.approx(100 * (ours.mean() - base.mean()))


def test_sign_flip_p_against_every_sign_pattern_and_mcnemar():
    """The permutation p of 12 hand-made differences equals the exact one over all 2^12 sign patterns (within
    Monte Carlo error); with one seed (differences of ±1 and 0) it is the exact McNemar p."""
    diff = np.array([1, 2 / 3, 1, -1 / 3, 1, 0, 1 / 3, 1, -2 / 3, 1, 2 / 3, 0])
    patterns = np.array([[1 - 2 * ((k >> i) & 1) for i in range(len(diff))] for k in range(2 ** len(diff))])
    exact = float((np.abs(patterns @ diff) >= abs(diff.sum()) - 1e-9).mean())
    assert 0.005 < exact < 0.2  # a case where the answer is neither 0 nor 1
    assert evaluation.sign_flip_p(diff, resamples=40_000) == pytest.approx(exact, abs=0.01)
    ours = [True] * 14 + [False] * 4 + [True] * 30
    base = [False] * 14 + [True] * 4 + [True] * 30
    p, b, c = evaluation.mcnemar_exact(ours, base)
    assert (b, c) == (14, 4)
    flips = evaluation.sign_flip_p(np.array(ours, float) - np.array(base, float), resamples=40_000)
    assert flips == pytest.approx(p, abs=0.006)


# the seed-aware statistics: the trained runs resampled too (each method's seeds), not only the questions

def disagreeing_seeds(n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """3 seeds per method on the same n questions: fine-tuning's seeds all alike; TinyLLM's seed 0 right on 6
    more questions, seeds 1 and 2 exactly fine-tuning's. Per-seed differences +6, 0, 0 points."""
    base = (np.arange(n) % 2 == 0).astype(float)  # half right
    first = np.tile(base, (3, 1))
    last = first.copy()
    last[0, 1:13:2] = 1.0  # six wrong answers made right in seed 0 only
    return first, last


def test_seed_bootstrap_widens_when_seeds_disagree_and_contains_zero():
    """Per-seed differences +6, 0, 0: holding the runs fixed, the question bootstrap sees 6 questions at +1/3
    and an interval above 0; resampling the seeds, TinyLLM draws no seed 0 in (2/3)^3 = 30% of resamples, so
    the seed-aware interval reaches 0 (it contains it) and is wider. Resampling the questions alone (the seed
    draw dropped) fails this."""
    first, last = disagreeing_seeds()
    assert [100 * (last[k].mean() - first[k].mean()) for k in range(3)] == pytest.approx([6.0, 0.0, 0.0])
    diff = last.mean(axis=0) - first.mean(axis=0)
    fixed_low, fixed_high = evaluation.bootstrap_interval([diff], resamples=10_000)
    low, high = evaluation.seed_bootstrap_interval([(first, last)], resamples=10_000)
    assert fixed_low > 0 and fixed_high < 6.0
    assert low <= 0 <= high and high - low > fixed_high - fixed_low
    assert low == 0.0  # no resample goes below: no seed of TinyLLM is worse than fine-tuning on any question
    assert high > fixed_high  # TinyLLM drawn as seed 0 three times: up to 6 points and beyond with the questions


def test_seed_bootstrap_equals_the_question_bootstrap_when_seeds_agree():
    """Every seed of a method gives the same answers: drawing seeds changes nothing, and the two-level interval
    is the question-only one within bootstrap error (different random draws), including across datasets."""
    rng = np.random.default_rng(7)
    strata, diffs = [], []
    for n in (400, 300):
        first, last = (np.tile((rng.random(n) < p).astype(float), (3, 1)) for p in (0.45, 0.55))
        strata.append((first, last))
        diffs.append(last[0] - first[0])
    seed_aware = evaluation.seed_bootstrap_interval(strata, resamples=10_000)
    fixed = evaluation.bootstrap_interval(diffs, resamples=10_000)
    assert seed_aware == pytest.approx(fixed, abs=0.4)  # both about ±3.6 points wide; Monte Carlo error ~0.1


def test_seed_permutation_p_is_the_enumeration_by_hand():
    """Two datasets with 2 seeds per method: C(4, 2) = 6 relabellings each, 36 in all. By hand, from the runs'
    accuracies: obqa (4 questions) fine-tuning 0.25, 0.5, TinyLLM 0.75, 1.0; arc (2 questions) fine-tuning
    0.5, 0.5, TinyLLM 0.5, 1.0. The observed pooled difference is (4 · 0.5 + 2 · 0.25) / 6 = 0.41667; a
    relabelling's is (4 · d_obqa + 2 · d_arc) / 6, with d the mean of the runs labelled TinyLLM minus the others.
    """
    obqa = (np.array([[1, 0, 0, 0], [1, 1, 0, 0]], float), np.array([[1, 1, 1, 0], [1, 1, 1, 1]], float))
    arc = (np.array([[1, 0], [0, 1]], float), np.array([[1, 0], [1, 1]], float))
    p, relabellings = evaluation.seed_permutation_p([obqa, arc])
    # obqa's accuracies [0.25, 0.5, 0.75, 1.0]: the 6 ways to pick two as "TinyLLM" give d = ±0.5, ±0.25, 0, 0
    d_obqa = [0.5, 0.25, 0.0, 0.0, -0.25, -0.5]
    # arc's accuracies [0.5, 0.5, 0.5, 1.0]: the pair holding 1.0 as "TinyLLM" (3 ways) d = +0.25, else -0.25
    d_arc = [0.25, 0.25, 0.25, -0.25, -0.25, -0.25]
    pooled = [(4 * a + 2 * b) / 6 for a in d_obqa for b in d_arc]
    observed = (4 * 0.5 + 2 * 0.25) / 6
    by_hand = sum(abs(v) >= observed - 1e-12 for v in pooled) / 36  # 0.41667 and 0.33333 ... only ±0.41667 reach
    assert relabellings == 36 and by_hand == 6 / 36
    assert p == pytest.approx(by_hand)
    # the same case with a negative effect (the methods swapped) has the same two-sided p
    assert evaluation.seed_permutation_p([(obqa[1], obqa[0]), (arc[1], arc[0])]) == (pytest.approx(by_hand), 36)


def test_seed_permutation_p_random_draws_agree_with_the_enumeration(monkeypatch):
    """Past EXACT_RELABELLINGS the relabellings are drawn at random: the same p within Monte Carlo error, and
    never 0 ((hits + 1) / (draws + 1)). With one seed per method no relabelling differs in size: p = 1."""
    rng = np.random.default_rng(4)
    strata = [tuple((rng.random((4, 30)) < p).astype(float) for p in (0.45, 0.55)) for _ in range(2)]
    exact, relabellings = evaluation.seed_permutation_p(strata)
    assert relabellings == 70 * 70 and 0.05 < exact < 0.5  # a case where p is neither tiny nor 1
    monkeypatch.setattr(evaluation, "EXACT_RELABELLINGS", 100)
    drawn, none = evaluation.seed_permutation_p(strata, resamples=20_000)
    assert none == 0 and drawn == pytest.approx(exact, abs=0.01)
    one_seed = [(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]))]
    assert evaluation.seed_permutation_p(one_seed) == (1.0, 2)


def test_std_ratio_interval_by_direct_computation():
    """Identical spread: the ratio's interval holds 1; a method ten times steadier: the whole interval far
    below 1."""
    rng = np.random.default_rng(5)
    noisy = rng.normal(40, 4, 10)
    low, high = evaluation.std_ratio_interval(noisy, noisy + 1.0)  # the same runs shifted: identical spread
    assert low < 1 < high
    steady = 40 + (noisy - 40) / 10
    low, high = evaluation.std_ratio_interval(noisy, steady)
    assert high < 0.2 and low > 0.05


def test_resampling_statistics_exactly_on_degenerate_cases():
    """Cases whose answer is known exactly, so that an off-by-one in a hit count, a chunk or a draw shows:
    all-zero differences tie with every sign flip (p = 1 exactly); constant differences give the interval
    (c, c) exactly, also in a resample count that is not a multiple of the 1,000 drawn at a time; a stratum whose
    only non-zero difference is question 0 has an interval reaching above 0."""
    for resamples in (7, 2500):
        assert evaluation.sign_flip_p(np.zeros(5), resamples) == 1.0
        assert evaluation.bootstrap_interval([np.full(4, 0.5), np.full(3, 0.5)], resamples) == (50.0, 50.0)
        first, last = np.zeros((3, 4)), np.full((2, 4), 0.25)
        assert evaluation.seed_bootstrap_interval([(first, last)], resamples) == pytest.approx((25.0, 25.0), abs=1e-12)
    only_first = np.array([1.0, 0.0, 0.0, 0.0])
    assert evaluation.bootstrap_interval([only_first], 2000)[1] > 0
    firsts, lasts = np.zeros((2, 4)), np.tile(only_first, (2, 1))
    assert evaluation.seed_bootstrap_interval([(firsts, lasts)], 2000)[1] > 0


def test_the_defaults_are_10000_resamples_from_seed_0(monkeypatch):
    """Each resampling statistic called without its last two arguments is the call with (10_000, 0), on data fine
    enough that another count or seed moves the result (checked, so the equalities can fail). The paired
    bootstrap of two runs' correct/incorrect (a coarse grid of values) hands its arguments to bootstrap_interval."""
    rng = np.random.default_rng(11)
    diff = rng.normal(0.1, 1.0, 300)  # seed-averaged differences take many values: no two resamplings tie
    strata = [(rng.random((3, 200)), rng.random((3, 200)))]  # any scores in [0, 1], not only 0 and 1
    cases = [(evaluation.sign_flip_p, (diff,)), (evaluation.bootstrap_interval, ([diff],)),
             (evaluation.seed_bootstrap_interval, (strata,)),
             (evaluation.std_ratio_interval, (rng.normal(35, 2, 5), rng.normal(37, 1, 4)))]
    for statistic, args in cases:
        default = statistic(*args)
        assert default == statistic(*args, 10_000, 0), statistic.__name__
        assert default != statistic(*args, 10_001, 0) and default != statistic(*args, 10_000, 1), statistic.__name__
    calls = []
    monkeypatch.setattr(evaluation, "bootstrap_interval", lambda *args: calls.append(args[1:]) or (0.0, 0.0))
    evaluation.paired_bootstrap([True, False], [False, False])
    assert calls == [(10_000, 0)]


def hand_permutation_case() -> list[tuple[np.ndarray, np.ndarray]]:
    """One dataset, 2 seeds per method, 2 questions: fine-tuning's runs both 0%, TinyLLM's both 100%. Of the
    C(4, 2) = 6 ways to label two of the four runs TinyLLM, two give |difference| = 100 points (the observed
    labelling and its mirror) and four give 0: p = 2/6 exactly."""
    return [(np.zeros((2, 2)), np.ones((2, 2)))]


def test_seed_permutation_p_exactly_in_both_branches(monkeypatch):
    """The exact branch on the hand case (1/3) and at its threshold; the random branch draws valid relabellings
    (k of the S runs each time: about 1/3, where shuffling all draws together lands near 1/8), counts
    (hits + 1) / (draws + 1) exactly (a case where every relabelling reaches the observed size: 1), and is
    reproducible from its seed, 0 by default, with 10,000 draws by default."""
    strata = hand_permutation_case()
    assert evaluation.seed_permutation_p(strata) == (pytest.approx(1 / 3, abs=1e-15), 6)
    monkeypatch.setattr(evaluation, "EXACT_RELABELLINGS", 6)  # exactly at the threshold: still enumerated
    assert evaluation.seed_permutation_p(strata) == (pytest.approx(1 / 3, abs=1e-15), 6)
    monkeypatch.setattr(evaluation, "EXACT_RELABELLINGS", 5)
    p, relabellings = evaluation.seed_permutation_p(strata, 20_000, 5)
    assert relabellings == 0 and p == pytest.approx(1 / 3, abs=0.01)
    assert evaluation.seed_permutation_p(strata, 20_000, 5) == (p, 0)
    default = evaluation.seed_permutation_p(strata)
    assert default == evaluation.seed_permutation_p(strata, 10_000, 0)
    assert default != evaluation.seed_permutation_p(strata, 10_001, 0)
    assert default != evaluation.seed_permutation_p(strata, 10_000, 1)
    # one run per method: both labellings give the same size, so every draw is a hit and p is 1, exactly
    one_seed = [(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]))]
    monkeypatch.setattr(evaluation, "EXACT_RELABELLINGS", 1)
    assert evaluation.seed_permutation_p(one_seed, 999) == (1.0, 0)


def test_std_ratio_interval_against_a_plain_loop():
    """The interval by a plain loop over the same draws (each method's runs drawn with replacement, first's draws
    then last's): the sample standard deviations (n - 1) of runs of unequal counts, their ratio (infinite when
    first's drawn runs are alike, dropped when both are), and the 2.5th and 97.5th percentiles as order
    statistics (the smallest value with at least that share of the ratios at or below it). No warning is
    printed for either division by zero."""
    def by_hand(first: np.ndarray, last: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
        rng = np.random.default_rng(seed)
        first_draws = rng.integers(0, len(first), (resamples, len(first)))
        last_draws = rng.integers(0, len(last), (resamples, len(last)))
        ratios = []
        for i, j in zip(first_draws, last_draws):
            a, b = statistics.stdev(first[i]), statistics.stdev(last[j])
            if a or b:
                ratios.append(b / a if a else math.inf)
        ratios.sort()
        return tuple(ratios[math.ceil(q * len(ratios)) - 1] for q in (0.025, 0.975))

    first, last = np.array([31.0, 32.5, 33.0, 35.5, 38.25]), np.array([36.0, 36.5, 37.75, 38.0])
    low, high = evaluation.std_ratio_interval(first, last, 3000, 2)
    assert (low, high) == pytest.approx(by_hand(first, last, 3000, 2), rel=1e-12)
    assert 0 < low < high < math.inf  # both ends are ratios of drawn spreads, which the n - 1 and the order set
    alike = np.array([40.0, 40.0, 41.0])  # some draws all 40: x / 0 and 0 / 0 both happen
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluation.std_ratio_interval(alike, alike, 3000, 2) == by_hand(alike, alike, 3000, 2)
