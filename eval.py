"""Evaluate a model and compare runs: accuracy on test and valid, Table 1, and the paired statistics.

    python eval.py --dataset=obqa --model=out/obqa/tinyllm/best --method=tinyllm --data=data --out=out/obqa/tinyllm
    python eval.py table --dataset=obqa --out=out

Answers are generated greedily from the answer prompt (p_A ⊕ question ⊕ options) and mapped to an
option with prompts.parse_answer: the paper's exact-match accuracy (its code compares the decoded text
with the answer text). `--scoring=rank` instead picks the option whose answer text has the highest
log-likelihood (summed over its tokens). Any model source works, so teachers are evaluated the same way
(`--method=teacher`, one run folder per teacher, e.g. out/obqa/teacher-flan-t5-xl).

Writes OUT/predictions.jsonl (one record per example and split) and OUT/results.json =
{"test": {"accuracy", "n"}, "valid": {...}, "model", "method", ...}. A run repeated over SEEDS is a folder
of seed<N>/ run folders; tables show it as the mean ± the sample standard deviation over its seeds.

The paired statistics (both runs answered the same test questions): the question bootstrap and sign-flip p of
one comparison or one pooled over datasets, McNemar's exact test, and, over seeds as well, the two-level
bootstrap and the seed-level permutation p that the study (experiments.py) leads with. The figures are PNG
through matplotlib, an optional extra. The experiments that fill Table 1's neighbours live in experiments.py.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import statistics
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import cli
import data
from cli import (AUTO_BOOL, BOOL, Progress, Rule, UserError, at_least, atomic_write, flag, format_seconds,
                 on_stop, one_of, parse_flags, resolve_device, run_main, some_of, split_list)
from student import accuracy, bf16_supported, load_student, parse_scoring, predict


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


def split_results(records: list[dict]) -> dict:
    """accuracy (the first scoring's: generate, or rank's summed log-likelihood, lm-eval's acc), n, and per
    scoring its own: accuracy_generate; accuracy_sum and accuracy_norm (per UTF-8 byte, lm-eval's acc_norm)."""
    results = {"accuracy": accuracy(records), "n": len(records)}
    for metric, key in METRICS.items():
        if records and key in records[0]:
            results[metric] = accuracy(records, key)
    return results


def evaluate(cfg: EvalConfig) -> dict:
    cli.check_flags(cfg)  # a config made in code (an experiment's run) is checked as a parsed one is
    splits = split_list(cfg.splits)  # as SPLITS_RULE reads them
    cli.check_folder(cfg.out, "--out")
    device = torch.device(resolve_device(cfg.device))
    if cfg.check_only:
        for split in splits:
            data.load_split(cfg.dataset, split, cfg.data, limit=cfg.limit or None)
        print(f"{cfg.out}: the flags, the data and the run folder are fine (--check_only=1)")
        return {}
    with cli.folder_lock(cfg.out):  # one writer per run folder, until results.json is written
        return write_evaluation(cfg, splits, device)


def write_evaluation(cfg: EvalConfig, splits: list[str], device: torch.device) -> dict:
    """evaluate's work: every split's predictions, then predictions.jsonl and results.json, each written whole."""
    # Inference only: bf16 weights where the device computes in bf16 natively, fp32 elsewhere.
    dtype = torch.bfloat16 if cfg.bf16 and bf16_supported(device) else torch.float32
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
        results[split] = split_results(records)
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


def seed_folders(folder: Path) -> list[Path]:
    """The finished seed<N>/ runs of a row folder (those with a results.json), by N."""
    return sorted((path.parent for path in folder.glob("seed*/results.json") if path.parent.name[4:].isdigit()),
                  key=lambda seed: int(seed.name[4:]))


def load_run(folder: Path) -> Run | None:
    """The run in `folder`: its results.json, or (SEEDS) its seed<N>/results.json folders, which take
    precedence over a results.json beside them. One seed is that seed's run, under the row's name."""
    seeds = seed_folders(folder)
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


def correct_by_id(folder: Path, metric: str, split: str = "test") -> dict[str, bool]:
    """Question id -> correct by `metric` on `split`, from a run folder's predictions.jsonl."""
    key = "correct" if metric == "accuracy" else METRICS[metric]
    records = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return {r["id"]: r[key] for r in records if r["split"] == split and key in r}


def paired_line(ours: Run, base: Run, metric: str, resamples: int, seed: int) -> str:
    label = f"| {row_label(ours.name, ours.method)} − {row_label(base.name, base.method)} |"
    if ours.seed_runs or base.seed_runs:
        return f"{label} not paired: repeated over SEEDS, compared by mean ± std above | | | |"
    missing = [str(run.folder / "predictions.jsonl") for run in (ours, base)
               if not (run.folder / "predictions.jsonl").is_file()]
    if missing:
        return f"{label} no {' or '.join(missing)}: run `make eval` | | | |"
    a, b = correct_by_id(ours.folder, metric), correct_by_id(base.folder, metric)
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
    cli.check_flags(cfg)  # a config made in code is checked as a parsed one is
    metrics = split_list(cfg.metric)  # as its rule reads them
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
    metric = split_list(cfg.metric)[0]
    draw("table", root / "table.png", lambda fig: plot_table(fig, read_results(Path(cfg.out), cfg.dataset),
                                                            metric, cfg.dataset))



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


def plot_table(fig, runs: list[Run], metric: str, dataset: str) -> None:
    ax = fig.subplots()
    runs = [run for run in runs if run.score(metric) is not None]
    ax.bar(range(len(runs)), [run.score(metric) * 100 for run in runs],
           yerr=[(run.spread(metric) or 0.0) * 100 for run in runs], capsize=4, color="tab:blue")
    ax.set_xticks(range(len(runs)), [row_label(run.name, run.method) for run in runs], rotation=20, ha="right")
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title(f"{dataset}: Table 1")


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


def main(argv: list[str]) -> None:
    command = argv[0] if argv else ""
    if command == "table":
        cfg = parse_flags(TableConfig, argv[1:], command)
        write_table(cfg, table(cfg))
    else:
        # results.json and predictions.jsonl are written whole at the end (atomic_write)
        with on_stop("no result of this evaluation was written (they are written at the end); "
                            "rerun the same command"):
            evaluate(parse_flags(EvalConfig, argv))


if __name__ == "__main__":
    run_main(main, "lower --batch_size (ARGS=--batch_size=8), or --max_new_tokens / --max_input_tokens")
