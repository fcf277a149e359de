"""TinyLLM pipeline entry point: teacher rationales into a file cache (paper §3.2, Eq. 1), and the
paper's experiments over train.py and eval.py runs, one command each.

    python tinyllm.py rationales --dataset=obqa --teachers="flan-t5-xl=release:flan-t5-xl llama-2=release:llama-2"
    python tinyllm.py sweep --dataset=obqa --alphas="0.01 0.1 0.5 1 2 3"      # α per teacher (§4.1, Fig. 3)
    python tinyllm.py fractions --dataset=obqa --methods="tinyllm dss finetune"  # less training data (Fig. 2)
    python tinyllm.py ablations --dataset=obqa                                 # Table 2's rows

Every teacher m writes one rationale per training example i, seeing the question, the options, the
gold answer and in-context examples: R_i^m = T^m(Q_i, O_i, A_i, P_i) (Eq. 1, teacher-forcing CoT).
Rationales are made once and cached, one JSON-lines file per (dataset, teacher); train.py reads them
with `load_rationales`. Teacher sources (`--teachers="name=source ..."`):

    release:flan-t5-xl | release:llama-2    the paper's published rationales (nothing is generated)
    org/name[@revision] | /a/local/folder   a model run here with t5.py / llama.py (config.json model_type)
    openai:BASE_URL#MODEL                   an OpenAI-compatible server, /v1/chat/completions (chat models)
    openai-completions:BASE_URL#MODEL       the same, /v1/completions: the prompt as is (base models)

A new kind of teacher is one small class with one method, `generate(jobs) -> list[str | Exception]`,
and one line in TEACHER_KINDS.

References: TinyLLM (Tian et al., arXiv 2402.04616); the Hugging Face hub's file layout
`/{repo}/resolve/{revision}/{file}`; the OpenAI HTTP API (`/v1/completions`, `/v1/chat/completions`).
"""
import ast
import collections
import dataclasses
import difflib
import errno
import fcntl
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import re
import shlex
import sys
import threading
import time
import tokenize
import traceback
import typing
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests
import torch
from torch import Tensor, nn

import data
import llama
import prompts
import t5
from data import Progress, UserError, format_seconds, interrupt_note  # noqa: F401 (the scripts' shared helpers)


# ---- files: atomic writes ---------------------------------------------------------------------

def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list, so that a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, content: bytes) -> None:
    """Temp file in the same folder + fsync + os.replace: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:  # a full disk, Ctrl-C: no temp file left behind
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)
        raise
    fsync_path(path.parent)


# ---- models: hub download and loading ---------------------------------------------------------

HUB_ID = re.compile(r"^([\w.-]+)/([\w.-]+)(?:@([\w.-]+))?$")
HUB_CONFIG = "config.json"
HUB_OPTIONAL = ("generation_config.json", "spiece.model", "tokenizer.model", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TOKENIZER_FILES = ("spiece.model", "tokenizer.model", "tokenizer.json")
DOWNLOAD_ATTEMPTS = 4


def tinyllm_home() -> Path:
    return Path(os.environ.get("TINYLLM_HOME") or Path.home() / ".cache" / "tinyllm")


def resolve_model(source: str) -> Path:
    """A local folder as is; a hub id `org/name[@revision]` (revision default `main`) is downloaded
    once, with requests, from HF_ENDPOINT (default https://huggingface.co) with HF_TOKEN, into
    $TINYLLM_HOME/hub/<org>--<name>/<revision>/ and read from there afterwards, offline."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    match = HUB_ID.match(source)
    if match is None:
        raise UserError(f"model {source!r}: not a folder, and not a hub id org/name[@revision]")
    org, name, revision = match.group(1), match.group(2), match.group(3) or "main"
    folder = tinyllm_home() / "hub" / f"{org}--{name}" / revision
    if (folder / ".complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # torchrun ranks asking for the same model: one downloads
        if not (folder / ".complete").exists():
            download_snapshot(f"{org}/{name}", revision, folder)
    return folder


def download_snapshot(repo: str, revision: str, folder: Path) -> None:
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    session = requests.Session()
    if os.environ.get("HF_TOKEN"):
        # requests drops this header on a redirect to another host (the hub's CDN), as it should
        session.headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    what = f"{repo}@{revision}"

    def fetch(filename: str, required: bool) -> bool:
        url = f"{endpoint}/{repo}/resolve/{revision}/{filename}"
        return download_file(session, url, folder / filename, required, what)

    fetch(HUB_CONFIG, required=True)
    for filename in HUB_OPTIONAL:
        fetch(filename, required=False)
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise UserError(f"{what}: no tokenizer file (one of {', '.join(TOKENIZER_FILES)}) on {endpoint}")
    if fetch("model.safetensors.index.json", required=False):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index.get("weight_map", {}).values()))
        bad = [s for s in shards if Path(s).name != s or not s.endswith(".safetensors")]
        if not shards or bad:
            raise UserError(f"{what}: model.safetensors.index.json has a bad weight_map (shards {bad or shards})")
        for shard in shards:
            fetch(shard, required=True)
    elif not fetch("model.safetensors", required=False):
        raise UserError(f"{what}: neither model.safetensors nor model.safetensors.index.json on "
                        f"{endpoint} (only safetensors checkpoints are read)")
    atomic_write(folder / ".complete", json.dumps({"repo": repo, "revision": revision,
                                                   "endpoint": endpoint}).encode())


def expected_sha256(headers: typing.Mapping[str, str]) -> str | None:
    """The hub sends the sha256 of large (LFS) files as X-Linked-Etag / ETag."""
    for key in ("X-Linked-Etag", "ETag"):
        value = headers.get(key, "").removeprefix("W/").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value
    return None


def download_file(session: requests.Session, url: str, dest: Path, required: bool, what: str) -> bool:
    """`url` into `dest` through data.http_download (a `.part` file resumed with Range requests);
    os.replace makes the file appear only when complete. Connection errors, truncated bodies and 5xx
    are retried, resuming where the last attempt stopped. False for a 404 on an optional file."""
    if dest.exists():  # an interrupted snapshot: files that exist are complete
        return True
    part = dest.with_name(dest.name + ".part")
    for attempt in range(DOWNLOAD_ATTEMPTS):
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))
        try:
            _, headers = data.http_download(url, part, f"{what}: {dest.name}", session)
        except data.DownloadError as e:
            if e.status == 404:
                if not required:
                    return False
                raise UserError(f"{what}: {dest.name} not found (404 from {url}); check the model id "
                                f"(and HF_ENDPOINT)") from e
            if e.status in (401, 403):
                raise UserError(f"{what}: access denied ({e.status} from {url}); gated or private "
                                "models need HF_TOKEN set to a token with access") from e
            problem = str(e)
            continue
        sha256 = expected_sha256(headers)
        if sha256 is not None and data.file_sha256(part) != sha256:
            part.unlink()
            raise UserError(f"{what}: {dest.name} does not match the sha256 {sha256} the server sent")
        os.replace(part, dest)
        fsync_path(dest.parent)
        return True
    raise UserError(f"{what}: download of {url} failed after {DOWNLOAD_ATTEMPTS} attempts: {problem}")




def load_model(source: str, dtype: torch.dtype = torch.float32,
               device: str = "cpu") -> tuple[nn.Module, object, str]:
    """(model, tokenizer, kind) for a hub id or folder: kind "t5" (t5.py) when config.json's
    model_type is t5, else "llama" (llama.py, which names the decoder-only types it reads); never
    guessed from the name."""
    folder = resolve_model(source)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise UserError(f"model {source!r}: {config_path} not found (not a Hugging Face model folder)")
    # t5.py and llama.py import nothing of ours and raise ValueError / FileNotFoundError about the
    # folder (its config, weights, keys, shapes, tokenizer): here, where the user's model enters,
    # they become UserErrors.
    try:
        kind = "t5" if json.loads(config_path.read_text()).get("model_type") == "t5" else "llama"
        model_cls, tokenizer_cls = (t5.T5, t5.Tokenizer) if kind == "t5" else (llama.Llama, llama.Tokenizer)
        model = model_cls.from_pretrained(folder, dtype=dtype, device=device)
    except ValueError as e:  # config values, keys, shapes
        raise UserError(f"{config_path}: {e}") from e
    except FileNotFoundError as e:  # no weights, a missing shard
        raise UserError(f"model {source!r}: {e}") from e
    try:
        tokenizer = tokenizer_cls.from_pretrained(folder)
    except ImportError as e:  # tokenizer.json needs the optional `tokenizers`; the message says how
        raise UserError(f"model {source!r}: {e}") from e
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"model {source!r}: no usable tokenizer: {e}; a checkpoint folder needs the tokenizer "
                        f"files of the model it was trained from (spiece.model, tokenizer.model or tokenizer.json)"
                        ) from e
    return model, tokenizer, kind


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
    for number, line in enumerate(lines, 1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            records.append(json.loads(line))
        except ValueError as e:
            if number == len(lines):
                break
            raise UserError(f"{path}:{number}: not a JSON record ({e}); the cache file is damaged: delete that "
                            "line (or the file) and rerun `make rationales` to make what is missing") from e
        good += len(line)
    return records, good


def read_cache(cache_dir: str | Path, dataset: str, teacher: str) -> dict[tuple[str, str], dict]:
    """(split, id) -> the newest record, errors included, over the main file and its rank shards."""
    newest: dict[tuple[str, str], dict] = {}
    for path in cache_files(cache_dir, dataset, teacher):
        for number, record in enumerate(read_jsonl(path)[0], 1):
            if record.get("teacher") != teacher:  # a file copied or renamed from another teacher's
                raise UserError(f"{path}:{number}: a record of teacher {record.get('teacher')!r}, but this is "
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
    atomic_write(main, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in newest.values()).encode())
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
            if cfg.compile:
                raise UserError("--compile=1: only a LLaMA-family local teacher's decode step compiles (T5's does not yet)")
            slots = t5.Slots(self.model, rows, cfg.max_new_tokens, max(len(p) for p in prompts_), device)
            eos_ids = {self.tokenizer.eos_id}
        else:
            slots = llama.Slots(self.model, rows, max(len(p) for p in prompts_) + cfg.max_new_tokens, device,
                                compile=bool(cfg.compile))
            eos_ids = set(self.tokenizer.eos_ids)
        model_file = t5 if self.kind == "t5" else llama
        sample = lambda logits: model_file.sample(logits, cfg.temperature, cfg.top_p, self.generator)  # noqa: E731
        for j, ids in continuous_generate(slots, prompts_, [cfg.max_new_tokens] * len(prompts_), eos_ids, sample):
            self.tokens += len(ids)
            yield fits[j], self.tokenizer.decode(ids)
        if cfg.compile:
            print(f"--compile=1: {slots.forward.summary()}", flush=True)


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


# ---- the `rationales` command -----------------------------------------------------------------

@dataclass
class RationalesConfig:
    """`python tinyllm.py rationales`: every teacher's rationales into CACHE (§3.2, Eq. 1)."""
    dataset: str = "obqa"  # obqa | arc | piqa | riddle | pubmedqa | bioasq
    teachers: str = "flan-t5-xl=release:flan-t5-xl llama-2=release:llama-2"  # name=source ...
    data: str = "data"  # the datasets' folder (downloaded and checksummed on first use)
    cache: str = "cache"  # the rationale cache: CACHE/<dataset>/<teacher>.jsonl
    limit: int = 0  # first N examples of each split (0 = all)
    splits: str = "train"  # comma-separated, of train, valid
    device: str = "auto"  # auto = cuda when available, else cpu
    k: int = 2  # in-context examples per prompt (0 = none)
    seed: int = 0  # picks the in-context examples (and seeds sampling)
    teacher_forcing: bool = True  # §3.2: the teacher sees the gold answer
    max_new_tokens: int = 128  # the longest rationale, in tokens
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    batch_size: int = 8  # prompts per forward pass of a local teacher
    compile: int = 0  # 1: a LLaMA-family local teacher's one-token decode step through torch.compile (off: see README)
    concurrency: int = 8  # requests in flight to a server teacher
    timeout: float = 120.0  # seconds per server request
    retries: int = 5  # further attempts on connection errors, timeouts, 429, 5xx, non-OpenAI answers
    backoff: float = 1.0  # seconds before the first retry, doubled at each


def parse_teachers(spec: str) -> list[tuple[str, str]]:
    teachers = []
    for item in spec.split():
        name, sep, source = item.partition("=")
        if not sep or not source or not re.fullmatch(r"[\w.-]+", name):
            raise UserError(f"--teachers: {item!r} is not name=source (name of letters, digits, _ . -)")
        if name in dict(teachers):
            raise UserError(f"--teachers: teacher name {name!r} given twice")
        teachers.append((name, source))
    if not teachers:
        raise UserError("--teachers: no teacher given (name=source ...)")
    return teachers


def resolve_device(device: str) -> str:
    """--device: "auto" (or empty) is CUDA when there is one, else the CPU."""
    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError as e:  # torch's own list of device types
        raise UserError(f"--device={device}: not a device ({e}); use auto, cpu or cuda (DEVICE= for make)") from e
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={device}: CUDA is not available on this machine (DEVICE=cpu)")
    return device


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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

    def stale(job: Job) -> bool:
        record = cached.get((job.split, job.example.id))
        return (record is None or record["error"] is not None or record["source"] != source
                or record["settings"] != settings
                or record["prompt_sha256"] != (sha256_text(job.prompt) if prompted else None))

    todo = [job for job in jobs if stale(job)]
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
                prompt_sha256=sha256_text(job.prompt) if prompted else None,
                rationale=rationale, raw=raw, settings=settings,
                stated_answer=prompts.stated_answer(rationale, list(job.example.options)) if error is None else None,
                degenerate=prompts.is_degenerate(rationale) if error is None else False,
                error=error, time=time.time())


def rationales(cfg: RationalesConfig) -> None:
    """Fill the cache with every teacher's rationales for the chosen splits, then print a summary."""
    if cfg.dataset not in data.DATASETS:
        raise UserError(f"--dataset={cfg.dataset}: not one of {', '.join(data.DATASETS)} (DATASET= for make)")
    splits = [s for s in re.split(r"[,\s]+", cfg.splits) if s]
    if not splits or any(s not in ("train", "valid") for s in splits):
        raise UserError(f"--splits={cfg.splits}: rationales are made for train and/or valid")
    for key, least in (("k", 0), ("limit", 0), ("retries", 0), ("batch_size", 1), ("concurrency", 1)):
        if getattr(cfg, key) < least:
            raise UserError(f"--{key}={getattr(cfg, key)}: must be >= {least}")
    teachers = parse_teachers(cfg.teachers)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(cfg.device)
    if device == "cuda" and world_size > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    distributed = world_size > 1 and "MASTER_ADDR" in os.environ
    if distributed:  # torchrun: wait for every rank before the summary
        torch.distributed.init_process_group("gloo")

    examples = {split: data.load_split(cfg.dataset, split, cfg.data, limit=cfg.limit or None) for split in splits}
    # in-context examples come from the whole training set, so --limit does not change the prompts
    pool = data.load_split(cfg.dataset, "train", cfg.data)
    # Ctrl-C: every batch already written is fsynced; the next run makes only what is missing
    with interrupt_note(f"the rationales made so far are kept in {Path(cfg.cache) / cfg.dataset}/; the same "
                        "command makes only the missing ones"):
        stopped = [why for name, source in teachers
                   if (why := run_teacher(cfg, name, source, examples, pool, device, rank, world_size))]
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
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


# ---- experiments: the α sweep (§4.1, Fig. 3), training fractions (Fig. 2), ablations (Table 2) ----
# Every row of an experiment is an ordinary run folder (train.py's best/, last/, metrics.jsonl, train.json;
# eval.py's results.json, predictions.jsonl), or with --seeds one seed<N>/ run folder per seed. The runs go
# in this process, one after the other, through train.train and eval.evaluate with the configs `make train
# eval` would build: no Python start and torch import per run (longer than a tiny run itself), and a
# failing run stops the experiment with its own message. Resumable: a run with results.json is done and
# never redone, one with train.json (training ended) is only evaluated, one with last/ continues from it
# (train.py --resume), so a killed experiment, started again, does what is missing. eval.py scores the
# rows, prints the table and writes OUT/<dataset>/<experiment>.{json,md,png}.

@dataclass
class ExperimentConfig:
    dataset: str = "obqa"  # obqa | arc | piqa | riddle | pubmedqa | bioasq
    student: str = "google/flan-t5-small"  # hub id or folder
    teachers: str = "flan-t5-xl=release:flan-t5-xl llama-2=release:llama-2"  # name=source ...
    data: str = "data"  # the datasets' folder
    cache: str = "cache"  # the rationale cache (`make rationales`)
    out: str = "out"  # rows in OUT/<dataset>/<experiment>/, the summary in OUT/<dataset>/<experiment>.json
    limit: int = 0  # first N examples of each split (0 = all)
    device: str = "auto"  # auto = cuda when available, else cpu
    seeds: str = ""  # "0 1 2": every row once per seed, in <row>/seed<N>/, reported as mean ± std ("" = once)
    metric: str = "accuracy"  # the results.json number compared (and selected on, by the sweep)
    train_args: str = ""  # extra train.py flags for every run, e.g. "--epochs=3 --lr=1e-4"
    eval_args: str = ""  # extra eval.py flags for every run (decoding follows train.py's validation unless set)


def number(value: float) -> str:
    """1.0 -> "1", 0.125 -> "0.125": α and fractions as folder names and table cells write them."""
    return f"{value:.10g}"


def parse_numbers(text: str, what: str, allowed: typing.Callable[[float], bool], rule: str) -> list[float]:
    """"0.1 1,3" -> [0.1, 1.0, 3.0]: space or comma separated, each value once, each `allowed`."""
    values: list[float] = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
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
        values = [int(item) for item in re.split(r"[,\s]+", seeds.strip()) if item]
    except ValueError:
        raise UserError(f"--seeds={seeds!r}: expected integers, e.g. --seeds=\"0 1 2\"") from None
    if len(set(values)) != len(values):
        raise UserError(f"--seeds={seeds!r}: a seed appears twice")
    return values or [None]


Config = typing.TypeVar("Config")


def with_flags(config: Config, args: str, what: str, fixed: set[str]) -> Config:
    """`config` with the --key=value flags in `args` applied (type-checked by parse_flags). The keys in
    `fixed` are set by the experiment itself, per row, and refused here."""
    tokens = shlex.split(args)
    parsed = parse_flags(type(config), tokens)
    keys = [token.removeprefix("--").partition("=")[0] for token in tokens]
    taken = sorted(set(keys) & fixed)
    if taken:
        raise UserError(f"{what}: --{taken[0]} is set by the experiment itself ({', '.join(sorted(fixed))})")
    return dataclasses.replace(config, **{key: getattr(parsed, key) for key in keys})


def check_experiment(cfg: ExperimentConfig) -> None:
    import eval as evaluation  # eval and train import this module: lazily, inside the commands

    if cfg.dataset not in data.DATASETS:
        raise UserError(f"--dataset={cfg.dataset}: not one of {', '.join(data.DATASETS)}")
    if cfg.metric not in evaluation.METRIC_NAMES:
        raise UserError(f"--metric={cfg.metric!r}: expected one of {', '.join(evaluation.METRIC_NAMES)}")
    parse_seeds(cfg.seeds)


def plan_row(cfg: ExperimentConfig, command: str, folder: Path, **fields) -> list[tuple]:
    """(train config, eval config) of each run of one row in `folder`: once, or once per seed in
    folder/seed<N>/. `fields` are the row's own train.py flags (method, alpha, train_fraction, ...)."""
    import eval as evaluation
    import train

    runs = []
    for seed in parse_seeds(cfg.seeds):
        out = folder if seed is None else folder / f"seed{seed}"
        own = dict(dataset=cfg.dataset, student=cfg.student, teachers=cfg.teachers, data=cfg.data,
                   cache=cfg.cache, limit=cfg.limit, device=cfg.device)
        own.update(fields, out=str(out), **({} if seed is None else {"seed": seed}))
        train_cfg = with_flags(train.TrainConfig(**own), cfg.train_args, f"{command} --train_args",
                               set(own) | {"resume"})
        # Decode as training's validation did (best/ was chosen on it), unless --eval_args says otherwise.
        eval_own = dict(dataset=cfg.dataset, model=str(out / "best"), method=train_cfg.method, data=cfg.data,
                        out=str(out), limit=cfg.limit, device=cfg.device)
        eval_cfg = evaluation.EvalConfig(**eval_own, batch_size=train_cfg.eval_batch_size,
                                         max_input_tokens=train_cfg.max_input_tokens,
                                         max_new_tokens=train_cfg.max_new_tokens, bf16=train_cfg.bf16,
                                         chat=train_cfg.chat, boundary=train_cfg.boundary,
                                         task_prefix=train_cfg.task_prefix)
        runs.append((train_cfg, with_flags(eval_cfg, cfg.eval_args, f"{command} --eval_args", set(eval_own))))
    return runs


def finished(run: tuple) -> bool:
    return (Path(run[0].out) / "results.json").is_file()


def train_and_evaluate(train_cfg, eval_cfg) -> None:
    """One run to its results.json: train (or continue training from last/), then evaluate best/."""
    import eval as evaluation
    import train

    run = Path(train_cfg.out)
    if not (run / "train.json").is_file():  # train.json is written when training ends: then only eval is left
        train.recover_checkpoint(run / "last")  # a kill between its two renames
        resume = (run / "last" / "trainer_state.pt").is_file()
        try:
            train.train(dataclasses.replace(train_cfg, resume=int(resume)))
        except SystemExit as e:  # a UserError of train.py: say which run
            hint = f"\n(this continued {run / 'last'}; delete {run} to start this run over)" if resume else ""
            raise UserError(f"{run}: {e}{hint}") from e
    evaluation.evaluate(eval_cfg)


def run_rows(rows: list[list[tuple]]) -> None:
    """Every run not finished yet, in order; finished ones (results.json) are kept as they are."""
    runs = [run for row in rows for run in row]
    todo = [run for run in runs if not finished(run)]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs finished already (kept), {len(todo)} to run", flush=True)
    for n, (train_cfg, eval_cfg) in enumerate(todo, 1):
        print(f"--- run {n} of {len(todo)}: {train_cfg.out}", flush=True)
        # Ctrl-C: finished runs keep their results.json and this one its last/: the same command goes on
        with interrupt_note(f"{len(runs) - len(todo) + n - 1} of {len(runs)} runs are finished and kept, and "
                            f"{train_cfg.out} keeps its last checkpoint if it saved one; the same command "
                            "continues from there"):
            train_and_evaluate(train_cfg, eval_cfg)


def command_line(command: str, cfg) -> str:
    """`python tinyllm.py <command>` with every flag of `cfg` that differs from its default: how a summary
    was made, written into it for `make report`."""
    default = type(cfg)()
    flags = [shlex.quote(f"--{f.name}={getattr(cfg, f.name)}") for f in dataclasses.fields(cfg)
             if getattr(cfg, f.name) != getattr(default, f.name)]
    return " ".join(["python tinyllm.py", command, *flags])


def summary_of(cfg: ExperimentConfig, command: str, rows: list[dict], **extra) -> dict:
    return dict(dataset=cfg.dataset, metric=cfg.metric, seeds=[s for s in parse_seeds(cfg.seeds) if s is not None],
                command=command_line(command, cfg), **extra, rows=rows)


@dataclass
class SweepConfig(ExperimentConfig):
    alphas: str = "0.01 0.1 0.5 1 2 3"  # §4.1: the values of every α_m; the grid is their product over teachers
    sweep: str = ""  # an explicit grid instead, naming every teacher: "a=0.1,1 b=1,3"


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
    import eval as evaluation

    check_experiment(cfg)
    names = [name for name, _ in parse_teachers(cfg.teachers)]
    grid = sweep_grid(cfg, names)
    root = Path(cfg.out) / cfg.dataset
    rows, planned = [], []
    for combination in itertools.product(*grid.values()):
        alpha = dict(zip(names, combination))
        flag = " ".join(f"{name}={number(a)}" for name, a in alpha.items())
        folder = root / "sweep" / ",".join(f"{name}={number(a)}" for name, a in alpha.items())
        rows.append(dict(alpha=alpha, alpha_flag=flag, folder=str(folder)))
        planned.append(plan_row(cfg, "sweep", folder, method="tinyllm", alpha=flag))
    if "valid" not in planned[0][0][1].splits:
        raise UserError("sweep --eval_args: --splits must include valid, the split the sweep chooses on")
    run_rows(planned)
    return evaluation.write_sweep(root, summary_of(cfg, "sweep", rows, grid=grid))


@dataclass
class FractionsConfig(ExperimentConfig):
    fractions: str = "0.125 0.25 0.5 0.75 1"  # Fig. 2: fractions of the training set (nested, per seed)
    methods: str = "tinyllm dss finetune"  # a curve each; dss once per teacher (dss-<teacher>), kd with the first
    alpha: str = ""  # name=weight ... for TinyLLM's Eq. 2 (default 1 each)


def method_runs(methods: str, names: list[str]) -> list[tuple[str, str, str]]:
    """(run name, method, teacher) per method, named as `make table` names its run folders."""
    import train

    trained = [m for m in train.METHODS if m != "inference"]
    runs: list[tuple[str, str, str]] = []
    for method in methods.split():
        if method not in trained:
            raise UserError(f"--methods: {method!r} is not one of {', '.join(trained)} (inference trains nothing)")
        runs += [(f"dss-{name}", "dss", name) for name in names] if method == "dss" else [(method, method, "")]
    if not runs or len({run for run, _, _ in runs}) != len(runs):
        raise UserError(f"--methods={methods!r}: give each method once")
    return runs


def fractions(cfg: FractionsConfig) -> dict:
    """Fig. 2: every method trained on nested fractions of the training set (train.py --train_fraction)."""
    import eval as evaluation

    check_experiment(cfg)
    names = [name for name, _ in parse_teachers(cfg.teachers)]
    values = sorted(parse_numbers(cfg.fractions, "--fractions", lambda f: 0 < f <= 1, "a fraction in (0, 1]"))
    root = Path(cfg.out) / cfg.dataset
    rows, planned = [], []
    for run, method, teacher in method_runs(cfg.methods, names):
        for fraction in values:
            folder = root / "fractions" / run / number(fraction)
            rows.append(dict(run=run, method=method, fraction=fraction, folder=str(folder)))
            planned.append(plan_row(cfg, "fractions", folder, method=method, teacher=teacher, alpha=cfg.alpha,
                                    train_fraction=fraction))
    run_rows(planned)
    return evaluation.write_fractions(root, summary_of(cfg, "fractions", rows, fractions=values))


@dataclass
class AblationsConfig(ExperimentConfig):
    alpha: str = ""  # name=weight ... (default 1 each); a row without a teacher keeps the others' α
    rationales_args: str = ""  # extra `rationales` flags for the re-prompted caches (those CACHE was made with)


# Table 2's re-prompted rows: the one `rationales` flag each changes (§3.2) and its cache folder's suffix
REPROMPTED = (("k0", "w/o in-context examples (--k=0)", {"k": 0}),
              ("teacher_forcing0", "w/o teacher forcing (--teacher_forcing=0)", {"teacher_forcing": False}))


def ablations(cfg: AblationsConfig) -> dict:
    """Table 2: TinyLLM without each teacher; without in-context examples and without teacher forcing,
    whose rationales are made again into their own caches, where every teacher can be re-prompted."""
    import eval as evaluation
    import train

    check_experiment(cfg)
    teachers = parse_teachers(cfg.teachers)
    alpha = train.parse_alpha(cfg.alpha, [name for name, _ in teachers])
    root = Path(cfg.out) / cfg.dataset
    rows, planned, caches = [], [], []

    def add(name: str, label: str, kept: list[tuple[str, str]], cache: str, note: str = "") -> list[tuple]:
        folder = root / "ablations" / name
        rows.append(dict(name=name, label=label, teachers=[n for n, _ in kept], cache=cache, folder=str(folder),
                         note=note))
        planned.append(plan_row(cfg, "ablations", folder, teachers=" ".join(f"{n}={s}" for n, s in kept),
                                # no teacher left: L = L_A (Eq. 2 with no rationale task), i.e. fine-tuning
                                method="tinyllm" if kept else "finetune", cache=cache,
                                alpha=" ".join(f"{n}={number(alpha[n])}" for n, _ in kept)))
        return planned[-1]

    add("tinyllm", "TinyLLM", teachers, cfg.cache)
    for name, _ in teachers:
        kept = [(n, s) for n, s in teachers if n != name]
        add(f"without-{name}", f"w/o {name}", kept, cfg.cache, "" if kept else "no teacher left: fine-tuning (L_A)")
    fixed = [f"{n}={s}" for n, s in teachers if not getattr(teacher_kind(s)[0], "prompted", True)]
    for key, label, change in REPROMPTED:
        if fixed:  # the paper's published rationales are text, made once with k=2 and the gold answer
            rows.append(dict(name=key, label=label, teachers=[n for n, _ in teachers], cache=None, folder=None,
                             note=f"not run: {', '.join(fixed)} cannot be re-prompted (fixed published "
                                  "rationales); a live teacher (a model, openai:...) can"))
            continue
        cache = f"{cfg.cache.rstrip('/')}-{key}"
        fields = dict(dataset=cfg.dataset, teachers=cfg.teachers, data=cfg.data, cache=cache, limit=cfg.limit,
                      splits="train", device=cfg.device, **change)
        rationales_cfg = with_flags(RationalesConfig(**fields), cfg.rationales_args, "ablations --rationales_args",
                                    set(fields))
        caches.append((rationales_cfg, add(key, label, teachers, cache)))
    for rationales_cfg, runs in caches:  # teachers are loaded only for rows with runs still to do
        if not all(finished(run) for run in runs):
            rationales(rationales_cfg)
    run_rows(planned)
    return evaluation.write_ablations(root, summary_of(cfg, "ablations", rows))


# ---- command line -----------------------------------------------------------------------------
# Every script (tinyllm.py, train.py, eval.py, tests/bench.py) reads its flags with parse_flags and
# runs under run_main: one flag syntax, one --help, one way errors and Ctrl-C are reported.

GLOBAL_FLAGS = {"debug": "1: the traceback of expected errors too (or TINYLLM_DEBUG=1)",
                "help": "this list"}


def parse_bool(key: str, value: str) -> bool:
    if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise UserError(f"--{key}={value}: expected bool (1/0, true/false, yes/no)")
    return value.lower() in ("1", "true", "yes")


def source_fields(cls: type) -> tuple[str, dict[str, tuple[str, str]]]:
    """(docstring, {field: (heading, comment)}) of one class body, from its source: the comment on a
    field's line (continued on comment lines that start with "#  "), and a comment on a line of its own
    as the heading of the fields below it."""
    source = inspect.getsource(cls)
    indent = len(source) - len(source.lstrip())
    source = "\n".join(line[indent:] for line in source.splitlines())
    comments = {token.start[0]: token.string
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    lines = source.splitlines()

    def own_line(number: int) -> bool:
        return number in comments and lines[number - 1].lstrip().startswith("#")

    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef), cls
    fields, heading = {}, ""
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        above = statement.lineno - 1  # a heading comment sits on the line just above its first field
        if own_line(above) and not comments[above].startswith("#  "):
            heading = comments[above].lstrip("#").strip()
        comment = [comments.get(statement.end_lineno, "")]
        below = statement.end_lineno + 1
        while own_line(below) and comments[below].startswith("#  "):
            comment.append(comments[below])
            below += 1
        fields[statement.target.id] = (heading, " ".join(c.lstrip("#").strip() for c in comment).strip())
    return ast.get_docstring(node) or "", fields


def config_fields(config_cls: type) -> tuple[str, list[tuple[str, str, str, str, str]]]:
    """(the class docstring, [(heading, name, type, default, comment)]) of a config dataclass, every
    field in dataclasses.fields order, inherited ones included: what --help shows, read from the
    source so that it says what the code says."""
    described: dict[str, tuple[str, str]] = {}
    for cls in reversed(config_cls.__mro__):  # a subclass's comment wins over its base's
        if dataclasses.is_dataclass(cls):
            described.update(source_fields(cls)[1])
    types = typing.get_type_hints(config_cls)
    rows = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((*described[f.name][:1], f.name, types[f.name].__name__, str(default), described[f.name][1]))
    return source_fields(config_cls)[0], rows


def script_of(config_cls: type, command: str) -> str:
    """How the user runs the script `config_cls` belongs to: `tinyllm.py rationales`, `train.py`, ..."""
    module = config_cls.__module__
    script = sys.argv[0] if module == "__main__" else f"{module}.py"
    return f"{script} {command}" if command else script


def flags_help(config_cls: type, command: str = "") -> str:
    doc, rows = config_fields(config_cls)
    if not doc:  # a config without a docstring: the script's own one-line summary
        module_doc = sys.modules[config_cls.__module__].__doc__ or ""
        doc = module_doc.strip().split("\n\n")[0].replace("\n", " ")
    shown = [(heading, f"--{name}={shell_quote(default)}", kind, comment) for heading, name, kind, default, comment in rows]
    shown += [("every script", f"--{name}" + ("=0" if name == "debug" else ""), "bool" if name == "debug" else "",
               comment) for name, comment in GLOBAL_FLAGS.items()]
    width = min(max(len(flag) for _, flag, _, _ in shown), 36)
    lines = [f"usage: python {script_of(config_cls, command)} [--key=value ...]", doc, "",
             "flags (type, then what it is; --key= with no value keeps the default):"]
    previous = ""
    for heading, flag, kind, comment in shown:
        if heading != previous:
            lines.append(f" {heading}:")
            previous = heading
        lines.append(f"  {flag:<{width}}  {kind:<5}  {comment}".rstrip())
    return "\n".join(lines)


def shell_quote(value: str) -> str:
    return f'"{value}"' if not value or " " in value else value


def parse_flags(config_cls: type, args: list[str], command: str = ""):
    """`--key=value` overrides of a config dataclass, converted to and checked against its field
    types. An empty value keeps the default (the Makefile passes unset variables as empty). --help
    prints every field from the dataclass source and exits; --debug is run_main's."""
    if any(arg in ("--help", "-h", "help") for arg in args):
        print(flags_help(config_cls, command))
        raise SystemExit(0)
    types = typing.get_type_hints(config_cls)
    values = {}
    for arg in args:
        key, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep:
            raise UserError(f"argument {arg!r}: flags are --key=value (--help lists them)")
        if key == "debug":  # read by run_main before the script starts; checked here like any flag
            parse_bool(key, value or "0")
            continue
        if key not in types:
            close = difflib.get_close_matches(key, types, n=1)
            raise UserError(f"unknown flag --{key}" + (f" (did you mean --{close[0]}?)" if close else "")
                            + f"; `python {script_of(config_cls, command)} --help` lists every flag")
        if value == "":
            continue
        kind = types[key]
        if kind is bool:
            values[key] = parse_bool(key, value)
            continue
        try:
            values[key] = kind(value)
        except ValueError:
            raise UserError(f"--{key}={value}: expected {kind.__name__}") from None
    return config_cls(**values)


def debug_requested(argv: list[str]) -> bool:
    flags = [arg.partition("=")[2] for arg in argv if arg.startswith("--debug=")]
    value = flags[-1] if flags else os.environ.get("TINYLLM_DEBUG", "0")
    return value.lower() in ("1", "true", "yes")


def expected_failure(error: BaseException, memory_hint: str) -> str | None:
    """The message of an expected failure, None for a bug. Expected: a UserError (or any
    SystemExit with a message, Python's idiom for the same), running out of memory, a full disk."""
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, str) else None
    text = str(error)
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
            isinstance(error, RuntimeError) and "can't allocate memory" in text):  # the CPU allocator's words
        asked = re.search(r"allocate (\d+) bytes", text) or re.search(r"allocate ([\d.]+ [KMGT]iB)", text)
        size = (data.format_bytes(int(asked.group(1))) if asked.group(1).isdigit() else asked.group(1)) if asked else ""
        return f"out of memory{f' (tried to allocate {size})' if size else ''}: {memory_hint}"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {error.filename}" if error.filename else ""
        return (f"no space left on the disk{where}: free some space, or point DATA=, CACHE=, OUT= (or TINYLLM_HOME) "
                "at a disk with room; files written completely are kept, no partial one is left")
    return None


def run_main(main: Callable[[list[str]], object], memory_hint: str) -> None:
    """Run a script's main(argv) as its `if __name__ == "__main__":` line: an expected failure
    (expected_failure) prints one `error: ...` block and exits 1, with the traceback first under
    --debug=1 / TINYLLM_DEBUG=1; Ctrl-C prints one line saying what was kept (interrupt_note) and
    exits 130 (128 + SIGINT, as a shell reports it); a bug keeps Python's traceback. `memory_hint`
    names the flags that lower the memory this script needs."""
    argv = sys.argv[1:]
    debug = debug_requested(argv)
    try:
        main(argv)
    except KeyboardInterrupt as interrupt:
        Progress.end_line()
        if debug:
            traceback.print_exc()
        print(f"interrupted: {getattr(interrupt, 'kept', 'nothing was in progress')}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except BaseException as error:
        Progress.end_line()
        message = expected_failure(error, memory_hint)
        if message is None:
            raise  # a bug (or a plain exit): Python prints the traceback
        if debug:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


COMMANDS = {"rationales": (RationalesConfig, rationales), "sweep": (SweepConfig, sweep),
            "fractions": (FractionsConfig, fractions), "ablations": (AblationsConfig, ablations)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("--help", "-h", "help"):
            print(f"usage: python {sys.argv[0]} COMMAND [--key=value ...]; COMMAND --help lists its flags\n")
            print("\n".join(f"  {name:<12} {(command.__doc__ or '').strip().splitlines()[0]}"
                            for name, (_, command) in COMMANDS.items()))
            return
        unknown = f"unknown command {argv[0]!r}; " if argv else ""
        raise UserError(f"{unknown}usage: python tinyllm.py {'|'.join(COMMANDS)} --key=value ... (--help)")
    config_cls, command = COMMANDS[argv[0]]
    command(parse_flags(config_cls, argv[1:], argv[0]))


if __name__ == "__main__":
    run_main(main, "lower --batch_size (rationales: prompts per forward pass of a local teacher; the "
                   "experiments: in --train_args / --eval_args) or --max_new_tokens")
