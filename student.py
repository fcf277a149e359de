"""The student: a T5 or LLaMA-family model behind one interface, for training (its rows, their loss) and answers.

Training's rows are (prompt ids, target ids) per task, grouped by example; target_loss returns the token
cross-entropy of every target token (Eq. 3-4's terms; train.py weighs them into Eq. 2). What makes that fast
lives here, under the one interface: rows packed end to end with a block-diagonal mask (little padding), the
decoder-only student reading an example's shared prompt once for all its tasks (a tree), and the LM head applied
in chunks at target positions only, its gradient taken in the forward pass (no (rows, length, vocab) tensor).

Answers: predict() greedy-decodes from the answer prompt p_A ⊕ Q ⊕ O and parses the option (the paper's exact
match), or ranks the options by log-likelihood (lm-evaluation-harness's acc and acc_norm). LoRA adapters (the
paper's parameter-efficient baseline) are added, merged and saved here too. train.py and eval.py import it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import data
import llama
import prompts
import t5
from cli import UserError
from data import load_model, resolve_model

ANSWER_TASK = "answer"  # the task name of L_A; a rationale task is named after its teacher


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
        eos = set(eos_ids)
        return [self.tokenizer.decode(cut_at_eos(row, eos)) for row in out.tolist()]

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
    path = source / STUDENT_FORMAT
    saved = json.loads(path.read_text()) if path.is_file() else None  # None: not a checkpoint trained here

    def pick(flag: int, key: str, default: bool) -> bool:
        """The flag when given (0 or 1), else the checkpoint's choice, else `default`."""
        return bool(flag) if flag in (0, 1) else (saved or {}).get(key, default)

    use_chat = pick(chat, "chat", DEFAULT_CHAT and tokenizer.chat_template is not None)
    with_boundary = pick(boundary, "boundary", True)
    # a checkpoint of ours that does not say had the prefix (version 2); a fresh student: none after a task line
    with_prefix = pick(task_prefix, "task_prefix", True if saved is not None else not with_boundary)
    if use_chat and tokenizer.chat_template is None:
        raise UserError(f"--chat=1: the student {source} has no chat template (tokenizer_config.json "
                        "'chat_template' or chat_template.jinja)")
    return use_chat, with_boundary, with_prefix


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
