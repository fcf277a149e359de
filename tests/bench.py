"""make bench: speed and peak memory of t5.py / llama.py against transformers, side by side in one process.

    python tests/bench.py --device=auto --out=out [--quick=1] [--full=1] [--reps=0] [--threads=0]
                          [--only=SUBSTRING] [--profile=1]

What is measured, every case on the same weights and the same inputs:
  1. Student training step, tokens/s (input + target tokens per second): one AdamW step (forward, token
     cross-entropy, backward, step, zero_grad) of t5.T5 vs transformers' T5ForConditionalGeneration, flan-t5-small
     and flan-t5-base shapes, random weights: the layers alone.
  2. Teacher generation, new tokens/s: greedy decoding of exactly N new tokens (EOS disabled in both, so no row
     stops early) with a KV cache; llama.Llama vs LlamaForCausalLM (SmolLM2-135M shape) and t5.T5 vs
     T5ForConditionalGeneration (flan-t5-base shape). The time is the whole `generate` call (prompt prefill /
     encoder included), so new tokens/s = batch * N / seconds. transformers uses its default (dynamic) cache; on
     CUDA the static cache is measured as well. Whether both produced the same tokens is recorded.
  3. Peak memory of each call above what was allocated before it. CUDA: torch.cuda.max_memory_allocated after
     reset_peak_memory_stats, minus memory_allocated before. CPU: tracemalloc cannot see torch's allocations, so
     the process's resident set is used instead: free memory is handed back to the OS (gc + malloc_trim), the
     kernel's peak-RSS mark is reset (`5` > /proc/self/clear_refs, Linux >= 4.0), and peak = VmHWM - VmRSS before.
     Weights, optimizer state and the other implementation's model are in the baseline, so the number is what the
     call itself adds (activations, gradients, KV cache, logits).

  4. The jobs as users run them, on real OBQA text through the real tokenizers (TINYLLM_ASSETS), in the dtype each
     script uses on the device (train.py: bf16 autocast where native; eval.py: bf16 weights where native; a local
     teacher: bf16 on CUDA, fp32 on the CPU): train.py's TinyLLM step (2 release teachers; flan-t5-small and the
     SmolLM2-135M shape as a decoder-only student) against one transformers forward per task, examples/s; a local
     teacher's rationales for 64 real teacher prompts, each row stopped at its release LLaMA-2 rationale's length,
     continuous batching against transformers generate on static batches (8 and 32 rows), rationales/s; rank
     scoring of 64 test questions against transformers' one row per option, examples/s. Each records whether both
     sides produced the same output (same_output: the fraction of rationales with the same tokens, of questions
     with the same chosen option).

Timing: warm-up calls are excluded; then repetitions alternate ours/transformers, and which of the two goes first
alternates too, so drift in machine load hits both alike. Reported: the median and the min-max spread of the
repetitions, the repetition count, and the load average (os.getloadavg) before and after each case.

Achieved throughput (both devices; the issue asks for it on CUDA): training FLOP/s = 6 x (matmul parameters x
tokens through them) + attention score/value products x 3 (forward + backward), the 6*N*T approximation made
exact per stack (encoder weights see input tokens, decoder weights and the LM head see target tokens). Decoding
memory bandwidth = bytes that must be read per new token (every matmul weight, plus the KV cache up to the current
length, plus T5's cross-attention K/V) / seconds of the whole generate call; the prefill is in the time, so this is
a lower bound. Both are set against peaks measured at start: a large matmul (bf16 on CUDA, fp32 on CPU) and a large
device copy (read + write bytes).

CUDA runs bf16: training under bf16 autocast with fp32 weights (as train.py does), generation with bf16 weights. CPU
runs fp32 (no native bf16 matmul on most CPUs). Both sides use torch's fused (one-pass) AdamW, on CPU too.

Shapes: --full=1 or DEVICE=cuda uses exactly the issue's shapes (training batch 8, input 256, target 64; generation
batch 1/8/32, prompt 200, 128 new tokens). The default CPU run must finish in 10 minutes on a 2-core machine, so
its repetition counts are small for the big cases, flan-t5-base training uses batch 4 (tokens/s is per token),
the TinyLLM step 3 x 4 rows, the generation warm-up decodes 4 tokens, and a time budget (--budget_s, 540 s) cuts
repetitions (never below one) when the machine is slower than planned. Every entry names its shapes and reports
the repetitions it ran. --quick=1 runs tiny configs in seconds (the smoke test in
tests/test_bench.py); its numbers mean nothing.

Not a test: pytest does not collect this file (no test_ prefix). transformers is a bench/test-only dependency.
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # flat scripts: t5.py and llama.py live in the repo root

import cli  # noqa: E402
import data  # noqa: E402
import llama  # noqa: E402
import prompts  # noqa: E402
import t5  # noqa: E402
import tinyllm  # noqa: E402
import student as students  # noqa: E402
import train  # noqa: E402
from cli import UserError, on_stop, parse_flags, run_main  # noqa: E402
from conftest import download  # noqa: E402  (tests/ is this script's folder: first on sys.path)


@dataclass
class BenchConfig:
    device: str = "auto"  # auto | cpu | cuda
    out: str = "out"  # bench.json goes here
    quick: int = 0  # 1: tiny configs, one repetition; seconds (smoke test)
    full: int = 0  # 1: the shapes and repetitions on CPU too (far longer than 10 minutes)
    reps: int = 0  # timed repetitions per implementation; 0: per-case default
    threads: int = 0  # torch intra-op threads; 0: torch's default (1 with --quick=1)
    only: str = ""  # run only cases whose name contains this
    profile: int = 0  # 1: also write a torch.profiler table per case and implementation to OUT/profile/
    budget_s: int = -1  # seconds for the whole run; cases cut repetitions to fit; 0: none; -1: 1200 for the
    #                     default CPU run (`make bench` within 20 minutes), none otherwise


# ---------------------------------------------------------------------------------------------------
# Model shapes, written out as config.json dicts (random weights: nothing is downloaded)

FLAN_T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_layers=8,
                     num_decoder_layers=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
                     layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
FLAN_T5_BASE = {**FLAN_T5_SMALL, "d_model": 768, "d_ff": 2048, "num_heads": 12, "num_layers": 12,
                "num_decoder_layers": 12}
FLAN_T5_LARGE = {**FLAN_T5_SMALL, "d_model": 1024, "d_ff": 2816, "num_heads": 16, "num_layers": 24,
                 "num_decoder_layers": 24}
SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY_T5 = {**FLAN_T5_SMALL, "vocab_size": 512, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_heads": 4,
           "num_layers": 2, "num_decoder_layers": 2, "relative_attention_max_distance": 32}
TINY_LLAMA = {**SMOLLM2_135M, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


# ---------------------------------------------------------------------------------------------------
# Measuring one call: wall time and the peak memory it adds


_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
        return _libc is not None
    except OSError:
        return False


class Meter:
    """Runs a call and returns (seconds, peak bytes it added or None). See the module docstring for the method."""

    def __init__(self, device: torch.device):
        self.device = device
        self.memory = device.type == "cuda" or cpu_peak_supported()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> tuple[float, int | None]:
        gc.collect()
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        elif self.memory:
            _libc.malloc_trim(0)  # freed heap pages back to the OS, so RSS is the live set
            before = _proc_status_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        fn()
        self.sync()
        seconds = time.perf_counter() - start
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - before
        elif self.memory:
            peak = _proc_status_kib("VmHWM") * 1024 - before
        else:
            peak = None
        return seconds, peak


@dataclass
class Case:
    """One comparison: two zero-argument callables doing the same work, and what a call amounts to."""
    name: str
    unit: str  # of the speed: "tokens/s", "new tokens/s", "examples/s" or "rationales/s"
    work: float  # tokens per call
    ours: Callable[[], object]
    theirs: Callable[[], object]
    reps: int
    baseline: str  # what the "transformers" column ran
    shapes: dict
    warmup: Callable[[], object] | None = None  # one call of each side, excluded; None: a full call
    flops: float = 0.0  # per call (training)
    bytes_read: float = 0.0  # per call (decoding)
    extra: dict = field(default_factory=dict)


def time_case(case: Case, meter: Meter, budget_s: float) -> dict:
    """Warm-up, then up to case.reps interleaved repetitions; fewer (at least one) when the first pair of calls
    shows that case.reps would not fit in budget_s (0: no limit). case.reps is set to the count run."""
    start = time.perf_counter()
    if case.warmup is not None:
        case.warmup()
    else:
        case.ours()
        case.theirs()
    meter.sync()
    times = {"ours": [], "theirs": []}
    peaks = {"ours": [], "theirs": []}
    load_before = os.getloadavg()
    reps = case.reps
    for r in range(case.reps):
        if r == 1 and budget_s:
            pair = times["ours"][0] + times["theirs"][0]
            reps = max(1, min(case.reps, int((budget_s - (time.perf_counter() - start)) // pair) + 1))
        if r >= reps:
            break
        order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")  # alternate who goes first
        for who in order:
            seconds, peak = meter(getattr(case, who))
            times[who].append(seconds)
            if peak is not None:
                peaks[who].append(peak)
    case.reps = reps
    return {"times": times, "peaks": peaks, "load": [load_before[0], os.getloadavg()[0]]}


def profile_case(case: Case, folder: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    folder.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    slug = "".join(c if c.isalnum() else "-" for c in case.name).strip("-")
    for who in ("ours", "theirs"):
        with profile(activities=activities, record_shapes=True) as prof:
            getattr(case, who)()
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=25)
        (folder / f"{slug}-{who}.txt").write_text(f"{case.name} ({who})\n\n{table}\n\nby input shape\n\n{by_shape}\n")


# ---------------------------------------------------------------------------------------------------
# Models on the same weights


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over labels != -100 (in fp32 for bf16 logits): the padded baseline's loss."""
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def transformers_t5(config: dict, device: torch.device) -> nn.Module:
    """T5ForConditionalGeneration with FLAN-T5's separate LM head. transformers 5 builds T5 with the head tied to
    the embedding whatever the config says (it unties only when loading a checkpoint with a distinct
    lm_head.weight, as the hub's flan-t5 files have), so the head is untied here by hand."""
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(**config))
    if not config["tie_word_embeddings"]:
        model.lm_head.weight = nn.Parameter(model.shared.weight.detach().clone())
        model.config.tie_word_embeddings = False
    return model.to(device)


def ours_from(theirs: nn.Module, ours: nn.Module) -> nn.Module:
    """Load transformers' state dict into our model by name (ours keep Hugging Face's names); strict, apart from
    transformers' aliases of the shared embedding."""
    state = theirs.state_dict()
    expected = ours.state_dict().keys()
    aliases = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"} - set(expected)
    unexpected = set(state) - set(expected) - aliases
    assert not unexpected, f"transformers keys our model lacks: {sorted(unexpected)}"
    ours.load_state_dict({k: state[k] for k in expected}, strict=True)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_theirs, f"parameter counts differ: ours {n_ours} vs transformers {n_theirs}"
    return ours


def linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def t5_head_params(config: dict) -> int:
    return config["vocab_size"] * config["d_model"]


# ---------------------------------------------------------------------------------------------------
# 1. Training steps


def t5_batch(config: dict, batch: int, input_len: int, target_len: int, device: torch.device,
             generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random (input_ids, attention_mask, decoder_input_ids, labels); ids avoid pad/eos/unk."""
    vocab = min(config["vocab_size"], 32000)
    input_ids = torch.randint(3, vocab, (batch, input_len), generator=generator).to(device)
    labels = torch.randint(3, vocab, (batch, target_len), generator=generator).to(device)
    return input_ids, torch.ones_like(input_ids), t5.shift_right(labels).to(device), labels


def train_flops(config: dict, ours: t5.T5, batch: int, input_len: int, target_len: int) -> float:
    """FLOPs of one training step on (batch, input_len) -> (batch, target_len): 3 x the forward's (the backward
    costs two forwards), counting matmuls only: 2 x weights x tokens through them, plus attention's QK^T and AV."""
    inner = config["num_heads"] * config["d_kv"]
    weights = (linear_params(ours.encoder) * input_len
               + (linear_params(ours.decoder) + t5_head_params(config)) * target_len)
    attention = 2 * inner * (config["num_layers"] * input_len * input_len
                             + config["num_decoder_layers"] * target_len * (target_len + input_len))
    return 3 * 2 * batch * (weights + attention)


def train_case(name: str, config: dict, batch: int, input_len: int, target_len: int, reps: int,
               device: torch.device, bf16: bool, compile: bool = False) -> Case:
    """One optimizer step on a random batch of fixed shape; compile: our model's forward through torch.compile
    (the compiled MFU of `make gpu-check`), transformers eager."""
    torch.manual_seed(0)
    theirs = transformers_t5(config, device).train()
    model = ours_from(theirs, t5.T5(t5.T5Config.from_hf_config(config)).to(device)).train()
    ours = torch.compile(model) if compile else model
    generator = torch.Generator().manual_seed(0)
    input_ids, mask, decoder_input_ids, labels = t5_batch(config, batch, input_len, target_len, device, generator)
    fused = True  # one-pass AdamW kernel, on CPU too (torch >= 2.4); both sides run the same optimizer
    opt_ours = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-5, fused=fused)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    def step_ours() -> None:
        with autocast():
            loss = token_cross_entropy(ours(input_ids, mask, decoder_input_ids), labels)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs() -> None:
        with autocast():
            logits = theirs(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
            loss = token_cross_entropy(logits, labels)
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    case = Case(name, "tokens/s", batch * (input_len + target_len), step_ours, step_theirs, reps,
                baseline=f"transformers T5ForConditionalGeneration ({theirs.config._attn_implementation})",
                shapes=dict(batch=batch, input=input_len, target=target_len),
                flops=train_flops(config, model, batch, input_len, target_len))
    return compiled_case(case, step_theirs) if compile else case


# ---------------------------------------------------------------------------------------------------
# 2. Generation


def llama_generation_case(name: str, config: dict, batch: int, prompt_len: int, new_tokens: int, reps: int,
                          device: torch.device, dtype: torch.dtype, static: bool, warmup_tokens: int) -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    theirs = LlamaForCausalLM(LlamaConfig(**config)).to(device, dtype).eval()
    ours = ours_from(theirs, llama.Llama(llama.LlamaConfig.from_hf_config(config))).to(device, dtype).eval()
    theirs.generation_config.eos_token_id = None  # exactly `new_tokens` for every row
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, config["vocab_size"], (batch, prompt_len), generator=generator).to(device)
    mask = torch.ones_like(input_ids)
    outputs = {}

    def ours_generate(n: int = new_tokens) -> None:
        outputs["ours"] = ours.generate(input_ids, mask, n, eos_ids=[])

    def theirs_generate(n: int = new_tokens) -> None:
        with torch.inference_mode():
            out = theirs.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n,
                                  do_sample=False, eos_token_id=None, pad_token_id=config["pad_token_id"],
                                  **({"cache_implementation": "static"} if static else {}))
        outputs["theirs"] = out[:, prompt_len:]

    kv_bytes_per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"]
    element = torch.finfo(dtype).bits // 8
    weights = linear_params(ours) * element  # the tied head counts once, as the LM head matmul
    context = sum(prompt_len + t for t in range(new_tokens))
    bytes_read = new_tokens * weights + batch * kv_bytes_per_token * element * context
    return generation_case(name, "LlamaForCausalLM", theirs, static, ours_generate, theirs_generate, outputs, reps,
                           batch, prompt_len, new_tokens, warmup_tokens, bytes_read)


def t5_generation_case(name: str, config: dict, batch: int, prompt_len: int, new_tokens: int, reps: int,
                       device: torch.device, dtype: torch.dtype, static: bool, warmup_tokens: int) -> Case:
    torch.manual_seed(0)
    theirs = transformers_t5(config, device).to(dtype).eval()
    ours = ours_from(theirs, t5.T5(t5.T5Config.from_hf_config(config))).to(device, dtype).eval()
    theirs.generation_config.eos_token_id = None
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, min(config["vocab_size"], 32000), (batch, prompt_len), generator=generator).to(device)
    mask = torch.ones_like(input_ids)
    outputs = {}

    def ours_generate(n: int = new_tokens) -> None:
        outputs["ours"] = ours.generate(input_ids, mask, n, eos_id=-1)

    def theirs_generate(n: int = new_tokens) -> None:
        with torch.inference_mode():
            out = theirs.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n,
                                  do_sample=False, eos_token_id=None,
                                  **({"cache_implementation": "static"} if static else {}))
        outputs["theirs"] = out[:, 1:]  # drop the decoder start token

    element = torch.finfo(dtype).bits // 8
    inner = config["num_heads"] * config["d_kv"]
    layers = config["num_decoder_layers"]
    # cross-attention k/v weights are applied once, to the encoder output, not per new token
    weights = (linear_params(ours.decoder) - layers * 2 * config["d_model"] * inner + t5_head_params(config)) * element
    self_context = sum(t + 1 for t in range(new_tokens))
    bytes_read = (new_tokens * weights
                  + batch * 2 * layers * inner * element * (self_context + new_tokens * prompt_len))
    return generation_case(name, "T5ForConditionalGeneration", theirs, static, ours_generate, theirs_generate,
                           outputs, reps, batch, prompt_len, new_tokens, warmup_tokens, bytes_read)


def generation_case(name: str, baseline_class: str, theirs: nn.Module, static: bool, ours_generate: Callable,
                    theirs_generate: Callable, outputs: dict, reps: int, batch: int, prompt_len: int,
                    new_tokens: int, warmup_tokens: int, bytes_read: float) -> Case:
    """The Case both generation benchmarks share: new tokens/s, the same-tokens check (outputs), a short
    warm-up of both sides."""
    case = Case(name, "new tokens/s", batch * new_tokens, ours_generate, theirs_generate, reps,
                baseline=f"transformers {baseline_class}.generate ({theirs.config._attn_implementation}, "
                         f"{'static' if static else 'dynamic'} cache)",
                shapes=dict(batch=batch, prompt=prompt_len, new_tokens=new_tokens), bytes_read=bytes_read)
    case.extra["outputs"] = outputs
    case.warmup = lambda: (ours_generate(warmup_tokens), theirs_generate(warmup_tokens))
    return case


# ---------------------------------------------------------------------------------------------------
# 3. The jobs as users run them: train.py's TinyLLM step, a local teacher's rationales, rank scoring. Real OBQA
#    text (the release beside the repo, TINYLLM_ASSETS) through the real tokenizers; random weights of the shapes.


@dataclass
class ReleaseText:
    train: list  # data.Example
    rationales: list[tuple[str, str]]  # (FLAN-T5-xl, LLaMA-2) release rationale per train example, "" if unusable
    test: list
    pool: list  # all of train: the in-context examples of the teacher prompts
    t5_tokenizer: object
    llama_tokenizer: object


_RELEASE: dict[str, ReleaseText] = {}


def assets_dir() -> Path | None:
    """TINYLLM_ASSETS, else ../shared/assets beside the repo, when it holds the release (as tests/conftest.py)."""
    env = os.environ.get("TINYLLM_ASSETS")
    path = Path(env) if env else ROOT.parent / "shared" / "assets"
    return path if (path / "tinyllm_release").is_dir() else None


def release_text(dataset: str = "obqa", n: int = 64) -> ReleaseText:
    """The first n train and test examples of a dataset with the release's rationales, and the real T5 and
    LLaMA-2 sentencepiece tokenizers (read once per run)."""
    if dataset in _RELEASE:
        return _RELEASE[dataset]
    import tempfile

    assets = assets_dir()
    folder = Path(tempfile.mkdtemp(prefix=f"bench-{dataset}-"))
    download(dataset, folder, base_url=str(assets / "tinyllm_release"), rationales=True)
    pool = data.load_split(dataset, "train", folder)
    raws = data.load_release_rationales(dataset, "train", folder)
    # the targets train.py reads: cleaned as the cache records them, degenerate ones left out ("")
    cleaned = [[prompts.clean_rationale(text or "") for text in prompts.parse_release(raw, ex)]
               for raw, ex in zip(raws[:n], pool[:n])]
    _RELEASE[dataset] = ReleaseText(pool[:n], [tuple("" if prompts.is_degenerate(t) else t for t in pair)
                                               for pair in cleaned],
                                    data.load_split(dataset, "test", folder)[:n], pool,
                                    t5.Tokenizer(assets / "t5_tokenizer" / "spiece.model"),
                                    llama.Tokenizer(assets / "llama2_tokenizer"))
    return _RELEASE[dataset]


def transformers_llama(config: dict, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**config)).to(device)


def job_student(kind: str, config: dict, device: torch.device, bf16: bool, dtype: torch.dtype = torch.float32):
    """(train.py's student around our model, transformers' model with the same weights)."""
    torch.manual_seed(0)
    text = release_text("obqa")
    if kind == "t5":
        theirs = transformers_t5(config, device).to(dtype)
        ours = ours_from(theirs, t5.T5(t5.T5Config.from_hf_config(config))).to(device, dtype)
        return students.Seq2SeqStudent(ours, text.t5_tokenizer, device, bf16), theirs
    theirs = transformers_llama(config, device).to(dtype)
    ours = ours_from(theirs, llama.Llama(llama.LlamaConfig.from_hf_config(config))).to(device, dtype)
    return students.DecoderOnlyStudent(ours, text.llama_tokenizer, device, bf16, chat=False, with_boundary=True), theirs


def theirs_task_loss(kind: str, theirs: nn.Module, rows: list[tuple[list[int], list[int]]], pad_id: int,
                     device: torch.device) -> Tensor:
    """One task's mean token cross-entropy the way the official code computes it: its own padded forward
    through transformers, the loss from `labels` over the full logits."""
    if kind == "t5":
        input_ids = students.pad([p for p, _ in rows], pad_id).to(device)
        mask = students.pad([[1] * len(p) for p, _ in rows], 0).to(device)
        labels = students.pad([t for _, t in rows], -100).to(device)
        return theirs(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    input_ids = students.pad([p + t for p, t in rows], pad_id).to(device)
    mask = students.pad([[1] * (len(p) + len(t)) for p, t in rows], 0).to(device)
    labels = students.pad([[-100] * len(p) + t for p, t in rows], -100).to(device)
    return theirs(input_ids=input_ids, attention_mask=mask, labels=labels).loss


def release_tasks(text: ReleaseText, examples: list) -> list[train.Task]:
    """The answer task and the paper's two teachers' rationale tasks (α = 0.5 each) over the release text."""
    tasks = [train.Task(students.ANSWER_TASK, prompts.ANSWER_PREFIX, 1.0, {ex.id: ex.answer_text for ex in examples})]
    for i, teacher in enumerate(("flan-t5-xl", "llama-2")):
        targets = {ex.id: r[i] for ex, r in zip(examples, text.rationales) if r[i].strip()}
        tasks.append(train.Task(teacher, prompts.teacher_prefix(teacher), 0.5, targets))
    return tasks


def our_step(student: students.Student, tasks: list[train.Task], examples: list, device: torch.device):
    """train.py's optimizer step on `examples` (one micro-batch) with `tasks`: micro_batch_loss, backward, fused
    AdamW. (the step function, its micro-batch, the task weights, the tokens per task)."""
    rows = train.encode_rows(student, examples, tasks, train.TrainConfig())
    (micro,), task_tokens, _ = train.shard_step(rows, list(range(len(examples))), len(tasks), 0, 1, 1)
    weights = torch.tensor([t.weight for t in tasks], device=device)
    task_tokens = torch.tensor(task_tokens, dtype=torch.float32, device=device)
    optimizer = torch.optim.AdamW(student.module.parameters(), lr=1e-5, fused=True)

    def step() -> None:
        loss, _ = train.micro_batch_loss(student, micro, weights, task_tokens, world=1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, micro, weights, task_tokens


def tinyllm_job_case(name: str, kind: str, config: dict, batch: int, reps: int, device: torch.device,
                     bf16: bool, compile: bool = False) -> Case:
    """Eq. 2 with the paper's two teachers on `batch` real OBQA examples: the answer and both release rationales
    (FLAN-T5-xl mean 17 words, LLaMA-2 mean 45, a long tail; cut at --max_target_tokens=256). Ours: train.py's
    own step (micro_batch_loss: T5 rows in two length groups; decoder-only: one tree per example, the question
    and options once, a branch per task; the LM head at target tokens only). Official: one transformers forward
    per task, losses weighted and summed. Both: one backward, one fused AdamW step, under the autocast train.py
    uses here."""
    student, theirs = job_student(kind, config, device, bf16)
    text = release_text("obqa")
    examples = text.train[:batch]
    tasks = release_tasks(text, examples)
    step_ours, micro, weights, task_tokens = our_step(student, tasks, examples, device)
    if compile:
        students.compile_objective(student)
    flat = [row for example in micro for row in example]
    by_task = [[(p, tgt) for t, p, tgt in flat if t == task] for task in range(len(tasks))]
    pad_id = student.tokenizer.pad_id
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-5, fused=True)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    def loss_theirs() -> Tensor:
        with autocast():
            return sum(w * theirs_task_loss(kind, theirs, task_rows, pad_id, device)
                       for w, task_rows in zip(weights, by_task))

    student.module.eval(), theirs.eval()  # the same Eq. 2 on both sides: checked once, untimed, no dropout
    with torch.no_grad():
        ours_loss = train.micro_batch_loss(student, micro, weights, task_tokens, world=1)[0]
        assert torch.allclose(ours_loss.float(), loss_theirs().float(), rtol=2e-2 if bf16 else 1e-4), name
    student.module.train(), theirs.train()

    def step_theirs() -> None:
        loss_theirs().backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    lengths = {t.name: sorted(len(tgt) for task, _, tgt in flat if tasks[task] is t) for t in tasks}
    case = Case(name, "examples/s", len(examples), step_ours, step_theirs, reps,
                baseline=f"transformers {type(theirs).__name__}, one forward per task (the official implementation's way)",
                shapes=dict(examples=len(examples), rows=len(flat), target_tokens=lengths,
                            prompt_tokens=sum(len(p) for _, p, _ in flat),
                            slots=step_slots(student, micro)))
    return compiled_case(case, step_theirs) if compile else case


def compiled_case(case: Case, theirs_warmup: Callable[[], object]) -> Case:
    """The case with --compile on our side (transformers eager, as users run it): the warm-up is one full call of
    ours, timed apart, so the compile is reported beside the steady rate, not in it: entry["compile"] = the
    seconds of that first call and the graphs torch._dynamo compiled in the case (all of them, timed calls included)."""
    from torch._dynamo.utils import counters

    case.name += " --compile"
    before = counters["stats"]["unique_graphs"]

    def warmup() -> None:
        start = time.perf_counter()
        case.ours()
        case.extra["compile"] = dict(first_call_s=time.perf_counter() - start,
                                     graphs_in_first_call=counters["stats"]["unique_graphs"] - before)
        theirs_warmup()

    case.warmup = warmup
    case.extra["graphs"] = lambda: counters["stats"]["unique_graphs"] - before
    return case


def step_slots(student: students.Student, micro: list) -> int:
    """Token slots a step computes: T5's bins (encoder and decoder, padding included); decoder-only, shared
    prompts once, padding excluded."""
    batch = student.collate([[(p, tgt) for _, p, tgt in example] for example in micro])[0]
    if student.kind == "t5":
        return batch["input_ids"].numel() + batch["decoder_input_ids"].numel()
    return int((batch["segment_ids"] >= 0).sum())


def step_cost_case(name: str, dataset: str, config: dict, batch: int, reps: int, device: torch.device,
                   bf16: bool) -> Case:
    """What TinyLLM costs over fine-tuning for our decoder-only student: train.py's step on the same `batch` real
    examples of `dataset` with the answer and both release rationales (ours) and with the answer alone
    (fine-tuning, in the transformers column). The time ratio is entry["time_over_finetune"]."""
    student, _ = job_student("llama", config, device, bf16)
    text = release_text(dataset)
    examples = text.train[:batch]
    tasks = release_tasks(text, examples)
    step_tinyllm, micro, _, _ = our_step(student, tasks, examples, device)
    step_finetune, answer_micro, _, _ = our_step(student, tasks[:1], examples, device)
    return Case(name, "examples/s", len(examples), step_tinyllm, step_finetune, reps,
                baseline="our own fine-tuning step (L_A only) on the same examples",
                shapes=dict(examples=len(examples), slots_tinyllm=step_slots(student, micro),
                            slots_finetune=step_slots(student, answer_micro),
                            prompt_tokens=sum(len(p) for example in answer_micro for _, p, _ in example)),
                extra={"time_over_finetune": True})


def rationales_job_case(name: str, config: dict, rows: int, n_prompts: int, max_new_tokens: int, reps: int,
                        device: torch.device, dtype: torch.dtype, compile: bool = False) -> Case:
    """A local teacher (the SmolLM2-135M shape, the dtype LocalTeacher loads) writing rationales for n real OBQA
    teacher prompts (§3.2: two in-context examples, the gold answer, "Let's think step by step."), longest
    first as run_teacher orders them. Row i stops after the token count of the release's LLaMA-2 rationale of
    example i (capped at max_new_tokens), on both sides. Ours: continuous batching over `rows` rows. Theirs:
    transformers generate on static batches of `rows` prompts, each row stopped by a per-row criterion."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    torch.manual_seed(0)
    text = release_text("obqa")
    tok = text.llama_tokenizer
    theirs = transformers_llama(config, device).to(dtype).eval()
    ours = ours_from(theirs, llama.Llama(llama.LlamaConfig.from_hf_config(config))).to(device, dtype).eval()
    examples = text.train[:n_prompts]
    prompt_ids = [tok.encode(prompts.teacher_prompt(ex, data.in_context_examples(ex, text.pool, k=2)))
                  for ex in examples]
    limits = [max(1, min(max_new_tokens, len(tok.encode(r[1], bos=False)))) for r in text.rationales[:n_prompts]]
    order = sorted(range(n_prompts), key=lambda i: -len(prompt_ids[i]))
    prompt_ids, limits = [prompt_ids[i] for i in order], [limits[i] for i in order]
    outputs: dict = {}

    def ours_generate(n: int = n_prompts) -> None:
        slots = llama.Slots(ours, min(rows, n), max(len(p) + k for p, k in zip(prompt_ids, limits)), device)
        if compile:
            tinyllm.compile_slots(slots)
        with torch.inference_mode():
            outputs["ours"] = dict(tinyllm.continuous_generate(
                slots, prompt_ids[:n], limits[:n], set(), lambda logits: logits.argmax(-1)))

    class RowLimits(StoppingCriteria):
        def __init__(self, width: int, row_limits: list[int]):
            self.width, self.limits = width, torch.tensor(row_limits, device=device)

        def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
            return input_ids.shape[1] - self.width >= self.limits  # (B,) done per row

    def theirs_generate(n: int = n_prompts) -> None:
        done = {}
        for start in range(0, n, rows):
            chunk = list(range(start, min(start + rows, n)))
            ids = students.pad([prompt_ids[i] for i in chunk], tok.pad_id, left=True).to(device)
            mask = students.pad([[1] * len(prompt_ids[i]) for i in chunk], 0, left=True).to(device)
            with torch.inference_mode():
                out = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False, eos_token_id=None,
                                      max_new_tokens=max(limits[i] for i in chunk), pad_token_id=tok.pad_id,
                                      stopping_criteria=StoppingCriteriaList([RowLimits(ids.shape[1],
                                                                                        [limits[i] for i in chunk])]))
            for row, i in enumerate(chunk):
                done[i] = out[row, ids.shape[1]:ids.shape[1] + limits[i]].tolist()
        outputs["theirs"] = done

    case = Case(name, "rationales/s", n_prompts, ours_generate, theirs_generate, reps,
                baseline="transformers LlamaForCausalLM.generate, static batches, per-row stopping criterion",
                shapes=dict(rows=rows, prompts=n_prompts, prompt_tokens=sum(len(p) for p in prompt_ids),
                            new_tokens=sum(limits), max_new_tokens=max_new_tokens, limit_mean=sum(limits) / n_prompts))
    case.extra["compare"] = lambda: sum(outputs["ours"][i] == outputs["theirs"][i] for i in range(n_prompts)) / n_prompts
    case.warmup = lambda: (ours_generate(min(rows, 4)), theirs_generate(min(rows, 4)))
    # compiled: the first full call compiles every shape the run meets (its rows, its cache widths)
    return compiled_case(case, lambda: theirs_generate(min(rows, 4))) if compile else case


def rank_job_case(name: str, kind: str, config: dict, n_questions: int, batch: int, reps: int,
                  device: torch.device, bf16_weights: bool) -> Case:
    """Rank scoring (eval.py --scoring=rank) of n real OBQA test questions, the weights' dtype eval.py loads here.
    Ours: the student's score_options (one prompt pass per question). Theirs: what lm-evaluation-harness runs
    with transformers: every option as its own row, prompt included, log-probabilities from the full logits."""
    dtype = torch.bfloat16 if bf16_weights else torch.float32
    student, theirs = job_student(kind, config, device, bf16=False, dtype=dtype)
    student.module.eval(), theirs.eval()
    questions = release_text("obqa").test[:n_questions]
    prompt_rows = [student.fit_prompt(ex, students.ANSWER_TASK, prompts.ANSWER_PREFIX, 1024) for ex in questions]
    options = [[student.encode_option(o) for o in ex.options] for ex in questions]
    chunks = [range(s, min(s + batch, n_questions)) for s in range(0, n_questions, batch)]
    outputs: dict = {}
    pad_id = student.tokenizer.pad_id

    def ours_score() -> None:
        outputs["ours"] = [s for c in chunks for s in student.score_options([prompt_rows[i] for i in c],
                                                                            [options[i] for i in c])]

    @torch.inference_mode()
    def theirs_score() -> None:
        scores = []
        for c in chunks:
            pairs = [(prompt_rows[i], o) for i in c for o in options[i]]
            if kind == "t5":
                input_ids = students.pad([p for p, _ in pairs], pad_id).to(device)
                mask = students.pad([[1] * len(p) for p, _ in pairs], 0).to(device)
                labels = students.pad([o for _, o in pairs], -100).to(device)
                logits = theirs(input_ids=input_ids, attention_mask=mask, labels=labels).logits
            else:
                input_ids = students.pad([p + o for p, o in pairs], pad_id).to(device)
                mask = students.pad([[1] * (len(p) + len(o)) for p, o in pairs], 0).to(device)
                labels = students.pad([[-100] * len(p) + o for p, o in pairs], -100)[:, 1:].to(device)
                logits = theirs(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            picked = logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
            sums = picked.sum(-1).tolist()
            k = 0
            for i in c:
                scores.append(sums[k:k + len(options[i])])
                k += len(options[i])
        outputs["theirs"] = scores

    case = Case(name, "examples/s", n_questions, ours_score, theirs_score, reps,
                baseline=f"transformers {type(theirs).__name__}, one row per option (prompt included)",
                shapes=dict(questions=n_questions, batch=batch, options=sum(len(o) for o in options),
                            prompt_tokens=sum(len(p) for p in prompt_rows), dtype=str(dtype).removeprefix("torch.")))
    # the fraction of questions where both pick the same option (bf16 weights round the two sums differently,
    # and random weights leave options close, so a few near-ties may flip; in fp32 every choice agrees)
    case.extra["compare"] = lambda: sum(
        max(range(len(x)), key=x.__getitem__) == max(range(len(y)), key=y.__getitem__)
        for x, y in zip(outputs["ours"], outputs["theirs"])) / n_questions
    return case


# ---------------------------------------------------------------------------------------------------
# The plan: which cases, at which shapes and repetition counts


@dataclass
class Plan:
    name: str
    build: Callable[[], Case]


def make_plan(cfg: BenchConfig, device: torch.device) -> list[Plan]:
    cuda = device.type == "cuda"
    bf16 = cuda
    dtype = torch.bfloat16 if cuda else torch.float32
    full = cfg.full or cuda
    plan: list[Plan] = []

    def reps(cuda_reps: int, cpu_reps: int) -> int:
        return cfg.reps or (1 if cfg.quick else (cuda_reps if cuda else cpu_reps))

    if cfg.quick:
        small, base, smol = TINY_T5, TINY_T5, TINY_LLAMA
        train_shapes = dict(batch=2, input_len=16, target_len=8)
        t5_sizes = [("small", small, 2)]
        prompt, new_tokens, batches = 12, 6, [1, 4]
    else:
        small, base, smol = FLAN_T5_SMALL, FLAN_T5_BASE, SMOLLM2_135M
        train_shapes = dict(batch=8, input_len=256, target_len=64)
        t5_sizes = [("flan-t5-small", small, 8), ("flan-t5-base", base, 8 if full else 4)]
        prompt, new_tokens, batches = 200, 128, [1, 8, 32]
    shapes = train_shapes

    # 1. training
    for label, config, batch in t5_sizes:
        n = reps(10, 3 if label.endswith("small") else 2)
        name = f"train {label} b{batch} in{shapes['input_len']} tgt{shapes['target_len']}"
        plan.append(Plan(name, lambda name=name, config=config, batch=batch, n=n: train_case(
            name, config, batch, shapes["input_len"], shapes["target_len"], n, device, bf16)))

    if cuda:  # the paper's largest student at its 1024 input tokens: the MFU of training on a GPU
        name = "train flan-t5-large b8 in1024 tgt64"
        for compile in (False, True):  # compiled: the MFU torch.compile reaches (gpt-fast, nanoT5 compile theirs)
            plan.append(Plan(name + " --compile" * compile, lambda name=name, compile=compile: train_case(
                name, FLAN_T5_LARGE, 8, 1024, 64, reps(10, 1), device, bf16, compile)))

    # 2. generation: (cuda reps, cpu reps) per batch; CPU batch 32 is the expensive one
    cpu_reps = {1: 3, 8: 2, 32: 1, 4: 1}
    # the warm-up runs the prefill and a few decode steps at the measured shapes: on CUDA the whole call (caching
    # allocator, kernels), on CPU a short one (the full calls at batch 32 take most of a minute)
    warmup_tokens = new_tokens if full else 4
    statics = [False, True] if cuda else [False]
    for kind, config, build in (("smollm2-135m", smol, llama_generation_case), ("flan-t5-base", base,
                                                                               t5_generation_case)):
        label = kind if not cfg.quick else f"tiny-{kind.split('-')[0]}"
        for batch in batches:
            for static in statics:
                suffix = " (transformers static cache)" if static else ""
                name = f"generate {label} b{batch} prompt{prompt} new{new_tokens}{suffix}"
                n = reps(10 if batch < 32 else 5, cpu_reps[batch])
                plan.append(Plan(name, lambda name=name, config=config, build=build, batch=batch, n=n, static=static:
                                 build(name, config, batch, prompt, new_tokens, n, device, dtype, static,
                                       warmup_tokens)))

    if assets_dir() is None:
        print("job cases left out: they read the real OBQA release; set TINYLLM_ASSETS to the shared/assets folder",
              flush=True)
        return plan
    # 3. the jobs, on real OBQA text, in the dtype each script uses here (train.py: bf16 autocast where native;
    # eval.py: bf16 weights where native; a local teacher: bf16 on CUDA, fp32 on the CPU)
    native_bf16 = students.bf16_supported(device)
    teacher_dtype = torch.bfloat16 if cuda else torch.float32
    job_batch, n_text = (4, 8) if cfg.quick else (8, 64)
    rows_list, max_new = ([2, 4], 8) if cfg.quick else ([8, 32], 128)
    t5_label, smol_label = ("tiny-t5", "tiny-llama") if cfg.quick else ("flan-t5-small", "smollm2-135m")
    if cfg.quick:  # the real tokenizers' ids need the real vocabulary sizes
        small, smol = {**small, "vocab_size": 32128}, {**smol, "vocab_size": 32000}
    # --compile: ours compiled (the name says so), transformers eager; not in the quick smoke test, whose CI time
    # would go to compiling (tests/test_compile.py checks the compiled paths)
    compiles = (False,) if cfg.quick else (False, True)
    for kind, label, config in (("t5", t5_label, small), ("llama", smol_label, smol)):
        for compile in compiles:
            name = f"job: train.py tinyllm step, {label} student, {job_batch} OBQA examples, 2 teachers"
            plan.append(Plan(name + " --compile" * compile, lambda name=name, kind=kind, config=config, compile=compile:
                             tinyllm_job_case(name, kind, config, job_batch, reps(10, 2), device, native_bf16, compile)))
    for dataset in ("obqa", "pubmedqa"):
        name = f"job: tinyllm step over fine-tuning step, {smol_label} student, {job_batch} {dataset} examples"
        plan.append(Plan(name, lambda name=name, dataset=dataset: step_cost_case(
            name, dataset, smol, job_batch, reps(10, 2), device, native_bf16)))
    for rows in rows_list:
        for compile in compiles:
            name = f"job: rationales, {smol_label} teacher, {n_text} OBQA prompts, {rows} rows, LLaMA-2 lengths"
            plan.append(Plan(name + " --compile" * compile, lambda name=name, rows=rows, compile=compile:
                             rationales_job_case(name, smol, rows, n_text, max_new, reps(3, 1), device, teacher_dtype,
                                                 compile)))
    for kind, label, config in (("t5", t5_label, small), ("llama", smol_label, smol)):
        name = f"job: rank scoring, {label}, {n_text} OBQA test questions"
        plan.append(Plan(name, lambda name=name, kind=kind, config=config: rank_job_case(
            name, kind, config, n_text, 32, reps(5, 2), device, native_bf16)))
    return plan


# ---------------------------------------------------------------------------------------------------
# Device peaks


def measure_peaks(device: torch.device, quick: bool) -> dict:
    """Achievable peaks on this device: a big matmul's FLOP/s and a big copy's bytes/s (read + write)."""
    cuda = device.type == "cuda"
    n = 256 if quick else (8192 if cuda else 2048)
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    copy_src = torch.empty((2**28 if cuda else 2**26) if not quick else 2**20, dtype=torch.uint8, device=device)
    copy_src.fill_(1)
    copy_dst = torch.empty_like(copy_src)
    copy_dst.fill_(0)  # touched once here: a fresh buffer per copy would time page faults, not bandwidth
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def best(fn: Callable[[], object], reps: int) -> float:
        fn()
        sync()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return min(times)

    matmul = best(lambda: a @ b, 10 if cuda else 3)
    copy = best(lambda: copy_dst.copy_(copy_src), 10 if cuda else 3)
    return {"matmul_flops_per_s": 2 * n**3 / matmul, "matmul": f"{n}x{n} {str(dtype).removeprefix('torch.')}",
            "copy_bytes_per_s": 2 * copy_src.numel() / copy, "copy_bytes": copy_src.numel()}


# ---------------------------------------------------------------------------------------------------
# Report


def summarize(case: Case, timing: dict, device: torch.device, peaks: dict) -> list[dict]:
    entries = []
    speed = {who: [case.work / s for s in timing["times"][who]] for who in ("ours", "theirs")}
    med = {who: statistics.median(v) for who, v in speed.items()}
    common = dict(device=str(device), reps=case.reps, baseline=case.baseline,
                  shapes=case.shapes, load=timing["load"])
    entry = dict(name=case.name, ours=med["ours"], transformers=med["theirs"], ratio=med["ours"] / med["theirs"],
                 unit=case.unit, ours_spread=[min(speed["ours"]), max(speed["ours"])],
                 transformers_spread=[min(speed["theirs"]), max(speed["theirs"])], **common)
    outputs = case.extra.get("outputs")
    if outputs:
        a, b = outputs.get("ours"), outputs.get("theirs")
        assert a is not None and b is not None and a.shape == b.shape, (
            f"{case.name}: expected both to produce {case.shapes['new_tokens']} tokens per row, got "
            f"{None if a is None else tuple(a.shape)} and {None if b is None else tuple(b.shape)}")
        entry["same_tokens"] = bool(torch.equal(a.cpu(), b.cpu()))
    if "compare" in case.extra:  # the jobs: same rationales (fraction of rows), same option scores (bool)
        entry["same_output"] = case.extra["compare"]()
    if "compile" in case.extra:
        entry["compile"] = {**case.extra["compile"], "graphs": case.extra["graphs"]()}
    if case.extra.get("time_over_finetune"):  # both columns are ours: TinyLLM's step time / fine-tuning's
        entry["time_over_finetune"] = 1 / entry["ratio"]
    entries.append(entry)
    if timing["peaks"]["ours"] and timing["peaks"]["theirs"]:
        mem = {who: max(timing["peaks"][who]) / 2**20 for who in ("ours", "theirs")}
        entries.append(dict(name=f"{case.name} | peak memory", ours=mem["ours"], transformers=mem["theirs"],
                            ratio=mem["ours"] / mem["theirs"] if mem["theirs"] > 0 else math.nan, unit="MiB",
                            method=("cuda max_memory_allocated" if device.type == "cuda"
                                    else "peak RSS (VmHWM after clear_refs) - RSS before"), **common))
    if case.flops:
        achieved = {who: case.flops * med[who] / case.work / 1e9 for who in ("ours", "theirs")}
        peak = peaks["matmul_flops_per_s"] / 1e9
        entries.append(dict(name=f"{case.name} | achieved FLOP/s", ours=achieved["ours"],
                            transformers=achieved["theirs"], ratio=achieved["ours"] / achieved["theirs"],
                            unit="GFLOP/s", ours_of_peak=achieved["ours"] / peak,
                            transformers_of_peak=achieved["theirs"] / peak, peak=peak, **common))
    if case.bytes_read:
        achieved = {who: case.bytes_read * med[who] / case.work / 1e9 for who in ("ours", "theirs")}
        peak = peaks["copy_bytes_per_s"] / 1e9
        entries.append(dict(name=f"{case.name} | achieved bandwidth", ours=achieved["ours"],
                            transformers=achieved["theirs"], ratio=achieved["ours"] / achieved["theirs"],
                            unit="GB/s", ours_of_peak=achieved["ours"] / peak,
                            transformers_of_peak=achieved["theirs"] / peak, peak=peak, **common))
    return entries


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(entries: list[dict]) -> str:
    rows = [("benchmark", "ours", "transformers", "ours/transformers", "unit", "reps")]
    for e in entries:
        ours, theirs = fmt(e["ours"]), fmt(e["transformers"])
        if "ours_spread" in e:
            ours += f" [{fmt(e['ours_spread'][0])}-{fmt(e['ours_spread'][1])}]"
            theirs += f" [{fmt(e['transformers_spread'][0])}-{fmt(e['transformers_spread'][1])}]"
        if "ours_of_peak" in e:
            ours += f" ({e['ours_of_peak']:.0%} of peak)"
            theirs += f" ({e['transformers_of_peak']:.0%})"
        ratio = f"{e['ratio']:.2f}x" + (" (lower is better)" if e["unit"] == "MiB" else "")
        rows.append((e["name"], ours, theirs, ratio, e["unit"], str(e["reps"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine_info(device: torch.device, cfg: BenchConfig) -> dict:
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, cpu=cpu, cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), device=str(device), quick=bool(cfg.quick),
                full=bool(cfg.full or device.type == "cuda"), loadavg_start=os.getloadavg())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str]) -> list[dict]:
    cfg = parse_flags(BenchConfig, argv)
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"bench.py: --device={cfg.device!r}: expected auto, cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("bench.py: --device=cuda but torch sees no CUDA device")
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if cfg.threads or cfg.quick:
        # Quick mode's tiny shapes gain nothing from threads, and on a loaded machine OpenMP threads waiting
        # for each other at every op make it 10x slower: one thread keeps the smoke test at a few seconds.
        torch.set_num_threads(cfg.threads or 1)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    info = machine_info(device, cfg)
    peaks = measure_peaks(device, bool(cfg.quick))
    info["peaks"] = peaks
    print(f"bench on {info.get('gpu', info['cpu'])} ({device}, {info['torch_threads']} threads), torch {torch.__version__}, "
          f"transformers {info['transformers']}, load average {os.getloadavg()[0]:.2f}; peaks: matmul "
          f"{peaks['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, copy {peaks['copy_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    meter = Meter(device)
    if not meter.memory:
        print("peak memory: not measurable here (no /proc/self/clear_refs); memory rows are left out", flush=True)
    entries: list[dict] = []
    plans = [p for p in make_plan(cfg, device) if not cfg.only or cfg.only in p.name]
    budget = cfg.budget_s if cfg.budget_s >= 0 else (1200 if device.type == "cpu" and not (cfg.full or cfg.quick) else 0)
    for i, plan in enumerate(plans):
        print(f"[case {i + 1} of {len(plans)}] {plan.name}", flush=True)
        case_start = time.perf_counter()
        case_budget = max(budget - (case_start - start), 1.0) / (len(plans) - i) if budget else 0.0
        try:
            case = plan.build()
            timing = time_case(case, meter, case_budget)
        except Exception as error:  # noqa: BLE001 (transformers' static cache is optional: report, go on)
            if "static cache" not in plan.name:
                raise
            print(f"{plan.name}: transformers failed ({type(error).__name__}: {error}); left out", flush=True)
            info.setdefault("failed", {})[plan.name] = f"{type(error).__name__}: {error}"
            continue
        new = summarize(case, timing, device, peaks)
        entries += new
        if cfg.profile:
            profile_case(case, out / "profile")
        del case
        gc.collect()
        for e in new:
            print(f"{e['name']}: ours {fmt(e['ours'])} vs transformers {fmt(e['transformers'])} {e['unit']} "
                  f"({e['ratio']:.2f}x)", flush=True)
        print(f"  [{time.perf_counter() - case_start:.0f}s, {new[0]['reps']} reps, load "
              f"{timing['load'][0]:.2f}->{timing['load'][1]:.2f}]", flush=True)
    info["loadavg_end"] = os.getloadavg()
    info["seconds"] = time.perf_counter() - start
    report = dict(machine=info, entries=entries)
    cli.atomic_write(out / "bench.json", json.dumps(report, indent=2) + "\n")
    print()
    print(table(entries))
    print(f"\n{len(entries)} entries in {info['seconds']:.0f}s, load average {info['loadavg_start'][0]:.2f} at start, "
          f"{info['loadavg_end'][0]:.2f} at end -> {out / 'bench.json'}")
    return entries


def command_line(argv: list[str]) -> None:
    # OUT/bench.json is written whole at the end: an interrupted run leaves none
    with on_stop("no bench result was written (OUT/bench.json is written at the end)"):
        main(argv)


if __name__ == "__main__":
    run_main(command_line, "the shapes are the issue's and fixed: --quick=1 runs tiny ones, --only=NAME one case")
