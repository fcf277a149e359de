"""LLaMA-family decoder in plain PyTorch: LLaMA-1/2, Llama-3.x, TinyLlama, SmolLM2, Qwen2/2.5.

TinyLLM (Tian et al., arXiv 2402.04616) distils rationales from several teachers (§3.2); its second
teacher is LLaMA-2-chat. This one file serves that teacher, today's Llama-3.x / Qwen2.5 / SmolLM2 chat
teachers, and small decoder-only students.

References: Hugging Face `modeling_llama.py` / `modeling_qwen2.py` (parameter names, so checkpoints load
by identity; rotate_half RoPE; RMSNorm in fp32), meta-llama/llama `generation.py` (batched decoding that
stops per row at EOS), pytorch-labs/gpt-fast (preallocated KV cache written at explicit slots, prefill
and one-token decode as separate functions, meta-device build + `load_state_dict(assign=True)`).

Top to bottom in data-flow order: config -> RMSNorm -> RoPE -> attention -> MLP -> block -> model ->
loading/saving -> generation -> tokenizer -> chat templates.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import sentencepiece
import torch
import torch.nn as nn
import torch.nn.functional as F
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------------
# Config

MODEL_TYPES = ("llama", "qwen2")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads (multi-head, LLaMA-1/2 7B)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or Llama-3.1's {"rope_type": "llama3", *LLAMA3_ROPE_KEYS}
    attention_bias: bool = False  # LLaMA's flag: bias on q, k, v and o projections
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"  # "qwen2": q, k, v always have a bias, o never
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; llama.py knows {MODEL_TYPES}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                                 f"num_attention_heads={self.num_attention_heads}; give head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        if self.model_type == "qwen2" and (self.attention_bias or self.mlp_bias):
            raise ValueError("attention_bias/mlp_bias: Qwen2 has a fixed bias layout (q, k, v only)")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type != "llama3":
                raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported (only 'llama3')")
            for key in LLAMA3_ROPE_KEYS:
                if key not in self.rope_scaling:
                    raise ValueError(f"rope_scaling.{key} is missing for rope_type 'llama3'")

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @classmethod
    def from_hf_config(cls, d: dict) -> LlamaConfig:
        """From a Hugging Face config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
        `rope_parameters`). Anything this model would silently compute differently raises ValueError."""
        model_type = d.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is not supported; llama.py knows {MODEL_TYPES}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported (SwiGLU needs 'silu')")
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True: sliding-window attention is not supported")
        if any(kind != "full_attention" for kind in d.get("layer_types") or []):
            raise ValueError(f"layer_types={d['layer_types']}: only 'full_attention' layers are supported")
        if d.get("attention_dropout", 0.0):
            raise ValueError(f"attention_dropout={d['attention_dropout']}: dropout is not supported")

        rope_theta = d.get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling")
        parameters = d.get("rope_parameters")  # transformers >= 5 folds theta and scaling into one dict
        if parameters:
            rope_theta = parameters.get("rope_theta", rope_theta)
            scaling = parameters
        if (parameters or {}).get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor: only full-width RoPE is supported")
        if scaling is not None:
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))  # "type" in older configs
            if rope_type == "default":
                scaling = None
            elif rope_type != "llama3":
                raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported (only 'llama3')")
            else:
                scaling = {"rope_type": "llama3", **{k: scaling[k] for k in LLAMA3_ROPE_KEYS if k in scaling}}

        known = {f.name for f in fields(cls)} - {"rope_theta", "rope_scaling", "model_type"}
        kwargs = {k: d[k] for k in known if d.get(k) is not None}
        for k in ("bos_token_id", "pad_token_id"):  # None is a real value here ("the model has none")
            kwargs[k] = d.get(k, 1 if k == "bos_token_id" else None)
        if "eos_token_id" not in kwargs:
            kwargs["eos_token_id"] = []
        return cls(model_type=model_type, rope_theta=float(rope_theta), rope_scaling=scaling, **kwargs)

    def to_hf_config(self) -> dict:
        """config.json for transformers' LlamaForCausalLM / Qwen2ForCausalLM."""
        d = asdict(self)
        d["architectures"] = ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"]
        d["hidden_act"] = "silu"
        eos = self.eos_token_id
        d["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        if self.model_type == "qwen2":
            del d["attention_bias"], d["mlp_bias"]  # not Qwen2 options: the q/k/v bias is built in
            d.update(use_sliding_window=False, sliding_window=None)
        return d


# ----------------------------------------------------------------------------------------------------
# RMSNorm and rotary position embedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32 and cast back *before* the weight, as Hugging Face does, so bf16 runs agree
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_inv_freq(config: LlamaConfig) -> Tensor:
    """Inverse frequencies (head_dim/2,) in fp32, with Llama-3.1's long-context rescaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # llama3: wavelengths longer than the pretraining context are stretched by `factor`, short ones kept,
    # and the band in between interpolated smoothly (Meta's apply_scaling, same as transformers)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin (B, T, head_dim) in fp32 for per-row positions (B, T): left-padded rows start at 0."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # rotate_half layout: dims i and i + head_dim/2 pair up
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, heads, T, head_dim); the rotation runs in fp32 so long positions stay exact in bf16."""
    x32 = x.float()
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, head_dim): broadcast over heads
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Attention (grouped-query), MLP, block


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Grouped-query attention: query head h reads key/value head h // (H // KV), as transformers'
    repeat_kv. q (B, H, T, D); k, v (B, KV, S, D); mask (B, 1, T, S) bool, True = may attend, or None:
    causal when T == S (an unpadded prompt), every key when T == 1 (one new token of an unpadded batch)."""
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    assert mask is not None or T in (1, S), f"no mask needs T == S or T == 1, got T={T}, S={S}"
    if mask is None and T > 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != KV)
    # fold the H/KV query heads that share a key/value head into the query axis instead of repeating
    # k and v: no copy of the (large) KV cache, and any SDPA backend accepts it
    group = H // KV
    q = q.reshape(B, KV, group * T, D)  # (B, KV, group*T, D); a view when T == 1
    if mask is not None and T > 1:  # one query (T == 1) broadcasts its (B, 1, 1, S) mask over the group
        mask = mask[:, :, None].expand(B, 1, group, T, S).reshape(B, 1, group * T, S)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.view(B, H, T, D)


class KVCache(nn.Module):
    """Preallocated cache (B, n_kv_heads, S_max, head_dim) written at explicit slots (gpt-fast): nothing
    is reallocated while decoding. Attention reads only the written prefix, so a step costs the current
    length, not S_max (eager decoding; a compiled/CUDA-graph step would want fixed shapes instead)."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        # empty, not zeros: no slot is read before it is written, and on CPU untouched pages cost no memory
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)

    def gather(self, rows: Tensor, max_len: int) -> KVCache:
        """A new cache of len(rows) rows and `max_len` slots whose first slots hold a copy of rows `rows`
        of this one: continuations of a shared prompt, one cache row each (rank scoring)."""
        B, KV, S, D = self.k.shape
        out = KVCache(len(rows), KV, max_len, D, self.k.dtype, self.k.device)
        out.k[:, :, :S], out.v[:, :, :S] = self.k[rows], self.v[rows]
        return out

    def update(self, start: int | Tensor, k: Tensor, v: Tensor, end: int | None = None) -> tuple[Tensor, Tensor]:
        """Write k, v (B, KV, T, D) at slots start..start+T-1; return the written prefix (B, KV, start+T, D).
        start (B,), one token per row: row b writes at its own slot start[b] (continuous batching, where every
        row holds a sequence of its own length), and the first `end` slots are returned."""
        if isinstance(start, Tensor):
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[rows, :, start], self.v[rows, :, start] = k[:, :, 0], v[:, :, 0]  # (B, KV, D) each
            return self.k[:, :, :end], self.v[:, :, :end]
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads,
                                                        config.num_key_value_heads, config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None, cache_start: int | Tensor = 0) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # per-row slots (a tensor cache_start) read as many slots as the mask covers
            end = mask.shape[-1] if isinstance(cache_start, Tensor) else None
            k, v = cache.update(cache_start, k, v, end)  # (B, KV, cache_start + T, D)
        y = attend(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(gate) * up)
        # no autograd (generation): in place, so a prompt's (B, T, intermediate) activations take two
        # buffers instead of four; lower peak memory and ~10% faster on CPU
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None, cache_start: int | Tensor = 0) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------------
# Model


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids (B, T) counting only real tokens, so a left-padded row starts at 0 like an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def padding_causal_mask(attention_mask: Tensor) -> Tensor:
    """(B, 1, T, T) bool: causal and not padding. A padding query still sees itself, so no row of the
    softmax is empty (SDPA would give NaN, and NaN values leak through zero attention weights)."""
    T = attention_mask.shape[1]
    slots = torch.arange(T, device=attention_mask.device)
    causal = slots[None, :] <= slots[:, None]  # (T, T)
    return (causal & attention_mask.bool()[:, None, None, :]) | (slots[None, :] == slots[:, None])


def segment_causal_mask(segment_ids: Tensor, branch_ids: Tensor | None = None) -> Tensor:
    """(B, 1, T, T) bool for sequences packed end to end: slot i sees slot j <= i of the same segment
    (segment_ids (B, T), the packed row each slot holds; -1 is padding, which sees itself only, so no
    softmax row is empty). Positions restart per segment, so each row computes as if it ran alone.

    branch_ids (B, T) make each segment a tree (train.py's TinyLLM step: one example's tasks over one shared
    prompt): 0 marks the shared prefix, k > 0 the k-th branch after it. A slot of branch k sees the shared
    prefix and the earlier slots of branch k only, so with positions that continue from the prefix, every
    branch computes exactly as the row prefix + branch would alone."""
    T = segment_ids.shape[1]
    slots = torch.arange(T, device=segment_ids.device)
    causal = slots[None, :] <= slots[:, None]  # (T, T)
    see = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    if branch_ids is not None:
        see = see & ((branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :]))
    return ((see & causal & (segment_ids >= 0)[:, :, None]) | (slots[None, :] == slots[:, None]))[:, None]


class Llama(nn.Module):
    # train.py --checkpointing=1: keep each block's input only and recompute the block in backward
    checkpointing = False

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(  # Hugging Face names, so checkpoints load by identity
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:  # Llama-3.2 1B/3B, SmolLM2, small Qwen2.5: no separate lm_head
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor, mask: Tensor | None,
                      caches: list[KVCache] | None = None, cache_start: int | Tensor = 0) -> Tensor:
        """(B, T) ids -> (B, T, hidden) after the final norm. With caches, k/v go to slots
        cache_start.. and attention reads every slot written so far."""
        cos, sin = rope_cos_sin(self.inv_freq, position_ids)
        x = self.model.embed_tokens(input_ids)
        recompute = self.checkpointing and caches is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            if recompute:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, caches[i] if caches is not None else None, cache_start)
        return self.model.norm(x)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab) for a (left- or right-) padded batch. Never touches a KV cache."""
        B, T = input_ids.shape
        mask = None
        if attention_mask is not None:
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask)
            if not bool(attention_mask.all()):  # unpadded batches keep SDPA's fast causal kernels
                mask = padding_causal_mask(attention_mask)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        return self.lm_head(self.hidden_states(input_ids, position_ids, mask))

    # ------------------------------------------------------------------------------------------------
    # Loading and saving (Hugging Face safetensors layout)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> Llama:
        """Load a local Hugging Face folder: config.json + model.safetensors, or shards listed in
        model.safetensors.index.json. Every key and shape must match the config; the only exception is
        lm_head.weight when the embeddings are tied (absent, or an identical copy)."""
        folder = Path(path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
        config = LlamaConfig.from_hf_config(json.loads(config_file.read_text()))
        with torch.device("meta"):
            model = cls(config)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        files = _weight_files(folder)  # tensor name -> safetensors file

        alias = {"lm_head.weight"} if config.tie_word_embeddings else set()
        missing = sorted(set(expected) - set(files) - alias)
        unexpected = sorted(set(files) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{folder}: checkpoint does not match config.json\n"
                             f"  missing keys ({len(missing)}): {_short_list(missing)}\n"
                             f"  unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
        state = {}
        for file in sorted(set(files.values())):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise ValueError(f"{file}: {name} has shape {shape} but config.json implies "
                                         f"{expected[name]}")
                    state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        embedding = state["model.embed_tokens.weight"]
        if config.tie_word_embeddings:
            if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], embedding):
                raise ValueError(f"{folder}: config.json ties the embeddings (tie_word_embeddings) "
                                 "but lm_head.weight differs from model.embed_tokens.weight")
            state["lm_head.weight"] = embedding
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight  # one Parameter again after assign
        model.inv_freq = rope_inv_freq(config).to(device)  # not in the checkpoint: still on meta
        return model.eval()

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        """config.json + model.safetensors (or shards + index when larger than max_shard_bytes),
        loadable by transformers' LlamaForCausalLM / Qwen2ForCausalLM. Files are written atomically."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()
                 if not (self.config.tie_word_embeddings and name == "lm_head.weight")}
        shards: list[dict[str, Tensor]] = [{}]
        size = 0
        for name, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += nbytes
        if len(shards) == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            _atomic_write(folder / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
        index = folder / "model.safetensors.index.json"
        if len(shards) > 1:
            weight_map = {tensor: file for file, shard in zip(names, shards) for tensor in shard}
            total = sum(t.numel() * t.element_size() for t in state.values())
            _atomic_write_text(index, json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": weight_map}, indent=2))
        # weights of an earlier save in the other layout would shadow or confuse loaders
        for stale in [*folder.glob("model-*-of-*.safetensors"), folder / "model.safetensors", index]:
            if stale.exists() and stale.name not in names and not (stale == index and len(shards) > 1):
                stale.unlink()
        hf = self.config.to_hf_config()
        hf["torch_dtype"] = hf["dtype"] = str(self.lm_head.weight.dtype).removeprefix("torch.")
        _atomic_write_text(folder / "config.json", json.dumps(hf, indent=2))

    def kv_dtype(self, device: torch.device) -> torch.dtype:
        """k/v arrive in the autocast dtype when autocast is on (bf16 on CUDA), else in the weights' dtype."""
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.lm_head.weight.dtype

    # ------------------------------------------------------------------------------------------------
    # Scoring continuations of a shared prompt: the prompt runs once, its options read its KV cache

    @torch.no_grad()
    def continuation_hidden(self, prompt_ids: Tensor, prompt_mask: Tensor, continuation_ids: Tensor,
                            owner: Tensor) -> Tensor:
        """Hidden states (R, L, hidden) that predict each continuation token: out[r, j] predicts
        continuation_ids[r, j] after prompt owner[r]. prompt_ids (B, T) LEFT-padded with prompt_mask;
        continuation_ids (R, L) right-padded (what follows a row's end is never read by its real tokens).
        Equal to running every prompt + continuation as one sequence, at one prompt pass per prompt."""
        B, T = prompt_ids.shape
        R, L = continuation_ids.shape
        cfg, device = self.config, prompt_ids.device
        kv_dtype = self.kv_dtype(device)
        caches = [KVCache(B, cfg.num_key_value_heads, T, cfg.head_dim, kv_dtype, device)
                  for _ in range(cfg.num_hidden_layers)]
        key_valid = prompt_mask.bool()
        padded = not bool(key_valid.all())
        mask = padding_causal_mask(prompt_mask) if padded else None
        last = self.hidden_states(prompt_ids, positions_from_mask(prompt_mask), mask, caches)[:, -1]  # (B, hidden)
        first = last[owner][:, None]  # (R, 1, hidden): predicts every continuation's first token
        if L == 1:
            return first
        # tokens 0..L-2 of each continuation, after its own prompt's cache rows (copied per continuation)
        row_caches = [cache.gather(owner, T + L - 1) for cache in caches]
        slots = torch.arange(L - 1, device=device)
        causal = slots[None, :] <= slots[:, None]  # (L-1, L-1)
        mask = torch.cat([key_valid[owner][:, None, :].expand(R, L - 1, T),
                          causal[None].expand(R, L - 1, L - 1)], dim=-1)[:, None]  # (R, 1, L-1, T+L-1)
        positions = key_valid.sum(-1)[owner][:, None] + slots  # (R, L-1): right after each prompt
        rest = self.hidden_states(continuation_ids[:, :-1], positions, mask, row_caches, cache_start=T)
        return torch.cat([first, rest], dim=1)

    # ------------------------------------------------------------------------------------------------
    # Generation: prefill the prompt, then one token at a time through a preallocated KV cache

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, key_valid: Tensor | None, caches: list[KVCache]) -> Tensor:
        """Run the (left-padded) prompt (B, T) through the model, filling cache slots 0..T-1.
        key_valid (B, >= T): which cache slots hold real tokens; None: no padding.
        Returns next-token logits (B, vocab)."""
        B, T = input_ids.shape
        if key_valid is None:
            mask, positions = None, torch.arange(T, device=input_ids.device).expand(B, T)
        else:  # causal over the T prompt slots only: nothing after them is written yet
            mask, positions = padding_causal_mask(key_valid[:, :T]), positions_from_mask(key_valid[:, :T])
        hidden = self.hidden_states(input_ids, positions, mask, caches)
        # left padding: the last column is every row's last token; the head runs on it alone, as a
        # (B, T, vocab) logits tensor would be the largest allocation of the whole call
        return self.lm_head(hidden[:, -1])

    @torch.no_grad()
    def decode_step(self, token: Tensor, position: Tensor, slot: int, key_valid: Tensor | None,
                    caches: list[KVCache]) -> Tensor:
        """One new token per row: token (B,), its RoPE position (B,), its cache slot, shared by all rows.
        key_valid (B, S_max) as in prefill (slots from the prompt's end on are all True), or None.
        Attention reads cache slots 0..slot only. Returns next-token logits (B, vocab)."""
        mask = key_valid[:, None, None, :slot + 1] if key_valid is not None else None  # (B, 1, 1, slot+1)
        hidden = self.hidden_states(token[:, None], position[:, None], mask, caches, slot)
        return self.lm_head(hidden[:, 0])

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 128,
                 eos_ids: list[int] | tuple[int, ...] | None = None, pad_id: int | None = None) -> Tensor:
        """New tokens (B, <= max_new_tokens) for a left-padded batch, greedy (the student's answers; a teacher
        that samples decodes through Slots with tinyllm.sample_token). Each row stops at its first token in
        eos_ids (default: the config's; the EOS itself is kept) and is padded with pad_id after it (default:
        config pad, else the first EOS). The batch stops early once every row is done."""
        B, T = input_ids.shape
        device = input_ids.device
        eos_ids = self.config.eos_token_id if eos_ids is None else list(eos_ids)
        if pad_id is None:
            pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else (eos_ids or [0])[0]
        if max_new_tokens <= 0:
            return input_ids.new_empty(B, 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if T and not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs a LEFT-padded batch: attention_mask[:, -1] must be all ones")
        S = T + max_new_tokens
        cfg = self.config
        kv_dtype = self.kv_dtype(device)
        caches = [KVCache(B, cfg.num_key_value_heads, S, cfg.head_dim, kv_dtype, device)
                  for _ in range(cfg.num_hidden_layers)]
        key_valid = None  # an unpadded batch needs no mask: SDPA's causal kernel for the prompt
        if not bool(attention_mask.all()):
            key_valid = torch.ones(B, S, dtype=torch.bool, device=device)
            key_valid[:, :T] = attention_mask.bool()
        next_position = attention_mask.long().sum(-1)  # (B,) real tokens so far
        eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)

        logits = self.prefill(input_ids, key_valid, caches)
        for step in range(max_new_tokens):
            token = torch.where(done, pad_id, logits.argmax(-1))
            out[:, step] = token
            done |= torch.isin(token, eos)
            # checking `done` costs a host sync, so only every 16 tokens; the few extra steps are trimmed
            if step == max_new_tokens - 1 or (step % 16 == 15 and bool(done.all())):
                break
            logits = self.decode_step(token, next_position + step, T + step, key_valid, caches)

        is_eos = torch.isin(out, eos)  # a pad equal to an EOS id comes after the first EOS: harmless
        lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, max_new_tokens)
        return out[:, :int(lengths.max())]


class Compiled:
    """torch.compile(fn) (--compile=1), with what it cost: `graphs` compiled and `seconds` spent in the calls
    that compiled (their run included; a backward graph compiles in its first backward, outside them), so a
    run can print them apart from its steady rate. Shapes are the caller's to keep few (bucketed widths);
    dynamo's automatic dynamic shapes take over a dimension after its first change (the batch's rows). A
    compiler that fails (the CPU backend needs a C++ compiler) ends the run with a one-line reason."""

    def __init__(self, fn, mode: str | None = None):
        self.fn = torch.compile(fn, mode=mode)
        self.graphs, self.seconds = 0, 0.0

    def __call__(self, *args):
        from torch._dynamo.utils import counters

        before, start = counters["stats"]["unique_graphs"], time.perf_counter()
        try:
            out = self.fn(*args)
        except Exception as error:
            if type(error).__name__ not in ("BackendCompilerFailed", "InductorError", "CppCompileError"):
                raise
            reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise RuntimeError(f"torch.compile failed here ({reason[:200]}): run without --compile") from None
        if counters["stats"]["unique_graphs"] > before:
            self.graphs += counters["stats"]["unique_graphs"] - before
            self.seconds += time.perf_counter() - start
        return out

    def summary(self) -> str:
        return f"{self.graphs} graph(s) compiled in {self.seconds:.1f} s"


class Slots:
    """Continuous batching (as Orca and vLLM schedule it): `rows` cache rows, each holding one sequence at its
    own length, so that a row whose sequence has ended takes the next prompt (admit) while the others go on.
    Every row feeds its pending token (its prompt's last token, then each token sampled for it) at its own
    position in one shared step. tinyllm.continuous_generate is the scheduler."""

    def __init__(self, model: Llama, rows: int, max_len: int, device: torch.device):
        cfg = model.config
        self.model, self.device, self.max_len = model, device, max_len
        # the one-token step: tinyllm.compile_slots swaps in a compiled one and reads the cache in widths of
        # width_multiple slots (a few shapes to compile); eager, each step reads exactly the longest row's prefix
        self.forward, self.width_multiple = self.logits, 1
        self.dtype = model.kv_dtype(device)
        self.caches = [KVCache(rows, cfg.num_key_value_heads, max_len, cfg.head_dim, self.dtype, device)
                       for _ in range(cfg.num_hidden_layers)]
        for cache in self.caches:  # a short row's masked slots are read too: NaN garbage would leak through 0 weights
            cache.k.zero_(), cache.v.zero_()
        self.lengths = [0] * rows  # tokens in each row's cache (host: the scheduler reads it anyway)
        self.live = [False] * rows  # a retired row feeds garbage in place, never read, until it is dropped
        self.pending = torch.zeros(rows, dtype=torch.long, device=device)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @torch.no_grad()
    def admit(self, rows: list[int], prompts: list[list[int]]) -> None:
        """Prompts into cache rows `rows`: all but each prompt's last token in one left-padded prefill into a
        scratch cache, each prompt's real slots then copied to slots 0.. of its row; the last token is pending."""
        assert all(prompts), "every prompt needs at least one token"
        heads = [p[:-1] for p in prompts]
        width = max(len(h) for h in heads)
        if width:
            ids = torch.zeros(len(heads), width, dtype=torch.long)
            mask = torch.zeros(len(heads), width, dtype=torch.long)
            for j, h in enumerate(heads):
                if h:
                    ids[j, width - len(h):], mask[j, width - len(h):] = torch.tensor(h), 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            cfg = self.model.config
            scratch = [KVCache(len(heads), cfg.num_key_value_heads, width, cfg.head_dim, self.dtype, self.device)
                       for _ in range(cfg.num_hidden_layers)]
            padded = not bool(mask.all())
            self.model.hidden_states(ids, positions_from_mask(mask), padding_causal_mask(mask) if padded else None,
                                     scratch)  # the head is not needed: the last prompt token comes in step()
            for j, (row, h) in enumerate(zip(rows, heads)):
                for cache, part in zip(self.caches, scratch):
                    cache.k[row, :, :len(h)] = part.k[j, :, width - len(h):]
                    cache.v[row, :, :len(h)] = part.v[j, :, width - len(h):]
        for row, h in zip(rows, heads):
            self.lengths[row], self.live[row] = len(h), True
        self.pending[torch.tensor(rows, device=self.device)] = torch.tensor([p[-1] for p in prompts], device=self.device)

    @torch.no_grad()
    def step(self) -> Tensor:
        """Each row's pending token at position = its length, written at that slot; attention reads slots
        0..length of its own row. Next-token logits (rows, vocab)."""
        position = torch.tensor(self.lengths, device=self.device)  # (rows,)
        # masked slots past each row's length read as nothing, so a rounded-up width changes no output
        width = min(-(-(max(self.lengths) + 1) // self.width_multiple) * self.width_multiple, self.max_len)
        slots = torch.arange(width, device=self.device)
        mask = (slots[None, :] <= position[:, None])[:, None, None, :]  # (rows, 1, 1, width)
        logits = self.forward(self.pending, position, mask)
        self.lengths = [n + live for n, live in zip(self.lengths, self.live)]
        return logits

    def logits(self, tokens: Tensor, position: Tensor, mask: Tensor) -> Tensor:
        """tokens (rows,) at positions (rows,), written at those slots, reading the slots `mask` shows ->
        next-token logits (rows, vocab)."""
        hidden = self.model.hidden_states(tokens[:, None], position[:, None], mask, self.caches, position)
        return self.model.lm_head(hidden[:, 0])

    def feed(self, tokens: Tensor) -> None:
        """The tokens (rows,) each row feeds at the next step."""
        self.pending = tokens

    def retire(self, row: int) -> None:
        self.live[row] = False

    def keep(self, rows: list[int]) -> None:
        """Only `rows` stay (renumbered 0..len(rows)-1): once no prompt waits, finished rows cost compute."""
        index = torch.tensor(rows, device=self.device)
        for cache in self.caches:
            cache.k, cache.v = cache.k[index], cache.v[index]
        self.lengths = [self.lengths[r] for r in rows]
        self.live = [self.live[r] for r in rows]
        self.pending = self.pending[index]


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from model.safetensors.index.json or model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        absent = sorted({file for file in weight_map.values() if not (folder / file).is_file()})
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are missing: {absent}")
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                            "(only safetensors checkpoints are supported)")


def _short_list(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) to a temp file beside `path`, fsync, then os.replace: no torn file on a crash. The model
    files stand alone, so each keeps its own copy of cli.atomic_write (why: t5._atomic_write)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------
# Tokenizer: sentencepiece tokenizer.model (LLaMA-1/2, TinyLlama) or tokenizer.json (Llama-3, Qwen2, SmolLM2)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(token: str | dict | None) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    """Text <-> ids as transformers does for the same folder.

    tokenizer.model (sentencepiece): BOS added, no EOS; special-token strings in the text ("<s>", "</s>",
    "<unk>", added tokens) become their ids and every text span between them is encoded by sentencepiece
    on its own, with its dummy-prefix space. That is transformers' sentencepiece LlamaTokenizer with its
    default legacy=True (and the behaviour of Meta's Llama-2 `tokenizer.json`), so the Llama-2-chat
    prompt "<s>[INST] ..." gives [1, 518, 25580, ...] exactly as Meta's reference code does.
    tokenizer.json: the Hugging Face `tokenizers` package (optional, imported only here) runs it as is,
    including its post-processor for BOS and its added special tokens."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        config = _read_json(self.folder / "tokenizer_config.json")
        generation = _read_json(self.folder / "generation_config.json")
        if (self.folder / "tokenizer.model").is_file():
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.folder / "tokenizer.model"))
            self._fast = None
            self.vocab_size = self._sp.get_piece_size()
            specials = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)
                        if self._sp.is_control(i) or self._sp.is_unknown(i)}
            for token_id, token in (config.get("added_tokens_decoder") or {}).items():
                specials[_token_text(token)] = int(token_id)
            self._specials = specials
            self._special_ids = set(specials.values())
            self._split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
            self._add_bos = config.get("add_bos_token", True)
            default_bos, default_eos = self._sp.bos_id(), self._sp.eos_id()
            default_pad = self._sp.pad_id()
        elif (self.folder / "tokenizer.json").is_file():
            try:
                import tokenizers
            except ImportError as error:
                raise ImportError(f"{self.folder}/tokenizer.json needs the optional `tokenizers` package: "
                                  "pip install -r requirements-extra.txt (or: pip install tokenizers)") from error
            self._sp = None
            self._fast = tokenizers.Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
            default_bos = default_eos = default_pad = -1
        else:
            raise FileNotFoundError(f"{self.folder}: no tokenizer.model or tokenizer.json")

        def token_id(key: str, default: int) -> int | None:
            text = _token_text(config.get(key))
            found = self.token_to_id(text) if text is not None else None
            return found if found is not None else (default if default >= 0 else None)

        self.bos_id = token_id("bos_token", default_bos)
        eos = generation.get("eos_token_id")  # chat models list several here, e.g. Llama-3's <|eot_id|>
        eos_id = token_id("eos_token", default_eos)
        self.eos_ids: list[int] = ([eos] if isinstance(eos, int) else list(eos)) if eos is not None else (
            [eos_id] if eos_id is not None else [])
        pad = token_id("pad_token", default_pad)
        self.pad_id = pad if pad is not None else (self.eos_ids or [0])[0]
        self.bos_token = self.id_to_token(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self.id_to_token(eos_id) if eos_id is not None else None

        template_file = self.folder / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template: str | None = template

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        return cls(folder)

    def token_to_id(self, token: str) -> int | None:
        if self._fast is not None:
            return self._fast.token_to_id(token)
        if token in self._specials:
            return self._specials[token]
        token_id = self._sp.piece_to_id(token)
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str:
        if self._fast is not None:
            return self._fast.id_to_token(token_id)
        added = {i: t for t, i in self._specials.items()}
        return added[token_id] if token_id in added else self._sp.id_to_piece(token_id)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Ids of `text`; with bos, the model's own prefix (LLaMA-2 <s>, Llama-3 <|begin_of_text|>, or
        nothing for Qwen2/SmolLM2, as their tokenizer adds none)."""
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=bos).ids
        ids = [self.bos_id] if bos and self._add_bos and self.bos_id is not None else []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:  # odd parts are the special-token strings the split captured
                ids.append(self._specials[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        ids = [int(i) for i in ids]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=True)
        return self._sp.decode([i for i in ids if i not in self._special_ids])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text in this model's own chat format (encode it with bos=False: the template
        writes BOS itself where the model wants one)."""
        if self.chat_template is None:
            raise ValueError(f"{self.folder}: no chat template (tokenizer_config.json 'chat_template' "
                             "or chat_template.jinja); this is not a chat model")
        return render_chat(self.chat_template, messages, self.bos_token, self.eos_token, add_generation_prompt)

    def save_pretrained(self, folder: str | Path) -> None:
        """Copy the tokenizer files (and generation_config.json, which holds the EOS ids) to `folder`."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            source = self.folder / name
            if source.is_file() and source.resolve() != (out / name).resolve():
                _atomic_write(out / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
        if not (self.folder / "tokenizer_config.json").is_file() and self._sp is not None:
            config = {"tokenizer_class": "LlamaTokenizer", "bos_token": self.bos_token,
                      "eos_token": self.eos_token, "unk_token": self._sp.id_to_piece(self._sp.unk_id()),
                      "add_bos_token": self._add_bos, "add_eos_token": False, "legacy": True}
            _atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2))


# ----------------------------------------------------------------------------------------------------
# Chat templates, rendered the way transformers' apply_chat_template renders them


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in transformers;
    for rendering it is a no-op, but templates using it must still compile."""
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # transformers replaces jinja's tojson, which would HTML-escape quotes and "<"
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile_chat_template(template: str) -> jinja2.Template:
    # chat templates come from model repos, i.e. untrusted code: sandboxed, as in transformers
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], bos_token: str | None, eos_token: str | None,
                add_generation_prompt: bool = True, **variables) -> str:
    """Render a chat template (jinja2) as transformers' apply_chat_template(..., tokenize=False) does."""
    return _compile_chat_template(template).render(
        messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
        bos_token=bos_token, eos_token=eos_token, **variables)
