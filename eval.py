"""Accuracy of a student (or any model) on test and valid, and the paper's Table 1 from the results.

    python eval.py --dataset=obqa --model=out/obqa/tinyllm/best --method=tinyllm --data=data --out=out/obqa/tinyllm
    python eval.py table --dataset=obqa --out=out
    python eval.py report --dataset=obqa --out=out   # OUT/obqa/report.md: every table and figure, with its command

Answers are generated greedily from the answer prompt (p_A ⊕ question ⊕ options) and mapped to an
option with prompts.parse_answer: the paper's exact-match accuracy (its code compares the decoded text
with the answer text). `--scoring=rank` instead picks the option whose answer text has the highest
log-likelihood (summed over its tokens). Any model source works, so teachers are evaluated the same way
(`--method=teacher`, one run folder per teacher, e.g. out/obqa/teacher-flan-t5-xl).

Writes OUT/predictions.jsonl (one record per example and split) and OUT/results.json =
{"test": {"accuracy", "n"}, "valid": {...}, "model", "method", ...}. A run repeated over SEEDS is a folder
of seed<N>/ run folders; tables show it as the mean ± the sample standard deviation over its seeds.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import data
from tinyllm import (Progress, UserError, atomic_write, format_seconds, interrupt_note, number, parse_flags,
                     resolve_device, run_main)
from train import accuracy, bf16_supported, load_student, parse_scoring, predict


@dataclass
class EvalConfig:
    dataset: str = "obqa"  # obqa | arc | piqa | riddle | pubmedqa | bioasq
    model: str = ""  # hub id or folder (a run's best/, the student for inference, a teacher)
    method: str = ""  # the row this is in the table: inference, finetune, kd, dss, lora, tinyllm, teacher
    data: str = "data"  # the datasets' folder (downloaded and checksummed on first use)
    out: str = ""  # the run folder results go into
    limit: int = 0  # first N examples of each split (0 = all)
    device: str = "auto"  # auto = cuda when available, else cpu
    scoring: str = "generate"  # generate (the paper's) | rank (lm-eval's log-likelihood) | generate,rank (both)
    splits: str = "test,valid"  # comma-separated, of test, valid
    batch_size: int = 32  # questions per forward pass
    max_input_tokens: int = 1024  # longer inputs lose words from the start of the question
    max_new_tokens: int = 64  # the longest generated answer, in tokens
    bf16: int = 1  # bf16 weights where the device computes bf16 natively (fp32 elsewhere)
    chat: int = -1  # decoder-only student: 1 = chat template, 0 = plain; -1 = the checkpoint's format, else default
    boundary: int = -1  # decoder-only student: 1 = the input ends with "Answer:"; -1 = the checkpoint's, else 1
    task_prefix: int = -1  # decoder-only student: 1 = p_A ("predict: ") at the start too; -1 = the checkpoint's, else 0


@dataclass
class TableConfig:
    dataset: str = "obqa"  # obqa | arc | piqa | riddle | pubmedqa | bioasq
    out: str = "out"  # reads OUT/<dataset>/*/results.json, writes OUT/<dataset>/table.md
    metric: str = "accuracy"  # column(s), comma-separated: accuracy | accuracy_generate | accuracy_sum | accuracy_norm
    resamples: int = 10000  # paired bootstrap resamples of the test questions
    seed: int = 0  # of the bootstrap


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one (tinyllm.atomic_write: temp file, fsync, rename)."""
    atomic_write(path, text.encode("utf-8"))


METRICS = {"accuracy_generate": "correct_generate", "accuracy_sum": "correct_sum", "accuracy_norm": "correct_norm"}


def split_results(records: list[dict], scorings: list[str]) -> dict:
    """accuracy (the first scoring's: generate, or rank's summed log-likelihood, lm-eval's acc), n, and per
    scoring its own: accuracy_generate; accuracy_sum and accuracy_norm (per UTF-8 byte, lm-eval's acc_norm)."""
    results = {"accuracy": accuracy(records), "n": len(records)}
    for metric, key in METRICS.items():
        if records and key in records[0]:
            results[metric] = accuracy(records, key)
    return results


def evaluate(cfg: EvalConfig) -> dict:
    if not cfg.model or not cfg.out:
        raise UserError("eval.py needs --model (hub id or folder) and --out (the run folder for results)")
    splits = [s.strip() for s in cfg.splits.split(",") if s.strip()]
    for split in splits:
        if split not in data.SPLITS:
            raise UserError(f"--splits: unknown split {split!r} (splits: {', '.join(data.SPLITS)})")
    device = torch.device(resolve_device(cfg.device))
    # Inference only: bf16 weights where the device computes in bf16 natively, fp32 elsewhere.
    dtype = torch.bfloat16 if cfg.bf16 and bf16_supported(device) else torch.float32
    scorings = parse_scoring(cfg.scoring)
    student = load_student(cfg.model, device, bool(cfg.bf16), dtype, chat=cfg.chat, boundary=cfg.boundary,
                           task_prefix=cfg.task_prefix)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    lines = []
    start = time.perf_counter()
    for split in splits:
        examples = data.load_split(cfg.dataset, split, cfg.data, limit=cfg.limit or None)
        progress = Progress(f"{cfg.dataset} {split}", len(examples), unit="examples")
        records = predict(student, examples, cfg.scoring, cfg.batch_size, cfg.max_input_tokens, cfg.max_new_tokens,
                          progress=progress.update)
        results[split] = split_results(records, scorings)
        lines += [json.dumps({"split": split, **record}) for record in records]
        print(f"{cfg.dataset} {split}: " + ", ".join(f"{metric} {value:.4f}" for metric, value in results[split].items()
                                                     if metric.startswith("accuracy"))
              + f" (n={len(records)}) {cfg.model}", flush=True)
    results.update(model=cfg.model, method=cfg.method, dataset=cfg.dataset, scoring=cfg.scoring,
                   format=student.input_format(), eval_seconds=round(time.perf_counter() - start, 1))
    write_atomic(out / "predictions.jsonl", "".join(line + "\n" for line in lines))
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    print(f"results: {out / 'results.json'} (predictions: {out / 'predictions.jsonl'})")
    return results


# ---------------------------------------------------------------------------------------------------
# Table 1: Inference, Fine-tune, KD, DSS-<teacher>..., TinyLLM, then Δ_FF and Δ_Distill

ROW_NAMES = {"teacher": "Teacher", "inference": "Inference", "lora": "LoRA", "finetune": "Fine-tune",
             "kd": "KD", "dss": "DSS", "tinyllm": "TinyLLM"}
DISTILLATION = ("kd", "dss")  # the distillation baselines Δ_Distill compares with


@dataclass
class Run:
    """One row of the table: a run folder with its results.json (and train.json when it was trained), or
    one repeated over SEEDS: then seed_runs holds a Run per seed<N>/ folder and its numbers are their mean."""
    name: str  # the folder, e.g. dss-llama-2
    method: str
    results: dict
    folder: Path
    seed_runs: list[Run] = field(default_factory=list)

    def score(self, metric: str, split: str = "test") -> float | None:
        if self.seed_runs:
            return mean_or_none([run.score(metric, split) for run in self.seed_runs])
        return self.results.get(split, {}).get(metric)

    def spread(self, metric: str, split: str = "test") -> float | None:
        """The sample standard deviation (n - 1) over the seeds; None for a single run."""
        values = [run.score(metric, split) for run in self.seed_runs]
        return statistics.stdev(values) if len(values) > 1 and None not in values else None

    def seconds(self) -> float | None:
        """Training plus evaluation wall time, when both are recorded (the mean over seeds)."""
        if self.seed_runs:
            return mean_or_none([run.seconds() for run in self.seed_runs])
        train_file = self.folder / "train.json"
        trained = json.loads(train_file.read_text())["seconds"] if train_file.is_file() else 0.0
        evaluated = self.results.get("eval_seconds")
        return None if evaluated is None else trained + evaluated


def mean_or_none(values: list[float | None]) -> float | None:
    return None if not values or None in values else statistics.fmean(values)


def load_run(folder: Path) -> Run | None:
    """The run in `folder`: its results.json, or (SEEDS) its seed<N>/results.json folders, which take
    precedence over a results.json beside them. One seed is that seed's run, under the row's name."""
    seeds = sorted((path.parent for path in folder.glob("seed*/results.json") if path.parent.name[4:].isdigit()),
                   key=lambda seed: int(seed.name[4:]))
    if seeds:
        runs = [load_run(seed) for seed in seeds]
        if len(runs) == 1:
            return Run(folder.name, runs[0].method, runs[0].results, runs[0].folder)
        return Run(folder.name, runs[0].method, runs[0].results, folder, runs)
    path = folder / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
        results["test"]["accuracy"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not an eval.py results file ({e!r}); run `make eval` again") from None
    return Run(folder.name, results.get("method") or folder.name, results, folder)


def read_results(out: Path, dataset: str) -> list[Run]:
    """Every run directly under OUT/<dataset>/ (*/results.json, or */seed<N>/results.json), in Table 1's order."""
    root = out / dataset
    folders = {path.parent for path in root.glob("*/results.json")} | {
        path.parent.parent for path in root.glob("*/seed*/results.json")}
    rows = [run for folder in sorted(folders) if (run := load_run(folder)) is not None]
    order = list(ROW_NAMES)
    return sorted(rows, key=lambda r: (order.index(r.method) if r.method in order else len(order), r.name))


def row_label(run: str, method: str) -> str:
    """DSS-<teacher> and Teacher rows are told apart by their run folder (the Makefile's RUN)."""
    if method in ("dss", "teacher") and "-" in run:
        return f"{ROW_NAMES[method]}-{run.split('-', 1)[1]}"
    if method == "tinyllm" and run != "tinyllm":
        return f"TinyLLM ({run})"  # an ablation: a teacher subset, or rationales without in-context examples
    return ROW_NAMES.get(method, run)


def percent(mean: float | None, std: float | None = None) -> str:
    """A table cell in %: "60.00", "60.00 ± 1.20" over seeds, "—" for a number the run does not have."""
    if mean is None:
        return "—"
    return f"{mean * 100:.2f}" + (f" ± {std * 100:.2f}" if std is not None else "")


def delta(ours: float, base: float) -> str:
    """Relative improvement in percent, as the paper's Δ rows, and the absolute points beside it."""
    points = f"{(ours - base) * 100:+.2f} pts"
    return f"{(ours - base) / base * 100:+.2f}% ({points})" if base else f"n/a ({points})"  # 0 accuracy: no ratio


# ---------------------------------------------------------------------------------------------------
# Paired statistics: both runs answered the same test questions, so compare them question by question

def paired_bootstrap(ours: list[bool], base: list[bool], resamples: int = 10_000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Accuracy difference ours - base in points, and its 95% percentile interval over `resamples` resamples
    of the questions with replacement (the same questions for both runs in every resample)."""
    diff = np.asarray(ours, dtype=np.float64) - np.asarray(base, dtype=np.float64)  # +1, 0 or -1 per question
    low, high = bootstrap_interval([diff], resamples, seed)
    return 100 * diff.mean(), low, high


def bootstrap_interval(strata: list[np.ndarray], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval, in points, of the mean per-question difference over all strata's questions, each
    resample drawing every stratum's questions (a dataset's) from that stratum with replacement, so each
    dataset keeps its size in the pooled mean."""
    rng = np.random.default_rng(seed)
    total = sum(len(d) for d in strata)
    sums = np.zeros(resamples)
    for start in range(0, resamples, 1000):  # 1000 resamples at a time: (1000, n) indices, not (resamples, n)
        stop = min(start + 1000, resamples)
        for d in strata:
            sums[start:stop] += d[rng.integers(0, len(d), (stop - start, len(d)))].sum(axis=1)
    low, high = np.percentile(sums / total, [2.5, 97.5])
    return 100 * low, 100 * high


def sign_flip_p(diff: np.ndarray, resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided p of "no difference" for paired per-question differences: under H0 each question's difference
    is as likely negated, so flip every sign at random and count how often |Σ| reaches the observed one
    ((hits + 1) / (resamples + 1), never 0). With one seed (differences in {-1, 0, 1}) it is McNemar's test."""
    rng = np.random.default_rng(seed)
    observed = abs(diff.sum()) - 1e-9  # float sums of the same terms in another order
    hits = 0
    for start in range(0, resamples, 1000):
        signs = rng.integers(0, 2, (min(1000, resamples - start), len(diff))) * 2 - 1  # (k, n) of ±1
        hits += int((np.abs(signs @ diff) >= observed).sum())
    return (hits + 1) / (resamples + 1)


def mcnemar_exact(ours: list[bool], base: list[bool]) -> tuple[float, int, int]:
    """Exact (binomial) McNemar test: (two-sided p, b, c) with b the questions only ours gets right and c those
    only base gets right; under H0 each discordant question is a fair coin, b ~ Binomial(b + c, 1/2)."""
    b = sum(o and not r for o, r in zip(ours, base))
    c = sum(r and not o for o, r in zip(ours, base))
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail), b, c


def correct_by_id(run: Run, metric: str, split: str = "test") -> dict[str, bool]:
    key = "correct" if metric == "accuracy" else METRICS[metric]
    records = [json.loads(line) for line in (run.folder / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return {r["id"]: r[key] for r in records if r["split"] == split and key in r}


def paired_line(ours: Run, base: Run, metric: str, resamples: int, seed: int) -> str:
    label = f"| {row_label(ours.name, ours.method)} − {row_label(base.name, base.method)} |"
    if ours.seed_runs or base.seed_runs:
        return f"{label} not paired: repeated over SEEDS, compared by mean ± std above | | | |"
    missing = [str(run.folder / "predictions.jsonl") for run in (ours, base)
               if not (run.folder / "predictions.jsonl").is_file()]
    if missing:
        return f"{label} no {' or '.join(missing)}: run `make eval` | | | |"
    a, b = correct_by_id(ours, metric), correct_by_id(base, metric)
    if a.keys() != b.keys() or not a:
        raise UserError(f"{ours.folder} and {base.folder}: predictions of different test questions ({len(a)} vs "
                        f"{len(b)}): evaluate both with the same --limit")
    ids = sorted(a)
    diff, low, high = paired_bootstrap([a[i] for i in ids], [b[i] for i in ids], resamples, seed)
    p, only_ours, only_base = mcnemar_exact([a[i] for i in ids], [b[i] for i in ids])
    return f"{label} {diff:+.2f} | [{low:+.2f}, {high:+.2f}] | {p:.3g} | {only_ours} / {only_base} |"


METRIC_NAMES = {"accuracy": "accuracy (each run's --scoring)", "accuracy_generate": "generate (exact match)",
                "accuracy_sum": "rank, summed log-likelihood (acc)", "accuracy_norm": "rank, per byte (acc_norm)"}


def table(cfg: TableConfig) -> str:
    """Table 1: one row per run, a column per metric of `--metric`, the wall time when recorded, Δ_FF and
    Δ_Distill (relative, as the paper), then the paired differences of TinyLLM against fine-tuning and the best
    distillation baseline: bootstrap interval and exact McNemar p, per metric."""
    metrics = [m.strip() for m in cfg.metric.split(",") if m.strip()]
    for metric in metrics:
        if metric not in METRIC_NAMES:
            raise UserError(f"--metric={metric!r}: expected one of {', '.join(METRIC_NAMES)} (comma-separated)")
    rows = read_results(Path(cfg.out), cfg.dataset)
    if not rows:
        raise UserError(f"no results in {Path(cfg.out) / cfg.dataset}/*/results.json: run `make table` or "
                        "`make train eval METHOD=...` first")
    timed = any(run.seconds() is not None for run in rows)

    def cell(run: Run, metric: str) -> str:
        return percent(run.score(metric), run.spread(metric))

    header = [cfg.dataset] if metrics == ["accuracy"] else metrics
    lines = [f"{cfg.dataset} test, " + "; ".join(f"{m}: {METRIC_NAMES[m]}" for m in metrics),
             "| Method | " + " | ".join(header) + (" | wall time |" if timed else " |"),
             "|---|" + "---:|" * (len(metrics) + timed)]
    for run in rows:
        time_cell = [format_seconds(run.seconds()) if run.seconds() is not None else "—"] if timed else []
        lines.append(f"| {row_label(run.name, run.method)} | " + " | ".join([cell(run, m) for m in metrics] + time_cell)
                     + " |")
    ours = next((run for run in rows if run.name == "tinyllm"), None)
    finetune = next((run for run in rows if run.method == "finetune"), None)
    distill = [run for run in rows if run.method in DISTILLATION]

    def best_distill(metric: str) -> Run | None:
        scored = [run for run in distill if run.score(metric) is not None]
        return max(scored, key=lambda run: run.score(metric)) if scored else None

    for label, base_of in (("Δ_FF", lambda m: finetune), ("Δ_Distill", best_distill)):
        if ours is None or all(base_of(m) is None for m in metrics):
            continue
        cells = [delta(ours.score(m), base_of(m).score(m))
                 if base_of(m) is not None and ours.score(m) is not None and base_of(m).score(m) is not None else "—"
                 for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells + ([""] if timed else [])) + " |")
    seeded = [run for run in rows if run.seed_runs]
    if seeded:
        lines += ["", seeds_note(seeded) + "; Δ rows compare the means"]
    if ours is not None and (finetune is not None or distill):
        lines += ["", f"Paired differences on the test questions (points; 95% paired bootstrap interval, "
                      f"{cfg.resamples:,} resamples, seed {cfg.seed}; exact McNemar p; b / c = questions only the "
                      "first / only the second gets right):"]
        for metric in metrics:
            bases = [base for base in (finetune, best_distill(metric)) if base is not None]
            if ours.score(metric) is None or not bases:
                continue
            lines += ["", f"{metric}:", "| comparison | Δ | 95% CI | McNemar p | b / c |", "|---|---:|---:|---:|---:|"]
            lines += [paired_line(ours, base, metric, cfg.resamples, cfg.seed) for base in bases]
    text = "\n".join(lines)
    print(text)
    return text


def seeds_note(runs: list[Run]) -> str:
    """What ± means, below a table with runs repeated over SEEDS."""
    seeds = {run.name: ", ".join(seed.folder.name.removeprefix("seed") for seed in run.seed_runs) for run in runs}
    over = (f"seeds {next(iter(seeds.values()))}" if len(set(seeds.values())) == 1 else
            "each run's seeds (" + "; ".join(f"{name}: {s}" for name, s in seeds.items()) + ")")
    return f"mean ± sample standard deviation (n − 1) over {over}; a number without ± is a single run"


def write_table(cfg: TableConfig, text: str) -> None:
    """Table 1 beside its runs, for `make report`: OUT/<dataset>/table.md and its bar chart table.png."""
    root = Path(cfg.out) / cfg.dataset
    write_atomic(root / "table.md", text + "\n")
    metric = cfg.metric.split(",")[0].strip()
    draw("table", root / "table.png", lambda fig: plot_table(fig, read_results(Path(cfg.out), cfg.dataset),
                                                            metric, cfg.dataset))


# ---------------------------------------------------------------------------------------------------
# The experiments of tinyllm.py (sweep, fractions, ablations): each row scored from its run folder(s), the
# table printed, and OUT/<dataset>/<experiment>.json (every row), .md (the table) and .png written

def scored(rows: list[dict], metric: str) -> list[dict]:
    """Each row with its valid and test `metric` (the mean over its seeds), their sample standard deviation
    (None for a single run) and its number of runs. Rows that could not run (folder None) stay as they are."""
    for row in rows:
        if row.get("folder") is None:
            continue
        run = load_run(Path(row["folder"]))
        if run is None:
            raise UserError(f"{row['folder']}: no results.json: that run has not finished")
        for split in ("valid", "test"):
            row[split], row[f"{split}_std"] = run.score(metric, split), run.spread(metric, split)
        row["runs"] = len(run.seed_runs) or 1
    return rows


def caption(summary: dict, what: str) -> str:
    seeds = summary["seeds"]
    over = (f"; mean ± sample standard deviation (n − 1) over seeds {', '.join(map(str, seeds))}"
            if len(seeds) > 1 else "")
    return f"{summary['dataset']} {what}: {summary['metric']} in %{over}"


def write_summary(root: Path, name: str, summary: dict, lines: list[str]) -> dict:
    text = "\n".join(lines)
    print(text, flush=True)
    write_atomic(root / f"{name}.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(root / f"{name}.md", text + "\n")
    print(f"summary: {root / name}.json (every run), table: {root / name}.md")
    draw_summary(root, name, summary)
    return summary


def write_sweep(root: Path, summary: dict) -> dict:
    """§4.1, Fig. 3: the α combination with the best valid score is chosen; test is shown, never used to choose."""
    rows = scored(summary["rows"], summary["metric"])
    unscored = [row["folder"] for row in rows if row["valid"] is None]
    if unscored:
        raise UserError(f"no valid {summary['metric']} in {unscored[0]}/results.json: the sweep chooses on valid "
                        "(evaluate with --splits=test,valid)")
    best = max(rows, key=lambda row: row["valid"])  # ties: the first in grid order
    summary["best"] = {key: best[key] for key in ("alpha", "alpha_flag", "folder", "valid", "valid_std", "test",
                                                  "test_std")}
    names = list(summary["grid"])
    lines = [caption(summary, "α sweep (§4.1, Fig. 3), the best chosen on valid"), "",
             "| " + " | ".join(f"α {name}" for name in names) + " | valid | test | |",
             "|" + "---:|" * (len(names) + 2) + "---|"]
    for row in rows:
        lines.append("| " + " | ".join(number(row["alpha"][name]) for name in names)
                     + f" | {percent(row['valid'], row['valid_std'])} | {percent(row['test'], row['test_std'])} | "
                     + ("← best on valid |" if row is best else "|"))
    lines += ["", f"best on valid: ALPHA=\"{best['alpha_flag']}\" (valid {percent(best['valid'])}, "
                  f"test {percent(best['test'])}); train with it: make train ALPHA=\"{best['alpha_flag']}\""]
    return write_summary(root, "sweep", summary, lines)


def full_finetune(summary: dict) -> dict | None:
    """Fig. 2's dotted line: full fine-tuning on the whole training set, when the experiment has it."""
    return next((row for row in summary["rows"] if row["method"] == "finetune" and row["fraction"] == 1.0
                 and row.get("test") is not None), None)


def write_fractions(root: Path, summary: dict) -> dict:
    """Fig. 2: test score by fraction of the training set, a row per method."""
    rows = scored(summary["rows"], summary["metric"])
    fractions = summary["fractions"]
    cells = {(row["run"], row["fraction"]): percent(row["test"], row["test_std"]) for row in rows}
    runs = {row["run"]: row["method"] for row in rows}
    lines = [caption(summary, "test score by fraction of the training set (Fig. 2; nested subsets)"), "",
             "| Method | " + " | ".join(f"{f * 100:g}% of train" for f in fractions) + " |",
             "|---|" + "---:|" * len(fractions)]
    lines += [f"| {row_label(run, method)} | " + " | ".join(cells[run, f] for f in fractions) + " |"
              for run, method in runs.items()]
    full = full_finetune(summary)
    if full is not None:
        lines += ["", f"full fine-tuning on all of train (Fig. 2's dotted line): {percent(full['test'], full['test_std'])}"]
    return write_summary(root, "fractions", summary, lines)


def write_ablations(root: Path, summary: dict) -> dict:
    """Table 2: each row against TinyLLM with every teacher (the first row)."""
    rows = scored(summary["rows"], summary["metric"])
    full = rows[0]
    lines = [caption(summary, "ablations (Table 2); Δ: test against TinyLLM with every teacher"), "",
             "| Row | teachers | rationale cache | valid | test | Δ test (pts) | note |",
             "|---|---|---|---:|---:|---:|---|"]
    for row in rows:
        if row["folder"] is None:
            cells = ["—", "n/a", "n/a", ""]
        else:
            gap = "" if row is full or None in (row["test"], full["test"]) else f"{(row['test'] - full['test']) * 100:+.2f}"
            cells = [f"`{row['cache']}`", percent(row["valid"], row["valid_std"]), percent(row["test"], row["test_std"]), gap]
        lines.append(f"| {row['label']} | {', '.join(row['teachers']) or '—'} | " + " | ".join(cells) + f" | {row['note']} |")
    return write_summary(root, "ablations", summary, lines)


# ---------------------------------------------------------------------------------------------------
# Figures: PNG through matplotlib, an optional extra (requirements-extra.txt), imported only here. Fixed
# sizes (no tight bounding box), so every PNG is FIGURE_SIZES[kind] x FIGURE_DPI pixels.

FIGURE_DPI = 100
FIGURE_SIZES = {"table": (8.0, 4.5), "sweep": (6.5, 5.0), "fractions": (7.0, 4.5), "ablations": (8.0, 4.5),
                "training": (10.0, 4.0)}  # inches
MATPLOTLIB_HINT = ("matplotlib is not installed; plots are optional: .venv/bin/pip install matplotlib "
                   "(requirements-extra.txt), then `make report` draws them")


def figure_class() -> type | None:
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no GUI backend, no global state
    except ImportError:
        return None
    return Figure


def draw(kind: str, path: Path, plot: typing.Callable) -> bool:
    """plot(figure) into the PNG `path`, atomically; without matplotlib one line says how to get it."""
    figure = figure_class()
    if figure is None:
        print(f"{path}: not drawn, {MATPLOTLIB_HINT}")
        return False
    fig = figure(figsize=FIGURE_SIZES[kind], dpi=FIGURE_DPI, layout="constrained")
    plot(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=FIGURE_DPI)
    os.replace(tmp, path)
    print(f"figure: {path}")
    return True


def draw_summary(root: Path, name: str, summary: dict) -> None:
    if name == "sweep" and len(summary["grid"]) != 2:
        print(f"{root / 'sweep.png'}: no figure, the Fig. 3 heatmap is for two teachers ({len(summary['grid'])} here)")
        return
    plot = {"sweep": plot_sweep, "fractions": plot_fractions, "ablations": plot_ablations}[name]
    draw(name, root / f"{name}.png", lambda fig: plot(fig, summary))


def plot_table(fig, runs: list[Run], metric: str, dataset: str) -> None:
    ax = fig.subplots()
    runs = [run for run in runs if run.score(metric) is not None]
    ax.bar(range(len(runs)), [run.score(metric) * 100 for run in runs],
           yerr=[(run.spread(metric) or 0.0) * 100 for run in runs], capsize=4, color="tab:blue")
    ax.set_xticks(range(len(runs)), [row_label(run.name, run.method) for run in runs], rotation=20, ha="right")
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title(f"{dataset}: Table 1")


def plot_sweep(fig, summary: dict) -> None:
    """Fig. 3: valid score over the α of two teachers, the chosen cell boxed."""
    from matplotlib.patches import Rectangle

    (first, ys), (second, xs) = summary["grid"].items()
    values = np.full((len(ys), len(xs)), np.nan)
    for row in summary["rows"]:
        values[ys.index(row["alpha"][first]), xs.index(row["alpha"][second])] = row["valid"] * 100
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis", origin="lower", aspect="auto")
    for i in range(len(ys)):
        for j in range(len(xs)):
            ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", color="white", fontsize=8)
    best = summary["best"]["alpha"]
    ax.add_patch(Rectangle((xs.index(best[second]) - 0.5, ys.index(best[first]) - 0.5), 1, 1, fill=False,
                           edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(xs)), [number(x) for x in xs])
    ax.set_yticks(range(len(ys)), [number(y) for y in ys])
    ax.set_xlabel(f"α {second}")
    ax.set_ylabel(f"α {first}")
    ax.set_title(f"{summary['dataset']}: valid {summary['metric']} (%) over α (Fig. 3)")
    fig.colorbar(image, ax=ax)


def plot_fractions(fig, summary: dict) -> None:
    """Fig. 2: test score against the fraction of train, a line per method, full fine-tuning dotted."""
    ax = fig.subplots()
    for run in dict.fromkeys(row["run"] for row in summary["rows"]):
        rows = [row for row in summary["rows"] if row["run"] == run and row["test"] is not None]
        ax.errorbar([row["fraction"] * 100 for row in rows], [row["test"] * 100 for row in rows],
                    yerr=[(row["test_std"] or 0.0) * 100 for row in rows], marker="o", capsize=3,
                    label=row_label(run, rows[0]["method"]))
    full = full_finetune(summary)
    if full is not None:
        ax.axhline(full["test"] * 100, linestyle=":", color="gray", label="Fine-tune, 100% of train")
    ax.set_xticks([f * 100 for f in summary["fractions"]], [f"{f * 100:g}" for f in summary["fractions"]])
    ax.set_xlabel("training examples used (%)")
    ax.set_ylabel(f"test {summary['metric']} (%)")
    ax.set_title(f"{summary['dataset']}: less training data (Fig. 2)")
    ax.legend()


def plot_ablations(fig, summary: dict) -> None:
    """Table 2 as bars; rows that could not run are labelled n/a."""
    ax = fig.subplots()
    rows = summary["rows"][::-1]  # top to bottom in table order
    ax.barh(range(len(rows)), [(row.get("test") or 0.0) * 100 for row in rows],
            xerr=[(row.get("test_std") or 0.0) * 100 for row in rows], capsize=4, color="tab:green")
    ax.set_yticks(range(len(rows)), [row["label"] + (" (n/a)" if row["folder"] is None else "") for row in rows])
    ax.set_xlim(left=0)
    ax.set_xlabel(f"test {summary['metric']} (%)")
    ax.set_title(f"{summary['dataset']}: ablations (Table 2)")


def plot_training(fig, records: list[dict], title: str) -> None:
    """One run's metrics.jsonl: the loss of every task (L_A and each L_Tm, Eq. 2) and valid accuracy, by step."""
    losses, valid = fig.subplots(1, 2)
    steps = [r["step"] for r in records if "loss" in r]
    for task in dict.fromkeys(task for r in records if "loss" in r for task in r["loss"]):
        losses.plot(steps, [r["loss"].get(task, np.nan) for r in records if "loss" in r], label=task,
                    marker="o", markersize=2)  # a marker: a run of one step still shows its loss
    losses.set_xlabel("step")
    losses.set_ylabel("loss (token cross-entropy)")
    losses.legend()
    evals = [r for r in records if "valid_accuracy" in r]
    valid.plot([r["step"] for r in evals], [r["valid_accuracy"] * 100 for r in evals], marker="o")
    valid.set_xlabel("step")
    valid.set_ylabel("valid accuracy (%)")
    fig.suptitle(title)


def draw_training(metrics: Path, root: Path) -> Path:
    """metrics.jsonl -> training.png beside it (drawn again only when the metrics are newer)."""
    png = metrics.parent / "training.png"
    if not png.exists() or png.stat().st_mtime < metrics.stat().st_mtime:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        draw("training", png, lambda fig: plot_training(fig, records, str(metrics.parent.relative_to(root))))
    return png


# ---------------------------------------------------------------------------------------------------
# make report: OUT/<dataset>/report.md, every table and figure there with the command that made it

@dataclass
class ReportConfig:
    dataset: str = "obqa"  # obqa | arc | piqa | riddle | pubmedqa | bioasq
    out: str = "out"  # links what is under OUT/<dataset>/ in OUT/<dataset>/report.md


SECTIONS = (("table", "Table 1: baselines and TinyLLM", "make table"),
            ("sweep", "α per teacher (§4.1, Fig. 3)", "make sweep"),
            ("fractions", "Less training data (Fig. 2)", "make fractions"),
            ("ablations", "Ablations (Table 2)", "make ablations"))


def link(path: Path, root: Path) -> str:
    return urllib.parse.quote(str(path.relative_to(root)), safe="/=,.-_")


def report(cfg: ReportConfig) -> Path:
    """Tables are included as written by their commands; figures missing so far (matplotlib installed since)
    are drawn from the JSON summaries, and every run's training curves from its metrics.jsonl."""
    root = Path(cfg.out) / cfg.dataset
    if not root.is_dir():
        raise UserError(f"{root}: nothing to report; run `make table`, `make sweep`, ... first")
    if not (root / "table.md").is_file() and read_results(Path(cfg.out), cfg.dataset):
        table_cfg = TableConfig(dataset=cfg.dataset, out=cfg.out)  # runs from `make train eval`: their table
        write_table(table_cfg, table(table_cfg))
    lines = [f"# {cfg.dataset}: results in {root}", "",
             f"Written by `make report DATASET={cfg.dataset} OUT={cfg.out}` from what exists under {root}/; "
             "run it again after new runs."]
    for name, title, target in SECTIONS:
        if not (root / f"{name}.md").is_file():
            continue
        if name == "table":
            made = (f"`{target} DATASET={cfg.dataset}` (each row `make train eval METHOD=...`; the table "
                    f"`python eval.py table --dataset={cfg.dataset} --out={cfg.out}`)")
            if not (root / "table.png").exists():
                draw("table", root / "table.png",
                     lambda fig: plot_table(fig, read_results(Path(cfg.out), cfg.dataset), "accuracy", cfg.dataset))
        else:
            summary = json.loads((root / f"{name}.json").read_text())
            made = f"`{summary['command']}` (what `{target}` runs)"
            if not (root / f"{name}.png").exists():
                draw_summary(root, name, summary)
        files = [f"[{path.name}]({path.name})" for path in (root / f"{name}.md", root / f"{name}.json")
                 if path.is_file()]
        lines += ["", f"## {title}", "", f"Made by {made}; files: {', '.join(files)}.", "",
                  (root / f"{name}.md").read_text().strip()]
        if (root / f"{name}.png").is_file():
            lines += ["", f"![{title}]({name}.png)"]
    metrics = sorted(root.rglob("metrics.jsonl"))
    if metrics:
        if figure_class() is None:
            print(f"training curves: not drawn, {MATPLOTLIB_HINT}")
        else:
            for path in metrics:
                draw_training(path, root)
        lines += ["", "## Training curves", "", "Per run, from its metrics.jsonl (train.py): the loss of every task "
                  "(L_A and each teacher's L_Tm, Eq. 2) and valid accuracy by step.", ""]
        for path in metrics:
            run, png = path.parent, path.parent / "training.png"
            lines.append(f"- `{run.relative_to(root)}`: " + (f"[training.png]({link(png, root)})" if png.is_file()
                                                          else f"[metrics.jsonl]({link(path, root)})"))
    write_atomic(root / "report.md", "\n".join(lines) + "\n")
    print(f"report: {root / 'report.md'}")
    return root / "report.md"


def main(argv: list[str]) -> None:
    if argv and argv[0] == "table":
        cfg = parse_flags(TableConfig, argv[1:], "table")
        write_table(cfg, table(cfg))
    elif argv and argv[0] == "report":
        report(parse_flags(ReportConfig, argv[1:], "report"))
    else:
        # results.json and predictions.jsonl are written whole at the end (write_atomic)
        with interrupt_note("no result of this evaluation was written (they are written at the end); "
                            "rerun the same command"):
            evaluate(parse_flags(EvalConfig, argv))


if __name__ == "__main__":
    run_main(main, "lower --batch_size (ARGS=--batch_size=8), or --max_new_tokens / --max_input_tokens")
