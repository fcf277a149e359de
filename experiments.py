"""The paper's experiments and the study, one command each: resumable runs, their tables, figures and report.

    python experiments.py sweep --dataset=obqa --alphas="0.01 0.1 0.5 1 2 3"      # α per teacher (§4.1, Fig. 3)
    python experiments.py fractions --dataset=obqa --methods="tinyllm dss finetune"  # less training data (Fig. 2)
    python experiments.py ablations --dataset=obqa                                 # Table 2's rows
    python experiments.py study --datasets="obqa riddle" --seeds="0 1 2"           # TinyLLM vs fine-tuning, pooled
    python experiments.py report --dataset=obqa --out=out   # OUT/obqa/report.md: every table and figure, with its command

Every row of an experiment is an ordinary run folder (train.py's best/, metrics.jsonl, train.json, and
last/ until the run is finished; eval.py's results.json, predictions.jsonl), or with --seeds one seed<N>/ run
folder per seed. The runs go in this process, one after the other, through train.train and evaluate with the
configs `make train eval` would build: no Python start and torch import per run (longer than a tiny run
itself), and a failing run stops the experiment with its own message. Resumable: a run with results.json
is done and never redone, one with train.json (training ended) is only evaluated, one with last/ continues
from it (train.py --resume), so a killed experiment, started again, does what is missing. Then each row is
scored from its run folder(s), the table printed, and OUT/<dataset>/<experiment>.json (every row), .md (the
table) and .png (the figure) written.

An experiment is a config (ExperimentConfig and its own flags), a function that adds its rows to an
Experiment, runs them and writes its table (write_<name>), a line in EXPERIMENTS, and its figure
(draw_summary) and section of the report (SECTIONS).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shlex
import shutil
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import cli
import data
import tinyllm
import train
from cli import (BOOL, ConfigT, Rule, UserError, at_least, atomic_write, flag, format_seconds, on_stop, one_of,
                 parse_flags, run_main, some_of, split_list)
from eval import (MATPLOTLIB_HINT, METRIC_NAMES, EvalConfig, TableConfig, bootstrap_interval, correct_by_id, draw,
                  draw_training, evaluate, figure_class, load_run, percent, plot_table, read_results, row_label,
                  seed_bootstrap_interval, seed_folders, seed_permutation_p, sign_flip_p, std_ratio_interval, table,
                  write_table)


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
    for item in split_list(text):
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
        values = [int(item) for item in split_list(seeds)]
    except ValueError:
        raise UserError(f"--seeds={seeds!r}: expected integers, e.g. --seeds=\"0 1 2\" (SEEDS= for make)") from None
    if len(set(values)) != len(values):
        raise UserError(f"--seeds={seeds!r}: a seed appears twice (SEEDS= for make)")
    return values or [None]


def with_flags(config: ConfigT, args: str, what: str, fixed: set[str]) -> ConfigT:
    """`config` with the --key=value flags in `args` applied (type-checked by parse_flags). The keys in
    `fixed` are set by the experiment itself, per row, and refused here."""
    tokens = shlex.split(args)
    values = cli.read_flags(type(config), tokens)
    keys = [token.removeprefix("--").partition("=")[0] for token in tokens]
    taken = sorted(set(keys) & fixed)
    if taken:
        raise UserError(f"{what}: --{taken[0]} is set by the experiment itself ({', '.join(sorted(fixed))})")
    return cli.check_flags(dataclasses.replace(config, **values))


def check_experiment(cfg: ExperimentConfig) -> None:
    cli.check_flags(cfg)  # parse_flags did for the command line; again for a config made in code (the study's)


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
        """To its results.json: train (or continue training from last/), then evaluate best/, holding the run
        folder's lock throughout (another process on it stops this run before any work)."""
        with cli.folder_lock(self.folder):
            self.train_and_evaluate()

    def train_and_evaluate(self) -> None:
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
        # Done: last/ only ever served to continue a killed training. It holds the weights and AdamW's two
        # moments (1.6 GB for SmolLM2-135M, three times best/); kept, a 40-run study needs 85 GB and filled
        # this machine's disk. best/ (what was scored) and train.json (the config it trained with) stay.
        if (self.folder / "last").exists():
            shutil.rmtree(self.folder / "last")


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
    """`python experiments.py <command>` with every flag of `cfg` that differs from its default: how a summary was
    made, written into it for `make report`."""
    default = type(cfg)()
    flags = [shlex.quote(f"--{f.name}={getattr(cfg, f.name)}") for f in dataclasses.fields(cfg)
             if getattr(cfg, f.name) != getattr(default, f.name)]
    return " ".join(["python experiments.py", command, *flags])


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
        cli.check_flags(run.train)
        cli.check_flags(run.eval)
        cli.check_folder(run.folder, "--out")
        cfg = run.train
        inputs = (cfg.dataset, cfg.data, cfg.cache, cfg.teachers, cfg.method, cfg.teacher, cfg.limit, cfg.train_limit,
                  cfg.train_fraction, cfg.seed, run.eval.splits)
        if run.finished() or inputs in checked:
            continue
        checked.add(inputs)
        for split in split_list(run.eval.splits):
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
        # a stop (Ctrl-C, SIGTERM, a full disk): finished runs keep their results.json and this one its last/, and
        # the same command goes on; the line below is inside, so that a signal right after it says so too
        with on_stop(f"{done + n - 1} of {len(runs)} runs are finished and kept, and {run.folder} "
                     "keeps its last checkpoint if it saved one; the same command continues from there"):
            print(f"--- run {n} of {len(todo)}: {run.folder}", flush=True)
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
    """`python experiments.py sweep`: TinyLLM once per combination of α over the teachers, the best chosen on valid."""
    alphas: str = flag("0.01 0.1 0.5 1 2 3", ALPHAS_RULE)  # §4.1: the values of every α_m; the grid is their product over teachers
    sweep: str = ""  # an explicit grid instead, naming every teacher: "a=0.1,1 b=1,3"

    def check(self) -> None:
        sweep_grid(self, tinyllm.teacher_names(self.teachers))


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
    names = tinyllm.teacher_names(cfg.teachers)
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
    """`python experiments.py fractions`: every method on nested fractions of the training set (Fig. 2)."""
    fractions: str = flag("0.125 0.25 0.5 0.75 1", FRACTIONS_RULE)  # Fig. 2: fractions of the training set (nested, per seed)
    methods: str = "tinyllm dss finetune"  # a curve each; dss once per teacher (dss-<teacher>), kd with the first
    alpha: str = flag("", train.ALPHA_RULE)  # name=weight ... for TinyLLM's Eq. 2 (default 1 each)

    def check(self) -> None:
        method_runs(self.methods, tinyllm.teacher_names(self.teachers))


def method_runs(methods: str, names: list[str]) -> list[tuple[str, str, str]]:
    """(run name, method, teacher) per method, named as `make table` names its run folders."""
    trained = [m for m in train.METHODS if m != "inference"]
    runs: list[tuple[str, str, str]] = []
    for method in split_list(methods):
        if method not in trained:
            raise UserError(f"--methods: {method!r} is not one of {', '.join(trained)} (inference trains nothing)")
        runs += [(f"dss-{name}", "dss", name) for name in names] if method == "dss" else [(method, method, "")]
    if not runs or len({run for run, _, _ in runs}) != len(runs):
        raise UserError(f"--methods={methods!r}: give each method once")
    return runs


def fractions(cfg: FractionsConfig) -> dict:
    """Fig. 2: every method trained on nested fractions of the training set (train.py --train_fraction)."""
    check_experiment(cfg)
    names = tinyllm.teacher_names(cfg.teachers)
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
    """`python experiments.py ablations`: Table 2, TinyLLM without each teacher, in-context examples, teacher forcing."""
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
    """`python experiments.py study`: every method on every dataset, once per seed, and the pooled paired difference."""
    datasets: str = flag("", some_of(*data.DATASETS, at_least_one=False))  # the datasets, each a stratum of the pooled analysis ("" = --dataset)
    methods: str = "finetune tinyllm"  # the methods compared: the difference is the last minus the first
    alpha: str = flag("", train.ALPHA_RULE)  # name=weight ... for TinyLLM's Eq. 2 (default 1 each)
    resamples: int = flag(10_000, at_least(1))  # bootstrap resamples and sign flips of the analysis
    train: int = flag(1, BOOL)  # 0: only the analysis of the runs finished so far, nothing is trained

    def check(self) -> None:
        if len(method_runs(self.methods, tinyllm.teacher_names(self.teachers))) < 2:
            raise UserError(f"--methods={self.methods!r}: a study compares two methods or more (the last minus the first)")


def study_datasets(cfg: StudyConfig) -> list[str]:
    """--datasets as its rule reads it (known, each once, comma- or space-separated), else --dataset."""
    return split_list(cfg.datasets) or [cfg.dataset]


def study(cfg: StudyConfig) -> dict:
    """Every method of --methods on every dataset of --datasets per seed, in OUT/study/<dataset>/<method>/[seed<N>/],
    seed by seed (a stopped study has whole seeds first); then write_study."""
    methods = method_runs(cfg.methods, tinyllm.teacher_names(cfg.teachers))  # two or more: StudyConfig.check
    root = Path(cfg.out) / "study"
    datasets = study_datasets(cfg)
    rows, runs = [], []
    for dataset in datasets:
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
    summary = dict(datasets=datasets, methods=[run for run, _, _ in methods], metric=cfg.metric,
                   seeds=[s for s in parse_seeds(cfg.seeds) if s is not None], resamples=cfg.resamples,
                   command=command_line("study", cfg), rows=rows)
    return write_study(root, summary)


def question_scores(folder: Path, metric: str, split: str = "test") -> dict[str, dict[str, bool]]:
    """Seed name ("" for a run without seeds) -> {question id: correct} of every finished run of a row."""
    runs = {seed.name: seed for seed in seed_folders(folder)} or ({"": folder} if (folder / "results.json").is_file() else {})
    return {name: correct_by_id(path, metric, split) for name, path in runs.items()}


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
    seed_folders = [f"seed{seed}" for seed in summary["seeds"]] or [""]  # "": a run without seeds is its row's folder
    missing = [f"{row['dataset']}/{row['run']}" + (f"/{name}" if name else "") for row in summary["rows"]
               for name in seed_folders if not (Path(row["folder"]) / name / "results.json").is_file()]
    planned = len(summary["rows"]) * len(seed_folders)
    pooled = analysis["pooled"]
    if pooled is not None:
        lines += [verdict(comparison, pooled, seeds_used, (planned - len(missing), planned)), ""]
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
        lines.append("| **pooled** |" + " | " * (2 * len(methods) - 1) +
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
    if missing:
        lines += ["", f"not finished yet (the same command continues): {', '.join(missing)}"]
    return write_summary(root, "study", summary, lines)


def verdict(comparison: str, pooled: dict, seeds_used: dict[str, int], runs: tuple[int, int]) -> str:
    """The pooled result in one sentence, from the seed-aware interval: "better" or "worse" only when it excludes
    0, else "no difference established"; the number of seeds in; the interval with the runs fixed beside it.
    While fewer than the planned runs (done, planned) are in, it is marked interim: the design fixes the seeds
    in advance, and a line crossed on the way decides nothing."""
    ours, base = comparison.split(" − ")
    if pooled["low"] > 0:
        head = f"{ours} is better than {base} by {pooled['diff']:.2f} points"
    elif pooled["high"] < 0:
        head = f"{ours} is worse than {base} by {-pooled['diff']:.2f} points"
    else:
        head = f"No difference established: {comparison} = {pooled['diff']:+.2f} points"
    counts = sorted(set(seeds_used.values()))
    seeds = (f"{counts[0]} seed{'s' if counts[0] != 1 else ''} per method on each" if len(counts) == 1 else
             " and ".join(f"{n} seed{'s' if n != 1 else ''} of {d}" for d, n in seeds_used.items()))
    if runs[0] < runs[1]:
        head = f"Interim, {runs[0]} of {runs[1]} runs in: " + head.replace("No difference", "no difference", 1)
    fixed = pooled["runs_fixed"]
    return (f"**{head}** (pooled over {pooled['n']:,} test questions of {len(seeds_used)} dataset"
            f"{'s' if len(seeds_used) != 1 else ''}, {seeds}; 95% CI with the seeds resampled "
            f"[{pooled['low']:+.2f}, {pooled['high']:+.2f}], seed-level p = {pooled['p']:.3g}; with these trained "
            f"runs held fixed [{fixed['low']:+.2f}, {fixed['high']:+.2f}], p = {fixed['p']:.3g}).")


# ---------------------------------------------------------------------------------------------------
# Figures of the experiments (eval.draw: PNG through matplotlib, optional)

def draw_summary(root: Path, name: str, summary: dict) -> None:
    if name == "sweep" and len(summary["grid"]) != 2:
        print(f"{root / 'sweep.png'}: no figure, the Fig. 3 heatmap is for two teachers ({len(summary['grid'])} here)")
        return
    plot = {"sweep": plot_sweep, "fractions": plot_fractions, "ablations": plot_ablations, "study": plot_study}[name]
    draw(name, root / f"{name}.png", lambda fig: plot(fig, summary))


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



# ---------------------------------------------------------------------------------------------------
# make report: OUT/<dataset>/report.md, every table and figure there with the command that made it

@dataclass
class ReportConfig:
    """`python experiments.py report`: OUT/<dataset>/report.md, every table and figure there with its command."""
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
    if command in ("--help", "-h", "help"):
        configs = {name: config for name, (config, _) in EXPERIMENTS.items()} | {"report": ReportConfig}
        print("usage: python experiments.py <command> [--key=value ...]\n" + "\n".join(
            f"  {name:<10} {config.__doc__.split(': ', 1)[1].splitlines()[0]}" for name, config in configs.items()) +
            "\n`python experiments.py <command> --help` lists its flags")
        return
    if command == "report":
        report(parse_flags(ReportConfig, argv[1:], command))
    elif command in EXPERIMENTS:
        config_cls, experiment = EXPERIMENTS[command]
        experiment(parse_flags(config_cls, argv[1:], command))
    else:
        raise UserError(f"{command or 'no command'}: expected one of {', '.join([*EXPERIMENTS, 'report'])} "
                        "(python experiments.py <command> --help lists its flags)")


if __name__ == "__main__":
    run_main(main, "lower --batch_size (ARGS=--batch_size=8), or --max_new_tokens / --max_input_tokens (in "
                   "--train_args / --eval_args)")
