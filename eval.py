"""Accuracy of a student (or any model) on test and valid, and the paper's Table 1 from the results.

    python eval.py --dataset=obqa --model=out/obqa/tinyllm/best --method=tinyllm --data=data --out=out/obqa/tinyllm
    python eval.py table --dataset=obqa --out=out

Answers are generated greedily from the answer prompt (p_A ⊕ question ⊕ options) and mapped to an
option with prompts.parse_answer: the paper's exact-match accuracy (its code compares the decoded text
with the answer text). `--scoring=rank` instead picks the option whose answer text has the highest
log-likelihood (summed over its tokens). Any model source works, so teachers are evaluated the same way
(`--method=teacher`, one run folder per teacher, e.g. out/obqa/teacher-flan-t5-xl).

Writes OUT/predictions.jsonl (one record per example and split) and OUT/results.json =
{"test": {"accuracy", "n"}, "valid": {...}, "model", "method", ...}.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import data
from tinyllm import parse_flags, resolve_device
from train import accuracy, bf16_supported, load_student, predict


@dataclass
class EvalConfig:
    dataset: str = "obqa"
    model: str = ""  # hub id or folder (a run's best/, the student for inference, a teacher)
    method: str = ""  # the row this is in the table: inference, finetune, kd, dss, lora, tinyllm, teacher
    data: str = "data"
    out: str = ""  # the run folder results go into
    limit: int = 0  # first N examples of each split (0 = all)
    device: str = "auto"
    scoring: str = "generate"  # generate (the paper's) | rank
    splits: str = "test,valid"
    batch_size: int = 32
    max_input_tokens: int = 1024
    max_new_tokens: int = 64
    bf16: int = 1


@dataclass
class TableConfig:
    dataset: str = "obqa"
    out: str = "out"


def write_atomic(path: Path, text: str) -> None:
    """Temp file in the same folder, fsync, rename: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def evaluate(cfg: EvalConfig) -> dict:
    if not cfg.model or not cfg.out:
        raise SystemExit("eval.py needs --model (hub id or folder) and --out (the run folder for results)")
    splits = [s.strip() for s in cfg.splits.split(",") if s.strip()]
    for split in splits:
        if split not in data.SPLITS:
            raise SystemExit(f"--splits: unknown split {split!r} (splits: {', '.join(data.SPLITS)})")
    device = torch.device(resolve_device(cfg.device))
    # Inference only: bf16 weights where the device computes in bf16 natively, fp32 elsewhere.
    dtype = torch.bfloat16 if cfg.bf16 and bf16_supported(device) else torch.float32
    student = load_student(cfg.model, device, bool(cfg.bf16), dtype)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    lines = []
    for split in splits:
        examples = data.load_split(cfg.dataset, split, cfg.data, limit=cfg.limit or None)
        records = predict(student, examples, cfg.scoring, cfg.batch_size, cfg.max_input_tokens, cfg.max_new_tokens)
        results[split] = {"accuracy": accuracy(records), "n": len(records)}
        lines += [json.dumps({"split": split, **record}) for record in records]
        print(f"{cfg.dataset} {split}: accuracy {results[split]['accuracy']:.4f} "
              f"({sum(r['correct'] for r in records)}/{len(records)}) {cfg.model}", flush=True)
    results.update(model=cfg.model, method=cfg.method, dataset=cfg.dataset, scoring=cfg.scoring)
    write_atomic(out / "predictions.jsonl", "".join(line + "\n" for line in lines))
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    print(f"results: {out / 'results.json'} (predictions: {out / 'predictions.jsonl'})")
    return results


# ---------------------------------------------------------------------------------------------------
# Table 1: Inference, Fine-tune, KD, DSS-<teacher>..., TinyLLM, then Δ_FF and Δ_Distill

ROW_NAMES = {"teacher": "Teacher", "inference": "Inference", "finetune": "Fine-tune", "lora": "LoRA",
             "kd": "KD", "dss": "DSS", "tinyllm": "TinyLLM"}
DISTILLATION = ("kd", "dss")  # the distillation baselines Δ_Distill compares with


def read_results(out: Path, dataset: str) -> list[tuple[str, str, float]]:
    """(run folder name, method, test accuracy) of every OUT/<dataset>/*/results.json, in Table 1's order."""
    rows = []
    for path in sorted((out / dataset).glob("*/results.json")):
        try:
            results = json.loads(path.read_text())
            rows.append((path.parent.name, results.get("method") or path.parent.name, results["test"]["accuracy"]))
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}: not an eval.py results file ({e!r}); run `make eval` again") from None
    order = list(ROW_NAMES)
    return sorted(rows, key=lambda r: (order.index(r[1]) if r[1] in order else len(order), r[0]))


def row_label(run: str, method: str) -> str:
    """DSS-<teacher> and Teacher rows are told apart by their run folder (the Makefile's RUN)."""
    if method in ("dss", "teacher") and "-" in run:
        return f"{ROW_NAMES[method]}-{run.split('-', 1)[1]}"
    if method == "tinyllm" and run != "tinyllm":
        return f"TinyLLM ({run})"  # an ablation: a teacher subset, or rationales without in-context examples
    return ROW_NAMES.get(method, run)


def delta(ours: float, base: float) -> str:
    """Relative improvement in percent, as the paper's Δ rows, and the absolute points beside it."""
    points = f"{(ours - base) * 100:+.2f} pts"
    return f"{(ours - base) / base * 100:+.2f}% ({points})" if base else f"n/a ({points})"  # 0 accuracy: no ratio


def table(cfg: TableConfig) -> str:
    rows = read_results(Path(cfg.out), cfg.dataset)
    if not rows:
        raise SystemExit(f"no results in {Path(cfg.out) / cfg.dataset}/*/results.json: run `make table` or "
                         "`make train eval METHOD=...` first")
    lines = [f"| Method | {cfg.dataset} |", "|---|---:|"]
    lines += [f"| {row_label(run, method)} | {acc * 100:.2f} |" for run, method, acc in rows]
    accuracy_of = {run: acc for run, _, acc in rows}
    ours = accuracy_of.get("tinyllm")
    finetune = next((acc for run, method, acc in rows if method == "finetune"), None)
    distill = [acc for _, method, acc in rows if method in DISTILLATION]
    if ours is not None and finetune is not None:
        lines.append(f"| Δ_FF | {delta(ours, finetune)} |")
    if ours is not None and distill:
        lines.append(f"| Δ_Distill | {delta(ours, max(distill))} |")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str]) -> None:
    if argv and argv[0] == "table":
        table(parse_flags(TableConfig, argv[1:]))
    else:
        evaluate(parse_flags(EvalConfig, argv))


if __name__ == "__main__":
    main(sys.argv[1:])
