"""Train a student on the answers and every teacher's rationales: the method (TinyLLM §3.3, Eq. 2-4) and its loop.

    python train.py --dataset=obqa --student=google/flan-t5-small --teachers="flan-t5-xl=release:flan-t5-xl llama-2=release:llama-2" \
        --alpha="flan-t5-xl=1 llama-2=0.5" --method=tinyllm --data=data --cache=cache --out=out/obqa/tinyllm

Read top to bottom. The config; then the method: each training example becomes one row per task (build_tasks:
the answer task, input p_A ⊕ Q ⊕ O and target the answer, and one rationale task per teacher m, input p_m ⊕ Q ⊕ O
and target m's rationale from the cache), and the loss of a batch of rows is Eq. 2, L = L_A + Σ_m α_m L_Tm,
each task loss the mean token cross-entropy over that task's tokens in the step (micro_batch_loss, train_step);
then the loop (train: maybe_log / maybe_eval / maybe_save, as nanoT5) and its set-up, checkpoints and resume.
How rows become one forward pass (packing, the chunked LM-head loss, the decoder-only shared prompt) is the
student's business: student.py.

Methods (the paper's Table 1 rows): tinyllm (all teachers), finetune (L_A only), kd (the answer target is
the teacher's stated answer), dss (Distill-step-by-step: one teacher's rationales), lora (L_A with
low-rank adapters on the attention q/v projections, merged at save), inference (nothing to train).

References: TinyLLM, Tian et al., arXiv 2402.04616; Distilling step-by-step, Hsieh et al., 2023;
LoRA, Hu et al., 2021; nanoT5 (the loop split into maybe_log / maybe_eval / maybe_save).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

import cli
import data
import prompts
import tinyllm
from cli import (AUTO_BOOL, BOOL, Rule, UserError, above, at_least, atomic_write, flag, fraction, fsync_path,
                 format_seconds, on_stop, one_of, parse_flags, run_main, setup_distributed)
from student import (ANSWER_TASK, Student, adapter_state, add_lora, compile_objective, inference_student,
                     load_adapters, load_student, predict)

METHODS = ("tinyllm", "finetune", "kd", "dss", "lora", "inference")


# ---------------------------------------------------------------------------------------------------
# the config: --key=value flags, type-checked against it; "" means "the default"

def parse_alpha(alpha: str, names: list[str] | None) -> dict[str, float]:
    """"a=1 b=0.5" -> {a: 1.0, b: 0.5}; teachers not named get weight 1 (Eq. 2's α_m, >= 0). names=None: any
    teacher name (the syntax and the weights alone)."""
    weights = {name: 1.0 for name in names or []}
    for spec in alpha.split():
        name, sep, value = spec.partition("=")
        if not sep or not name or (names is not None and name not in weights):
            raise UserError(f"--alpha: {spec!r} is not name=weight for a teacher in --teachers "
                            f"({' '.join(names or []) or 'none'}) (ALPHA= for make)")
        try:
            weights[name] = float(value)
        except ValueError:
            raise UserError(f"--alpha: weight {value!r} of {name} is not a number (ALPHA= for make)") from None
        if not (math.isfinite(weights[name]) and weights[name] >= 0):
            raise UserError(f"--alpha: weight {value} of {name} must be >= 0, Eq. 2's α_m (ALPHA= for make)")
    return weights


TEACHERS_RULE = Rule("name[=source] ..., names distinct", lambda value: tinyllm.parse_teachers(value, sources=False)
                     and None, empty_is_value=True)


ALPHA_RULE = Rule("name=weight ..., each >= 0", lambda value: parse_alpha(value, None) and None)


@dataclass
class TrainConfig:
    dataset: str = flag("obqa", one_of(*data.DATASETS))  # the benchmark (§4.1)
    student: str = "google/flan-t5-small"  # hub id or folder: T5 (seq2seq) or LLaMA-family (decoder-only)
    teachers: str = flag("flan-t5-xl=release:flan-t5-xl llama-2=release:llama-2", TEACHERS_RULE)  # names pick the cache files; sources must match theirs
    alpha: str = flag("", ALPHA_RULE)  # "name=weight ..." for Eq. 2; default 1 for every teacher
    method: str = flag("tinyllm", one_of(*METHODS))  # the row of Table 1 to train
    teacher: str = ""  # the one teacher of dss / kd; default the first of --teachers
    data: str = "data"  # the datasets' folder (downloaded and checksummed on first use)
    cache: str = "cache"  # the rationale cache (`make rationales`)
    out: str = ""  # run folder; default out/<dataset>/<method>
    limit: int = flag(0, at_least(0))  # first N examples of train and valid (0 = all)
    train_limit: int = flag(0, at_least(0))  # first N training examples only (0 = all); valid stays whole, unlike --limit
    train_fraction: float = flag(1.0, fraction())  # a seeded fraction of train, the paper's Figure 2 (12.5% ... 100%)
    device: str = "auto"  # auto = cuda when available, else cpu
    resume: int = flag(0, BOOL)  # 1: continue from OUT/last (optimizer, scheduler, data order, RNG)
    # optimisation: the paper's defaults
    lr: float = flag(5e-5, above(0))  # AdamW peak learning rate, decayed linearly to 0
    batch_size: int = flag(8, at_least(1))  # examples per optimizer step, over all processes and accumulation steps
    grad_accum: int = flag(1, at_least(1))  # micro-batches per optimizer step (each batch_size / grad_accum examples)
    epochs: int = flag(1, at_least(1))  # passes over the training set (the paper: 1)
    warmup_steps: int = flag(0, at_least(0))  # linear warmup steps before the decay
    weight_decay: float = flag(0.0, at_least(0))  # AdamW's decoupled weight decay
    clip: float = flag(1.0, at_least(0))  # max gradient norm (0 = no clipping)
    seed: int = 0  # data order, dropout, the train_fraction subset
    # the student: its inputs, precision and speed
    max_input_tokens: int = flag(1024, at_least(1))  # longer inputs lose words from the start of the question
    max_target_tokens: int = flag(256, at_least(1))  # rationale targets are cut to this many tokens
    bf16: int = flag(1, BOOL)  # bf16 autocast on CUDA (and CPU with native bf16); weights stay fp32
    checkpointing: int = flag(0, BOOL)  # 1: recompute each block in backward (activation checkpointing), for large students
    compile: int = flag(0, BOOL)  # 1: torch.compile the model's forward in the step; off by default (README, Performance):
    #  on the CPU +9% (T5) and nothing (SmolLM2) after a 1.5-2 minute first step; on a GPU not measured yet
    chat: int = flag(-1, AUTO_BOOL)  # decoder-only student: 1 = its chat template around the input, 0 = plain text, -1 = default
    boundary: int = flag(-1, AUTO_BOOL)  # decoder-only student: 1 = the input ends with a line naming the target, -1 = default (1)
    task_prefix: int = flag(-1, AUTO_BOOL)  # decoder-only student: 1 = p_A / p_m at the start too (nothing shared), -1 = default (0)
    lora_rank: int = flag(8, at_least(1))  # --method=lora: rank of the q/v adapters
    lora_alpha: float = flag(16.0, above(0))  # --method=lora: the adapters' scale is lora_alpha / lora_rank
    # bookkeeping
    log_every: int = flag(10, at_least(1))  # a progress line (losses per task, lr, tokens/s, ETA) every N steps
    eval_every: int = flag(0, at_least(0))  # valid accuracy every N steps (0 = at the end of each epoch)
    save_every: int = flag(0, at_least(0))  # OUT/last every N steps (0 = at evaluations and at the end)
    stop_at: int = flag(0, at_least(0))  # stop after this step (the schedule still spans the full run; RESUME=1 continues)
    eval_batch_size: int = flag(32, at_least(1))  # questions per forward pass in validation
    max_new_tokens: int = flag(64, at_least(1))  # the longest generated answer in validation, in tokens
    check_only: int = flag(0, BOOL)  # 1: check the flags, data, rationale cache and run folder, then stop (what `make table` does for every run first)

    def check(self) -> None:
        """The flags together, after each one's own rule (cli.check_flags calls it)."""
        names = tinyllm.teacher_names(self.teachers, sources=False)
        parse_alpha(self.alpha, names)
        if self.method == "tinyllm" and not names:
            raise UserError("--method=tinyllm needs at least one teacher in --teachers (TEACHERS= for make)")
        if self.method in ("dss", "kd") and self.one_teacher() not in names:
            raise UserError(f"--teacher={self.one_teacher()!r} is not one of --teachers ({' '.join(names) or 'none'})")
        if self.batch_size % self.grad_accum:
            raise UserError(f"--batch_size={self.batch_size} must be a multiple of --grad_accum={self.grad_accum}")

    def one_teacher(self) -> str:
        """The one teacher of dss and kd: --teacher, else the first of --teachers."""
        return self.teacher or next(iter(tinyllm.teacher_names(self.teachers, sources=False)), "")


# ---------------------------------------------------------------------------------------------------
# the method (§3.3): the tasks an example becomes, Eq. 2 over a batch of their rows, the step

@dataclass
class Task:
    name: str  # "answer" or a teacher name
    prefix: str  # p_A or p_m
    weight: float  # 1 for the answer, α_m for a teacher (Eq. 2)
    targets: dict[str, str] = field(repr=False)  # example id -> target text; a missing id has no row


def usable_rationale(record: dict | None) -> str | None:
    if not record or record.get("error") or record.get("degenerate"):
        return None
    return (record.get("rationale") or "").strip() or None


def teacher_rationales(cfg: TrainConfig, teacher: str, source: str) -> dict[str, dict]:
    """Example id -> the cached record of `teacher`'s rationale for that training example (tinyllm.load_rationales;
    a `source` ("" for a bare name) must be the one the cache was made with); none at all is a UserError."""
    records = tinyllm.load_rationales(cfg.cache, cfg.dataset, teacher, split="train", source=source or None)
    if not records:
        path = tinyllm.cache_file(cfg.cache, cfg.dataset, teacher)
        raise UserError(f"no train rationales of teacher {teacher!r} in {path}: run `make rationales` "
                        f"(DATASET={cfg.dataset} TEACHERS=...) first, or fix --teachers/--cache")
    return records


def build_tasks(cfg: TrainConfig, examples: list[data.Example], log=print) -> list[Task]:
    """Eq. 2's tasks for the method of a checked config (TrainConfig.check): the answer task first (L_A, weight 1;
    its target the gold answer, for kd the teacher's stated one), then a rationale task per teacher the method
    learns from (L_Tm, weight α_m; tinyllm: every teacher, dss: one, the others: none)."""
    sources = dict(tinyllm.parse_teachers(cfg.teachers, sources=False))
    names = list(sources)
    alpha = parse_alpha(cfg.alpha, names)
    teacher = cfg.one_teacher()
    answer = {ex.id: prompts.answer_target(ex) for ex in examples}
    if cfg.method == "kd":
        # Standard KD on the answer: the target is the option the teacher stated in its rationale; where
        # it stated none we can parse (or has no record), the gold answer stands in.
        records = teacher_rationales(cfg, teacher, sources[teacher])
        stated, agree = 0, 0
        for ex in examples:
            choice = (records.get(ex.id) or {}).get("stated_answer")
            if isinstance(choice, int) and 0 <= choice < len(ex.options):
                answer[ex.id] = prompts.answer_target(dataclasses.replace(ex, answer=choice))
                stated, agree = stated + 1, agree + (choice == ex.answer)
        log(f"kd: {teacher}'s stated answer is the target for {stated}/{len(examples)} examples "
            f"({agree} agree with gold); gold for the rest")
    tasks = [Task(ANSWER_TASK, prompts.ANSWER_PREFIX, 1.0, answer)]
    for name in {"tinyllm": names, "dss": [teacher]}.get(cfg.method, []):
        records = teacher_rationales(cfg, name, sources[name])
        targets = {ex.id: text for ex in examples if (text := usable_rationale(records.get(ex.id)))}
        if not any(ex.id in records for ex in examples):  # the cache was made for other examples (another LIMIT)
            raise UserError(f"{name}: none of the {len(examples)} train examples"
                            f"{f' (--limit={cfg.limit})' if cfg.limit else ''} has a rationale in "
                            f"{tinyllm.cache_file(cfg.cache, cfg.dataset, name)} ({len(records)} records, none for "
                            "these): run `make rationales` with the same DATASET and LIMIT first")
        log(f"{name}: rationales for {len(targets)}/{len(examples)} train examples "
            f"(missing or degenerate ones are left out of L_{name}), α = {alpha[name]:g}")
        tasks.append(Task(name, prompts.teacher_prefix(name), alpha[name], targets))
    return tasks


def encode_rows(student: Student, examples: list[data.Example], tasks: list[Task],
                cfg: TrainConfig) -> list[list[tuple[int, list[int], list[int]]]]:
    """Per example, its (task index, prompt ids, target ids) rows, tokenized once before training."""
    limit = student.prompt_limit(cfg.max_input_tokens, cfg.max_target_tokens)
    rows = []
    for ex in examples:
        rows.append([(t, student.fit_prompt(ex, task.name, task.prefix, limit),
                      student.encode_target(task.targets[ex.id])[:cfg.max_target_tokens])
                     for t, task in enumerate(tasks) if ex.id in task.targets])
    return rows


# The step's batch: a permutation per epoch from (seed, epoch), so step -> batch is a pure function (resume).

def global_batch(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step` (1-based). The last batch of an epoch wraps around to the
    epoch's start so that every step has `batch_size` examples (as DistributedSampler pads)."""
    steps_per_epoch = math.ceil(n / batch_size)
    epoch, k = divmod(step - 1, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    batch = order[k * batch_size:(k + 1) * batch_size]
    return batch + order[:batch_size - len(batch)]


def shard_step(rows: list[list[tuple]], batch: list[int], n_tasks: int, rank: int, world: int,
               grad_accum: int) -> tuple[list[list[tuple]], list[int], int]:
    """This rank's micro-batches of the step (each a list of examples, each a list of its rows with their task
    index), the number of target tokens of each task in the WHOLE step (every rank and micro-batch), and the
    step's total tokens."""
    task_tokens, tokens = [0] * n_tasks, 0
    for i in batch:
        for t, prompt, target in rows[i]:
            task_tokens[t] += len(target)
            tokens += len(prompt) + len(target)
    mine = batch[rank::world]  # DistributedSampler-like: rank r takes every world-th example
    per_micro = len(mine) // grad_accum
    micro_batches = [[rows[i] for i in mine[j * per_micro:(j + 1) * per_micro]] for j in range(grad_accum)]
    return micro_batches, task_tokens, tokens


def micro_batch_loss(student: Student, micro: list[list[tuple]], weights: Tensor, task_tokens: Tensor,
                     world: int) -> tuple[Tensor, Tensor]:
    """Eq. 2 over one micro-batch: Σ_t w_t · (CE summed over task t's tokens here) / (task t's tokens in the
    whole step). Normalising by the step's token count makes micro-batches and ranks add up exactly to the
    per-task mean token cross-entropy of the full batch; `world` undoes DDP's gradient averaging.
    Returns the loss to backpropagate and this micro-batch's share of each task's loss (n_tasks,)."""
    task = torch.tensor([t for example in micro for t, _, _ in example], device=student.device)  # (R,)
    per_token = weights * world / task_tokens.clamp(min=1)  # (n_tasks,): w_t / (task t's tokens in the step)
    with student.autocast():
        loss, losses, token_rows = student.target_loss([[(p, tgt) for _, p, tgt in example] for example in micro],
                                                       per_token[task])
    token_task = task[token_rows]  # (N,)
    task_sums = torch.zeros(len(weights), device=student.device).index_add_(0, token_task, losses.float())
    return loss, task_sums / task_tokens.clamp(min=1)


def train_step(student: Student, rows: list[list[tuple]], weights: Tensor, optimizer, scheduler, cfg: TrainConfig,
               step: int, rank: int, world: int) -> tuple[Tensor, int, float]:
    """Optimizer step `step` on Eq. 2 over its global batch, this rank's share in --grad_accum micro-batches:
    (this rank's share of each task's loss (n_tasks,), the step's tokens, the learning rate the step used)."""
    # Every step's randomness (dropout) is a function of (seed, step, rank): resume needs no saved RNG.
    torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)
    batch = global_batch(len(rows), cfg.batch_size, step, cfg.seed)
    micro_batches, task_tokens, tokens = shard_step(rows, batch, len(weights), rank, world, cfg.grad_accum)
    task_tokens = torch.tensor(task_tokens, dtype=torch.float32).to(student.device, non_blocking=True)
    task_losses = torch.zeros(len(weights), device=student.device)
    try:
        for j, micro in enumerate(micro_batches):
            sync = j == len(micro_batches) - 1 or world == 1
            with contextlib.nullcontext() if sync else student.train_objective.no_sync():
                loss, micro_losses = micro_batch_loss(student, micro, weights, task_tokens, world)
                loss.backward()
            task_losses += micro_losses
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], cfg.clip)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        raise UserError(f"out of {student.device.type} memory at step {step} (batch {cfg.batch_size}, grad_accum "
                        f"{cfg.grad_accum}): try a smaller --batch_size with --grad_accum (e.g. "
                        f"ARGS=\"--grad_accum={2 * cfg.grad_accum}\") or a shorter --max_input_tokens") from None
    return task_losses, tokens, lr


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The learning rate of scheduler step `step` (0-based) as a fraction of --lr: a linear warmup over `warmup`
    steps, then a linear decay to 0 at `total` (the paper: no warmup)."""
    return min((step + 1) / max(warmup, 1), max(total - step, 0) / max(total - warmup, 1))


# ---------------------------------------------------------------------------------------------------
# the loop (nanoT5-like): set-up, then per step train_step and maybe_log / maybe_eval / maybe_save

@dataclass
class LoopState:
    """Where the training loop is: the step and the best validation so far (saved in trainer_state.pt as plain
    fields, for --resume), the wall time, and the progress line's tallies since the last log."""
    step: int = 0  # last completed optimizer step
    best_accuracy: float = -1.0
    best_step: int = 0
    logged_step: int = 0  # the step of the last flushed loss
    first_step: int = 0  # the step this invocation started after (the ETA's rate is over its steps)
    tokens: int = 0  # tokens since the last log
    lr: float = 0.0  # the learning rate of the last step
    log_time: float = field(default_factory=time.perf_counter)
    started: float = field(default_factory=time.perf_counter)  # this invocation's start
    seconds_before: float = 0.0  # wall time of the interrupted invocations this one resumes

    @classmethod
    def resumed(cls, saved: dict) -> LoopState:
        """The state a trainer_state.pt was saved with (maybe_save)."""
        return cls(step=saved["step"], logged_step=saved["step"], first_step=saved["step"],
                   best_accuracy=saved["best_accuracy"], best_step=saved["best_step"],
                   seconds_before=saved.get("seconds", 0.0))

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started


def train(cfg: TrainConfig) -> Path:
    """Check every input, take the run folder (one writer: a second process on it stops here), then fit. Returns
    RUN/best, the checkpoint with the best valid accuracy."""
    rank, world, device = setup_distributed(cfg.device)
    log = print if rank == 0 else (lambda *args, **kwargs: None)
    run = run_folder(cfg)
    if cfg.method == "inference":
        log(f"--method=inference trains nothing: `make eval METHOD=inference` evaluates {cfg.student} as is")
        return run
    train_examples, valid_examples, tasks = check_run(cfg, world, log)
    # Recovering a killed save moves checkpoints, so only the folder's one writer does it (under torchrun, the
    # first rank): a check of a folder another run is saving into stops here instead of deleting its temp folder.
    writer = rank == 0 and (run.is_dir() or not cfg.check_only)  # a check of a new folder creates nothing
    with cli.folder_lock(run) if writer else contextlib.nullcontext():
        if writer:
            for folder in (run / "last", run / "best"):
                recover_checkpoint(folder)
        if world > 1:
            dist.barrier()  # the other ranks read last/ once it is whole
        saved = resume_state(cfg, run)
        if cfg.check_only:
            log(f"{run}: the flags, the data, the rationale cache and the run folder are fine (--check_only=1)")
            return run
        return fit(cfg, run, train_examples, valid_examples, tasks, saved, rank, world, device, log)


def fit(cfg: TrainConfig, run: Path, train_examples: list[data.Example], valid_examples: list[data.Example],
        tasks: list[Task], saved: dict | None, rank: int, world: int, device: torch.device, log) -> Path:
    """One train_step per optimizer step (from the saved one, resuming), each followed by maybe_log / maybe_eval /
    maybe_save; then train.json."""
    torch.manual_seed(cfg.seed)
    student = prepare_student(cfg, run, device, world, saved, log)
    compiled = compile_objective(student) if cfg.compile else None
    rows = encode_rows(student, train_examples, tasks, cfg)
    steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer, scheduler = make_optimizer(cfg, student, total, saved)
    state = LoopState.resumed(saved) if saved else LoopState()
    if saved:
        log(f"resuming {run} at step {state.step}/{total}")
    metrics = run / "metrics.jsonl"
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        trim_metrics(metrics, state.step)
    log(f"training {cfg.student} ({student.kind}) with {cfg.method} on {cfg.dataset}: {len(train_examples)} examples, "
        f"tasks {', '.join(t.name for t in tasks)}, {total} steps of {cfg.batch_size} on {world} x {device}"
        f"{' (bf16 autocast)' if student.bf16 else ''}")
    weights = torch.tensor([task.weight for task in tasks], device=device)
    step_losses = torch.zeros(max(cfg.log_every, 1), len(tasks), device=device)  # per-step task losses

    for step in range(state.step + 1, total + 1):
        task_losses, tokens, state.lr = train_step(student, rows, weights, optimizer, scheduler, cfg, step, rank, world)
        step_losses[(step - state.logged_step - 1) % len(step_losses)] += task_losses
        state.step, state.tokens = step, state.tokens + tokens
        stop = step == total or step == cfg.stop_at
        evaluate = step == total or (step % cfg.eval_every == 0 if cfg.eval_every else step % steps_per_epoch == 0)
        save = stop or evaluate or (cfg.save_every and step % cfg.save_every == 0)
        if stop or evaluate or save or step - state.logged_step == len(step_losses):
            maybe_log(step_losses, state, tasks, total, metrics, log, rank)
        if evaluate:
            maybe_eval(student, valid_examples, cfg, state, run, metrics, log, rank, world)
        if save:
            maybe_save(student, cfg, optimizer, scheduler, state, run, rank, world)
        if evaluate or save:
            state.log_time = time.perf_counter()  # tokens/s counts training time only
        if stop:
            break
    if compiled is not None:
        log(f"--compile=1: {compiled.summary()}")
    return finish(cfg, run, state, len(train_examples), total, metrics, log, rank, world)


def maybe_log(step_losses: Tensor, state: LoopState, tasks: list[Task], total: int, metrics: Path, log,
              rank: int) -> None:
    """Flush the per-step losses (the one host sync), stop on a non-finite one, print the progress line."""
    n = state.step - state.logged_step
    losses = all_reduce_sum(step_losses[:n].clone()).cpu()  # (n, n_tasks): every rank's share summed
    step_losses.zero_()
    for i, row in enumerate(losses):
        bad = [task.name for task, value in zip(tasks, row.tolist()) if not math.isfinite(value)]
        if bad:
            raise UserError(f"non-finite loss at step {state.logged_step + i + 1} in task {bad[0]} "
                            f"({', '.join(bad)}): lower --lr, check the data, or try --bf16=0")
    now = time.perf_counter()
    mean = losses.mean(dim=0).tolist()
    tokens_per_s = state.tokens / max(now - state.log_time, 1e-9)
    eta = (now - state.started) / max(state.step - state.first_step, 1) * (total - state.step)
    log(f"step {state.step}/{total} | " + " ".join(f"{t.name} {v:.4f}" for t, v in zip(tasks, mean))
        + f" | lr {state.lr:.2e} | {tokens_per_s:,.0f} tok/s | ETA {format_seconds(eta)}", flush=True)
    if rank == 0:
        with open(metrics, "a") as f:
            for i, row in enumerate(losses.tolist()):
                f.write(json.dumps({"step": state.logged_step + i + 1,
                                    "loss": {t.name: v for t, v in zip(tasks, row)}}) + "\n")
            f.write(json.dumps({"step": state.step, "lr": state.lr, "tokens_per_s": tokens_per_s}) + "\n")
    state.logged_step, state.tokens, state.log_time = state.step, 0, now


def maybe_eval(student: Student, valid_examples: list[data.Example], cfg: TrainConfig, state: LoopState, run: Path,
               metrics: Path, log, rank: int, world: int) -> None:
    """Valid accuracy; RUN/best follows the best one (the test split is never looked at in training)."""
    accuracy_ = valid_accuracy(student, valid_examples, cfg, rank, world)
    improved = accuracy_ > state.best_accuracy
    if improved:
        state.best_accuracy, state.best_step = accuracy_, state.step
        if rank == 0:
            save_checkpoint(student, run / "best")
    log(f"step {state.step}: valid accuracy {accuracy_:.4f} (best {state.best_accuracy:.4f} at step "
        f"{state.best_step}){' -> saved ' + str(run / 'best') if improved else ''}", flush=True)
    if rank == 0:
        with open(metrics, "a") as f:
            f.write(json.dumps({"step": state.step, "valid_accuracy": accuracy_}) + "\n")


def valid_accuracy(student: Student, examples: list[data.Example], cfg: TrainConfig, rank: int,
                   world: int) -> float:
    """Greedy answers on this rank's share of valid, summed over ranks, by the student as eval.py will load it."""
    records = predict(inference_student(student), examples[rank::world], "generate", cfg.eval_batch_size,
                      cfg.max_input_tokens, cfg.max_new_tokens)
    counts = all_reduce_sum(torch.tensor([sum(r["correct"] for r in records), len(records)],
                                         dtype=torch.float64, device=student.device))
    return (counts[0] / counts[1].clamp(min=1)).item()


def maybe_save(student: Student, cfg: TrainConfig, optimizer, scheduler, state: LoopState, run: Path, rank: int,
               world: int) -> None:
    """RUN/last with what RESUME=1 needs: optimizer, scheduler, step, best so far (and LoRA adapters)."""
    if rank == 0:
        trainer_state = {"step": state.step, "best_accuracy": state.best_accuracy, "best_step": state.best_step,
                         "seconds": state.seconds(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "config": dataclasses.asdict(cfg)}
        if cfg.method == "lora":
            trainer_state["adapters"] = adapter_state(student.module)
        save_checkpoint(student, run / "last", trainer_state)
    if world > 1:
        dist.barrier()


def finish(cfg: TrainConfig, run: Path, state: LoopState, examples: int, total: int, metrics: Path, log, rank: int,
           world: int) -> Path:
    """RUN/train.json, written when training ends (what the table shows as the run's training time), with the
    config it trained with: the run says how it was made once an experiment has dropped its last/."""
    if world > 1:
        dist.barrier()
    best = run / "best"
    if rank == 0:
        summary = {"seconds": round(state.seconds(), 1), "steps": state.step, "examples": examples,
                   "best_step": state.best_step, "best_valid_accuracy": state.best_accuracy,
                   "code": cli.code_revision(),  # the git commit that trained it
                   "config": dataclasses.asdict(cfg)}
        atomic_write(run / "train.json", json.dumps(summary, indent=2) + "\n")
    log(f"checkpoint: {best} (valid accuracy {state.best_accuracy:.4f} at step {state.best_step}); "
        f"last: {run / 'last'} (step {state.step}/{total}); metrics: {metrics}")
    return best


# ---------------------------------------------------------------------------------------------------
# set-up: every input checked before any work, the student, the optimizer, resume

def check_config(cfg: TrainConfig, world: int) -> None:
    cli.check_flags(cfg)  # a config made in code (an experiment's run) is checked as a parsed one is
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UserError(f"--batch_size={cfg.batch_size} must be a multiple of processes x --grad_accum "
                        f"= {world} x {cfg.grad_accum}")


def check_run(cfg: TrainConfig, world: int = 1, log=lambda *args, **kwargs: None
              ) -> tuple[list[data.Example], list[data.Example], list[Task]]:
    """Everything a run reads or writes, before it starts: the flags together, the run folder (creatable), the
    data (downloaded if need be) and the rationale cache of every teacher it learns from. Returns (train, valid,
    tasks): what the run then trains on."""
    check_config(cfg, world)
    cli.check_folder(run_folder(cfg), "--out")
    data.check_model_source(cfg.student, "--student")
    train_examples, valid_examples = training_examples(cfg)
    return train_examples, valid_examples, build_tasks(cfg, train_examples, log)


def training_examples(cfg: TrainConfig) -> tuple[list[data.Example], list[data.Example]]:
    """(train, valid): --train_limit, then the --train_fraction subset, then --limit of each. Never the test
    split while training: RUN/best is chosen on valid."""
    limit = cfg.limit or None
    train_examples = data.load_split(cfg.dataset, "train", cfg.data, limit=cfg.train_limit or None)
    train_examples = data.train_subset(train_examples, cfg.train_fraction, cfg.seed)[:limit]
    return train_examples, data.load_split(cfg.dataset, "valid", cfg.data, limit=limit)


def prepare_student(cfg: TrainConfig, run: Path, device: torch.device, world: int, saved: dict | None,
                    log) -> Student:
    """The student to train: --student, or RUN/last when resuming; LoRA adapters; DDP under torchrun."""
    # A LoRA run's last/ holds merged weights: resume from the frozen base plus the saved adapters.
    source = str(run / "last") if saved and cfg.method != "lora" else cfg.student
    student = load_student(source, device, bool(cfg.bf16), chat=cfg.chat, boundary=cfg.boundary,
                           task_prefix=cfg.task_prefix)
    if cfg.checkpointing:
        for module in student.module.modules():
            if hasattr(module, "checkpointing"):  # t5.Stack, llama.Llama
                module.checkpointing = True
    if cfg.method == "lora":
        log(f"lora: rank {cfg.lora_rank} adapters on {add_lora(student.module, cfg.lora_rank, cfg.lora_alpha)} "
            "attention projections, base frozen")
        if saved:  # only the adapters: the base is the (frozen) student itself
            load_adapters(student.module, saved["adapters"])
    student.module.train()
    if world > 1:  # DDP wraps the model with its loss, so that one forward is the whole objective
        student.train_objective = nn.parallel.DistributedDataParallel(
            student.objective, device_ids=[device.index] if device.type == "cuda" else None)
    return student


def make_optimizer(cfg: TrainConfig, student: Student, total: int, saved: dict | None):
    """AdamW over the trainable parameters, and a linear warmup then linear decay to 0 over `total` steps."""
    params = [p for p in student.module.parameters() if p.requires_grad]
    # fused: one kernel for the whole update, on CUDA and on CPU (measured on CPU, 74M parameters:
    # 0.055 s a step against 0.95 s for the per-tensor loop)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    # a closure binding warmup and total; LambdaLR's state_dict (saved for --resume) keeps no function, only its step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total))
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    return optimizer, scheduler


def resume_state(cfg: TrainConfig, run: Path) -> dict | None:
    """RUN/last/trainer_state.pt with --resume=1 (checked against this run's flags), else None. Reads only: train
    has recovered a killed save first (recover_checkpoint), as the folder's one writer."""
    if not cfg.resume:
        return None
    path = run / "last" / "trainer_state.pt"
    if not path.exists():
        raise UserError(f"--resume=1 but {path} does not exist: nothing to resume (RESUME=0 starts over)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        saved_config = saved["config"]
    except (RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError) as e:  # a truncated zip, another file
        raise UserError(f"{path}: cannot be read, truncated or not a trainer state ({type(e).__name__}: "
                        f"{str(e)[:200]}); delete {run / 'last'} and start over with RESUME=0") from e
    check_resumable(cfg, saved_config)
    return saved


RESUME_FIELDS = ("dataset", "student", "method", "teacher", "teachers", "alpha", "limit", "train_limit",
                 "train_fraction", "chat", "boundary", "task_prefix", "batch_size", "epochs",
                 "seed", "lr", "warmup_steps", "max_input_tokens", "max_target_tokens", "lora_rank", "lora_alpha")


def check_resumable(cfg: TrainConfig, saved: dict) -> None:
    changed = [f"--{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_FIELDS if saved.get(k) != getattr(cfg, k)]
    if changed:
        raise UserError("--resume=1 with a different run configuration: " + "; ".join(changed)
                        + " (keep the flags of the interrupted run, or RESUME=0 to start over)")


def trim_metrics(metrics: Path, step: int) -> None:
    """On resume, drop records past the resumed step so the file reads as one uninterrupted run."""
    if not metrics.exists():
        return
    keep = [line for line in metrics.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(metrics, "".join(line + "\n" for line in keep))


def run_folder(cfg: TrainConfig) -> Path:
    return Path(cfg.out or f"out/{cfg.dataset}/{cfg.method}")


# ---------------------------------------------------------------------------------------------------
# checkpoints: RUN/best and RUN/last, each a folder from_pretrained loads, written atomically

def recover_checkpoint(folder: Path) -> None:
    """A kill between save_checkpoint's two renames leaves only the previous checkpoint, moved aside
    as `.NAME.old-PID`: put it back. Leftover temp folders of an interrupted save are removed."""
    if not folder.parent.is_dir():
        return
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(tmp)
    olds = sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not folder.exists() and olds:
        os.replace(olds.pop(), folder)
    for old in olds:
        shutil.rmtree(old)


def save_checkpoint(student: Student, folder: Path, trainer_state: dict | None = None) -> None:
    """Write into a temp folder beside `folder`, fsync, then rename over it: a crash leaves the old one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    old = None
    try:
        with cli.writing(folder):  # safetensors' and torch.save's write errors as the OSError they stand for
            student.save_pretrained(tmp)
            if trainer_state is not None:
                with open(tmp / "trainer_state.pt", "wb") as f:  # an open file: its OSError says why a write failed
                    torch.save(trainer_state, f)
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_path(path)
        fsync_path(tmp)
        if folder.exists():  # a folder cannot be renamed onto a non-empty one: move the old one aside first
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:  # Ctrl-C or a full disk mid-save: the previous checkpoint stays, no temp folder
        if old is not None and not folder.exists():
            os.replace(old, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(folder.parent)
    if old is not None:
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------------
# distributed (torchrun, set up by cli.setup_distributed): a sum over ranks

def all_reduce_sum(tensor: Tensor) -> Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def interrupted(cfg: TrainConfig) -> str:
    """What Ctrl-C leaves: checkpoints are written whole (save_checkpoint), so RUN/last is the last save."""
    state = run_folder(cfg) / "last" / "trainer_state.pt"
    if not state.is_file():
        return "no checkpoint was saved yet (the first one at the first evaluation or --save_every steps)"
    step = torch.load(state, map_location="cpu", weights_only=True, mmap=True)["step"]
    return f"the last checkpoint {state.parent} (step {step}) is kept: RESUME=1 (--resume=1) continues from it"


def main(argv: list[str]) -> None:
    cfg = parse_flags(TrainConfig, argv)
    try:
        with on_stop(lambda: interrupted(cfg)):
            train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main, "lower --batch_size with a larger --grad_accum (ARGS=\"--batch_size=4 --grad_accum=2\"), "
                   "--eval_batch_size, or --max_input_tokens / --max_target_tokens")
