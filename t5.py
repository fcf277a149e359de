"""T5 / FLAN-T5 encoder-decoder in plain PyTorch, standalone: TinyLLM's students and one of its teachers.

The students of TinyLLM (Tian et al., arXiv 2402.04616) are FLAN-T5 small/base/large; FLAN-T5-xl is one
of its teachers.

Reads top to bottom in data-flow order: config -> relative position buckets -> layer norm -> attention ->
feed-forward -> blocks -> stacks -> model -> loading/saving -> generation -> loss helpers -> tokenizer.
Parameter names are Hugging Face's, so checkpoints load and save by identity.

References: Raffel et al. 2020 (T5, arXiv 1910.10683); the T5 v1.1 / FLAN-T5 checkpoints (gated-GELU,
untied LM head); mesh-tensorflow `_relative_position_bucket`; karpathy/nanoGPT, pytorch-labs/gpt-fast
(preallocated KV cache, meta-device build) and PiotrNawrot/nanoT5 (HF names kept) for the layout.
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------------------
# Config


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # per-head width; num_heads * d_kv need not equal d_model (flan-t5-small: 6*64 vs 512)
    d_ff: int = 2048
    num_layers: int = 6  # encoder blocks
    num_decoder_layers: int | None = None  # defaults to num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"  # "relu" (T5 v1.0) or "gated-gelu" (T5 v1.1 / FLAN-T5, tanh GELU)
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.1  # training only; generation never applies dropout
    tie_word_embeddings: bool = True  # LM head shares `shared.weight` (v1.0); v1.1 has its own `lm_head`
    scale_decoder_outputs: bool | None = None  # multiply by d_model**-0.5 before the head; default = tied
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            # Original T5 rescales because its head is the (tied) input embedding; v1.1 does not.
            self.scale_decoder_outputs = self.tie_word_embeddings
        if self.feed_forward_proj not in ("relu", "gated-gelu"):
            raise ValueError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported "
                             "(expected 'relu' or 'gated-gelu')")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"T5Config.{name}={value!r} must be a positive integer")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(f"T5Config.relative_attention_num_buckets={self.relative_attention_num_buckets} "
                             "must be >= 4 (half exact, half log-spaced, per direction)")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate={self.dropout_rate!r} must be in [0, 1)")

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @classmethod
    def from_hf_config(cls, d: dict) -> T5Config:
        """From a Hugging Face `config.json` dict. Derived keys (`dense_act_fn`, `is_gated_act`) and generic
        ones (`architectures`, `dtype`, `use_cache`, ...) are ignored; unsupported values raise ValueError."""
        if d.get("model_type", "t5") != "t5":
            raise ValueError(f"config.json model_type={d['model_type']!r}: only 't5' is supported here")
        if d.get("is_encoder_decoder", True) is not True:
            raise ValueError("config.json is_encoder_decoder must be true for T5ForConditionalGeneration")
        if d.get("is_decoder", False):
            raise ValueError("config.json is_decoder=true (a decoder-only T5 stack) is not supported")
        eos = d.get("eos_token_id", 1)
        if isinstance(eos, list):
            if len(eos) != 1:
                raise ValueError(f"config.json eos_token_id={eos!r}: T5 has one EOS id")
            eos = eos[0]
        known = {f.name for f in fields(cls)} - {"eos_token_id"}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        if kwargs.get("pad_token_id") is not None and "decoder_start_token_id" not in kwargs:
            kwargs["decoder_start_token_id"] = kwargs["pad_token_id"]  # T5 starts decoding from <pad>
        return cls(eos_token_id=eos, **kwargs)

    def to_hf_config(self) -> dict:
        """A `config.json` dict that transformers' T5ForConditionalGeneration reads back to this model.
        `scale_decoder_outputs` is written explicitly: transformers >= 5 honours it (and ties the head unless the
        checkpoint has a distinct `lm_head.weight`); older versions derive it from `tie_word_embeddings`."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True, **d}


# ---------------------------------------------------------------------------------------------------
# Relative position buckets (T5 §2.1): a learned scalar per (bucket, head) added to the attention logits.


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """Bucket of `key_position - query_position`. Half the buckets (per direction, when bidirectional) hold
    exact small distances, the rest are log-spaced up to `max_distance`; farther distances share the last
    bucket. The decoder (bidirectional=False) only sees the past, so positive offsets fall into bucket 0."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).long() * num_buckets  # keys to the right get the upper half
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # Same float ops, in the same order, as mesh-tensorflow / transformers, so truncation agrees bit for bit.
    # The clamp only avoids log(0) in entries that `torch.where` discards anyway.
    log_ratio = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


def mask_if_padded(attention_mask: Tensor | None) -> Tensor | None:
    """The 1/0 mask, or None when it masks nothing. An unpadded batch then runs SDPA with the position bias
    alone (1, H, T, T), or with no mask at all, instead of a (B, H, T, T) bias. One host sync per call, so
    call it once per forward, never per layer."""
    return None if attention_mask is None or bool(attention_mask.all()) else attention_mask


def padding_bias(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T_k) 1/0 mask -> (B, 1, 1, T_k) additive bias: 0 for tokens, the dtype's min for padding.
    The finite min (not -inf) keeps a fully padded row from turning into NaN."""
    return ((1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min).to(dtype)


def causal_bias(length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(T, T) additive bias hiding future keys."""
    return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)


def segment_bias(query_segments: Tensor, key_segments: Tensor, causal: bool, dtype: torch.dtype) -> Tensor:
    """(B, 1, T_q, T_k) fp32 additive bias for rows packed end to end: a slot sees the slots of its own segment
    (segment ids (B, T), which row each slot holds; -1 is padding), and with `causal` only those at or before
    it: a block-diagonal mask, so no real slot sees padding or another row. A padding slot sees every key: its
    output is never read, and a softmax row with nothing to see would be NaN in backward. Hidden slots get
    `dtype`'s min, which stays finite once the bias is cast to `dtype`."""
    see = query_segments[:, :, None] == key_segments[:, None, :]  # (B, T_q, T_k)
    if causal:
        slots = torch.arange(key_segments.shape[1], device=key_segments.device)
        see = see & (slots[None, :] <= slots[:, None])[None]
    see = see | (query_segments < 0)[:, :, None]
    return ((~see).float() * torch.finfo(dtype).min)[:, None]


def compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype attention will run in: the autocast dtype when autocast is on, else the weights' dtype.
    SDPA needs the additive mask in the query's dtype; we cast the bias once per stack, not per layer."""
    device_type = weight.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


# ---------------------------------------------------------------------------------------------------
# Layer norm: T5's is RMSNorm (no mean subtraction, no bias), statistics in fp32.


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)  # half-precision checkpoints keep a half-precision residual stream
        return self.weight * x


# ---------------------------------------------------------------------------------------------------
# Attention


class Attention(nn.Module):
    """Multi-head attention without the 1/sqrt(d) scale (T5 folds it into the initialisation). The first
    block of each stack owns `relative_attention_bias`; every block reuses the bias it produces."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, bidirectional: bool):
        super().__init__()
        self.n_heads, self.d_kv, self.dropout = config.num_heads, config.d_kv, config.dropout_rate
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
            self.bidirectional = bidirectional
            self.num_buckets = config.relative_attention_num_buckets
            self.max_distance = config.relative_attention_max_distance

    def position_bias(self, query_length: int, key_length: int) -> Tensor:
        """(1, H, T_q, T_k) learned bias for queries at positions 0..T_q-1 over keys 0..T_k-1."""
        device = self.relative_attention_bias.weight.device
        relative = (torch.arange(key_length, device=device)[None, :]
                    - torch.arange(query_length, device=device)[:, None])  # (T_q, T_k)
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        # (T_q,T_k,H) -> (1,H,T_q,T_k); contiguous, or SDPA copies the permuted bias in every layer.
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0).contiguous()

    def heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_kv).transpose(1, 2)  # (B,T,H*d_kv) -> (B,H,T,d_kv)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """q (B,H,T_q,d_kv), k/v (B,H,T_k,d_kv), bias broadcastable to (B,H,T_q,T_k) or None -> (B,T_q,d_model)."""
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0,
                                           dropout_p=self.dropout if self.training else 0.0)
        B, _, T, _ = y.shape
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_kv))  # (B,H,T,d_kv) -> (B,T,H*d_kv)

    def forward(self, x: Tensor, bias: Tensor | None, source: Tensor | None = None,
                source_rows: Tensor | None = None) -> Tensor:
        """Whole-sequence attention: self-attention when `source` is None, else over `source` (encoder output).
        source_rows (B,): query row i reads source row source_rows[i], so K/V are projected once per source row
        even when several query rows (the options of one question) share it."""
        source = x if source is None else source
        k, v = self.heads(self.k(source)), self.heads(self.v(source))
        if source_rows is not None:
            k, v = k[source_rows], v[source_rows]  # (B_src, H, T, d_kv) -> (B, H, T, d_kv)
        return self.attend(self.heads(self.q(x)), k, v, bias)


# ---------------------------------------------------------------------------------------------------
# Feed-forward


class DenseReluDense(nn.Module):
    """T5 v1.0: wo(relu(wi x)). T5 v1.1 / FLAN-T5: wo(gelu_tanh(wi_0 x) * wi_1 x) (transformers calls this
    `gated-gelu` but runs the tanh approximation, `gelu_new`; the checkpoints were trained with it)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.gated, self.dropout = config.gated, config.dropout_rate
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        else:
            h = F.relu(self.wi(x))
        return self.wo(F.dropout(h, self.dropout, self.training))


# ---------------------------------------------------------------------------------------------------
# Blocks: pre-norm residual sublayers, named as in transformers (`layer.0`, `layer.1`, `layer.2`).


class SelfAttentionLayer(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool, bidirectional: bool):
        super().__init__()
        self.SelfAttention = Attention(config, has_relative_attention_bias, bidirectional)
        self.layer_norm = LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + F.dropout(self.SelfAttention(self.layer_norm(x), bias), self.dropout, self.training)


class CrossAttentionLayer(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = Attention(config, has_relative_attention_bias=False, bidirectional=True)
        self.layer_norm = LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def forward(self, x: Tensor, encoder_out: Tensor, bias: Tensor | None, encoder_rows: Tensor | None = None) -> Tensor:
        h = self.EncDecAttention(self.layer_norm(x), bias, encoder_out, encoder_rows)
        return x + F.dropout(h, self.dropout, self.training)


class FeedForwardLayer(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = DenseReluDense(config)
        self.layer_norm = LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def forward(self, x: Tensor) -> Tensor:
        return x + F.dropout(self.DenseReluDense(self.layer_norm(x)), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: T5Config, is_decoder: bool, has_relative_attention_bias: bool):
        super().__init__()
        layers: list[nn.Module] = [SelfAttentionLayer(config, has_relative_attention_bias, bidirectional=not is_decoder)]
        if is_decoder:
            layers.append(CrossAttentionLayer(config))
        layers.append(FeedForwardLayer(config))
        self.layer = nn.ModuleList(layers)

    def forward(self, x: Tensor, self_bias: Tensor | None, encoder_out: Tensor | None = None,
                cross_bias: Tensor | None = None, encoder_rows: Tensor | None = None) -> Tensor:
        x = self.layer[0](x, self_bias)
        if encoder_out is not None:
            x = self.layer[1](x, encoder_out, cross_bias, encoder_rows)
        return self.layer[-1](x)

    def forward_step(self, x: Tensor, position: int | Tensor, self_bias: Tensor, cache: DecoderCache,
                     index: int) -> Tensor:
        """One decoder token x (B,1,d_model) at `position`: its K/V are written into the preallocated cache,
        and the query attends over the prefix written so far, `[:position + 1]` (a view of the static buffer;
        reading the whole buffer would cost attention over T_max slots at every step). position (B,): each row
        at its own position (continuous batching), reading as many slots as self_bias covers."""
        self_layer, cross_layer, ff_layer = self.layer
        attn = self_layer.SelfAttention
        h = self_layer.layer_norm(x)
        self_k, self_v = cache.self_k[index], cache.self_v[index]
        rows = torch.arange(x.shape[0], device=x.device) if isinstance(position, Tensor) else slice(None)
        self_k[rows, :, position] = attn.heads(attn.k(h))[:, :, 0]  # (B, H, d_kv) at each row's position
        self_v[rows, :, position] = attn.heads(attn.v(h))[:, :, 0]
        prefix = slice(0, self_bias.shape[-1])
        x = x + attn.attend(attn.heads(attn.q(h)), self_k[:, :, prefix], self_v[:, :, prefix], self_bias)
        cross = cross_layer.EncDecAttention
        h = cross_layer.layer_norm(x)
        x = x + cross.attend(cross.heads(cross.q(h)), cache.cross_k[index], cache.cross_v[index], cache.cross_bias)
        return ff_layer(x)


# ---------------------------------------------------------------------------------------------------
# Stacks and the model


class Stack(nn.Module):
    """Encoder or decoder: blocks then a final norm. Token embedding lives in `T5.shared` (transformers'
    `encoder.embed_tokens` / `decoder.embed_tokens` are aliases of it and are not separate parameters).
    With `checkpointing` set (train.py --checkpointing=1), training keeps only each block's input and
    recomputes the block in backward: activation memory of one block instead of all of them."""

    checkpointing = False

    def __init__(self, config: T5Config, num_layers: int, is_decoder: bool):
        super().__init__()
        self.block = nn.ModuleList([Block(config, is_decoder, has_relative_attention_bias=(i == 0))
                                    for i in range(num_layers)])
        self.final_layer_norm = LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    @property
    def relative_attention(self) -> Attention:
        return self.block[0].layer[0].SelfAttention

    def forward(self, x: Tensor, self_bias: Tensor | None, encoder_out: Tensor | None = None,
                cross_bias: Tensor | None = None, encoder_rows: Tensor | None = None) -> Tensor:
        x = F.dropout(x, self.dropout, self.training)
        recompute = self.checkpointing and torch.is_grad_enabled()
        for block in self.block:
            if recompute:  # the saved RNG state replays the same dropout masks in the recomputation
                x = checkpoint(block, x, self_bias, encoder_out, cross_bias, encoder_rows, use_reentrant=False)
            else:
                x = block(x, self_bias, encoder_out, cross_bias, encoder_rows)
        return F.dropout(self.final_layer_norm(x), self.dropout, self.training)


@dataclass
class DecoderCache:
    """Decoding state for one batch: preallocated self-attention K/V (written at explicit positions),
    cross-attention K/V computed once from the encoder output, and the biases."""
    self_k: list[Tensor]  # per decoder layer (B, H, T_max, d_kv)
    self_v: list[Tensor]
    cross_k: list[Tensor]  # per decoder layer (B, H, T_enc, d_kv)
    cross_v: list[Tensor]
    self_bias: Tensor  # (1, H, T_max, T_max): position bias + causal mask; step t reads row t, keys 0..t
    cross_bias: Tensor | None  # (B, 1, 1, T_enc): encoder padding; None when nothing is padded


class T5(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, config.num_layers, is_decoder=False)
        self.decoder = Stack(config, config.num_decoder_layers, is_decoder=True)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B, T_enc) ids and 1/0 mask (None: nothing padded) -> (B, T_enc, d_model)."""
        T = input_ids.shape[1]
        dtype = compute_dtype(self.shared.weight)
        attention_mask = mask_if_padded(attention_mask)
        # Built once, contiguous and in the compute dtype, and shared by every encoder block (SDPA would copy a
        # strided or mis-typed mask in every layer).
        bias = self.encoder.relative_attention.position_bias(T, T)  # (1, H, T, T)
        if attention_mask is not None:
            bias = bias.float() + padding_bias(attention_mask, torch.float32)  # (B, H, T, T)
        return self.encoder(self.shared(input_ids), bias.to(dtype).contiguous())

    def decode(self, decoder_input_ids: Tensor, encoder_out: Tensor, attention_mask: Tensor | None,
               decoder_attention_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced decoder over the whole target (no cache) -> logits (B, T_dec, V)."""
        return self.lm_logits(self.decoder_hidden(decoder_input_ids, encoder_out, attention_mask, decoder_attention_mask))

    def decoder_hidden(self, decoder_input_ids: Tensor, encoder_out: Tensor, attention_mask: Tensor | None,
                       decoder_attention_mask: Tensor | None = None, encoder_rows: Tensor | None = None) -> Tensor:
        """Teacher-forced decoder over the whole target (training / scoring; no cache) -> the final norm's
        output (B, T_dec, d_model), before the LM head. A mask of None means nothing is padded.
        encoder_rows (B,): decoder row i reads encoder row encoder_rows[i] (B_enc rows in encoder_out and
        attention_mask), so one encoder pass serves several targets of the same input (rank scoring)."""
        T = decoder_input_ids.shape[1]
        dtype = compute_dtype(self.shared.weight)
        attention_mask = mask_if_padded(attention_mask)
        decoder_attention_mask = mask_if_padded(decoder_attention_mask)
        bias = (self.decoder.relative_attention.position_bias(T, T).float()
                + causal_bias(T, torch.float32, decoder_input_ids.device))  # (1, H, T, T)
        if decoder_attention_mask is not None:
            bias = bias + padding_bias(decoder_attention_mask, torch.float32)  # (B, H, T, T)
        cross_bias = padding_bias(attention_mask, dtype) if attention_mask is not None else None
        if cross_bias is not None and encoder_rows is not None:
            cross_bias = cross_bias[encoder_rows]  # (B_enc, 1, 1, T_enc) -> (B, 1, 1, T_enc)
        return self.decoder(self.shared(decoder_input_ids), bias.to(dtype).contiguous(), encoder_out, cross_bias,
                            encoder_rows)

    def packed_hidden(self, input_ids: Tensor, encoder_segments: Tensor, decoder_input_ids: Tensor,
                      decoder_segments: Tensor) -> Tensor:
        """Rows packed end to end (train.py's TinyLLM step): bin b holds the prompts of several rows one after
        another in input_ids[b] (B, T_enc) and their decoder inputs in the same order in decoder_input_ids[b]
        (B, T_dec); segment ids of the same shapes name each slot's row within its bin (-1: padding). Each row
        computes as it would alone: encoder attention within its prompt, decoder attention causal within its
        target, cross-attention over its own prompt. The relative position bias needs nothing per row: a row's
        slots are contiguous, so slot j - slot i is its position j - position i, and the bias depends on that
        distance only. -> the decoder's final norm output (B, T_dec, d_model)."""
        T_enc, T_dec = input_ids.shape[1], decoder_input_ids.shape[1]
        dtype = compute_dtype(self.shared.weight)
        bias = (self.encoder.relative_attention.position_bias(T_enc, T_enc).float()
                + segment_bias(encoder_segments, encoder_segments, False, dtype))  # (B, H, T_enc, T_enc)
        encoder_out = self.encoder(self.shared(input_ids), bias.to(dtype).contiguous())
        bias = (self.decoder.relative_attention.position_bias(T_dec, T_dec).float()
                + segment_bias(decoder_segments, decoder_segments, True, dtype))  # (B, H, T_dec, T_dec)
        cross_bias = segment_bias(decoder_segments, encoder_segments, False, dtype).to(dtype)  # (B, 1, T_dec, T_enc)
        return self.decoder(self.shared(decoder_input_ids), bias.to(dtype).contiguous(), encoder_out, cross_bias)

    def head_input(self, h: Tensor) -> Tensor:
        """What the LM head multiplies: the decoder output, rescaled for T5 v1.0's tied head."""
        return h * self.config.d_model ** -0.5 if self.config.scale_decoder_outputs else h

    @property
    def output_embedding(self) -> Tensor:
        """The LM head's weight (vocab, d_model): the input embedding when tied (T5 v1.0)."""
        return self.shared.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def lm_logits(self, h: Tensor) -> Tensor:
        return F.linear(self.head_input(h), self.output_embedding)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor,
                decoder_attention_mask: Tensor | None = None) -> Tensor:
        """Logits (B, T_dec, vocab_size) for `decoder_input_ids` (usually `shift_right(labels)`)."""
        attention_mask = mask_if_padded(attention_mask)  # checked once for both stacks
        encoder_out = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, encoder_out, attention_mask, decoder_attention_mask)

    # -----------------------------------------------------------------------------------------------
    # Loading and saving (Hugging Face layout: config.json + model.safetensors or a sharded index)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> T5:
        """Load a local transformers T5ForConditionalGeneration folder. Strict: every parameter present with
        its shape; the only extra keys allowed are transformers' tied aliases of `shared.weight`."""
        from safetensors import safe_open

        folder = Path(path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: no config.json (expected a transformers T5 folder)")
        config = T5Config.from_hf_config(json.loads(config_file.read_text()))
        key_files = _safetensors_key_files(folder)
        handles = {f: safe_open(f, framework="pt", device=str(device)) for f in set(key_files.values())}

        def read(key: str) -> Tensor:
            return handles[key_files[key]].get_tensor(key)

        def shape(key: str) -> tuple[int, ...]:
            return tuple(handles[key_files[key]].get_slice(key).get_shape())

        if config.tie_word_embeddings and "lm_head.weight" in key_files and "shared.weight" in key_files:
            # transformers >= 5 writes tie_word_embeddings=true for every T5 and keeps the head untied when the
            # checkpoint carries a distinct `lm_head.weight`; do the same rather than drop a trained head.
            if shape("lm_head.weight") != shape("shared.weight") or not torch.equal(read("lm_head.weight"),
                                                                                   read("shared.weight")):
                config = replace(config, tie_word_embeddings=False)

        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        aliases = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
        if config.tie_word_embeddings:
            aliases.add("lm_head.weight")
        _check_keys(folder, expected, {k: shape(k) for k in key_files}, aliases)
        for alias in aliases & key_files.keys():
            if not torch.equal(read(alias), read("shared.weight")):
                raise ValueError(f"{folder}: {alias} differs from shared.weight; untied input embeddings are "
                                 "not supported")
        state = {k: read(k).to(dtype) for k in expected}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json + model.safetensors that transformers' T5ForConditionalGeneration loads."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        config = {**self.config.to_hf_config(), "dtype": str(self.shared.weight.dtype).removeprefix("torch.")}
        _atomic_write(folder / "config.json", lambda f: f.write_text(json.dumps(config, indent=2) + "\n"))
        _atomic_write(folder / "model.safetensors", lambda f: save_file(state, str(f), metadata={"format": "pt"}))

    # -----------------------------------------------------------------------------------------------
    # Generation: encoder once, cross-attention K/V once, one decoder token per step over a static cache.

    def start_decoding(self, encoder_out: Tensor, attention_mask: Tensor | None, max_length: int) -> DecoderCache:
        """Allocate the self-attention cache for `max_length` decoder positions and project the encoder output
        into every decoder layer's cross-attention K/V."""
        B = encoder_out.shape[0]
        dtype = compute_dtype(self.shared.weight)
        device = encoder_out.device
        c = self.config
        self_k = [torch.zeros(B, c.num_heads, max_length, c.d_kv, dtype=dtype, device=device)
                  for _ in range(c.num_decoder_layers)]
        self_v = [torch.zeros_like(k) for k in self_k]
        cross = [block.layer[1].EncDecAttention for block in self.decoder.block]
        cross_k = [a.heads(a.k(encoder_out)).to(dtype) for a in cross]
        cross_v = [a.heads(a.v(encoder_out)).to(dtype) for a in cross]
        # Position t's bias row depends only on t, so all rows are computed once here, not at every step.
        self_bias = (self.decoder.relative_attention.position_bias(max_length, max_length).float()
                     + causal_bias(max_length, torch.float32, device)).to(dtype)
        attention_mask = mask_if_padded(attention_mask)
        cross_bias = padding_bias(attention_mask, dtype) if attention_mask is not None else None
        return DecoderCache(self_k, self_v, cross_k, cross_v, self_bias, cross_bias)

    def decode_step(self, token: Tensor, position: int, cache: DecoderCache) -> Tensor:
        """token (B,1) at decoder `position` -> logits (B, vocab_size); fills the cache at `position`."""
        x = self.shared(token)
        self_bias = cache.self_bias[:, :, position:position + 1, :position + 1]  # (1, H, 1, position + 1)
        for i, block in enumerate(self.decoder.block):
            x = block.forward_step(x, position, self_bias, cache, i)
        return self.lm_logits(self.decoder.final_layer_norm(x))[:, 0]

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 eos_id: int | None = None) -> Tensor:
        """New token ids (B, <= max_new_tokens), greedy (the student's answers; a teacher that samples decodes
        through Slots with tinyllm.sample_token). Each row stops at its EOS (kept in the row) and is padded
        with pad after it; the result is trimmed to the longest row. No dropout whatever the module's mode."""
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
        eos_id = self.config.eos_token_id if eos_id is None else eos_id
        pad_id = self.config.pad_token_id
        B = input_ids.shape[0]
        attention_mask = mask_if_padded(attention_mask)  # checked once for the encoder and the cross-attention
        cache = self.start_decoding(self.encode(input_ids, attention_mask), attention_mask, max_new_tokens)
        token = torch.full((B, 1), self.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=input_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for t in range(max_new_tokens):
            logits = self.decode_step(token, t, cache)
            next_token = torch.where(done, pad_id, logits.argmax(-1))
            out[:, t] = next_token
            done |= next_token == eos_id
            token = next_token[:, None]
            # `done.all()` is the loop's only host sync; doing it every 8 steps keeps the device queue full
            # and costs at most 7 wasted steps once every row has finished.
            if t % 8 == 7 and bool(done.all()):
                break
        is_eos = out == eos_id
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, max_new_tokens)
        return out[:, :int(lengths.max())]


class Slots:
    """Continuous batching (as Orca and vLLM schedule it): `rows` decoder rows, each decoding its own input at
    its own position, so that a row whose output has ended takes the next prompt (admit: its encoder output's
    cross-attention K/V written into the row) while the others go on. tinyllm.continuous_generate schedules."""

    def __init__(self, model: T5, rows: int, max_new_tokens: int, max_source: int, device: torch.device):
        c = model.config
        self.model, self.device = model, device
        self.dtype = dtype = compute_dtype(model.shared.weight)
        zeros = lambda length: [torch.zeros(rows, c.num_heads, length, c.d_kv, dtype=dtype, device=device)  # noqa: E731
                                for _ in range(c.num_decoder_layers)]
        steps = max_new_tokens + 1  # a finished row, until dropped, feeds in place one slot past its last token
        self.cache = DecoderCache(zeros(steps), zeros(steps), zeros(max_source), zeros(max_source),
                                  (model.decoder.relative_attention.position_bias(steps, steps).float()
                                   + causal_bias(steps, torch.float32, device)).to(dtype), None)
        self.source_valid = torch.zeros(rows, max_source, dtype=torch.bool, device=device)
        self.steps = steps
        # the one-token step: tinyllm.compile_slots swaps in a compiled one and reads the self-attention cache in
        # widths of width_multiple slots (a few shapes to compile); eager, each step reads the longest row's prefix
        self.forward, self.width_multiple = self.logits, 1
        self.positions = [0] * rows  # decoder tokens so far per row (host)
        self.live = [False] * rows
        self.pending = torch.zeros(rows, dtype=torch.long, device=device)

    @property
    def rows(self) -> int:
        return len(self.positions)

    @torch.no_grad()
    def admit(self, rows: list[int], prompts: list[list[int]]) -> None:
        """Encode the prompts (one right-padded batch) and write their cross-attention K/V into rows `rows`;
        each row restarts at decoder position 0 with the decoder start token pending."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, :len(p)], mask[j, :len(p)] = torch.tensor(p), 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        encoder_out = self.model.encode(ids, mask_if_padded(mask))
        index = torch.tensor(rows, device=self.device)
        for block, cross_k, cross_v in zip(self.model.decoder.block, self.cache.cross_k, self.cache.cross_v):
            attention = block.layer[1].EncDecAttention
            cross_k[index, :, :width] = attention.heads(attention.k(encoder_out)).to(self.dtype)
            cross_v[index, :, :width] = attention.heads(attention.v(encoder_out)).to(self.dtype)
        self.source_valid[index] = False
        self.source_valid[index, :width] = mask.bool()
        for row in rows:
            self.positions[row], self.live[row] = 0, True
        self.pending[index] = self.model.config.decoder_start_token_id

    @torch.no_grad()
    def step(self) -> Tensor:
        """Each row's pending token at its own decoder position: next-token logits (rows, vocab)."""
        position = torch.tensor(self.positions, device=self.device)
        # slots past a row's position are masked by the causal part of self_bias, so a rounded-up length
        # changes no output
        length = min(-(-(max(self.positions) + 1) // self.width_multiple) * self.width_multiple, self.steps)
        self.cache.cross_bias = padding_bias(self.source_valid, self.dtype)  # (rows, 1, 1, max_source)
        self_bias = self.cache.self_bias[0][:, position, :length].transpose(0, 1)[:, :, None]  # (rows, H, 1, length)
        logits = self.forward(self.pending, position, self_bias)
        self.positions = [n + live for n, live in zip(self.positions, self.live)]
        return logits

    def logits(self, tokens: Tensor, position: Tensor, self_bias: Tensor) -> Tensor:
        """tokens (rows,) at decoder positions (rows,), their K/V written at those slots, reading the slots
        self_bias (rows, H, 1, length) covers -> next-token logits (rows, vocab)."""
        x = self.model.shared(tokens[:, None])
        for i, block in enumerate(self.model.decoder.block):
            x = block.forward_step(x, position, self_bias, self.cache, i)
        return self.model.lm_logits(self.model.decoder.final_layer_norm(x))[:, 0]

    def feed(self, tokens: Tensor) -> None:
        self.pending = tokens

    def retire(self, row: int) -> None:
        self.live[row] = False

    def keep(self, rows: list[int]) -> None:
        """Only `rows` stay (renumbered): once no prompt waits, finished rows cost compute."""
        index = torch.tensor(rows, device=self.device)
        for buffers in (self.cache.self_k, self.cache.self_v, self.cache.cross_k, self.cache.cross_v):
            buffers[:] = [b[index] for b in buffers]
        self.source_valid = self.source_valid[index]
        self.positions = [self.positions[r] for r in rows]
        self.live = [self.live[r] for r in rows]
        self.pending = self.pending[index]


# ---------------------------------------------------------------------------------------------------
# Checkpoint helpers


def _safetensors_key_files(folder: Path) -> dict[str, str]:
    """Parameter name -> safetensors file, from model.safetensors.index.json (sharded) or model.safetensors."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are absent: {missing}")
        return {k: str(folder / f) for k, f in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return {k: str(single) for k in f.keys()}


def _check_keys(folder: Path, expected: dict[str, tuple], found: dict[str, tuple], aliases: set[str]) -> None:
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys() - aliases)
    conflicts = [f"{k}: model {expected[k]} vs checkpoint {found[k]}"
                 for k in expected if k in found and expected[k] != found[k]]
    conflicts += [f"{k}: alias of shared.weight {expected['shared.weight']} vs checkpoint {found[k]}"
                  for k in sorted(aliases & found.keys()) if found[k] != expected["shared.weight"]]
    if missing or unexpected or conflicts:
        raise ValueError(f"{folder}: checkpoint does not match its config.json: missing keys {missing}; "
                         f"unexpected keys {unexpected}; first shape mismatch: {conflicts[0] if conflicts else None}")


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path), fsync, then rename over `path`, so readers never see a half-written file. The model
    files import nothing of the project (each stands alone), so each keeps this small copy of cli.atomic_write,
    taking a writer (safetensors' save_file writes to a path) rather than bytes."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# Training helpers


def shift_right(labels: Tensor, start_id: int = 0, pad_id: int = 0) -> Tensor:
    """Decoder inputs for teacher forcing: [start, y_0, ..., y_{T-2}], with -100 (ignored labels) -> pad."""
    shifted = torch.full_like(labels, start_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_id)


# ---------------------------------------------------------------------------------------------------
# Tokenizer: sentencepiece plus T5's 100 sentinels, matching transformers' T5Tokenizer ids.


class Tokenizer:
    """T5 tokenizer over `spiece.model`. Like transformers' T5Tokenizer (legacy=True behaviour, i.e. the
    text after a special token gets sentencepiece's leading "▁"): special-token strings in the text
    (`<pad>`, `</s>`, `<unk>`, `<extra_id_N>`) map to their ids, every other span goes through
    sentencepiece, and `</s>` is appended. Sentinel `<extra_id_N>` is id `pieces + 99 - N` (32099..32000)."""

    num_sentinels = 100

    def __init__(self, path: str | Path):
        import sentencepiece

        path = Path(path)
        self.model_file = path / "spiece.model" if path.is_dir() else path
        if not self.model_file.is_file():
            raise FileNotFoundError(f"{self.model_file}: no sentencepiece model")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.model_file))
        self.pad_id, self.eos_id, self.unk_id = self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()
        if (self.pad_id, self.eos_id, self.unk_id) != (0, 1, 2):
            raise ValueError(f"{self.model_file}: pad/eos/unk ids are {self.pad_id}/{self.eos_id}/{self.unk_id}, "
                             "T5 expects 0/1/2")
        self.num_pieces = self.sp.get_piece_size()
        self.vocab_size = self.num_pieces + self.num_sentinels
        self.special_ids = {"<pad>": 0, "</s>": 1, "<unk>": 2}
        self.special_ids.update({f"<extra_id_{n}>": self.num_pieces + self.num_sentinels - 1 - n
                                 for n in range(self.num_sentinels)})
        self.special_tokens = {i: s for s, i in self.special_ids.items()}
        # Longest first so that "<extra_id_10>" is not read as "<extra_id_1>" + "0>".
        alternatives = sorted(self.special_ids, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        return cls(folder)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, span in enumerate(self._special_pattern.split(text)):
            if i % 2:
                ids.append(self.special_ids[span])
            elif span:
                ids.extend(self.sp.encode(span))
        ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int] | Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped (or written out when skip_special_tokens=False). Ids
        outside the vocabulary (the model's padding rows 32100..32127) are dropped, as in transformers."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        pieces = []
        for i in ids:
            if i in self.special_tokens:
                if not skip_special_tokens:
                    pieces.append(self.special_tokens[i])
            elif 0 <= i < self.num_pieces:
                pieces.append(self.sp.id_to_piece(i).replace("▁", " "))
        text = "".join(pieces)
        # sentencepiece's dummy prefix: the leading "▁" of the first token is not part of the text.
        return text[1:] if pieces and pieces[0].startswith(" ") else text

    def save_pretrained(self, folder: str | Path) -> None:
        """spiece.model + tokenizer_config.json + special_tokens_map.json (what transformers' T5Tokenizer
        reads when protobuf is installed) + tokenizer.json (read by transformers without protobuf)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model_bytes = self.model_file.read_bytes()
        sentinels = [f"<extra_id_{n}>" for n in range(self.num_sentinels)]
        special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                   "additional_special_tokens": sentinels}
        config = {"tokenizer_class": "T5Tokenizer", "extra_ids": self.num_sentinels, "legacy": True,
                  "model_max_length": 512, **special}
        _atomic_write(folder / "spiece.model", lambda f: f.write_bytes(model_bytes))
        _atomic_write(folder / "special_tokens_map.json", lambda f: f.write_text(json.dumps(special, indent=2)))
        _atomic_write(folder / "tokenizer_config.json", lambda f: f.write_text(json.dumps(config, indent=2)))
        tokenizer_json = json.dumps(self._tokenizer_json(model_bytes), ensure_ascii=False)
        _atomic_write(folder / "tokenizer.json", lambda f: f.write_text(tokenizer_json, encoding="utf-8"))

    def _tokenizer_json(self, model_bytes: bytes) -> dict:
        """The `tokenizers` serialisation transformers builds from spiece.model for T5 (Unigram + the model's
        precompiled normalizer + whitespace/metaspace pre-tokenizer + "$A </s>" template)."""
        vocab = [[self.sp.id_to_piece(i), self.sp.get_score(i)] for i in range(self.num_pieces)]
        vocab += [[self.special_tokens[i], 0.0] for i in range(self.num_pieces, self.vocab_size)]
        added = [{"id": i, "content": self.special_tokens[i], "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True} for i in sorted(self.special_tokens)]
        charsmap = _sentencepiece_charsmap(model_bytes)
        metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": ({"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap).decode()}
                           if charsmap else None),
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace]},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                "special_tokens": {"</s>": {"id": "</s>", "ids": [self.eos_id], "tokens": ["</s>"]}}},
            "decoder": metaspace,
            "model": {"type": "Unigram", "unk_id": self.unk_id, "vocab": vocab, "byte_fallback": False},
        }


def _sentencepiece_charsmap(model_bytes: bytes) -> bytes | None:
    """`normalizer_spec.precompiled_charsmap` (ModelProto field 3, NormalizerSpec field 2) read straight from
    the protobuf wire format, so neither protobuf nor transformers is needed."""
    def varint(buf: bytes, i: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            byte = buf[i]
            value |= (byte & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if byte < 0x80:
                return value, i

    def length_delimited(buf: bytes, wanted: int) -> bytes | None:
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            field, wire = key >> 3, key & 7
            if wire == 0:
                _, i = varint(buf, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                n, i = varint(buf, i)
                if field == wanted:
                    return buf[i:i + n]
                i += n
            else:
                raise ValueError(f"spiece.model: unsupported protobuf wire type {wire}")
        return None

    normalizer = length_delimited(model_bytes, 3)
    return length_delimited(normalizer, 2) if normalizer is not None else None
