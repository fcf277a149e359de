"""Top floor: results, evaluation of a model, the paper's tables and figures, and the experiments that fill them.

    python eval.py --dataset=obqa --model=out/obqa/tinyllm/best --method=tinyllm --data=data --out=out/obqa/tinyllm
    python eval.py table --dataset=obqa --out=out
    python eval.py sweep --dataset=obqa --alphas="0.01 0.1 0.5 1 2 3"      # α per teacher (§4.1, Fig. 3)
    python eval.py fractions --dataset=obqa --methods="tinyllm dss finetune"  # less training data (Fig. 2)
    python eval.py ablations --dataset=obqa                                 # Table 2's rows
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

import dataclasses
import io
import itertools
import json
import math
import re
import shlex
import statistics
import time
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import data
import tinyllm
import train
from data import (AUTO_BOOL, BOOL, ConfigT, Progress, Rule, UserError, at_least, atomic_write, flag, format_seconds,
                  interrupt_note, one_of, parse_flags, resolve_device, run_main, some_of)
from train import accuracy, bf16_supported, load_student, parse_scoring, predict


METRIC_NAMES = {"accuracy": "accuracy (each run's --scoring)", "accuracy_generate": "generate (exact match)",
                "accuracy_sum": "rank, summed log-likelihood (acc)", "accuracy_norm": "rank, per byte (acc_norm)"}
SPLITS_RULE = some_of(*data.SPLITS)  # here: a config's `data` field hides the module in its class body
SCORING_RULE = Rule("generate, rank or generate,rank", lambda value: parse_scoring(value) and None)


@dataclass
class EvalConfig:
    """`python eval.py`: accuracy of a model on test and valid (exact match of its answer, or ranked options)."""
    dataset: str = flag("obqa", one_of(*data.DATASETS))  # the benchmark (§4.1)
    model: str = ""  # hub id or folder (a run's best/, the student for inference, a teacher)
    method: str = ""  # the row this is in the table: inference, finetune, kd, dss, lora, tinyllm, teacher
    data: str = "data"  # the datasets' folder (downloaded and checksummed on first use)
    out: str = ""  # the run folder results go into
    limit: int = flag(0, at_least(0))  # first N examples of each split (0 = all)
    device: str = "auto"  # auto = cuda when available, else cpu
    scoring: str = flag("generate", SCORING_RULE)  # generate (the paper's) | rank (lm-eval's log-likelihood) | generate,rank (both)
    splits: str = flag("test,valid", SPLITS_RULE)  # the splits evaluated
    batch_size: int = flag(32, at_least(1))  # questions per forward pass
    max_input_tokens: int = flag(1024, at_least(1))  # longer inputs lose words from the start of the question
    max_new_tokens: int = flag(64, at_least(1))  # the longest generated answer, in tokens
    bf16: int = flag(1, BOOL)  # bf16 weights where the device computes bf16 natively (fp32 elsewhere)
    chat: int = flag(-1, AUTO_BOOL)  # decoder-only student: 1 = chat template, 0 = plain; -1 = the checkpoint's format, else default
    boundary: int = flag(-1, AUTO_BOOL)  # decoder-only student: 1 = the input ends with "Answer:"; -1 = the checkpoint's, else 1
    task_prefix: int = flag(-1, AUTO_BOOL)  # decoder-only student: 1 = p_A ("predict: ") at the start too; -1 = the checkpoint's, else 0
    check_only: int = flag(0, BOOL)  # 1: check the flags, the data and the run folder, then stop (the model is not loaded)

    def check(self) -> None:
        if not self.model or not self.out:
            raise UserError("eval.py needs --model (hub id or folder) and --out (the run folder for results)")


@dataclass
class TableConfig:
    """`python eval.py table`: Table 1 from every run's results.json, with Δ_FF, Δ_Distill and paired tests."""
    dataset: str = flag("obqa", one_of(*data.DATASETS))  # the benchmark (§4.1)
    out: str = "out"  # reads OUT/<dataset>/*/results.json, writes OUT/<dataset>/table.md
    metric: str = flag("accuracy", some_of(*METRIC_NAMES))  # the column(s) of the table
    resamples: int = flag(10000, at_least(1))  # paired bootstrap resamples of the test questions
    seed: int = 0  # of the bootstrap


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
    data.check_flags(cfg)  # a config made in code (an experiment's run) is checked as a parsed one is
    splits = [s for s in re.split(r"[,\s]+", cfg.splits) if s]  # as SPLITS_RULE reads them
    data.check_folder(cfg.out, "--out")
    device = torch.device(resolve_device(cfg.device))
    if cfg.check_only:
        for split in splits:
            data.load_split(cfg.dataset, split, cfg.data, limit=cfg.limit or None)
        print(f"{cfg.out}: the flags, the data and the run folder are fine (--check_only=1)")
        return {}
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
    atomic_write(out / "predictions.jsonl", "".join(line + "\n" for line in lines))
    atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
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


# Over seeds as well: a study's runs are (dataset, method, seed), and the training seed (data order, dropout) moves a
# run's accuracy by several points on a small student, so the study's headline resamples the seeds too. Each
# stratum (a dataset) is (first, last): each method's per-question correctness, one row per seed, (S, n) floats.

def seed_bootstrap_interval(strata: list[tuple[np.ndarray, np.ndarray]], resamples: int = 10_000,
                            seed: int = 0) -> tuple[float, float]:
    """95% percentile interval, in points, of the pooled difference last − first when the training is redone as
    well as the questions redrawn (a two-level bootstrap). Every resample draws each method's seeds with
    replacement, per dataset, and averages the drawn runs per question; then it draws the dataset's questions
    with replacement, the same ones for both methods (paired), so each dataset keeps its size in the pool."""
    rng = np.random.default_rng(seed)
    total = sum(first.shape[1] for first, _ in strata)
    sums = np.zeros(resamples)
    for start in range(0, resamples, 1000):
        k = min(1000, resamples - start)
        for first, last in strata:
            # (k, S) drawn seeds -> (k, S, n) their rows -> (k, n): per question, the mean over the drawn runs
            first_k, last_k = (runs[rng.integers(0, len(runs), (k, len(runs)))].mean(axis=1) for runs in (first, last))
            questions = rng.integers(0, first.shape[1], (k, first.shape[1]))  # (k, n)
            sums[start:start + k] += np.take_along_axis(last_k - first_k, questions, axis=1).sum(axis=1)
    low, high = np.percentile(sums / total, [2.5, 97.5])
    return 100 * low, 100 * high


EXACT_RELABELLINGS = 100_000  # seed_permutation_p enumerates every relabelling up to this many


def seed_permutation_p(strata: list[tuple[np.ndarray, np.ndarray]], resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, int]:
    """Two-sided p of "the method makes no difference" at the level of trained runs: within each dataset the method
    labels are exchangeable among its runs, so shuffle them and count how often the pooled difference (each
    dataset's mean accuracy of the runs labelled last − of those labelled first, weighted by its questions)
    reaches the observed one in size. Exact over every relabelling while there are at most EXACT_RELABELLINGS
    (then p can be 1 / their number, and the number is returned), else `resamples` random ones ((hits + 1) /
    (resamples + 1), and 0 is returned)."""
    total = sum(first.shape[1] for first, _ in strata)
    runs = [(np.concatenate([first.mean(axis=1), last.mean(axis=1)]), len(last), first.shape[1])
            for first, last in strata]  # per dataset: (every run's accuracy, first's then last's; k last; n)

    def weighted(accuracy: np.ndarray, last: np.ndarray, n: int) -> np.ndarray:
        """n · (mean of the runs in `last` − mean of the others), `last` a (..., S) boolean mask."""
        k = last.sum(axis=-1)
        return n * ((accuracy * last).sum(axis=-1) / k - (accuracy * ~last).sum(axis=-1) / (len(accuracy) - k))

    observed = sum(weighted(a, np.arange(len(a)) >= len(a) - k, n) for a, k, n in runs) / total
    relabellings = math.prod(math.comb(len(a), k) for a, k, _ in runs)
    if relabellings <= EXACT_RELABELLINGS:
        values = np.zeros(1)
        for accuracy, k, n in runs:
            masks = np.zeros((math.comb(len(accuracy), k), len(accuracy)), dtype=bool)  # every choice of k last runs
            for row, chosen in enumerate(itertools.combinations(range(len(accuracy)), k)):
                masks[row, list(chosen)] = True
            values = np.add.outer(values, weighted(accuracy, masks, n)).ravel()  # every combination over datasets
        return float(np.mean(np.abs(values / total) >= abs(observed) - 1e-12)), relabellings
    rng = np.random.default_rng(seed)
    shuffled = np.zeros(resamples)
    for accuracy, k, n in runs:
        order = rng.permuted(np.tile(np.arange(len(accuracy)), (resamples, 1)), axis=1)  # (resamples, S)
        shuffled += weighted(accuracy, order >= len(accuracy) - k, n)
    hits = int((np.abs(shuffled / total) >= abs(observed) - 1e-12).sum())
    return (hits + 1) / (resamples + 1), 0


def std_ratio_interval(first: np.ndarray, last: np.ndarray, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of std(last) / std(first), the sample standard deviations of the runs' accuracies
    over seeds, each method's seeds drawn with replacement. A resample in which first's drawn runs are all alike
    gives an infinite ratio (kept); one in which both are, none (dropped)."""
    rng = np.random.default_rng(seed)
    first_std, last_std = (runs[rng.integers(0, len(runs), (resamples, len(runs)))].std(axis=1, ddof=1)
                           for runs in (first, last))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = last_std / first_std
    ratios = ratios[~np.isnan(ratios)]
    if not len(ratios):  # neither method's runs differ at all
        return math.nan, math.nan
    # no interpolation between order statistics: between two infinite ratios it would give nan
    low, high = np.percentile(ratios, [2.5, 97.5], method="inverted_cdf")
    return float(low), float(high)


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
    atomic_write(root / "table.md", text + "\n")
    metric = cfg.metric.split(",")[0].strip()
    draw("table", root / "table.png", lambda fig: plot_table(fig, read_results(Path(cfg.out), cfg.dataset),
                                                            metric, cfg.dataset))


# ---------------------------------------------------------------------------------------------------
# The paper's experiments: the α sweep (§4.1, Fig. 3), training fractions (Fig. 2), ablations (Table 2).
# Every row of an experiment is an ordinary run folder (train.py's best/, last/, metrics.jsonl, train.json;
# eval.py's results.json, predictions.jsonl), or with --seeds one seed<N>/ run folder per seed. The runs go
# in this process, one after the other, through train.train and evaluate with the configs `make train eval`
# would build: no Python start and torch import per run (longer than a tiny run itself), and a failing run
# stops the experiment with its own message. Resumable: a run with results.json is done and never redone,
# one with train.json (training ended) is only evaluated, one with last/ continues from it (train.py
# --resume), so a killed experiment, started again, does what is missing. Then each row is scored from its
# run folder(s), the table printed, and OUT/<dataset>/<experiment>.json (every row), .md (the table) and
# .png (the figure) written.
#
# An experiment is a config (ExperimentConfig and its own flags), a function that adds its rows to an
# Experiment, runs them and writes its table (write_<name>), a line in EXPERIMENTS, and its figure
# (draw_summary) and section of the report (SECTIONS).

SEEDS_RULE = Rule("integers, each once", lambda value: parse_seeds(value) and None)


@dataclass
class ExperimentConfig:
    dataset: str = flag("obqa", one_of(*data.DATASETS))  # the benchmark (§4.1)
    student: str = "google/flan-t5-small"  # hub id or folder
    teachers: str = flag("flan-t5-xl=release:flan-t5-xl llama-2=release:llama-2", tinyllm.TEACHERS_RULE)  # name=source ...
    data: str = "data"  # the datasets' folder
    cache: str = "cache"  # the rationale cache (`make rationales`)
    out: str = "out"  # rows in OUT/<dataset>/<experiment>/, the summary in OUT/<dataset>/<experiment>.json
    limit: int = flag(0, at_least(0))  # first N examples of each split (0 = all)
    device: str = "auto"  # auto = cuda when available, else cpu
    seeds: str = flag("", SEEDS_RULE)  # "0 1 2": every row once per seed, in <row>/seed<N>/, reported as mean ± std ("" = once)
    metric: str = flag("accuracy", one_of(*METRIC_NAMES))  # the results.json number compared (and selected on, by the sweep)
    train_args: str = ""  # extra train.py flags for every run, e.g. "--epochs=3 --lr=1e-4"
    eval_args: str = ""  # extra eval.py flags for every run (decoding follows train.py's validation unless set)


def format_number(value: float) -> str:
    """1.0 -> "1", 0.125 -> "0.125": α and fractions as folder names and table cells write them."""
    return f"{value:.10g}"


def parse_numbers(text: str, what: str, allowed: typing.Callable[[float], bool], rule: str) -> list[float]:
    """"0.1 1,3" -> [0.1, 1.0, 3.0]: space or comma separated, each value once, each `allowed`."""
    values: list[float] = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise UserError(f"{what}: {item!r} is not a number") from None
        if math.isnan(value) or not allowed(value):
            raise UserError(f"{what}: {item} is not {rule}")
        if value not in values:
            values.append(value)
    if not values:
        raise UserError(f"{what}: no value given")
    return values


def parse_seeds(seeds: str) -> list[int | None]:
    """--seeds="0 1 2" -> [0, 1, 2]; "" -> [None]: each row once, in its folder itself, at train.py's --seed."""
    try:
        values = [int(item) for item in re.split(r"[,\s]+", seeds.strip()) if item]
    except ValueError:
        raise UserError(f"--seeds={seeds!r}: expected integers, e.g. --seeds=\"0 1 2\" (SEEDS= for make)") from None
    if len(set(values)) != len(values):
        raise UserError(f"--seeds={seeds!r}: a seed appears twice (SEEDS= for make)")
    return values or [None]


def with_flags(config: ConfigT, args: str, what: str, fixed: set[str]) -> ConfigT:
    """`config` with the --key=value flags in `args` applied (type-checked by parse_flags). The keys in
    `fixed` are set by the experiment itself, per row, and refused here."""
    tokens = shlex.split(args)
    values = data.read_flags(type(config), tokens)
    keys = [token.removeprefix("--").partition("=")[0] for token in tokens]
    taken = sorted(set(keys) & fixed)
    if taken:
        raise UserError(f"{what}: --{taken[0]} is set by the experiment itself ({', '.join(sorted(fixed))})")
    return data.check_flags(dataclasses.replace(config, **values))


def check_experiment(cfg: ExperimentConfig) -> None:
    data.check_flags(cfg)  # parse_flags did for the command line; again for a config made in code (the study's)


@dataclass
class RunPlan:
    """One run of an experiment's row: the train.py and eval.py configs `make train eval` would build."""
    train: train.TrainConfig
    eval: EvalConfig

    @property
    def folder(self) -> Path:
        return Path(self.train.out)

    def finished(self) -> bool:
        return (self.folder / "results.json").is_file()

    def run(self) -> None:
        """To its results.json: train (or continue training from last/), then evaluate best/."""
        if not (self.folder / "train.json").is_file():  # written when training ends: then only eval is left
            train.recover_checkpoint(self.folder / "last")  # a kill between its two renames
            resume = (self.folder / "last" / "trainer_state.pt").is_file()
            try:
                train.train(dataclasses.replace(self.train, resume=int(resume)))
            except SystemExit as e:  # a UserError of train.py: say which run
                hint = (f"\n(this continued {self.folder / 'last'}; delete {self.folder} to start this run over)"
                        if resume else "")
                raise UserError(f"{self.folder}: {e}{hint}") from e
        evaluate(self.eval)


def plan_runs(cfg: ExperimentConfig, command: str, folder: Path, **fields) -> list[RunPlan]:
    """The runs of one row in `folder`: once, or once per seed in folder/seed<N>/. `fields` are the row's own
    train.py flags (method, alpha, train_fraction, ...)."""
    runs = []
    for seed in parse_seeds(cfg.seeds):
        out = folder if seed is None else folder / f"seed{seed}"
        own = dict(dataset=cfg.dataset, student=cfg.student, teachers=cfg.teachers, data=cfg.data,
                   cache=cfg.cache, limit=cfg.limit, device=cfg.device)
        own.update(fields, out=str(out), **({} if seed is None else {"seed": seed}))
        train_cfg = with_flags(train.TrainConfig(**own), cfg.train_args, f"{command} --train_args",
                               set(own) | {"resume", "check_only"})
        # Decode as training's validation did (best/ was chosen on it), unless --eval_args says otherwise.
        eval_own = dict(dataset=cfg.dataset, model=str(out / "best"), method=train_cfg.method, data=cfg.data,
                        out=str(out), limit=cfg.limit, device=cfg.device)
        eval_cfg = EvalConfig(**eval_own, batch_size=train_cfg.eval_batch_size,
                              max_input_tokens=train_cfg.max_input_tokens, max_new_tokens=train_cfg.max_new_tokens,
                              bf16=train_cfg.bf16, chat=train_cfg.chat, boundary=train_cfg.boundary,
                              task_prefix=train_cfg.task_prefix)
        runs.append(RunPlan(train_cfg, with_flags(eval_cfg, cfg.eval_args, f"{command} --eval_args",
                                                  set(eval_own) | {"check_only"})))
    return runs


def command_line(command: str, cfg: ExperimentConfig) -> str:
    """`python eval.py <command>` with every flag of `cfg` that differs from its default: how a summary was
    made, written into it for `make report`."""
    default = type(cfg)()
    flags = [shlex.quote(f"--{f.name}={getattr(cfg, f.name)}") for f in dataclasses.fields(cfg)
             if getattr(cfg, f.name) != getattr(default, f.name)]
    return " ".join(["python eval.py", command, *flags])


@dataclass
class Experiment:
    """One experiment's rows as they are planned: each row is a dict for its table and summary (its run folder
    in "folder", None for a row that cannot run) and its runs; run() runs what is not finished yet."""
    cfg: ExperimentConfig
    name: str  # the command: rows in OUT/<dataset>/<name>/, the summary in OUT/<dataset>/<name>.{json,md,png}
    rows: list[dict] = field(default_factory=list)
    runs: list[RunPlan] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return Path(self.cfg.out) / self.cfg.dataset

    def add(self, folder: str, row: dict, **train_fields) -> list[RunPlan]:
        """A row run in OUT/<dataset>/<name>/<folder> with its own train.py flags; returns its runs."""
        path = self.root / self.name / folder
        self.rows.append({**row, "folder": str(path)})
        runs = plan_runs(self.cfg, self.name, path, **train_fields)
        self.runs += runs
        return runs

    def add_not_run(self, row: dict) -> None:
        """A row the table shows without a run (its note says why)."""
        self.rows.append({**row, "folder": None})

    def run(self) -> None:
        run_plans(self.runs)

    def summary(self, **extra) -> dict:
        """What write_<name> scores, prints and writes: how it was made, `extra`, and the rows."""
        cfg = self.cfg
        return dict(dataset=cfg.dataset, metric=cfg.metric, seeds=[s for s in parse_seeds(cfg.seeds) if s is not None],
                    command=command_line(self.name, cfg), **extra, rows=self.rows)


def check_plans(runs: list[RunPlan], made_later: typing.Collection[str] = ()) -> None:
    """Before the first run starts, every run's: train.py and eval.py flags (each field's rule, then together),
    run folder (creatable), and for a run with training still to do the data and the rationale cache it reads
    (train.check_run; a cache in `made_later`, which the experiment fills first, only from then on)."""
    checked: set[tuple] = set()
    for run in runs:
        data.check_flags(run.train)
        data.check_flags(run.eval)
        data.check_folder(run.folder, "--out")
        cfg = run.train
        inputs = (cfg.dataset, cfg.data, cfg.cache, cfg.teachers, cfg.method, cfg.teacher, cfg.limit, cfg.train_limit,
                  cfg.train_fraction, cfg.seed, run.eval.splits)
        if run.finished() or inputs in checked:
            continue
        checked.add(inputs)
        for split in re.split(r"[,\s]+", run.eval.splits):
            if split:
                data.load_split(run.eval.dataset, split, run.eval.data, limit=run.eval.limit or None)
        if (run.folder / "train.json").is_file():  # training is over: only the evaluation is left
            continue
        if cfg.cache in made_later:
            train.check_config(cfg, 1)
            train.training_examples(cfg)
        else:
            train.check_run(cfg)


def run_plans(runs: list[RunPlan]) -> None:
    """Every run not finished yet, in order, once every run is checked (check_plans); finished ones (results.json)
    are kept as they are."""
    check_plans(runs)
    todo = [run for run in runs if not run.finished()]
    done = len(runs) - len(todo)
    print(f"{done} of {len(runs)} runs finished already (kept), {len(todo)} to run", flush=True)
    for n, run in enumerate(todo, 1):
        print(f"--- run {n} of {len(todo)}: {run.folder}", flush=True)
        # Ctrl-C: finished runs keep their results.json and this one its last/: the same command goes on
        with interrupt_note(f"{done + n - 1} of {len(runs)} runs are finished and kept, and {run.folder} "
                            "keeps its last checkpoint if it saved one; the same command continues from there"):
            run.run()


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
    atomic_write(root / f"{name}.json", json.dumps(summary, indent=2) + "\n")
    atomic_write(root / f"{name}.md", text + "\n")
    print(f"summary: {root / name}.json (every run), table: {root / name}.md")
    draw_summary(root, name, summary)
    return summary


# ---- the α sweep (§4.1, Fig. 3)

ALPHAS_RULE = Rule("numbers >= 0", lambda value: parse_numbers(value, "--alphas", lambda a: a >= 0, "an α >= 0")
                   and None)


@dataclass
class SweepConfig(ExperimentConfig):
    """`python eval.py sweep`: TinyLLM once per combination of α over the teachers, the best chosen on valid."""
    alphas: str = flag("0.01 0.1 0.5 1 2 3", ALPHAS_RULE)  # §4.1: the values of every α_m; the grid is their product over teachers
    sweep: str = ""  # an explicit grid instead, naming every teacher: "a=0.1,1 b=1,3"

    def check(self) -> None:
        sweep_grid(self, [name for name, _ in tinyllm.parse_teachers(self.teachers)])


def sweep_grid(cfg: SweepConfig, names: list[str]) -> dict[str, list[float]]:
    """Teacher name -> its α values: --sweep's lists (every teacher named), else --alphas for each."""
    def values(text: str, what: str) -> list[float]:
        return parse_numbers(text, what, lambda a: a >= 0, "an α >= 0")

    if not cfg.sweep.strip():
        return {name: values(cfg.alphas, "--alphas") for name in names}
    grid: dict[str, list[float]] = {}
    for item in cfg.sweep.split():
        name, sep, text = item.partition("=")
        if not sep or name not in names:
            raise UserError(f"--sweep: {item!r} is not name=α,α,... for a teacher of --teachers ({' '.join(names)})")
        if name in grid:
            raise UserError(f"--sweep: teacher {name!r} given twice")
        grid[name] = values(text, f"--sweep {name}")
    missing = [name for name in names if name not in grid]
    if missing:
        raise UserError(f"--sweep gives no α for {', '.join(missing)}: an explicit grid names every teacher")
    return {name: grid[name] for name in names}


def sweep(cfg: SweepConfig) -> dict:
    """§4.1, Fig. 3: TinyLLM once per combination of α over the teachers; the best is chosen on valid."""
    check_experiment(cfg)
    names = [name for name, _ in tinyllm.parse_teachers(cfg.teachers)]
    grid = sweep_grid(cfg, names)
    experiment = Experiment(cfg, "sweep")
    for combination in itertools.product(*grid.values()):
        alpha = dict(zip(names, combination))
        flag = " ".join(f"{name}={format_number(a)}" for name, a in alpha.items())
        folder = ",".join(f"{name}={format_number(a)}" for name, a in alpha.items())
        experiment.add(folder, dict(alpha=alpha, alpha_flag=flag), method="tinyllm", alpha=flag)
    if "valid" not in experiment.runs[0].eval.splits:
        raise UserError("sweep --eval_args: --splits must include valid, the split the sweep chooses on")
    experiment.run()
    return write_sweep(experiment.root, experiment.summary(grid=grid))


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
        lines.append("| " + " | ".join(format_number(row["alpha"][name]) for name in names)
                     + f" | {percent(row['valid'], row['valid_std'])} | {percent(row['test'], row['test_std'])} | "
                     + ("← best on valid |" if row is best else "|"))
    lines += ["", f"best on valid: ALPHA=\"{best['alpha_flag']}\" (valid {percent(best['valid'])}, "
                  f"test {percent(best['test'])}); train with it: make train ALPHA=\"{best['alpha_flag']}\""]
    return write_summary(root, "sweep", summary, lines)


# ---- less training data (Fig. 2)

FRACTIONS_RULE = Rule("numbers in (0, 1]", lambda value: parse_numbers(value, "--fractions", lambda f: 0 < f <= 1,
                                                                     "a fraction in (0, 1]") and None)


@dataclass
class FractionsConfig(ExperimentConfig):
    """`python eval.py fractions`: every method on nested fractions of the training set (Fig. 2)."""
    fractions: str = flag("0.125 0.25 0.5 0.75 1", FRACTIONS_RULE)  # Fig. 2: fractions of the training set (nested, per seed)
    methods: str = "tinyllm dss finetune"  # a curve each; dss once per teacher (dss-<teacher>), kd with the first
    alpha: str = flag("", train.ALPHA_RULE)  # name=weight ... for TinyLLM's Eq. 2 (default 1 each)

    def check(self) -> None:
        method_runs(self.methods, [name for name, _ in tinyllm.parse_teachers(self.teachers)])


def method_runs(methods: str, names: list[str]) -> list[tuple[str, str, str]]:
    """(run name, method, teacher) per method, named as `make table` names its run folders."""
    trained = [m for m in train.METHODS if m != "inference"]
    runs: list[tuple[str, str, str]] = []
    for method in methods.split():
        if method not in trained:
            raise UserError(f"--methods: {method!r} is not one of {', '.join(trained)} (inference trains nothing)")
        runs += [(f"dss-{name}", "dss", name) for name in names] if method == "dss" else [(method, method, "")]
    if not runs or len({run for run, _, _ in runs}) != len(runs):
        raise UserError(f"--methods={methods!r}: give each method once")
    return runs


def fractions(cfg: FractionsConfig) -> dict:
    """Fig. 2: every method trained on nested fractions of the training set (train.py --train_fraction)."""
    check_experiment(cfg)
    names = [name for name, _ in tinyllm.parse_teachers(cfg.teachers)]
    values = sorted(parse_numbers(cfg.fractions, "--fractions", lambda f: 0 < f <= 1, "a fraction in (0, 1]"))
    experiment = Experiment(cfg, "fractions")
    for run, method, teacher in method_runs(cfg.methods, names):
        for fraction in values:
            experiment.add(f"{run}/{format_number(fraction)}", dict(run=run, method=method, fraction=fraction),
                           method=method, teacher=teacher, alpha=cfg.alpha, train_fraction=fraction)
    experiment.run()
    return write_fractions(experiment.root, experiment.summary(fractions=values))


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


# ---- ablations (Table 2)

@dataclass
class AblationsConfig(ExperimentConfig):
    """`python eval.py ablations`: Table 2, TinyLLM without each teacher, in-context examples, teacher forcing."""
    alpha: str = flag("", train.ALPHA_RULE)  # name=weight ... (default 1 each); a row without a teacher keeps the others' α
    rationales_args: str = ""  # extra `rationales` flags for the re-prompted caches (those CACHE was made with)


# Table 2's re-prompted rows: the one `rationales` flag each changes (§3.2) and its cache folder's suffix
REPROMPTED = (("k0", "w/o in-context examples (--k=0)", {"k": 0}),
              ("teacher_forcing0", "w/o teacher forcing (--teacher_forcing=0)", {"teacher_forcing": False}))


def ablations(cfg: AblationsConfig) -> dict:
    """Table 2: TinyLLM without each teacher; without in-context examples and without teacher forcing,
    whose rationales are made again into their own caches, where every teacher can be re-prompted."""
    check_experiment(cfg)
    teachers = tinyllm.parse_teachers(cfg.teachers)
    alpha = train.parse_alpha(cfg.alpha, [name for name, _ in teachers])
    experiment = Experiment(cfg, "ablations")

    def add(name: str, label: str, kept: list[tuple[str, str]], cache: str, note: str = "") -> list[RunPlan]:
        row = dict(name=name, label=label, teachers=[n for n, _ in kept], cache=cache, note=note)
        return experiment.add(name, row, teachers=" ".join(f"{n}={s}" for n, s in kept), cache=cache,
                              # no teacher left: L = L_A (Eq. 2 with no rationale task), i.e. fine-tuning
                              method="tinyllm" if kept else "finetune",
                              alpha=" ".join(f"{n}={format_number(alpha[n])}" for n, _ in kept))

    add("tinyllm", "TinyLLM", teachers, cfg.cache)
    for name, _ in teachers:
        kept = [(n, s) for n, s in teachers if n != name]
        add(f"without-{name}", f"w/o {name}", kept, cfg.cache, "" if kept else "no teacher left: fine-tuning (L_A)")
    fixed = [f"{n}={s}" for n, s in teachers if not getattr(tinyllm.teacher_kind(s)[0], "prompted", True)]
    reprompted: list[tuple[tinyllm.RationalesConfig, list[RunPlan]]] = []
    for key, label, change in REPROMPTED:
        if fixed:  # the paper's published rationales are text, made once with k=2 and the gold answer
            experiment.add_not_run(dict(name=key, label=label, teachers=[n for n, _ in teachers], cache=None,
                                        note=f"not run: {', '.join(fixed)} cannot be re-prompted (fixed published "
                                             "rationales); a live teacher (a model, openai:...) can"))
            continue
        cache = f"{cfg.cache.rstrip('/')}-{key}"
        fields = dict(dataset=cfg.dataset, teachers=cfg.teachers, data=cfg.data, cache=cache, limit=cfg.limit,
                      splits="train", device=cfg.device, **change)
        rationales_cfg = with_flags(tinyllm.RationalesConfig(**fields), cfg.rationales_args,
                                    "ablations --rationales_args", set(fields))
        reprompted.append((rationales_cfg, add(key, label, teachers, cache)))
    check_plans(experiment.runs, made_later={rationales_cfg.cache for rationales_cfg, _ in reprompted})
    for rationales_cfg, runs in reprompted:  # teachers are loaded only for rows with runs still to do
        if not all(run.finished() for run in runs):
            tinyllm.rationales(rationales_cfg)
    experiment.run()
    return write_ablations(experiment.root, experiment.summary())


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


# ---- the study: TinyLLM against fine-tuning, over datasets and seeds, one pooled paired verdict
# Each dataset is a stratum. The headline resamples what a rerun would change: the trained runs (each method's
# seeds) and the test questions (a two-level bootstrap), with a seed-level permutation p; beside it the
# interval that holds these trained runs fixed (questions only) and the sign-flip p. The runs choose their
# checkpoint on valid (train.py's best/); test is only scored.

@dataclass
class StudyConfig(ExperimentConfig):
    """`python eval.py study`: every method on every dataset, once per seed, and the pooled paired difference."""
    datasets: str = flag("", some_of(*data.DATASETS, at_least_one=False))  # the datasets, each a stratum of the pooled analysis ("" = --dataset)
    methods: str = "finetune tinyllm"  # the methods compared: the difference is the last minus the first
    alpha: str = flag("", train.ALPHA_RULE)  # name=weight ... for TinyLLM's Eq. 2 (default 1 each)
    resamples: int = flag(10_000, at_least(1))  # bootstrap resamples and sign flips of the analysis
    train: int = flag(1, BOOL)  # 0: only the analysis of the runs finished so far, nothing is trained

    def check(self) -> None:
        if len(method_runs(self.methods, [name for name, _ in tinyllm.parse_teachers(self.teachers)])) < 2:
            raise UserError(f"--methods={self.methods!r}: a study compares two methods or more (the last minus the first)")


def study_datasets(cfg: StudyConfig) -> list[str]:
    datasets = cfg.datasets.split() or [cfg.dataset]
    unknown = [d for d in datasets if d not in data.DATASETS]
    if unknown or len(set(datasets)) != len(datasets):
        raise UserError(f"--datasets={cfg.datasets!r}: each of {', '.join(data.DATASETS)} at most once")
    return datasets


def study(cfg: StudyConfig) -> dict:
    """Every method of --methods on every dataset of --datasets per seed, in OUT/study/<dataset>/<method>/[seed<N>/],
    seed by seed (a stopped study has whole seeds first); then write_study."""
    names = [name for name, _ in tinyllm.parse_teachers(cfg.teachers)]
    methods = method_runs(cfg.methods, names)
    if len(methods) < 2:
        raise UserError(f"--methods={cfg.methods!r}: a study compares two methods or more (the last minus the first)")
    root = Path(cfg.out) / "study"
    rows, runs = [], []
    for dataset in study_datasets(cfg):
        sub = dataclasses.replace(cfg, dataset=dataset, out=str(root))
        check_experiment(sub)
        for run, method, teacher in methods:
            folder = root / dataset / run
            plans = plan_runs(sub, "study", folder, method=method, teacher=teacher, alpha=cfg.alpha)
            rows.append(dict(dataset=dataset, run=run, method=method, folder=str(folder)))
            runs.append(plans)
    if cfg.train:
        run_plans([plans[k] for k in range(len(runs[0])) for plans in runs])  # seed-major order
    root.mkdir(parents=True, exist_ok=True)  # --train=0 before any run: the empty table still gets written
    summary = dict(datasets=study_datasets(cfg), methods=[run for run, _, _ in methods], metric=cfg.metric,
                   seeds=[s for s in parse_seeds(cfg.seeds) if s is not None], resamples=cfg.resamples,
                   command=command_line("study", cfg), rows=rows)
    return write_study(root, summary)


def question_scores(folder: Path, metric: str, split: str = "test") -> dict[str, dict[str, bool]]:
    """Seed name ("" for a run without seeds) -> {question id: correct} of every finished run of a row."""
    seeds = sorted(path.parent for path in folder.glob("seed*/results.json"))
    runs = {seed.name: seed for seed in seeds} or ({"": folder} if (folder / "results.json").is_file() else {})
    return {name: correct_by_id(Run(folder.name, "", {}, path), metric, split) for name, path in runs.items()}


def paired_runs(first: dict[str, dict[str, bool]], last: dict[str, dict[str, bool]]
               ) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """The seeds both methods have finished (sorted) and each method's correctness on them, (seeds, questions) as
    floats, the questions in sorted id order. None when no seed is finished for both."""
    seeds = sorted(first.keys() & last.keys())
    if not seeds:
        return None
    ids = sorted(first[seeds[0]])
    if any(sorted(runs[seed]) != ids for runs in (first, last) for seed in seeds):
        raise UserError("study: the runs of one dataset scored different test questions: evaluate all with the same --limit")
    first_runs, last_runs = (np.array([[runs[s][i] for i in ids] for s in seeds], dtype=np.float64) for runs in (first, last))
    return seeds, first_runs, last_runs


def study_analysis(strata: dict[str, tuple[np.ndarray, np.ndarray]], resamples: int, seed: int = 0) -> dict:
    """Per dataset and pooled, from each method's (seeds, questions) correctness: the mean per-question
    difference last − first in points, averaged over seeds; its 95% interval and p with the seeds resampled
    (low, high, p: seed_bootstrap_interval, seed_permutation_p) and with these runs held fixed (runs_fixed:
    bootstrap_interval, sign_flip_p). Per dataset also each method's standard deviation of test accuracy over
    seeds and the interval of their ratio (stability: exploratory)."""
    def one(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
        diffs = [last.mean(axis=0) - first.mean(axis=0) for first, last in pairs]  # per question, over seeds
        pooled = np.concatenate(diffs)
        low, high = seed_bootstrap_interval(pairs, resamples, seed)
        p, relabellings = seed_permutation_p(pairs, resamples, seed)
        fixed_low, fixed_high = bootstrap_interval(diffs, resamples, seed)
        return dict(n=len(pooled), diff=100 * float(pooled.mean()), low=low, high=high, p=p, relabellings=relabellings,
                    runs_fixed=dict(low=fixed_low, high=fixed_high, p=sign_flip_p(pooled, resamples, seed)))

    def stability(first: np.ndarray, last: np.ndarray) -> dict | None:
        if min(len(first), len(last)) < 2:
            return None
        first_acc, last_acc = 100 * first.mean(axis=1), 100 * last.mean(axis=1)  # each run's accuracy, points
        low, high = std_ratio_interval(first_acc, last_acc, resamples, seed)
        # JSON has no inf or nan: None is an unbounded end (inf), or no interval at all (nan: no spread anywhere)
        return dict(first_std=float(first_acc.std(ddof=1)), last_std=float(last_acc.std(ddof=1)),
                    ratio_low=low if math.isfinite(low) else None, ratio_high=high if math.isfinite(high) else None)

    return dict(datasets={name: one([pair]) | {"stability": stability(*pair)} for name, pair in strata.items()},
                pooled=one(list(strata.values())) if strata else None)


def write_study(root: Path, summary: dict) -> dict:
    """The study's table: each method's valid and test score per dataset (mean ± std over seeds, wall time), the
    difference per dataset and pooled with both intervals, the pooled verdict in one sentence (seed-aware), each
    seed's own difference, and the stability lines."""
    metric, methods = summary["metric"], summary["methods"]
    first, last = methods[0], methods[-1]
    cells, strata, seeds_used = {}, {}, {}
    for row in summary["rows"]:
        run = load_run(Path(row["folder"]))
        row.update(valid=None, valid_std=None, test=None, test_std=None, seconds=None, runs=0)
        if run is not None:
            row.update(valid=run.score(metric, "valid"), valid_std=run.spread(metric, "valid"),
                       test=run.score(metric, "test"), test_std=run.spread(metric, "test"), seconds=run.seconds(),
                       runs=len(run.seed_runs) or 1)
        cells[row["dataset"], row["run"]] = row
    seed_strata: dict[str, dict[str, np.ndarray]] = {}  # seed -> dataset -> that seed's own per-question differences
    for dataset in summary["datasets"]:
        paired = paired_runs(question_scores(Path(cells[dataset, first]["folder"]), metric),
                             question_scores(Path(cells[dataset, last]["folder"]), metric))
        if paired is not None:
            seeds, first_runs, last_runs = paired
            strata[dataset] = (first_runs, last_runs)
            seeds_used[dataset] = len(seeds)
            for k, seed in enumerate(seeds):
                seed_strata.setdefault(seed, {})[dataset] = last_runs[k] - first_runs[k]
    # pooled like the analysis (every question weighs the same), for the seeds finished on every dataset
    per_seed = {seed: {name: 100 * float(d.mean()) for name, d in diffs.items()} |
                ({"pooled": 100 * float(np.concatenate(list(diffs.values())).mean())} if diffs.keys() == strata.keys() else {})
                for seed, diffs in seed_strata.items()}
    analysis = study_analysis(strata, summary["resamples"])
    summary.update(analysis=analysis, seeds_used=seeds_used, per_seed=per_seed)
    label = {run: row_label(run, cells[summary["datasets"][0], run]["method"]) for run in methods}
    comparison = f"{label[last]} − {label[first]}"
    lines = [f"study: {comparison} on test, {metric} in points; per question the mean over seeds. Seeds resampled "
             f"(the headline): 95% two-level bootstrap (each method's seeds, then the questions, within each "
             f"dataset; {summary['resamples']:,} resamples, seed 0) and a seed-level permutation p (method labels "
             f"shuffled among each dataset's runs). Runs fixed (conditional on these trained runs): paired "
             f"bootstrap of the questions and a sign-flip p", ""]
    pooled = analysis["pooled"]
    if pooled is not None:
        lines += [verdict(comparison, pooled, seeds_used), ""]
    lines += ["| dataset | " + " | ".join(f"{label[m]} valid | {label[m]} test" for m in methods) +
              " | Δ test | 95% CI, seeds resampled | p, seeds | 95% CI, runs fixed | p, runs fixed | seeds | questions "
              f"| wall time ({', '.join(label[m] for m in methods)}) |",
              "|---|" + "---:|---:|" * len(methods) + "---:|---:|---:|---:|---:|---:|---:|---|"]

    def paired_cells(r: dict) -> str:
        fixed = r["runs_fixed"]
        return (f"{r['diff']:+.2f} | [{r['low']:+.2f}, {r['high']:+.2f}] | {r['p']:.3g} | "
                f"[{fixed['low']:+.2f}, {fixed['high']:+.2f}] | {fixed['p']:.3g}")

    for dataset in summary["datasets"]:
        scores = " | ".join(f"{percent(cells[dataset, m]['valid'], cells[dataset, m]['valid_std'])} | "
                            f"{percent(cells[dataset, m]['test'], cells[dataset, m]['test_std'])}" for m in methods)
        times = ", ".join(format_seconds(cells[dataset, m]["seconds"]) if cells[dataset, m]["seconds"] else "—"
                          for m in methods)
        result = analysis["datasets"].get(dataset)
        paired = (f"{paired_cells(result)} | {seeds_used[dataset]} | {result['n']}" if result
                  else "— | — | — | — | — | 0 | —")
        lines.append(f"| {dataset} | {scores} | {paired} | {times} |")
    if pooled is not None:
        lines.append(f"| **pooled** |" + " | " * (2 * len(methods) - 1) +
                     f" | **{pooled['diff']:+.2f}** | {paired_cells(pooled).split(' | ', 1)[1]} | | {pooled['n']} | |")
    if len(per_seed) > 1:
        lines += ["", "per seed, each seed's own runs (Δ test, points): " + "; ".join(
            f"{seed}: " + ", ".join(f"{name} {value:+.2f}" for name, value in diffs.items())
            for seed, diffs in per_seed.items())]
    steadiness = [(dataset, r["stability"]) for dataset, r in analysis["datasets"].items() if r["stability"]]
    if steadiness:
        def ratio(s: dict) -> str:
            if not s["first_std"]:
                return "∞" if s["last_std"] else "undefined (no spread)"
            bound = lambda value: "∞" if value is None else f"{value:.2f}"
            return f"{s['last_std'] / s['first_std']:.2f} [{bound(s['ratio_low'])}, {bound(s['ratio_high'])}]"
        lines += ["", f"stability across seeds (exploratory): standard deviation of test accuracy over seeds, "
                      f"{label[first]} / {label[last]}, and the ratio {label[last]} / {label[first]} with its 95% "
                      "bootstrap interval (seeds resampled): " + "; ".join(
                          f"{dataset} {s['first_std']:.2f} / {s['last_std']:.2f} points, ratio {ratio(s)}"
                          for dataset, s in steadiness)]
    seed_folders = [f"seed{seed}" for seed in summary["seeds"]] or [""]  # "": a run without seeds is its row's folder
    missing = [f"{row['dataset']}/{row['run']}" + (f"/{name}" if name else "") for row in summary["rows"]
               for name in seed_folders if not (Path(row["folder"]) / name / "results.json").is_file()]
    if missing:
        lines += ["", f"not finished yet (the same command continues): {', '.join(missing)}"]
    return write_summary(root, "study", summary, lines)


def verdict(comparison: str, pooled: dict, seeds_used: dict[str, int]) -> str:
    """The pooled result in one sentence, from the seed-aware interval: "better" or "worse" only when it excludes
    0, else "no difference established"; the number of seeds in; the interval with the runs fixed beside it."""
    ours, base = comparison.split(" − ")
    if pooled["low"] > 0 or pooled["high"] < 0:
        head = f"{ours} is {'better' if pooled['diff'] > 0 else 'worse'} than {base} by {abs(pooled['diff']):.2f} points"
    else:
        head = f"No difference established: {comparison} = {pooled['diff']:+.2f} points"
    counts = sorted(set(seeds_used.values()))
    seeds = (f"{counts[0]} seed{'s' if counts[0] != 1 else ''} per method on each" if len(counts) == 1 else
             "; ".join(f"{n} seeds of {d}" for d, n in seeds_used.items()))
    fixed = pooled["runs_fixed"]
    return (f"**{head}** (pooled over {pooled['n']:,} test questions of {len(seeds_used)} dataset"
            f"{'s' if len(seeds_used) != 1 else ''}, {seeds}; 95% CI with the seeds resampled "
            f"[{pooled['low']:+.2f}, {pooled['high']:+.2f}], seed-level p = {pooled['p']:.3g}; with these trained "
            f"runs held fixed [{fixed['low']:+.2f}, {fixed['high']:+.2f}], p = {fixed['p']:.3g}).")


# ---------------------------------------------------------------------------------------------------
# Figures: PNG through matplotlib, an optional extra (requirements-extra.txt), imported only here. Fixed
# sizes (no tight bounding box), so every PNG is FIGURE_SIZES[kind] x FIGURE_DPI pixels.

FIGURE_DPI = 100
FIGURE_SIZES = {"table": (8.0, 4.5), "sweep": (6.5, 5.0), "fractions": (7.0, 4.5), "ablations": (8.0, 4.5),
                "study": (7.0, 3.5),
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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=FIGURE_DPI)
    atomic_write(path, png.getvalue())
    print(f"figure: {path}")
    return True


def draw_summary(root: Path, name: str, summary: dict) -> None:
    if name == "sweep" and len(summary["grid"]) != 2:
        print(f"{root / 'sweep.png'}: no figure, the Fig. 3 heatmap is for two teachers ({len(summary['grid'])} here)")
        return
    plot = {"sweep": plot_sweep, "fractions": plot_fractions, "ablations": plot_ablations, "study": plot_study}[name]
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
    ax.set_xticks(range(len(xs)), [format_number(x) for x in xs])
    ax.set_yticks(range(len(ys)), [format_number(y) for y in ys])
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


def plot_study(fig, summary: dict) -> None:
    """The forest plot: each dataset's difference and the pooled one with both 95% intervals (thick: seeds
    resampled, the headline; thin, just below: these runs held fixed), each seed's own difference as a grey
    cross above, 0 dashed."""
    analysis = summary["analysis"]
    lines = [(name, r) for name, r in analysis["datasets"].items()]
    if analysis["pooled"] is not None:
        lines.append(("pooled", analysis["pooled"]))
    ax = fig.subplots()
    for y, (name, r) in enumerate(reversed(lines)):
        color = "black" if name == "pooled" else "tab:blue"
        ax.errorbar([r["diff"]], [y], xerr=[[r["diff"] - r["low"]], [r["high"] - r["diff"]]], color=color,
                    fmt="D" if name == "pooled" else "o", capsize=4, linewidth=2.5,
                    label="95% CI, seeds resampled" if y == 0 else None)
        fixed = r.get("runs_fixed")  # absent in a study.json written before the seed-aware analysis
        if fixed:
            ax.errorbar([r["diff"]], [y - 0.2], xerr=[[r["diff"] - fixed["low"]], [fixed["high"] - r["diff"]]],
                        fmt="none", color=color, capsize=2, linewidth=1, alpha=0.7,
                        label="95% CI, these runs fixed" if y == 0 else None)
        seeds = [diffs[name] for diffs in summary.get("per_seed", {}).values() if name in diffs]
        ax.plot(seeds, [y + 0.2] * len(seeds), "x", color="gray", label="one seed" if y == 0 and seeds else None)
    ax.axvline(0, linestyle="--", color="gray")
    ax.set_yticks(range(len(lines)), [f"{name} (n={r['n']})" for name, r in reversed(lines)])
    ax.set_ylim(-0.6, len(lines) - 0.4)
    methods = summary["methods"]
    ax.set_xlabel(f"{methods[-1]} − {methods[0]}, test {summary['metric']} (points)")
    ax.set_title("study: difference per dataset and pooled")
    if lines:
        ax.legend(loc="lower right", fontsize="x-small")


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
    """`python eval.py report`: OUT/<dataset>/report.md, every table and figure there with its command."""
    dataset: str = flag("obqa", one_of(*data.DATASETS))  # the benchmark (§4.1)
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
    atomic_write(root / "report.md", "\n".join(lines) + "\n")
    print(f"report: {root / 'report.md'}")
    return root / "report.md"


EXPERIMENTS = {"sweep": (SweepConfig, sweep), "fractions": (FractionsConfig, fractions),
               "ablations": (AblationsConfig, ablations), "study": (StudyConfig, study)}


def main(argv: list[str]) -> None:
    command = argv[0] if argv else ""
    if command == "table":
        cfg = parse_flags(TableConfig, argv[1:], command)
        write_table(cfg, table(cfg))
    elif command == "report":
        report(parse_flags(ReportConfig, argv[1:], command))
    elif command in EXPERIMENTS:
        config_cls, experiment = EXPERIMENTS[command]
        experiment(parse_flags(config_cls, argv[1:], command))
    else:
        # results.json and predictions.jsonl are written whole at the end (atomic_write)
        with interrupt_note("no result of this evaluation was written (they are written at the end); "
                            "rerun the same command"):
            evaluate(parse_flags(EvalConfig, argv))


if __name__ == "__main__":
    run_main(main, "lower --batch_size (ARGS=--batch_size=8), or --max_new_tokens / --max_input_tokens (the "
                   "experiments: in --train_args / --eval_args)")
