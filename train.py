"""Train a small student on the answers and on every teacher's rationales (TinyLLM §3.3, Eq. 2-4).

    python train.py --dataset=obqa --student=google/flan-t5-small --teachers="flan-t5-xl=release:flan-t5-xl llama-2=release:llama-2" \
        --alpha="flan-t5-xl=1 llama-2=0.5" --method=tinyllm --data=data --cache=cache --out=out/obqa/tinyllm

Each training example becomes one row per task: the answer task (input with p_A, target the answer) and
one rationale task per teacher m (input with p_m, target m's rationale from the cache). The loss is
Eq. 2, L = L_A + Σ_m α_m L_Tm, where each task loss is the mean token cross-entropy over that task's
tokens. The rows of every task share one padded forward; per-task losses are separated by a mask.

Methods (the paper's Table 1 rows): tinyllm (all teachers), finetune (L_A only), kd (the answer target is
the teacher's stated answer), dss (Distill-step-by-step: one teacher's rationales), lora (L_A with
low-rank adapters on the attention q/v projections, merged at save), inference (nothing to train).

The student is any T5 checkpoint (seq2seq, as in the paper) or any LLaMA-family checkpoint as a
decoder-only student (prompt tokens are masked out of the loss). eval.py imports the student classes.

References: TinyLLM, Tian et al., arXiv 2402.04616; Distilling step-by-step, Hsieh et al., 2023;
LoRA, Hu et al., 2021; nanoT5 (the loop split into maybe_log / maybe_eval / maybe_save).
"""
from __future__ import annotations

import contextlib
import copy
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
import torch.nn.functional as F
from torch import Tensor, nn

import data
import llama
import prompts
import t5
import tinyllm
from data import (AUTO_BOOL, BOOL, Rule, UserError, above, at_least, atomic_write, flag, format_seconds, fraction,
                  fsync_path, interrupt_note, load_model, one_of, parse_flags, resolve_model, run_main, setup_distributed)

METHODS = ("tinyllm", "finetune", "kd", "dss", "lora", "inference")
ANSWER_TASK = "answer"


# ---------------------------------------------------------------------------------------------------
# flags: --key=value, type-checked against a config dataclass; "" means "the default"

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
    max_input_tokens: int = flag(1024, at_least(1))  # longer inputs lose words from the start of the question
    max_target_tokens: int = flag(256, at_least(1))  # rationale targets are cut to this many tokens
    bf16: int = flag(1, BOOL)  # bf16 autocast on CUDA (and CPU with native bf16); weights stay fp32
    checkpointing: int = flag(0, BOOL)  # 1: recompute each block in backward (activation checkpointing), for large students
    # 1: torch.compile the model's forward in the step (compile_objective). Off by default on both devices: on
    # the CPU the full bench's compiled step gained 9% (T5) and nothing (SmolLM2) after a 1.5-2 minute first
    # step; on a GPU nothing is measured yet (README, Performance)
    compile: int = flag(0, BOOL)
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
        """The flags together, after each one's own rule (data.check_flags calls it)."""
        names = [name for name, _ in tinyllm.parse_teachers(self.teachers, sources=False)]
        parse_alpha(self.alpha, names)
        if self.method == "tinyllm" and not names:
            raise UserError("--method=tinyllm needs at least one teacher in --teachers (TEACHERS= for make)")
        teacher = self.teacher or (names[0] if names else "")
        if self.method in ("dss", "kd") and teacher not in names:
            raise UserError(f"--teacher={teacher!r} is not one of --teachers ({' '.join(names) or 'none'})")
        if self.batch_size % self.grad_accum:
            raise UserError(f"--batch_size={self.batch_size} must be a multiple of --grad_accum={self.grad_accum}")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # CPU autocast to bf16 runs everywhere but is only fast with native bf16 instructions.
    return device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()


def pad(rows: list[list[int]], value: int, left: bool = False) -> Tensor:
    """(R, T) LongTensor of `rows` padded with `value` on the right (or the left, for generation)."""
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            start = width - len(row) if left else 0
            out[i, start:start + len(row)] = torch.tensor(row)
    return out


def cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[:i]
    return ids


# ---------------------------------------------------------------------------------------------------
# Eq. 3-4's token cross-entropy at target positions only, the LM head applied in chunks

CE_CHUNK = 1024  # target tokens per chunk: (1024, vocab) fp32 logits at a time (200 MB for a 49k vocabulary)


def _chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, token_weights: Tensor | None,
                           need_hidden: bool, need_weight: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """CE_n = -log_softmax(h_n Wᵀ)[y_n] for hidden (N, d), weight (vocab, d), chunk by chunk, in the
    autocast dtype when autocast is on (as F.linear would be), the softmax in fp32. With need_*: the gradient
    of Σ_n w_n CE_n with respect to hidden / weight, from the same chunk's logits (softmax - one-hot)."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    losses = torch.empty(len(labels), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    with torch.autocast(device_type, enabled=False):
        w = weight.to(dtype)
        for start in range(0, len(labels), CE_CHUNK):
            end = min(start + CE_CHUNK, len(labels))
            h, y = hidden[start:end].to(dtype), labels[start:end]
            logits = F.linear(h, w).float()  # (n, vocab): the only logits that exist at any time
            if not (need_hidden or need_weight):  # scoring: the fused kernel (1.5x logsumexp + gather on CPU)
                losses[start:end] = F.cross_entropy(logits, y, reduction="none")
                continue
            log_probs = torch.log_softmax(logits, dim=-1)
            del logits
            losses[start:end] = -log_probs.gather(1, y[:, None])[:, 0]
            grad = log_probs.exp_()  # softmax, in place
            grad[torch.arange(end - start, device=grad.device), y] -= 1.0
            grad = grad.mul_(token_weights[start:end, None]).to(dtype)  # (n, vocab): dΣ w CE / d logits
            if need_hidden:
                grad_hidden[start:end] = grad @ w  # (n, d)
            if need_weight:
                grad_weight += (grad.T @ h).float()  # (vocab, d)
    return losses, grad_hidden, grad_weight.to(weight.dtype) if need_weight else None


class LinearCrossEntropy(torch.autograd.Function):
    """loss = Σ_n w_n · CE(h_n Wᵀ, y_n) with the gradient computed in the forward pass, chunk by chunk (the
    idea of Liger-Kernel's fused linear cross-entropy): the same three matmuls autograd would run over the
    full logits, but a chunk's logits live only while its loss and gradient are taken, so no (rows, length,
    vocab) tensor is ever made, in forward or backward. Backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, token_weights: Tensor) -> tuple[Tensor, Tensor]:
        losses, grad_hidden, grad_weight = _chunked_cross_entropy(hidden, weight, labels, token_weights,
                                                                  *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(losses)
        return (losses * token_weights).sum(), losses

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_losses: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None,
                grad_weight * grad_loss if grad_weight is not None else None, None, None)


def target_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor,
                         token_weights: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
    """Token cross-entropy of the LM head `weight` over hidden states at target positions only, hidden (N, d)
    and labels (N,): (Σ_n token_weights_n · CE_n, or None without weights; CE_n (N,), not differentiable)."""
    trains = token_weights is not None and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if trains:
        return LinearCrossEntropy.apply(hidden, weight, labels, token_weights)
    with torch.no_grad():
        losses, _, _ = _chunked_cross_entropy(hidden, weight, labels, None, False, False)
    return (losses * token_weights).sum() if token_weights is not None else None, losses


# ---------------------------------------------------------------------------------------------------
# batch layouts with little padding: rows packed end to end, a block-diagonal mask keeping them apart

PACK_MULTIPLE = 32  # T5 bins' widths are multiples of this: few distinct shapes (--compile), little lost


def pack_rows(sizes: list[tuple[int, ...]], capacity: tuple[int, ...] | None = None) -> list[list[int]]:
    """First-fit decreasing: row indices in bins, a row's sizes (one per packed sequence: the decoder-only tree;
    T5's prompt and target) summing to at most `capacity` (default: the largest row's) per bin, for sequences
    packed end to end (a bin is one batch row; a block-diagonal mask keeps its rows apart)."""
    capacity = capacity or tuple(max(size[d] for size in sizes) for d in range(len(sizes[0])))
    bins: list[list[int]] = []
    room: list[list[int]] = []
    for i in sorted(range(len(sizes)), key=lambda i: [-n for n in reversed(sizes[i])]):
        b = next((b for b, free in enumerate(room) if all(n <= f for n, f in zip(sizes[i], free))), None)
        if b is None:
            bins.append([])
            room.append(list(capacity))
            b = len(bins) - 1
        bins[b].append(i)
        room[b] = [f - n for f, n in zip(room[b], sizes[i])]
    return bins


def pack_prompts_and_targets(sizes: list[tuple[int, int]]) -> tuple[list[list[int]], tuple[int, int]]:
    """T5 rows (prompt length, target length) in bins of (encoder, decoder) widths, the widths chosen to compute
    the fewest slots: answer targets are a few tokens and rationales up to --max_target_tokens, so bins holding
    one long rationale take the short ones' prompts beside its own only when the encoder is wider than one
    prompt. Each slot costs its linear layers plus attention over its bin's width (1 + width / 1024)."""
    def round_up(n: int) -> int:
        return -(-max(n, 1) // PACK_MULTIPLE) * PACK_MULTIPLE

    enc, dec = (round_up(max(size[d] for size in sizes)) for d in (0, 1))
    best = None
    for encoder_width in range(enc, 4 * enc + 1, PACK_MULTIPLE):
        for decoder_width in range(dec, 2 * dec + 1, PACK_MULTIPLE):
            bins = pack_rows(sizes, (encoder_width, decoder_width))
            cost = len(bins) * sum(w * (1 + w / 1024) for w in (encoder_width, decoder_width))
            if best is None or cost < best[0]:
                best = (cost, bins, (encoder_width, decoder_width))
    return best[1], best[2]


def compile_objective(student: Student) -> llama.Compiled:
    """--compile=1: the model's forward in the training step (packed_hidden: T5's encoder and decoder, or the
    decoder-only trees) through torch.compile; the loss stays eager (its chunked LM head runs as many chunks as
    the step has target tokens). Packed widths are multiples of PACK_MULTIPLE (T5), so a run compiles a few
    graphs, not one per batch; the bins per batch become dynamic after their first change."""
    student.objective.packed_hidden = compiled = llama.Compiled(student.objective.packed_hidden)
    return compiled


def to_device(batch, device: torch.device):
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return [to_device(v, device) for v in batch]


# ---------------------------------------------------------------------------------------------------
# the student: one class per architecture, the same methods for train.py and eval.py

STUDENT_FORMAT = "student_format.json"  # in a decoder-only checkpoint: how its inputs were written


class Seq2SeqObjective(nn.Module):
    """T5: encoder over the prompts, decoder over the targets, the LM head at target tokens only. Training's
    batch is rows packed end to end (input_ids, encoder_segments, decoder_input_ids, decoder_segments,
    target_index; see Seq2SeqStudent.collate); rank scoring's is a list of padded groups (input_ids,
    attention_mask, decoder_input_ids, target_index, encoder_rows), one encoder row per question."""

    def __init__(self, model: t5.T5):
        super().__init__()
        self.model = model
        self.packed_hidden = model.packed_hidden  # compile_objective swaps in the compiled one

    def forward(self, batch: dict[str, Tensor] | list[dict[str, Tensor]], labels: Tensor,
                token_weights: Tensor | None) -> tuple[Tensor | None, Tensor]:
        if isinstance(batch, dict):
            h = self.packed_hidden(batch["input_ids"], batch["encoder_segments"], batch["decoder_input_ids"],
                                   batch["decoder_segments"])  # (bins, T_dec, d_model)
            hidden = h.flatten(0, 1)[batch["target_index"]]  # (N, d_model): target positions only
        else:
            hidden = []
            for g in batch:
                mask = t5.mask_if_padded(g["attention_mask"])  # one host sync for both stacks
                encoder_out = self.model.encode(g["input_ids"], mask)
                h = self.model.decoder_hidden(g["decoder_input_ids"], encoder_out, mask,
                                              encoder_rows=g.get("encoder_rows"))  # (R, T_dec, d_model)
                hidden.append(h.flatten(0, 1)[g["target_index"]])  # (N_g, d_model)
            hidden = torch.cat(hidden)
        return target_cross_entropy(self.model.head_input(hidden), self.model.output_embedding, labels, token_weights)


class DecoderOnlyObjective(nn.Module):
    """A LLaMA-family model over packed sequences (input_ids, position_ids, segment_ids: which example's tree
    each slot holds, -1 for padding; branch_ids: 0 its shared prompt, k its k-th row), the LM head at the
    positions that predict target tokens (target_index)."""

    def __init__(self, model: llama.Llama):
        super().__init__()
        self.model = model
        self.packed_hidden = self.tree_hidden  # compile_objective swaps in the compiled one

    def tree_hidden(self, input_ids: Tensor, position_ids: Tensor, segment_ids: Tensor, branch_ids: Tensor) -> Tensor:
        mask = llama.segment_causal_mask(segment_ids, branch_ids)  # (B, 1, T, T): each row's own view
        return self.model.hidden_states(input_ids, position_ids, mask)  # (B, T, hidden)

    def forward(self, batch: dict[str, Tensor], labels: Tensor,
                token_weights: Tensor | None) -> tuple[Tensor | None, Tensor]:
        hidden = self.packed_hidden(batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["branch_ids"])
        hidden = hidden.flatten(0, 1)[batch["target_index"]]  # (N, hidden)
        return target_cross_entropy(hidden, self.model.lm_head.weight, labels, token_weights)


class Student:
    """What training and evaluation need from a model, over (prompt ids, target ids) rows. Each subclass
    provides encode_prompt / encode_target / encode_option (text -> ids), collate (rows -> the objective's
    host tensors), score_options (rank scoring) and generate (greedy answers). `objective` (the model and
    its loss, one module) is what DDP wraps, as `train_objective`; `module`, the model, never is."""

    kind = ""

    def __init__(self, model: nn.Module, tokenizer, device: torch.device, bf16: bool, objective: nn.Module):
        self.module, self.tokenizer, self.device = model, tokenizer, device
        self.objective = self.train_objective = objective
        self.bf16 = bf16 and bf16_supported(device)

    def autocast(self):
        # bf16 activations, fp32 master weights and optimizer state.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def prompt_limit(self, limit: int, reserve: int) -> int:
        """Prompt tokens allowed when `reserve` more (target or generated) follow: T5's relative positions
        set no bound; a decoder-only model's position table does (see DecoderOnlyStudent)."""
        return limit

    def input_text(self, example: data.Example, task: str | None, prefix: str) -> str:
        """The text of task `task`'s input; task None: the part every task shares. T5 reads the official
        format, p ⊕ Q ⊕ O, whole in its encoder: the prefix names the task (§3.3)."""
        return prompts.student_input(example, prefix)

    def input_format(self) -> str:
        """How inputs are written, for results.json: the paper's T5 format, or a decoder-only one."""
        return self.kind

    def fit_prompt(self, example: data.Example, task: str, prefix: str, limit: int) -> list[int]:
        """THE student input of every row, trained, generated from or ranked: input_text(example, task, prefix),
        encoded, its shared part (input_text(example, None, prefix)) in at most `limit` tokens, so that every
        task of an example drops the same words. Too long: drop words from the START of the question, so the
        end of the question (where the ask is), the options and the task line survive."""
        def encode(ex: data.Example) -> tuple[list[int], int]:  # (ids, how many of them count against limit)
            ids = self.encode_prompt(self.input_text(ex, task, prefix))
            shared = self.input_text(ex, None, prefix)
            return ids, len(ids) if shared == self.input_text(ex, task, prefix) else len(self.encode_prompt(shared))

        ids, counted = encode(example)
        if counted <= limit:
            return ids
        words = example.question.split(" ")

        def encode_without(k: int) -> tuple[list[int], int]:
            return encode(dataclasses.replace(example, question=" ".join(words[k:])))

        lo, hi = 1, len(words)  # smallest k (words dropped) that fits, by bisection
        while lo < hi:
            mid = (lo + hi) // 2
            if encode_without(mid)[1] <= limit:
                hi = mid
            else:
                lo = mid + 1
        ids, counted = encode_without(lo)
        if counted > limit:  # the options alone are too long: keep the end, which holds the last options
            ids = ids[counted - limit:]
        return ids

    def target_loss(self, examples: list[list[tuple[list[int], list[int]]]],
                    row_weights: Tensor | None = None) -> tuple[Tensor | None, Tensor, Tensor]:
        """Token cross-entropy of every (prompt, target) row at its target tokens, the rows grouped by example
        (a decoder-only student reads what an example's rows share once): (Σ_n row_weights[row(n)] · CE_n, or
        None without weights; CE_n (N,); row(n) (N,), on the device), rows numbered in order, examples flat."""
        batch, labels, token_rows = to_device(self.collate(examples), self.device)
        token_weights = row_weights[token_rows] if row_weights is not None else None
        loss, losses = self.train_objective(batch, labels, token_weights)
        return loss, losses, token_rows

    @staticmethod
    def option_sums(losses: Tensor, token_rows: Tensor, options: list[list[list[int]]]) -> list[list[float]]:
        """Summed log-likelihood of each option from its tokens' cross-entropy, per question."""
        n_rows = sum(len(opts) for opts in options)
        sums = torch.zeros(n_rows, dtype=torch.float32).index_add_(0, token_rows.cpu(), -losses.float().cpu())
        scores, start = [], 0
        for opts in options:
            scores.append(sums[start:start + len(opts)].tolist())
            start += len(opts)
        return scores

    def save_pretrained(self, folder: Path) -> None:
        with merged_lora(self.module):
            self.module.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


class Seq2SeqStudent(Student):
    """A T5: the prompt goes to the encoder, the target is the decoder's labels (as in the paper)."""

    kind = "t5"

    def __init__(self, model: t5.T5, tokenizer, device: torch.device, bf16: bool):
        super().__init__(model, tokenizer, device, bf16, Seq2SeqObjective(model))

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)  # ends with </s>

    def encode_target(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)  # ends with </s>: the student learns to stop

    def encode_option(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)[:-1]  # the option's own tokens, without </s> (lm-evaluation-harness)

    def group(self, prompt_rows: list[list[int]], targets: list[list[int]],
              encoder_rows: list[int] | None = None) -> tuple[dict[str, Tensor], list[int]]:
        """One forward's tensors: prompts (B_enc, T_enc) right-padded, targets (R, T_dec) as labels, and
        the flat index of every target token; encoder_rows: target r reads prompt encoder_rows[r]."""
        pad_id = self.tokenizer.pad_id
        labels = pad([t or [pad_id] for t in targets], -100)
        width = labels.shape[1]
        group = {"input_ids": pad(prompt_rows, pad_id), "attention_mask": pad([[1] * len(p) for p in prompt_rows], 0),
                 "decoder_input_ids": t5.shift_right(labels, start_id=pad_id, pad_id=pad_id),  # T5 starts at pad
                 "target_index": torch.tensor([r * width + j for r, t in enumerate(targets) for j in range(len(t))])}
        if encoder_rows is not None:
            group["encoder_rows"] = torch.tensor(encoder_rows)
        return group, [r for r, t in enumerate(targets) for _ in t]

    def collate(self, examples: list[list[tuple[list[int], list[int]]]]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Every row, prompt and target, packed end to end with others into bins (pack_prompts_and_targets):
        bin b's prompts one after another in input_ids[b], their decoder inputs (shift_right of each target) in
        the same order in decoder_input_ids[b], segment ids naming each slot's row (-1 padding). t5.packed_hidden
        computes each row as if alone (tests/test_train.py checks losses and gradients), with no padding
        between rows of different lengths. Every task's input starts with its own prefix p_A / p_m (the official
        format), so rows share nothing: the rows of all examples are packed alike."""
        rows = [row for example in examples for row in example]
        bins, (encoder_width, decoder_width) = pack_prompts_and_targets([(len(p), len(t)) for p, t in rows])
        pad_id = self.tokenizer.pad_id
        input_ids = torch.full((len(bins), encoder_width), pad_id, dtype=torch.long)
        decoder_input_ids = torch.full((len(bins), decoder_width), pad_id, dtype=torch.long)
        encoder_segments = torch.full((len(bins), encoder_width), -1, dtype=torch.long)
        decoder_segments = torch.full((len(bins), decoder_width), -1, dtype=torch.long)
        target_index, labels, token_rows = [], [], []
        for b, members in enumerate(bins):
            at_enc = at_dec = 0
            for k, r in enumerate(members):
                prompt, target = rows[r]
                input_ids[b, at_enc:at_enc + len(prompt)] = torch.tensor(prompt, dtype=torch.long)
                encoder_segments[b, at_enc:at_enc + len(prompt)] = k
                # T5 starts decoding at pad: [pad, y_0, ..., y_{n-2}] predicts [y_0, ..., y_{n-1}]
                decoder_input_ids[b, at_dec:at_dec + len(target)] = torch.tensor(([pad_id] + target)[:len(target)], dtype=torch.long)
                decoder_segments[b, at_dec:at_dec + len(target)] = k
                target_index += range(b * decoder_width + at_dec, b * decoder_width + at_dec + len(target))
                labels += target
                token_rows += [r] * len(target)
                at_enc, at_dec = at_enc + len(prompt), at_dec + len(target)
        batch = {"input_ids": input_ids, "encoder_segments": encoder_segments, "decoder_input_ids": decoder_input_ids,
                 "decoder_segments": decoder_segments, "target_index": torch.tensor(target_index, dtype=torch.long)}
        return batch, torch.tensor(labels, dtype=torch.long), torch.tensor(token_rows, dtype=torch.long)

    @torch.no_grad()
    def score_options(self, prompt_rows: list[list[int]], options: list[list[list[int]]]) -> list[list[float]]:
        """The encoder runs once per question; every option is a decoder row over its question's output."""
        targets = [t for opts in options for t in opts]
        group, token_rows = self.group(prompt_rows, targets, [q for q, opts in enumerate(options) for _ in opts])
        labels = torch.tensor([token for t in targets for token in t])
        with self.autocast():
            _, losses = self.objective(to_device([group], self.device), labels.to(self.device), None)
        return self.option_sums(losses, torch.tensor(token_rows), options)

    @torch.no_grad()
    def generate(self, prompt_rows: list[list[int]], max_new_tokens: int) -> list[str]:
        input_ids = pad(prompt_rows, self.tokenizer.pad_id).to(self.device)
        mask = pad([[1] * len(p) for p in prompt_rows], 0).to(self.device)
        with self.autocast():  # the models' KV caches take the autocast dtype
            out = self.module.generate(input_ids, mask, max_new_tokens, eos_id=self.tokenizer.eos_id)
        eos = {self.tokenizer.eos_id}
        return [self.tokenizer.decode(cut_at_eos(row, eos)) for row in out.tolist()]


TASK_LINE_TOKENS = 32  # a decoder-only prompt's room for its task line (and chat turn end), beyond --max_input_tokens


class DecoderOnlyStudent(Student):
    """A LLaMA-family model: one sequence prompt + target; only the target tokens are in the loss (beyond
    the paper, which used T5 students only). The input is Q ⊕ O, then a task line that names the target
    ("Answer:", "Rationale (llama-2):"), and with `chat`, goes through the student's chat template as the
    user turn, the target being the assistant turn. The task line plays p_A / p_m's part (§3.3) where the
    target starts, so the question and options before it are the same text for every task: the TinyLLM step
    reads them once per example (collate). `task_prefix` keeps p_A / p_m at the start as well (version 2's
    format; then nothing is shared); the plain format (no task line) needs it, as it is the only marker."""

    kind = "llama"

    def __init__(self, model: llama.Llama, tokenizer, device: torch.device, bf16: bool, chat: bool = False,
                 with_boundary: bool = True, task_prefix: bool = False):
        super().__init__(model, tokenizer, device, bf16, DecoderOnlyObjective(model))
        if not (with_boundary or task_prefix):
            raise UserError("--boundary=0 with --task_prefix=0: nothing in the input would say which task's "
                            "target follows (keep the task line, or the prefix)")
        self.chat, self.with_boundary, self.task_prefix = chat, with_boundary, task_prefix

    def prompt_limit(self, limit: int, reserve: int) -> int:
        positions = self.module.config.max_position_embeddings
        room = positions - reserve - TASK_LINE_TOKENS
        if room <= 0:
            raise UserError(f"the student has {positions} positions: no room for a prompt before {reserve} "
                            "target tokens (lower --max_target_tokens / --max_new_tokens)")
        return min(limit, room)

    def input_text(self, example: data.Example, task: str | None, prefix: str) -> str:
        line = prompts.task_boundary(task, ANSWER_TASK) if task is not None and self.with_boundary else ""
        return prompts.student_input(example, prefix if self.task_prefix else "", line)

    def input_format(self) -> str:
        name = "chat" if self.chat else ("boundary" if self.with_boundary else "plain")
        return f"{name}+prefix" if self.task_prefix and self.with_boundary else name

    def encode_prompt(self, text: str) -> list[int]:
        if self.chat:  # the rendered template writes its own BOS text where the model wants one
            turn = self.tokenizer.apply_chat_template([{"role": "user", "content": text.rstrip("\n")}])
            return self.tokenizer.encode(turn, bos=False)
        return self.tokenizer.encode(text, bos=True)

    def encode_target(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False) + [self.tokenizer.eos_ids[0]]  # chat models: end of turn

    def encode_option(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False)

    def collate(self, examples: list[list[tuple[list[int], list[int]]]]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """One tree per example: the prompt tokens its rows share (Q ⊕ O, chat header), once, then one branch
        per row, the rest of its prompt (the task line) and its target. A branch sees the shared part and
        itself only (llama.segment_causal_mask with branch ids), at the positions it would have alone, so each
        row computes exactly as if it ran alone (tests/test_train.py checks losses and gradients). Trees are
        packed end to end into sequences as long as the longest tree. A row's last target token is never an
        input: it predicts nothing. Target token j of a row is predicted by the token before it."""
        trees = []  # (shared prompt, [(branch tokens, target, flat row index)])
        row = 0
        for rows in examples:
            shared = len(os.path.commonprefix([p for p, _ in rows]))  # the whole prompt of a lone row
            trees.append((rows[0][0][:shared], [(p[shared:], t, row + r) for r, (p, t) in enumerate(rows)]))
            row += len(rows)
        lengths = [len(shared) + sum(len(tail) + len(t) - 1 for tail, t, _ in branches) for shared, branches in trees]
        bins, width = pack_rows([(n,) for n in lengths]), max(lengths)
        input_ids = torch.full((len(bins), width), self.tokenizer.pad_id, dtype=torch.long)
        position_ids = torch.zeros((len(bins), width), dtype=torch.long)
        segment_ids = torch.full((len(bins), width), -1, dtype=torch.long)
        branch_ids = torch.zeros((len(bins), width), dtype=torch.long)
        target_index, labels, token_rows = [], [], []
        for b, members in enumerate(bins):
            start = 0
            for k, i in enumerate(members):
                shared, branches = trees[i]
                segment_ids[b, start:start + lengths[i]] = k
                input_ids[b, start:start + len(shared)] = torch.tensor(shared, dtype=torch.long)
                position_ids[b, start:start + len(shared)] = torch.arange(len(shared))
                at = start + len(shared)
                for branch, (tail, target, r) in enumerate(branches, 1):
                    n = len(tail) + len(target) - 1
                    input_ids[b, at:at + n] = torch.tensor(tail + target[:-1], dtype=torch.long)
                    position_ids[b, at:at + n] = torch.arange(len(shared), len(shared) + n)
                    branch_ids[b, at:at + n] = branch
                    last_prompt = at + len(tail) - 1 if tail else start + len(shared) - 1
                    target_index += [b * width + last_prompt] + [b * width + at + len(tail) + j
                                                                 for j in range(len(target) - 1)]
                    labels += target
                    token_rows += [r] * len(target)
                    at += n
                start += lengths[i]
        batch = {"input_ids": input_ids, "position_ids": position_ids, "segment_ids": segment_ids,
                 "branch_ids": branch_ids, "target_index": torch.tensor(target_index, dtype=torch.long)}
        return batch, torch.tensor(labels), torch.tensor(token_rows)

    @torch.no_grad()
    def score_options(self, prompt_rows: list[list[int]], options: list[list[list[int]]]) -> list[list[float]]:
        """Each prompt is prefilled once; every option continues from its prompt's KV cache."""
        targets = [t for opts in options for t in opts]
        owner = torch.tensor([q for q, opts in enumerate(options) for _ in opts], device=self.device)
        prompt_ids = pad(prompt_rows, self.tokenizer.pad_id, left=True).to(self.device)
        prompt_mask = pad([[1] * len(p) for p in prompt_rows], 0, left=True).to(self.device)
        continuations = pad([t or [self.tokenizer.pad_id] for t in targets], self.tokenizer.pad_id)
        width = continuations.shape[1]
        index = torch.tensor([r * width + j for r, t in enumerate(targets) for j in range(len(t))], device=self.device)
        labels = torch.tensor([token for t in targets for token in t], device=self.device)
        with self.autocast():
            hidden = self.module.continuation_hidden(prompt_ids, prompt_mask, continuations.to(self.device), owner)
            _, losses = target_cross_entropy(hidden.flatten(0, 1)[index], self.module.lm_head.weight, labels)
        token_rows = torch.tensor([r for r, t in enumerate(targets) for _ in t])
        return self.option_sums(losses, token_rows, options)

    @torch.no_grad()
    def generate(self, prompt_rows: list[list[int]], max_new_tokens: int) -> list[str]:
        input_ids = pad(prompt_rows, self.tokenizer.pad_id, left=True).to(self.device)
        mask = pad([[1] * len(p) for p in prompt_rows], 0, left=True).to(self.device)
        eos_ids = tuple(self.tokenizer.eos_ids)
        with self.autocast():
            out = self.module.generate(input_ids, mask, max_new_tokens, eos_ids=eos_ids)
        return [self.tokenizer.decode(cut_at_eos(row, set(eos_ids))) for row in out.tolist()]

    def save_pretrained(self, folder: Path) -> None:
        super().save_pretrained(folder)
        fmt = {"chat": self.chat, "boundary": self.with_boundary, "task_prefix": self.task_prefix}
        (Path(folder) / STUDENT_FORMAT).write_text(json.dumps(fmt) + "\n")  # inside save_checkpoint's temp folder


DEFAULT_CHAT = True  # an instruction-tuned decoder-only student reads its chat template (see student_format)


def student_format(source: Path, tokenizer, chat: int, boundary: int, task_prefix: int) -> tuple[bool, bool, bool]:
    """(chat, boundary, task_prefix) of a decoder-only student: the flags when given (0/1), else what the
    checkpoint was trained with (its student_format.json), else the defaults: the task line always, the chat
    template for an instruction-tuned student (one with a template), as measured best on OBQA valid
    (README), and no prefix p_A / p_m at the start (the shared prompt; version 2's checkpoints, whose
    student_format.json does not say, had it)."""
    saved = json.loads((source / STUDENT_FORMAT).read_text()) if (source / STUDENT_FORMAT).is_file() else None
    saved_ = saved or {}
    chat_ = bool(chat) if chat in (0, 1) else saved_.get("chat", DEFAULT_CHAT and tokenizer.chat_template is not None)
    boundary_ = bool(boundary) if boundary in (0, 1) else saved_.get("boundary", True)
    prefix_ = bool(task_prefix) if task_prefix in (0, 1) else (
        saved_.get("task_prefix", True) if saved is not None else not boundary_)
    if chat_ and tokenizer.chat_template is None:
        raise UserError(f"--chat=1: the student {source} has no chat template (tokenizer_config.json "
                        "'chat_template' or chat_template.jinja)")
    return chat_, boundary_, prefix_


def load_student(source: str, device: torch.device, bf16: bool = True, dtype: torch.dtype = torch.float32,
                 chat: int = -1, boundary: int = -1, task_prefix: int = -1) -> Student:
    """A hub id or folder -> the student wrapper for its architecture, on `device`: fp32 weights for training
    (bf16 autocast when `bf16`), bf16 weights for inference-only evaluation. chat / boundary: the decoder-only
    input format (-1: the checkpoint's, else the default; see student_format); T5 keeps the paper's format."""
    model, tokenizer, kind = load_model(source, dtype=dtype, device=str(device))
    if kind == "t5":
        if chat == 1 or boundary == 1 or task_prefix == 0:
            raise UserError(f"{source}: --chat, --boundary and --task_prefix are for decoder-only students; a T5 "
                            "student reads the paper's format")
        return Seq2SeqStudent(model, tokenizer, device, bf16)
    if kind == "llama":
        fmt = student_format(resolve_model(source), tokenizer, chat, boundary, task_prefix)
        return DecoderOnlyStudent(model, tokenizer, device, bf16, *fmt)
    raise UserError(f"{source}: model kind {kind!r} cannot be a student (T5 or LLaMA-family only)")


# ---------------------------------------------------------------------------------------------------
# answers: greedy with p_A then parse_answer (exact match, as in the paper), or the most likely option

SCORINGS = ("generate", "rank")


def parse_scoring(scoring: str) -> list[str]:
    chosen = [s.strip() for s in scoring.split(",") if s.strip()]
    if not chosen or any(s not in SCORINGS for s in chosen) or len(set(chosen)) != len(chosen):
        raise UserError(f"--scoring={scoring!r}: expected generate or rank, or both (generate,rank)")
    return chosen


def predict(student: Student, examples: list[data.Example], scoring: str = "generate", batch_size: int = 32,
            max_input_tokens: int = 1024, max_new_tokens: int = 64, progress=None) -> list[dict]:
    """One record per example: id, answer (gold), prediction (option index or None) and correct, by the first
    of `scoring` ("generate", "rank" or "generate,rank"). All from the one answer prompt (fit_prompt).
    - generate (the paper's exact match): greedy text, parsed to an option: output, prediction_generate.
    - rank (lm-evaluation-harness's multiple choice): every option's log-likelihood after the prompt, summed over
      its tokens (scores, tokens) and per UTF-8 byte of its text (lengths): prediction_sum (lm-eval's acc; rank's
      own prediction) and prediction_norm (acc_norm). Each prediction_* has its correct_*.
    `progress(n)` is called with the number of examples done after each batch."""
    scorings = parse_scoring(scoring)
    was_training = student.module.training
    student.module.eval()
    limit = student.prompt_limit(max_input_tokens, max_new_tokens)
    prompt_rows = [student.fit_prompt(ex, ANSWER_TASK, prompts.ANSWER_PREFIX, limit) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(prompt_rows[i]))  # similar lengths share a batch
    records = [{"id": ex.id, "answer": ex.answer} for ex in examples]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        if "generate" in scorings:
            outputs = student.generate([prompt_rows[i] for i in chunk], max_new_tokens)
            for i, text in zip(chunk, outputs):
                records[i].update(output=text, prediction_generate=prompts.parse_answer(text, examples[i].options))
        if "rank" in scorings:
            options = [[student.encode_option(option) for option in examples[i].options] for i in chunk]
            for i, scores, tokens in zip(chunk, student.score_options([prompt_rows[i] for i in chunk], options), options):
                lengths = [len(option.encode("utf-8")) for option in examples[i].options]
                per_byte = [s / max(n, 1) for s, n in zip(scores, lengths)]
                records[i].update(scores=scores, tokens=[len(t) for t in tokens], lengths=lengths,
                                  prediction_sum=max(range(len(scores)), key=scores.__getitem__),
                                  prediction_norm=max(range(len(scores)), key=per_byte.__getitem__))
        if progress is not None:
            progress(len(chunk))
    primary = "generate" if scorings[0] == "generate" else "sum"
    for record in records:
        for key in [k for k in record if k.startswith("prediction_")]:
            record["correct_" + key.removeprefix("prediction_")] = record[key] == record["answer"]
        record["prediction"] = record[f"prediction_{primary}"]
        record["correct"] = record[f"correct_{primary}"]
    student.module.train(was_training)
    return records


def accuracy(records: list[dict], key: str = "correct") -> float:
    return sum(r[key] for r in records) / len(records) if records else 0.0


# ---------------------------------------------------------------------------------------------------
# tasks and their rows (§3.3)

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
    """The answer task (first) and the rationale tasks of the method."""
    sources = dict(tinyllm.parse_teachers(cfg.teachers, sources=False))
    names = list(sources)
    alpha = parse_alpha(cfg.alpha, names)
    teacher = cfg.teacher or (names[0] if names else "")
    if cfg.method in ("dss", "kd") and teacher not in names:
        raise UserError(f"--teacher={teacher!r} is not one of --teachers ({' '.join(names) or 'none'})")
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
    rationale_teachers = {"tinyllm": names, "dss": [teacher]}.get(cfg.method, [])
    if cfg.method == "tinyllm" and not names:
        raise UserError("--method=tinyllm needs at least one teacher in --teachers")
    for name in rationale_teachers:
        records = teacher_rationales(cfg, name, sources[name])
        targets = {ex.id: text for ex in examples if (text := usable_rationale(records.get(ex.id)))}
        if not any(ex.id in records for ex in examples):  # the cache was made for other examples (another LIMIT)
            raise UserError(f"{name}: none of the {len(examples)} train examples"
                            f"{f' (--limit={cfg.limit})' if cfg.limit else ''} has a rationale in "
                            f"{Path(cfg.cache) / cfg.dataset / (name + '.jsonl')} ({len(records)} records, none for "
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


# ---------------------------------------------------------------------------------------------------
# data order: a permutation per epoch from (seed, epoch), so step -> batch is a pure function (resume)

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


# ---------------------------------------------------------------------------------------------------
# LoRA (the paper's parameter-efficient baseline): adapters on attention q and v, merged at save

LORA_TARGETS = ("q", "v", "q_proj", "v_proj")  # T5's and LLaMA's attention projections (HF names)


class LoRALinear(nn.Module):
    """y = base(x) + (α/r) · B A x, with the base frozen; B starts at zero so training starts from the base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.scale * (self.lora_B @ self.lora_A))
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear


def add_lora(model: nn.Module, rank: int, alpha: float) -> int:
    """Freeze `model` and put adapters on every attention q/v projection; returns how many."""
    model.requires_grad_(False)
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if name in LORA_TARGETS and isinstance(child, nn.Linear)]
    if not targets:
        raise UserError(f"--method=lora: no attention projection named {' / '.join(LORA_TARGETS)} in the student")
    for parent, name in targets:
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return len(targets)


@contextlib.contextmanager
def merged_lora(model: nn.Module):
    """Within the block the adapters are folded into plain Linear weights, so the model saves (and loads,
    in transformers too) as an ordinary checkpoint of the student's architecture."""
    swapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, LoRALinear)]
    for parent, name, child in swapped:
        setattr(parent, name, child.merged())
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def load_adapters(model: nn.Module, adapters: dict[str, Tensor]) -> None:
    """Restore exactly the adapters adapter_state saved: the same keys and shapes, nothing else."""
    params = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    if params.keys() != adapters.keys():
        raise UserError(f"LoRA adapters in the checkpoint do not fit the student: missing "
                        f"{sorted(params.keys() - adapters.keys())[:5]}, unexpected {sorted(adapters.keys() - params.keys())[:5]}")
    with torch.no_grad():
        for key, value in adapters.items():
            assert params[key].shape == value.shape, (key, params[key].shape, value.shape)
            params[key].copy_(value)


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
        student.save_pretrained(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
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
# distributed (torchrun, set up by data.setup_distributed): sums over ranks, and validation

def all_reduce_sum(tensor: Tensor) -> Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def inference_student(student: Student) -> Student:
    """The student as eval.py loads its checkpoint: bf16 weights where the device computes bf16 natively (LoRA
    adapters merged first, as saved), fp32 elsewhere. Validation scores this copy, so the accuracy that picks
    RUN/best is the one eval.py reports for it: greedy answers of a near-chance student flip on bf16 rounding
    (measured: 31.4% under autocast with fp32 weights, 28.2% with bf16 weights, same checkpoint, 500 questions)."""
    if not student.bf16:
        return student
    with merged_lora(student.module):
        # The checkpoint's tensors (the parameters) become bf16 as from_pretrained casts them, copied straight
        # into bf16 (no transient fp32 copy; tied weights stay one); buffers such as RoPE's inv_freq stay fp32.
        bf16 = {id(p): nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                for p in student.module.parameters()}
        module = copy.deepcopy(student.module, memo=bf16)
    inference = copy.copy(student)
    inference.module = module
    inference.objective = inference.train_objective = type(student.objective)(module)  # T5 scores through it
    return inference


def valid_accuracy(student: Student, examples: list[data.Example], cfg: TrainConfig, rank: int,
                   world: int) -> float:
    """Greedy answers on this rank's share of valid, summed over ranks, by the student as eval.py will load it."""
    records = predict(inference_student(student), examples[rank::world], "generate", cfg.eval_batch_size,
                      cfg.max_input_tokens, cfg.max_new_tokens)
    counts = all_reduce_sum(torch.tensor([sum(r["correct"] for r in records), len(records)],
                                         dtype=torch.float64, device=student.device))
    return (counts[0] / counts[1].clamp(min=1)).item()


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
    """Set-up, then one train_step per optimizer step, each followed by maybe_log / maybe_eval / maybe_save.
    Returns RUN/best, the checkpoint with the best valid accuracy."""
    rank, world, device = setup_distributed(cfg.device)
    log = print if rank == 0 else (lambda *args, **kwargs: None)
    run = run_folder(cfg)
    if cfg.method == "inference":
        log(f"--method=inference trains nothing: `make eval METHOD=inference` evaluates {cfg.student} as is")
        return run
    train_examples, valid_examples, tasks = check_run(cfg, world, log)
    saved = resume_state(cfg, run)
    if cfg.check_only:
        log(f"{run}: the flags, the data, the rationale cache and the run folder are fine (--check_only=1)")
        return run
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
    return finish(run, state, len(train_examples), total, metrics, log, rank, world)


def check_config(cfg: TrainConfig, world: int) -> None:
    data.check_flags(cfg)  # a config made in code (an experiment's run) is checked as a parsed one is
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UserError(f"--batch_size={cfg.batch_size} must be a multiple of processes x --grad_accum "
                        f"= {world} x {cfg.grad_accum}")


def check_run(cfg: TrainConfig, world: int = 1, log=lambda *args, **kwargs: None
              ) -> tuple[list[data.Example], list[data.Example], list[Task]]:
    """Everything a run reads or writes, before it starts: the flags together, the run folder (creatable), the
    data (downloaded if need be) and the rationale cache of every teacher it learns from. Returns (train, valid,
    tasks): what the run then trains on."""
    check_config(cfg, world)
    data.check_folder(run_folder(cfg), "--out")
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


def resume_state(cfg: TrainConfig, run: Path) -> dict | None:
    """RUN/last/trainer_state.pt with --resume=1 (checked against this run's flags), else None."""
    for folder in (run / "last", run / "best"):
        recover_checkpoint(folder)
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(cfg.warmup_steps, 1), max(total - s, 0) / max(total - cfg.warmup_steps, 1)))
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    return optimizer, scheduler


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


def finish(run: Path, state: LoopState, examples: int, total: int, metrics: Path, log, rank: int, world: int) -> Path:
    """RUN/train.json, written when training ends (what the table shows as the run's training time)."""
    if world > 1:
        dist.barrier()
    best = run / "best"
    if rank == 0:
        summary = {"seconds": round(state.seconds(), 1), "steps": state.step, "examples": examples,
                   "best_step": state.best_step, "best_valid_accuracy": state.best_accuracy,
                   "code": data.code_revision()}  # the git commit that trained it
        atomic_write(run / "train.json", json.dumps(summary, indent=2) + "\n")
    log(f"checkpoint: {best} (valid accuracy {state.best_accuracy:.4f} at step {state.best_step}); "
        f"last: {run / 'last'} (step {state.step}/{total}); metrics: {metrics}")
    return best


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
    metrics.write_text("".join(line + "\n" for line in keep))


def run_folder(cfg: TrainConfig) -> Path:
    return Path(cfg.out or f"out/{cfg.dataset}/{cfg.method}")


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
        with interrupt_note(lambda: interrupted(cfg)):
            train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main, "lower --batch_size with a larger --grad_accum (ARGS=\"--batch_size=4 --grad_accum=2\"), "
                   "--eval_batch_size, or --max_input_tokens / --max_target_tokens")
