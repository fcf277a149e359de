"""The teachers and their rationales (paper §3.2, Eq. 1): the teacher kinds, the rationale cache, `rationales`.

    python tinyllm.py rationales --dataset=obqa --teachers="flan-t5-xl=release:flan-t5-xl llama-2=release:llama-2"

Every teacher m writes one rationale per training example i, seeing the question, the options, the
gold answer and in-context examples: R_i^m = T^m(Q_i, O_i, A_i, P_i) (Eq. 1, teacher-forcing CoT).
Rationales are made once and cached, one JSON-lines file per (dataset, teacher); train.py reads them
with `load_rationales`. Teacher sources (`--teachers="name=source ..."`, read by `parse_teachers`):

    release:flan-t5-xl | release:llama-2    the paper's published rationales (nothing is generated)
    org/name[@revision] | /a/local/folder   a model run here with t5.py / llama.py (config.json model_type)
    openai:BASE_URL#MODEL                   an OpenAI-compatible server, /v1/chat/completions (chat models)
    openai-completions:BASE_URL#MODEL       the same, /v1/completions: the prompt as is (base models)

A new kind of teacher is one small class with one method, `generate(jobs) -> list[str | Exception]`,
and one line in TEACHER_KINDS. The paper's experiments (sweep, fractions, ablations) are eval.py's.

References: TinyLLM (Tian et al., arXiv 2402.04616); the OpenAI HTTP API (`/v1/completions`,
`/v1/chat/completions`).
"""
import collections
import contextlib
import json
import os
import re
import sys
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests
import torch
import torch.distributed as dist
from torch import Tensor

import cli
import data
import llama
import prompts
import t5
from cli import (BOOL, Progress, UserError, above, at_least, atomic_write, flag, fraction, on_stop, one_of,
                 parse_flags, run_main, some_of)
from data import load_model


# ---- the rationale cache ----------------------------------------------------------------------
# One append-only JSON-lines file per (dataset, teacher): {cache}/{dataset}/{teacher}.jsonl, and under
# torchrun one shard per rank, {teacher}.rank{r}.jsonl, merged on read. A record per (split, id);
# when one is made again (its prompt changed, or it failed before) the newer record ("time") wins on
# read, and a single-process run ends by compacting the files into one, one record per example.

def cache_file(cache_dir: str | Path, dataset: str, teacher: str, rank: int | None = None) -> Path:
    name = f"{teacher}.jsonl" if rank is None else f"{teacher}.rank{rank}.jsonl"
    return Path(cache_dir) / dataset / name


def cache_files(cache_dir: str | Path, dataset: str, teacher: str) -> list[Path]:
    main = cache_file(cache_dir, dataset, teacher)
    shards = sorted(main.parent.glob(f"{teacher}.rank*.jsonl"),
                    key=lambda p: int(re.search(r"\.rank(\d+)\.jsonl$", p.name).group(1)))
    return ([main] if main.exists() else []) + shards


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The records of one cache file and the byte length of its good part. A torn last line (a
    crash in the middle of a write) is dropped; a bad line before the last one is an error."""
    content = path.read_bytes()
    lines = content.splitlines(keepends=True)
    records, good = [], 0
    for line_number, line in enumerate(lines, 1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            records.append(json.loads(line))
        except ValueError as e:
            if line_number == len(lines):
                break
            raise UserError(f"{path}:{line_number}: not a JSON record ({e}); the cache file is damaged: delete that "
                            "line (or the file) and rerun `make rationales` to make what is missing") from e
        good += len(line)
    return records, good


def read_cache(cache_dir: str | Path, dataset: str, teacher: str) -> dict[tuple[str, str], dict]:
    """(split, id) -> the newest record, errors included, over the main file and its rank shards."""
    newest: dict[tuple[str, str], dict] = {}
    for path in cache_files(cache_dir, dataset, teacher):
        for line_number, record in enumerate(read_jsonl(path)[0], 1):
            if record.get("teacher") != teacher:  # a file copied or renamed from another teacher's
                raise UserError(f"{path}:{line_number}: a record of teacher {record.get('teacher')!r}, but this is "
                                f"teacher {teacher!r}'s cache file: move it back to "
                                f"{record.get('teacher')}.jsonl, or delete it and rerun `make rationales`")
            key = (record["split"], record["id"])
            if key not in newest or record["time"] >= newest[key]["time"]:
                newest[key] = record
    return newest


def load_rationales(cache_dir: str | Path, dataset: str, teacher: str, split: str = "train",
                    source: str | None = None) -> dict[str, dict]:
    """Example id -> record of one teacher's rationales for one split. Records whose generation
    failed (`error` set) are left out: they hold no rationale. With `source`, every record must have
    been made by that teacher source (the rationales of another model are never trained on silently)."""
    records = {id_: record for (record_split, id_), record in read_cache(cache_dir, dataset, teacher).items()
               if record_split == split and record["error"] is None}
    others = sorted({record["source"] for record in records.values()} - {source}) if source is not None else []
    if others:
        raise UserError(f"{cache_file(cache_dir, dataset, teacher)}: rationales made by {', '.join(others)}, but "
                        f"TEACHERS says {teacher}={source}: run `make rationales` with these TEACHERS to remake "
                        f"them, or give {teacher} the source the cache was made with")
    return records


class CacheWriter:
    """Appends records to one cache file: one write + flush + fsync per batch, so a crash loses at
    most the batch in flight (and a torn line that readers drop). The file is opened at the first
    record, so a teacher that fails at once leaves no empty file behind."""

    def __init__(self, path: Path):
        if path.exists():
            _, good = read_jsonl(path)
            if good < path.stat().st_size:  # cut a torn last line, or the next record would join it
                with open(path, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
        self.path = path
        self.file: typing.BinaryIO | None = None

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "ab", buffering=0)
        content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        view = memoryview(content)
        try:
            while view:
                view = view[self.file.write(view):]
            os.fsync(self.file.fileno())
        except OSError as error:  # a full disk: name the file (readers drop the torn line it may leave)
            error.filename = error.filename or str(self.path)
            raise

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def compact_cache(cache_dir: str | Path, dataset: str, teacher: str) -> None:
    """Rewrite the main file with the newest record per example and remove the rank shards, when
    there is anything to drop (superseded records, a torn line, shards). Atomic."""
    paths = cache_files(cache_dir, dataset, teacher)
    if not paths:  # nothing made (a teacher that failed at once): no empty file either
        return
    newest = read_cache(cache_dir, dataset, teacher)
    main = cache_file(cache_dir, dataset, teacher)
    if paths == [main] and main.stat().st_size == sum(
            len(json.dumps(r, ensure_ascii=False)) + 1 for r in newest.values()):
        return
    atomic_write(main, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in newest.values()))
    for path in paths:
        if path != main:
            path.unlink()


# ---- teachers ---------------------------------------------------------------------------------
# A teacher is built as Kind(spec, cfg, device) and has one method: generate(jobs) -> one item per
# job, the raw text, or an Exception that is recorded as that example's error (a rerun tries it
# again). A TeacherUnavailable item (or exception raised) is not recorded: the batch is saved and
# that teacher's run ends with its message. Optional attributes: `batch_size` (jobs per call, default --batch_size),
# `prompted = False` for teachers that take no prompt, `tokens` (generated so far, for the progress).

@dataclass(frozen=True)
class Job:
    """One rationale to make: R_i^m for example i of a split (Eq. 1)."""
    split: str
    example: data.Example
    prompt: str


class TeacherUnavailable(Exception):
    """The teacher cannot go on (a server that stays down, a wrong URL); everything done is kept."""


class LocalTeacher:
    """A model run here with t5.py / llama.py: a hub id or a local folder. Greedy by default; bf16
    on CUDA; instruction-tuned decoder-only models (their tokenizer has a chat template) get the
    prompt as a user message in it."""
    prompted = True

    def __init__(self, source: str, cfg: "RationalesConfig", device: str):
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.model, self.tokenizer, self.kind = load_model(source, dtype=dtype, device=device)
        self.model.eval()
        self.device, self.cfg = device, cfg
        self.chat = self.kind == "llama" and self.tokenizer.chat_template is not None
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.generator = torch.Generator(device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
        self.tokens = 0  # generated tokens, for the progress line

    def encode(self, prompt: str) -> list[int]:
        if self.kind == "t5":
            return self.tokenizer.encode(prompt)
        if self.chat:  # the rendered template holds its own BOS text, as transformers tokenizes it
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(text, bos=False)
        return self.tokenizer.encode(prompt, bos=True)

    def generate(self, jobs: list[Job]) -> list[str | Exception]:
        results: list[str | Exception] = [""] * len(jobs)
        for i, output in self.stream(jobs):
            results[i] = output
        return results

    @torch.inference_mode()
    def stream(self, jobs: list[Job]) -> typing.Iterator[tuple[int, str | Exception]]:
        """(job index, rationale) as rows finish: continuous batching over all of `jobs` with --batch_size rows
        (a finished row takes the next prompt at once); a prompt too long for the model is an error record."""
        cfg = self.cfg
        encoded = [self.encode(job.prompt) for job in jobs]
        fits = []
        for i, ids in enumerate(encoded):
            if self.max_positions is not None and len(ids) + cfg.max_new_tokens > self.max_positions:
                yield i, ValueError(f"prompt of {len(ids)} tokens + max_new_tokens {cfg.max_new_tokens} exceeds the "
                                    f"model's {self.max_positions} positions")
            else:
                fits.append(i)
        if not fits:
            return
        rows, device = min(cfg.batch_size, len(fits)), torch.device(self.device)
        prompts_ = [encoded[i] for i in fits]
        if self.kind == "t5":
            slots = t5.Slots(self.model, rows, cfg.max_new_tokens, max(len(p) for p in prompts_), device)
            eos_ids = {self.tokenizer.eos_id}
        else:
            slots = llama.Slots(self.model, rows, max(len(p) for p in prompts_) + cfg.max_new_tokens, device)
            eos_ids = set(self.tokenizer.eos_ids)
        compiled = compile_slots(slots) if cfg.compile else None
        sample = lambda logits: sample_token(logits, cfg.temperature, cfg.top_p, self.generator)  # noqa: E731
        for j, ids in continuous_generate(slots, prompts_, [cfg.max_new_tokens] * len(prompts_), eos_ids, sample):
            self.tokens += len(ids)
            yield fits[j], self.tokenizer.decode(ids)
        if compiled is not None:
            print(f"--compile=1: {compiled.summary()}", flush=True)


def sample_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Next token (B,) from logits (B, vocab), for either teacher kind: argmax when temperature is 0, else
    nucleus sampling (the smallest set of tokens whose probability mass reaches top_p; the top token always
    survives) at that temperature."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) > top_p] = 0.0  # the mass before it reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # argmax(p / E) with E ~ Exp(1) samples from p (an exponential race), without multinomial's host sync
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


DECODE_WIDTH_MULTIPLE = 64  # a compiled decode step reads the cache in widths of this many slots: a few shapes


def compile_slots(slots: llama.Slots | t5.Slots) -> llama.Compiled:
    """--compile=1: a local teacher's one-token decode step through torch.compile, as gpt-fast compiles its
    decode step (prefill stays eager), reading the cache in widths rounded up to DECODE_WIDTH_MULTIPLE so a
    run compiles a few shapes; on CUDA replayed as CUDA graphs (reduce-overhead): a step is many small kernels
    launched from the host."""
    mode = "reduce-overhead" if slots.device.type == "cuda" else None
    slots.forward = compiled = llama.Compiled(slots.logits, mode)
    slots.width_multiple = DECODE_WIDTH_MULTIPLE
    return compiled


def continuous_generate(slots, prompts_: list[list[int]], limits: list[int], eos_ids: set[int],
                        sample: typing.Callable[[Tensor], Tensor]) -> typing.Iterator[tuple[int, list[int]]]:
    """Continuous batching over `prompts_` with a model's Slots (llama.Slots, t5.Slots): every step feeds one
    token per row; a row whose output ended (an EOS, kept, or its limit) is yielded as (prompt index, new
    ids) and takes the next waiting prompt, so the batch stays full until the queue is empty. Then the
    finished rows are dropped, once they are a quarter of the batch, so the tail costs only what still
    runs. Greedy output is that of decoding each prompt alone."""
    queue = collections.deque(range(len(prompts_)))
    owner: list[int | None] = [None] * slots.rows  # prompt index of each row
    outputs: dict[int, list[int]] = {}

    def admit(rows: list[int]) -> None:
        taken = [queue.popleft() for _ in range(min(len(rows), len(queue)))]
        if taken:
            slots.admit(rows[:len(taken)], [prompts_[i] for i in taken])
            for row, i in zip(rows, taken):
                owner[row], outputs[i] = i, []

    admit(list(range(slots.rows)))
    while any(i is not None for i in owner):
        tokens = sample(slots.step())  # (rows,)
        slots.feed(tokens)
        finished = []
        for row, token in enumerate(tokens.tolist()):  # the step's one host sync
            i = owner[row]
            if i is None:
                continue
            outputs[i].append(token)
            if token in eos_ids or len(outputs[i]) >= limits[i]:
                yield i, outputs.pop(i)
                owner[row] = None
                slots.retire(row)
                finished.append(row)
        if queue:
            admit(finished)
        elif finished:
            live = [row for row, i in enumerate(owner) if i is not None]
            if live and len(live) <= 0.75 * len(owner):
                slots.keep(live)
                owner = [owner[row] for row in live]


class MalformedResponse(ValueError):
    """A 200 answer that is not an OpenAI response at all (not JSON, no choice): it says nothing about
    the example (a proxy's page, a server of another kind), so it is retried like a 5xx."""


class OpenAITeacher:
    """An OpenAI-compatible server (vLLM, llama.cpp server, ollama, ...): `openai:BASE_URL#MODEL`
    posts to BASE_URL/v1/chat/completions with the prompt as one user message (chat models);
    `openai-completions:BASE_URL#MODEL` posts the prompt as is to BASE_URL/v1/completions (base
    models). BASE_URL may end in /v1 or not. `concurrency` requests at a time, each with `timeout`;
    connection errors, timeouts, 429, 5xx and answers that break the protocol (not JSON, no choice)
    are retried `retries` times with exponential backoff; a server still failing after that ends the
    run (TeacherUnavailable). OPENAI_API_KEY, when set, is sent as the bearer token."""
    prompted = True
    chat = True

    def __init__(self, spec: str, cfg: "RationalesConfig", device: str):
        base, _, model = spec.partition("#")
        if not base.startswith(("http://", "https://")) or not model:
            raise UserError(f"teacher source {spec!r}: expected BASE_URL#MODEL, e.g. "
                            "openai:http://localhost:8000/v1#Qwen/Qwen2.5-7B-Instruct")
        base = base.rstrip("/")
        self.url = (base if base.endswith("/v1") else base + "/v1") + ("/chat/completions" if self.chat else "/completions")
        self.model, self.cfg = model, cfg
        # enough jobs per batch to keep every connection busy between the per-batch fsyncs
        self.batch_size = max(cfg.batch_size, 4 * cfg.concurrency)
        self.down = threading.Event()  # set once the server is given up on: queued requests stop at once
        self.local = threading.local()
        self.lock = threading.Lock()
        self.tokens = 0

    def session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
            if os.environ.get("OPENAI_API_KEY"):
                self.local.session.headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        return self.local.session

    def generate(self, jobs: list[Job]) -> list[str | Exception]:
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            try:
                return list(pool.map(self.request, [job.prompt for job in jobs]))
            except BaseException:  # Ctrl-C: no queued request may still go out while the pool shuts down
                self.down.set()
                pool.shutdown(cancel_futures=True)
                raise

    def request(self, prompt: str) -> str | Exception:
        cfg = self.cfg
        body = {"model": self.model, "max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "top_p": cfg.top_p}
        body.update({"messages": [{"role": "user", "content": prompt}]} if self.chat else {"prompt": prompt})
        problem, wait = "", 0.0
        for attempt in range(cfg.retries + 1):
            if attempt and self.down.wait(min(max(cfg.backoff * 2 ** (attempt - 1), wait), 60.0)):
                break
            if self.down.is_set():
                break
            try:
                response = self.session().post(self.url, json=body, timeout=cfg.timeout)
            except (requests.ConnectionError, requests.Timeout) as e:
                problem = data.request_problem(e)
                continue
            if response.status_code == 429 or response.status_code >= 500:
                problem = f"HTTP {response.status_code}: {response.text[:200]!r}"
                retry_after = response.headers.get("Retry-After", "")
                wait = float(retry_after) if retry_after.isdigit() else 0.0  # the server's own advice
                continue
            if response.status_code in (401, 403, 404):  # the same answer for every example: stop
                self.down.set()
                return TeacherUnavailable(f"{self.url} answered HTTP {response.status_code} "
                                          f"({response.text[:200]!r}); check the URL, the model name "
                                          f"{self.model!r} and OPENAI_API_KEY")
            if response.status_code != 200:  # e.g. 400 for a prompt over the context length
                return ValueError(f"HTTP {response.status_code}: {response.text[:300]}")
            text = self.text(response)
            if not isinstance(text, MalformedResponse):
                return text
            problem = f"HTTP 200 with {text}: {response.text[:200]!r}"  # a proxy's page, a broken server
        self.down.set()
        return TeacherUnavailable(f"{self.url} still failing after {cfg.retries + 1} attempts: "
                                  f"{problem or 'another request gave up on the server'}; check the server "
                                  "(or raise --retries, --backoff, --timeout)")

    def text(self, response: requests.Response) -> str | Exception:
        """The text of a 200 answer, a per-example error, or a MalformedResponse."""
        try:
            body = response.json()
        except ValueError:
            return MalformedResponse("a body that is not JSON")
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices:
            return MalformedResponse("no choices in the response")
        try:
            choice = choices[0]
            text = choice["message"]["content"] if self.chat else choice["text"]
        except (KeyError, TypeError) as e:
            return MalformedResponse(f"a malformed choice ({type(e).__name__}: {e})")
        if not isinstance(text, str) or not text.strip():
            return ValueError(f"response has no text: {response.text[:300]!r}")
        usage = body.get("usage") if isinstance(body, dict) else None
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            with self.lock:
                self.tokens += usage["completion_tokens"]
        return text


class OpenAICompletionsTeacher(OpenAITeacher):
    """`openai-completions:BASE_URL#MODEL`: the prompt as is, to /v1/completions (base models)."""
    chat = False


class ReleaseTeacher:
    """The paper's published rationales (`release:flan-t5-xl`, `release:llama-2`), read through
    data.load_release_rationales and split by prompts.parse_release; nothing is generated. The
    release has no LLaMA-2 rationales for PIQA: those examples are recorded as errors, never invented."""
    prompted = False
    PAPER_TEACHERS = ("flan-t5-xl", "llama-2")  # the order of parse_release's pair

    def __init__(self, spec: str, cfg: "RationalesConfig", device: str):
        if spec not in self.PAPER_TEACHERS:
            raise UserError(f"teacher source release:{spec}: the release has {', '.join(self.PAPER_TEACHERS)}")
        self.which, self.cfg = spec, cfg
        self.batch_size = 4096  # reading, not generating: few, large fsynced batches
        self.release: dict[str, tuple[dict[str, int], list[str]]] = {}

    def aligned(self, split: str) -> tuple[dict[str, int], list[str]]:
        """(example id -> position in the split file, the release strings in that order)."""
        if split not in self.release:
            examples = data.load_split(self.cfg.dataset, split, self.cfg.data)
            raw = data.load_release_rationales(self.cfg.dataset, split, self.cfg.data)  # checks the count
            self.release[split] = ({e.id: n for n, e in enumerate(examples)}, raw)
        return self.release[split]

    def generate(self, jobs: list[Job]) -> list[str | Exception]:
        results: list[str | Exception] = []
        for job in jobs:
            positions, raw = self.aligned(job.split)
            try:
                pair = prompts.parse_release(raw[positions[job.example.id]], job.example)
            except ValueError as e:
                results.append(e)
                continue
            text = pair[self.PAPER_TEACHERS.index(self.which)]
            results.append(text if text is not None else ValueError(
                f"the paper's release has no {self.which} rationale for {self.cfg.dataset} "
                f"{job.split} example {job.example.id}"))
        return results


# kind prefix of a teacher source -> class(spec after the prefix, cfg, device); no prefix: LocalTeacher
TEACHER_KINDS = {
    "release": ReleaseTeacher,
    "openai": OpenAITeacher,
    "openai-completions": OpenAICompletionsTeacher,
}


def teacher_kind(source: str) -> tuple[type, str]:
    kind, sep, spec = source.partition(":")
    if sep and kind in TEACHER_KINDS:
        return TEACHER_KINDS[kind], spec
    if sep and re.fullmatch(r"[a-z][\w-]*", kind) and not Path(source).exists():  # hub ids have no ":"
        raise UserError(f"--teachers: {source!r}: unknown teacher kind {kind!r}; the kinds are "
                        f"{', '.join(k + ':' for k in TEACHER_KINDS)}, or a hub id / local folder")
    return LocalTeacher, source


def check_teacher(cfg: "RationalesConfig", name: str, source: str) -> None:
    """A teacher's source, before any teacher starts: its kind and what can be checked without loading it or
    asking a server (the release's teacher names, a server's BASE_URL#MODEL, a local folder's model files)."""
    teacher_cls, spec = teacher_kind(source)
    try:
        if teacher_cls is LocalTeacher:
            if (Path(spec) / "config.json").is_file():
                data.check_model_files(Path(spec))
        else:
            teacher_cls(spec, cfg, "cpu")  # these constructors only read their spec
    except UserError as e:
        raise UserError(f"--teachers: {name}={source}: {e}") from e


# ---- the `rationales` command -----------------------------------------------------------------

TEACHERS_RULE = cli.Rule("name=source ..., at least one, names distinct",
                          lambda value: parse_teachers(value) and None, empty_is_value=True)


@dataclass
class RationalesConfig:
    """`python tinyllm.py rationales`: every teacher's rationales into CACHE (§3.2, Eq. 1)."""
    dataset: str = flag("obqa", one_of(*data.DATASETS))  # the benchmark (§4.1)
    teachers: str = flag("flan-t5-xl=release:flan-t5-xl llama-2=release:llama-2", TEACHERS_RULE)  # name=source ...
    data: str = "data"  # the datasets' folder (downloaded and checksummed on first use)
    cache: str = "cache"  # the rationale cache: CACHE/<dataset>/<teacher>.jsonl
    limit: int = flag(0, at_least(0))  # first N examples of each split (0 = all)
    splits: str = flag("train", some_of("train", "valid"))  # the splits to make rationales for
    device: str = "auto"  # auto = cuda when available, else cpu
    k: int = flag(2, at_least(0))  # in-context examples per prompt (0 = none)
    seed: int = 0  # picks the in-context examples (and seeds sampling)
    teacher_forcing: bool = True  # §3.2: the teacher sees the gold answer
    max_new_tokens: int = flag(128, at_least(1))  # the longest rationale, in tokens
    temperature: float = flag(0.0, at_least(0))  # 0 = greedy
    top_p: float = flag(1.0, fraction())  # nucleus sampling when temperature > 0
    batch_size: int = flag(8, at_least(1))  # prompts per forward pass of a local teacher
    compile: int = flag(0, BOOL)  # 1: a local teacher's one-token decode step through torch.compile (off: see README)
    concurrency: int = flag(8, at_least(1))  # requests in flight to a server teacher
    timeout: float = flag(120.0, above(0))  # seconds per server request
    retries: int = flag(5, at_least(0))  # further attempts on connection errors, timeouts, 429, 5xx, non-OpenAI answers
    backoff: float = flag(1.0, at_least(0))  # seconds before the first retry, doubled at each


def parse_teachers(spec: str, sources: bool = True) -> list[tuple[str, str]]:
    """--teachers="name=source ..." -> [(name, source), ...], every script's reading of it. sources=False is
    train.py's: a bare name is allowed (source "": the cache's source is then not checked), and so is no
    teacher at all (fine-tuning needs none)."""
    teachers: list[tuple[str, str]] = []
    for item in spec.split():
        name, sep, source = item.partition("=")
        bare = not sep and not sources
        if not (bare or source) or not re.fullmatch(r"[\w.-]+", name):
            raise UserError(f"--teachers: {item!r} is not name=source (name of letters, digits, _ . -)")
        if name in dict(teachers):
            raise UserError(f"--teachers: teacher name {name!r} given twice")
        teachers.append((name, source))
    if not teachers and sources:
        raise UserError("--teachers: no teacher given (name=source ...)")
    return teachers


def teacher_names(spec: str, sources: bool = True) -> list[str]:
    """The teacher names of --teachers, in order (parse_teachers without the sources)."""
    return [name for name, _ in parse_teachers(spec, sources)]


def summarize(name: str, cache: dict[tuple[str, str], dict], split: str, examples: list) -> tuple[str, int]:
    """One line per teacher and split: count, empty/degenerate, mean length, errors, and how often
    the teacher's stated answer agrees with the gold one where it states one. Returns (line, count)."""
    records = [cache[(split, e.id)] for e in examples if (split, e.id) in cache]
    gold = {e.id: e.answer for e in examples}
    good = [r for r in records if r["error"] is None]
    empty = sum(1 for r in good if not r["rationale"].strip())
    degenerate = sum(1 for r in good if r["degenerate"])
    words = sum(len(r["rationale"].split()) for r in good) / max(len(good), 1)
    stated = [r for r in good if r["stated_answer"] is not None]
    agree = sum(1 for r in stated if r["stated_answer"] == gold[r["id"]])
    errors = [r for r in records if r["error"] is not None]
    line = (f"{name} {split}: {len(good)}/{len(examples)} rationales, {empty} empty, {degenerate} degenerate, "
            f"mean {words:.1f} words, stated answer = gold {agree}/{len(stated)}"
            + (f" ({100 * agree / len(stated):.1f}%)" if stated else ""))
    if errors:
        line += f", {len(errors)} errors (first: {errors[0]['error']})"
    return line, len(good)


def make_jobs(cfg: RationalesConfig, prompted: bool, examples: dict[str, list], pool: list) -> list[Job]:
    """A job per example; the prompt is built only for teachers that take one (§3.2 teacher-forcing
    CoT with k in-context examples from the training set, deterministic from (seed, example id))."""
    jobs = []
    for split, split_examples in examples.items():
        for example in split_examples:
            prompt = ""
            if prompted:
                context = data.in_context_examples(example, pool, k=cfg.k, seed=cfg.seed) if cfg.k else []
                prompt = prompts.teacher_prompt(example, context, teacher_forcing=cfg.teacher_forcing)
            jobs.append(Job(split, example, prompt))
    return jobs


def is_stale(record: dict | None, source: str, settings: dict, prompt_sha256: str | None) -> bool:
    """The cache's remake rule: an example's rationale is made (again) when it has no record, its record is an
    error, or the record was made from another source, with other settings (k, seed, teacher forcing, decoding;
    a release record: another cleaning), or from another prompt (the sha256 of the prompt text; None for a
    teacher that takes no prompt). Otherwise the cached record stands."""
    return (record is None or record["error"] is not None or record["source"] != source
            or record["settings"] != settings or record["prompt_sha256"] != prompt_sha256)


def run_teacher(cfg: RationalesConfig, name: str, source: str, examples: dict[str, list], pool: list,
                device: str, rank: int, world_size: int) -> str | None:
    """Make what is missing or stale of one teacher's rationales; None, or why it stopped early."""
    teacher_cls, spec = teacher_kind(source)
    prompted = getattr(teacher_cls, "prompted", True)
    # A release record is only the cleaned text: a new clean_rationale makes it stale (a live teacher's is kept).
    settings = {"release": spec, "cleaning": prompts.CLEANING} if not prompted else dict(
        k=cfg.k, seed=cfg.seed, teacher_forcing=cfg.teacher_forcing, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p)
    jobs = make_jobs(cfg, prompted, examples, pool)
    jobs = jobs[rank::world_size]  # positions, not what is missing: every rank agrees without talking
    cached = read_cache(cfg.cache, cfg.dataset, name)
    todo = [job for job in jobs if is_stale(cached.get((job.split, job.example.id)), source, settings,
                                            prompts.prompt_sha256(job.prompt) if prompted else None)]
    print(f"{name} ({source}): {len(jobs) - len(todo)} cached, {len(todo)} to make"
          + (f" on rank {rank}/{world_size}" if world_size > 1 else ""), file=sys.stderr, flush=True)
    if not todo:
        return None
    try:
        teacher = teacher_cls(spec, cfg, device)
    except UserError as e:  # a model that is not there, or not one we read: say which teacher
        raise UserError(f"--teachers: {name}={source}: {e}") from e
    # longest prompts first: little padding per batch, and out-of-memory shows at once
    todo.sort(key=lambda job: -len(job.prompt))
    writer = CacheWriter(cache_file(cfg.cache, cfg.dataset, name, rank if world_size > 1 else None))
    progress = Progress(name, len(todo), unit="rationales")
    try:
        batch_size = getattr(teacher, "batch_size", cfg.batch_size)
        for batch, outputs in output_batches(teacher, todo, batch_size):
            assert len(outputs) == len(batch), f"{name}: {len(outputs)} outputs for {len(batch)} jobs"
            records, stop = [], None
            for job, output in zip(batch, outputs):
                if isinstance(output, TeacherUnavailable):
                    stop = stop or str(output)
                    continue
                records.append(make_record(name, source, settings, job, output, prompted))
            writer.write(records)
            progress.update(len(records), getattr(teacher, "tokens", None))
            if stop is not None:
                return f"{name}: {stop}"
    except TeacherUnavailable as e:
        return f"{name}: {e}"
    finally:
        writer.close()
    return None


def output_batches(teacher, todo: list[Job], batch_size: int) -> typing.Iterator[tuple[list[Job], list]]:
    """(jobs, their outputs) in groups of `batch_size`, each written to the cache as it comes: from
    teacher.generate per group, or, for a teacher with `stream(jobs)` (a local model decoding with continuous
    batching over the whole queue), in the order its rows finish."""
    if not hasattr(teacher, "stream"):
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            yield batch, teacher.generate(batch)
        return
    done: list[tuple[Job, str | Exception]] = []
    for index, output in teacher.stream(todo):
        done.append((todo[index], output))
        if len(done) == batch_size:
            yield [job for job, _ in done], [output for _, output in done]
            done = []
    if done:
        yield [job for job, _ in done], [output for _, output in done]


def make_record(name: str, source: str, settings: dict, job: Job, output: str | Exception,
                prompted: bool) -> dict:
    error = None if isinstance(output, str) else f"{type(output).__name__}: {output}"
    raw = output if error is None else ""
    rationale = prompts.clean_rationale(raw, job.prompt) if error is None else ""
    return dict(split=job.split, id=job.example.id, teacher=name, source=source,
                prompt_sha256=prompts.prompt_sha256(job.prompt) if prompted else None,
                rationale=rationale, raw=raw, settings=settings,
                stated_answer=prompts.stated_answer(rationale, list(job.example.options)) if error is None else None,
                degenerate=prompts.is_degenerate(rationale) if error is None else False,
                error=error, time=time.time())


def rationales(cfg: RationalesConfig) -> None:
    """Fill the cache with every teacher's rationales for the chosen splits, then print a summary."""
    cli.check_flags(cfg)  # a config made in code (the ablations') is checked as a parsed one is
    splits = cli.split_list(cfg.splits)
    teachers = parse_teachers(cfg.teachers)
    # every teacher before the first starts: its kind and source, and the cache folder
    for name, source in teachers:
        check_teacher(cfg, name, source)
    cli.check_folder(Path(cfg.cache) / cfg.dataset, "--cache")
    # Under torchrun the ranks meet once, at the end, after generating for very different times: gloo's
    # barrier, whose timeout is longer than NCCL's and which needs no GPU communicator.
    rank, world_size, device = cli.setup_distributed(cfg.device, backend="gloo")
    # One writer per cache file, for the whole command: the file this rank appends to, and on the first rank the
    # main file too (compacted at the end). A second `make rationales` on the same cache stops here.
    with contextlib.ExitStack() as locks:
        for name, _ in teachers:
            for path in {cache_file(cfg.cache, cfg.dataset, name, rank if world_size > 1 else None),
                         *([cache_file(cfg.cache, cfg.dataset, name)] if rank == 0 else [])}:
                locks.enter_context(cli.file_lock(path))
        fill_cache(cfg, teachers, splits, rank, world_size, device)


def fill_cache(cfg: RationalesConfig, teachers: list[tuple[str, str]], splits: list[str], rank: int,
               world_size: int, device: torch.device) -> None:
    """rationales' work, under its locks: every teacher's missing rationales, then the summary."""
    distributed = dist.is_initialized()
    examples = {split: data.load_split(cfg.dataset, split, cfg.data, limit=cfg.limit or None) for split in splits}
    # in-context examples come from the whole training set, so --limit does not change the prompts
    pool = data.load_split(cfg.dataset, "train", cfg.data)
    # Ctrl-C: every batch already written is fsynced; the next run makes only what is missing
    with on_stop(f"the rationales made so far are kept in {Path(cfg.cache) / cfg.dataset}/; the same "
                        "command makes only the missing ones"):
        stopped = [why for name, source in teachers
                   if (why := run_teacher(cfg, name, source, examples, pool, str(device), rank, world_size))]
    if distributed:  # wait for every rank before the summary
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        if stopped:
            raise UserError("\n".join(stopped))
        return
    empty_teachers = []
    for name, source in teachers:
        if world_size == 1 or distributed:
            compact_cache(cfg.cache, cfg.dataset, name)
        cached = read_cache(cfg.cache, cfg.dataset, name)
        for split in splits:
            line, count = summarize(name, cached, split, examples[split])
            print(line, flush=True)
            if count == 0 and examples[split]:
                empty_teachers.append(f"{name}: no rationale for any {cfg.dataset} {split} example")
    print(f"cache: {cache_file(cfg.cache, cfg.dataset, '*')}", flush=True)
    if stopped or empty_teachers:
        kept = "; everything made so far is kept in the cache, rerun to continue" if stopped else ""
        raise UserError("\n".join(stopped + empty_teachers) + kept)


def main(argv: list[str]) -> None:
    command = argv[0] if argv else ""
    if command in ("--help", "-h", "help"):
        print(f"usage: python tinyllm.py rationales [--key=value ...]: {rationales.__doc__}\n"
              "`python tinyllm.py rationales --help` lists its flags; the experiments are experiments.py's")
        return
    if command != "rationales":
        unknown = f"unknown command {command!r}; " if command else ""
        raise UserError(f"{unknown}usage: python tinyllm.py rationales --key=value ... (--help)")
    rationales(parse_flags(RationalesConfig, argv[1:], command))


if __name__ == "__main__":
    run_main(main, "lower --batch_size (prompts per forward pass of a local teacher) or --max_new_tokens")
