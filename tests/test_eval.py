"""eval.py: accuracy from hand-made outputs, rank scoring, results files, the Table-1 table, and the
whole pipeline (rationales -> train -> eval, the three CLIs the Makefile runs) on tiny random models."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import eval as evaluation
import prompts
import train

REPO = Path(__file__).resolve().parent.parent


EXAMPLES = [data.Example("q1", "Which is red?", ("grass", "blood", "sky"), 1),
            data.Example("q2", "Which is cold?", ("ice", "fire"), 0),
            data.Example("q3", "Which swims?", ("fish", "rock", "cat", "dog"), 0),
            data.Example("q4", "Which flies?", ("stone", "bird"), 1)]


class HandMadeStudent(train.Student):
    """A student whose greedy outputs and option scores are given by hand."""

    kind = "hand"

    def __init__(self, outputs: dict[str, str], scores: dict[str, list[float]] | None = None):
        super().__init__(torch.nn.Linear(1, 1), tokenizer=None, device=torch.device("cpu"), bf16=False)
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

    def log_likelihood(self, rows):
        out, seen = [], {}
        for prompt, _ in rows:
            ex = EXAMPLES[prompt[0]]
            k = seen[ex.id] = seen.get(ex.id, -1) + 1
            out.append(self.scores[ex.id][k])
        return torch.tensor(out)


def test_accuracy_of_hand_made_outputs():
    student = HandMadeStudent({"q1": "blood", "q2": "fire", "q3": "fish", "q4": "I do not know"})
    records = train.predict(student, EXAMPLES, "generate")
    assert [r["prediction"] for r in records] == [1, 1, 0, None]
    assert [r["correct"] for r in records] == [True, False, True, False]
    assert train.accuracy(records) == 0.5
    assert [r["id"] for r in records] == ["q1", "q2", "q3", "q4"]  # input order, whatever the batching
    assert train.predict(student, EXAMPLES, "generate", batch_size=1) == records


def test_rank_scoring_picks_the_most_likely_option():
    scores = {"q1": [-5.0, -1.0, -3.0], "q2": [-2.0, -0.5], "q3": [-9.0, -1.0, -8.0, -7.0], "q4": [-4.0, -3.0]}
    records = train.predict(HandMadeStudent({}, scores), EXAMPLES, "rank", batch_size=3)
    assert [r["prediction"] for r in records] == [1, 1, 1, 1]
    assert train.accuracy(records) == 0.5
    assert records[0]["scores"] == scores["q1"]
    with pytest.raises(SystemExit, match="--scoring='best': expected generate or rank"):
        train.predict(HandMadeStudent({}), EXAMPLES, "best")


def test_rank_scores_are_log_likelihoods_of_the_answer_text(tiny_t5):
    student = train.load_student(str(tiny_t5), torch.device("cpu"), bf16=False)
    records = train.predict(student, EXAMPLES[:2], "rank")
    for ex, record in zip(EXAMPLES, records):
        prompt = student.fit_prompt(ex, prompts.ANSWER_PREFIX, 1024)
        for option, score in enumerate(record["scores"]):
            target = student.encode_target(ex.options[option])
            batch = student.collate([(prompt, target)])
            expected = -student.token_losses(batch).sum().item()
            assert score == pytest.approx(expected, rel=1e-4, abs=1e-4)
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
    assert results["test"] == {"accuracy": 1.0, "n": 3} and results["valid"] == {"accuracy": 1.0, "n": 1}
    assert results["model"] == "some/model" and results["method"] == "finetune"
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [(p["split"], p["id"], p["correct"]) for p in predictions] == [
        ("test", "q1", True), ("test", "q2", True), ("test", "q3", True), ("valid", "q1", True)]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("obqa test: accuracy 1.0000 (3/3)") and out[1].startswith("obqa valid: accuracy")
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
        "| Method | obqa |", "|---|---:|",
        "| Inference | 30.00 |", "| Fine-tune | 50.00 |", "| KD | 48.00 |",
        "| DSS-flan-t5-xl | 52.00 |", "| DSS-llama-2 | 55.00 |", "| TinyLLM | 60.00 |",
        "| Δ_FF | +20.00% (+10.00 pts) |",  # (60 - 50) / 50
        "| Δ_Distill | +9.09% (+5.00 pts) |"]  # vs the best distillation baseline, DSS-llama-2
    with pytest.raises(SystemExit, match="no results in"):
        evaluation.table(evaluation.TableConfig(dataset="arc", out=str(tmp_path)))
    assert evaluation.delta(0.25, 0.0) == "n/a (+25.00 pts)"  # a baseline at 0% has no relative Δ


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
              "--max_new_tokens=8", *common)
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["n"] == 8 and results["valid"]["n"] == 8 and 0 <= results["test"]["accuracy"] <= 1
    assert out.strip().splitlines()[-1].startswith(f"results: {run / 'results.json'}")
    out = cli(str(REPO / "eval.py"), "table", "--dataset=obqa", f"--out={tmp_path / 'out'}")
    assert "| TinyLLM |" in out
