"""The command line as users meet it (issue 14). Every expected failure, run as the user runs it (the
script, or a make target, in a subprocess), must exit != 0 with one `error:` block that names the
culprit (and the fix where there is one), show no traceback, and leave no new file in DATA, CACHE or
OUT (folder listings before and after). Also: --help lists every field of each config dataclass with
its type, default and comment; a real bug keeps its traceback; --debug=1 / TINYLLM_DEBUG=1 add the
traceback to an expected failure; Ctrl-C exits 130 with one line saying what was kept, and the next
run continues from it.

Each subprocess spends ~2 s importing torch, so the table's cases run concurrently, once, in a
module fixture (only those selected, e.g. with -k).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

import cli
import data
import tinyllm
from conftest import REPO, edited_checkpoint, start_server, stop_server

PYTHON = sys.executable  # the venv's python, as `make` runs the scripts
WORKERS = 3  # concurrent subprocesses: torch's import is CPU-bound, a little over the 2 cores of CI
# flock files: bookkeeping, never a partial file (the downloader's; a run folder's and a cache file's, which hold
# only the last holder's pid and command and block no one once their process ends)


def is_lock_file(path: Path) -> bool:
    return path.name in (data.LOCK_NAME, cli.LOCK_FILE) or (path.name.startswith(".") and path.name.endswith(".lock"))


# ---------------------------------------------------------------------------------------------------
# the world the cases share: a data template, tiny checkpoints (good and broken), one loopback server

def reply(status: int, body: bytes | dict, delay: float = 0.0, headers: dict | None = None):
    """A server hook answering every request with `status` and `body`, after `delay` seconds."""
    payload = json.dumps(body).encode() if isinstance(body, dict) else body

    def hook(handler) -> None:
        handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        time.sleep(delay)
        try:
            handler.send_response(status)
            for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                handler.send_header(key, value)
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first (the timeout case)
            pass

    return hook


def chat(text: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}}], "usage": {"completion_tokens": 5}}


@pytest.fixture(scope="module")
def world(tmp_path_factory, assets, tiny_t5, tiny_llama):
    import torch

    root = tmp_path_factory.mktemp("world")
    release = assets / "tinyllm_release"
    template = root / "data"
    for split in data.SPLITS:  # what the cases need: obqa's split files (the rationale files come on demand)
        (template / "obqa").mkdir(parents=True, exist_ok=True)
        shutil.copy(release / data.split_file("obqa", split), template / data.split_file("obqa", split))

    def copy(name: str, drop: str) -> Path:
        folder = shutil.copytree(tiny_t5, root / name)
        (folder / drop).unlink()
        return folder

    def damaged(name: str, source: Path, file: str, damage: Callable[[bytes], bytes]) -> Path:
        folder = shutil.copytree(source, root / name)
        path = folder / file  # a file the copy lacks is added, damaged
        path.write_bytes(damage(path.read_bytes() if path.exists() else b""))
        return folder

    wrong_architecture = copy("t5-config-llama-weights", drop="model.safetensors")
    shutil.copy(tiny_llama / "model.safetensors", wrong_architecture / "model.safetensors")
    models = dict(
        t5=tiny_t5,
        nan_t5=edited_checkpoint(tiny_t5, root / "nan-t5",
                                 lambda state: state["decoder.final_layer_norm.weight"].fill_(math.nan)),
        missing_key_t5=edited_checkpoint(tiny_t5, root / "missing-key-t5",
                                         lambda state: state.pop("decoder.final_layer_norm.weight")),
        bad_shape_t5=edited_checkpoint(tiny_t5, root / "bad-shape-t5",
                                       lambda state: state.__setitem__("encoder.final_layer_norm.weight",
                                                                       torch.ones(31))),
        no_weights_t5=copy("no-weights-t5", drop="model.safetensors"),
        no_tokenizer_t5=copy("no-tokenizer-t5", drop="spiece.model"),
        wrong_architecture=wrong_architecture,
        truncated_t5=damaged("truncated-t5", tiny_t5, "model.safetensors", lambda b: b[:len(b) // 2]),
        config_not_json_t5=damaged("config-not-json-t5", tiny_t5, "config.json", lambda b: b[:len(b) // 2]),
        spiece_damaged_t5=damaged("spiece-damaged-t5", tiny_t5, "spiece.model", lambda b: b"not a model" * 10),
        tokenizer_json_damaged_llama=damaged("tokenizer-json-damaged-llama", tiny_llama, "tokenizer.json",
                                             lambda _: b'{"version": "1.0", "model": {'),
    )
    server = start_server(release)  # GET: the release files (and 404 for anything else); POST: the hooks
    server.hooks.update({
        "/500/v1/chat/completions": reply(500, b"boom: the GPU fell off the bus"),
        "/429/v1/chat/completions": reply(429, b"slow down"),
        "/slow/v1/chat/completions": reply(200, chat("too late"), delay=1.5),
        "/garbage/v1/chat/completions": reply(200, b"<html>a proxy's login page</html>"),
        "/empty/v1/chat/completions": reply(200, {"choices": []}),
        "/unknown/v1/chat/completions": reply(404, {"error": {"message": "The model `nope` does not exist."}}),
    })
    train = data.load_split("obqa", "train", template)
    yield SimpleNamespace(root=root, release=release, template=template, server=server, train=train,
                          **{name: str(path) for name, path in models.items()})
    stop_server(server)


# ---------------------------------------------------------------------------------------------------
# per-case set-ups: what each case breaks before the command runs

def write_cache(cache: Path, teacher: str, examples: list[data.Example], source: str = "release:llama-2",
                file_teacher: str | None = None, damaged_line: int | None = None) -> None:
    """A cache file in tinyllm.py's format, made by `source`; named after `file_teacher` when given
    (a file copied from another teacher); line `damaged_line` replaced by garbage."""
    records = [tinyllm.make_record(teacher, source, {"release": source.split(":")[-1]},
                                   tinyllm.Job("train", ex, ""), f"The answer is {ex.answer_text}, since the "
                                   "question asks exactly that.", prompted=False) for ex in examples]
    lines = [json.dumps(record) for record in records]
    if damaged_line is not None:
        lines[damaged_line - 1] = '{"split": "train", "id": '
    path = cache / "obqa" / f"{file_teacher or teacher}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def empty_data(world, case: SimpleNamespace) -> None:
    shutil.rmtree(case.data)


def damaged_source(world, case: SimpleNamespace) -> None:
    """A TINYLLM_DATA_URL folder whose train file differs from the release's (same size, one byte)."""
    empty_data(world, case)
    shutil.copytree(world.template, case.scratch / "source")
    flip_a_byte(case.scratch / "source" / "obqa" / "obqa_train.json")


def flip_a_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[100] ^= 1
    path.write_bytes(bytes(content))


def damaged_local_file(world, case: SimpleNamespace) -> None:
    flip_a_byte(case.data / "obqa" / "obqa_train.json")


def full_disk(world, case: SimpleNamespace) -> None:
    """The download's .part file writes to /dev/full: every write fails with ENOSPC, as on a full disk."""
    empty_data(world, case)
    (case.data / "obqa").mkdir(parents=True)
    (case.data / "obqa" / "obqa_train.json.part").symlink_to("/dev/full")


def a_file_in_the_way(world, case: SimpleNamespace) -> None:
    """scratch/file is a regular file: OUT, DATA or CACHE under it cannot be created."""
    (case.scratch / "file").write_text("not a folder\n")


def damaged_trainer_state(world, case: SimpleNamespace) -> None:
    """OUT/obqa/run/last/trainer_state.pt cut short, as a full disk or a kill in an old version could leave it."""
    last = case.out / "obqa" / "run" / "last"
    last.mkdir(parents=True)
    (last / "trainer_state.pt").write_bytes(b"PK\x03\x04 cut short")


def cache_of(teacher: str, first: int = 0, **options) -> Callable:
    """A set-up writing `teacher`'s cache for train examples first ... first + 3 (options: write_cache's)."""
    def run(world, case: SimpleNamespace) -> None:
        write_cache(case.cache, teacher, world.train[first:first + 4], **options)
    return run


# ---------------------------------------------------------------------------------------------------
# the table

@dataclass(frozen=True)
class Case:
    name: str
    command: str  # after `python` (or a `make ...` line); {data} {cache} {out} {scratch} and world's names
    expect: tuple[str, ...]  # regexes the error block must match: the culprit and, where there is one, the fix
    prepare: Callable | None = None  # breaks something in the case's folders first
    env: dict[str, str] = field(default_factory=dict)  # with the same {placeholders}
    logged: tuple[str, ...] = ()  # regexes for lines printed before the error (warnings)
    memory_limit_kb: int = 0  # ulimit -v: allocations beyond it fail at once, as on a full machine


RATIONALES = "tinyllm.py rationales --data={data} --cache={cache} --limit=2 --k=0 --device=cpu"
SERVER = RATIONALES + " --retries=1 --backoff=0.01 --timeout=5 --concurrency=1 --teachers=srv=openai:{url}"
TRAIN = "train.py --data={data} --cache={cache} --out={out}/obqa/run --device=cpu --limit=4 --student={t5}"
EVAL = "eval.py --data={data} --out={out}/obqa/run --device=cpu --limit=2 --splits=test"
RELEASE_TEACHER = " --teachers=t=release:llama-2 --method=dss"

CASES = [
    # flags and variables
    Case("flag-unknown", RATIONALES + " --datset=obqa",
         (r"unknown flag --datset \(did you mean --dataset\?\)", r"tinyllm\.py rationales --help")),
    Case("flag-type", TRAIN + " --lr=fast", (r"--lr=fast: expected float",)),
    Case("flag-syntax", "eval.py table obqa", (r"argument 'obqa': flags are --key=value",)),
    Case("device-unknown", TRAIN + " --method=finetune --device=gpu", (r"--device=gpu: not a device", "DEVICE=")),
    Case("limit-negative", TRAIN + " --method=finetune --limit=-1", (r"--limit=-1: must be >= 0", "LIMIT=")),
    Case("make-dataset-variable", "make --no-print-directory rationales DATASET=csqa DATA={data} CACHE={cache} "
         "DEVICE=cpu LIMIT=2", (r"--dataset=csqa: not one of obqa, arc", r"DATASET=")),
    Case("bench-device", "tests/bench.py --device=tpu --out={out}", (r"--device='tpu': expected auto, cpu or cuda",)),
    # datasets and downloads
    Case("dataset-unknown", RATIONALES + " --dataset=csqa", (r"--dataset=csqa: not one of obqa", "DATASET=")),
    Case("download-404", RATIONALES + " --teachers=t=release:llama-2", (
        r"obqa/obqa_train\.json: HTTP 404 from http://127\.0\.0\.1:\d+/missing/obqa/obqa_train\.json",),
         prepare=empty_data, env={"TINYLLM_DATA_URL": "{url}/missing"}),
    Case("checksum-mismatch", RATIONALES + " --teachers=t=release:llama-2", (
        r"obqa/obqa_train\.json: checksum mismatch for .*source/obqa/obqa_train\.json: sha256 [0-9a-f]{64}, "
        r"expected cfeec3fa9af8750e", r"TINYLLM_DATA_URL"), prepare=damaged_source,
         env={"TINYLLM_DATA_URL": "{scratch}/source"}),
    Case("dataset-file-damaged-and-source-down", RATIONALES + " --teachers=t=release:llama-2",
         (r"obqa/obqa_train\.json: HTTP 404 from http://127\.0\.0\.1:\d+/missing/",), prepare=damaged_local_file,
         env={"TINYLLM_DATA_URL": "{url}/missing"}, logged=(r"data/obqa/obqa_train\.json fails its checksum",)),
    Case("disk-full", RATIONALES + " --teachers=t=release:llama-2",
         (r"no space left on the disk writing .*data/obqa/obqa_train\.json\.part", r"DATA=, CACHE=, OUT="),
         prepare=full_disk),
    Case("out-of-memory", EVAL + " --model={t5} --max_new_tokens=200000000 --batch_size=1",
         (r"out of memory \(tried to allocate [\d.]+ GB\): lower --batch_size",), memory_limit_kb=4_000_000),
    # checkpoints and tokenizers
    Case("model-not-found", EVAL + " --model={scratch}/nothing", (r"model '.*/nothing': not a folder, and not a hub id",)),
    Case("model-no-weights", EVAL + " --model={no_weights_t5}",
         (r"no-weights-t5: neither model\.safetensors nor model\.safetensors\.index\.json",)),
    Case("model-missing-key", EVAL + " --model={missing_key_t5}",
         (r"missing-key-t5/config\.json: .*missing keys \['decoder\.final_layer_norm\.weight'\]",)),
    Case("model-shape-mismatch", EVAL + " --model={bad_shape_t5}",
         (r"encoder\.final_layer_norm\.weight: model \(32,\) vs checkpoint \(31,\)",)),
    Case("tokenizer-missing", EVAL + " --model={no_tokenizer_t5}",
         (r"no usable tokenizer: .*no-tokenizer-t5/spiece\.model: no sentencepiece model", r"tokenizer files")),
    Case("eval-wrong-architecture", EVAL + " --model={wrong_architecture}",
         (r"t5-config-llama-weights: checkpoint does not match its config\.json: missing keys \['decoder\.",
          r"unexpected keys \['model\.embed_tokens\.weight', 'model\.layers\.0\.")),
    Case("hub-not-found", TRAIN + " --method=finetune --student=org/none",
         (r"org/none@main: config\.json not found \(404 from http://127\.0\.0\.1:\d+/org/none/resolve/main/",
          r"HF_ENDPOINT")),
    # teachers
    Case("teacher-kind-unknown", RATIONALES + " --teachers=x=gpt4:turbo",
         (r"unknown teacher kind 'gpt4'; the kinds are release:, openai:, openai-completions:",)),
    Case("server-500", SERVER + "/500/v1#stub", (r"srv: http://127\.0\.0\.1:\d+/500/v1/chat/completions still failing "
                                                 r"after 2 attempts: HTTP 500: 'boom: the GPU fell off the bus'",
                                                 r"--retries", r"kept in the cache")),
    Case("server-429", SERVER + "/429/v1#stub", (r"/429/v1/chat/completions still failing .* HTTP 429: 'slow down'",)),
    Case("server-timeout", SERVER + "/slow/v1#stub --timeout=0.3",
         (r"/slow/v1/chat/completions still failing .*ReadTimeout", r"--timeout")),
    Case("server-garbage-json", SERVER + "/garbage/v1#stub",
         (r"HTTP 200 with a body that is not JSON: \"<html>a proxy's login page</html>\"",)),
    Case("server-empty-choices", SERVER + "/empty/v1#stub", (r"HTTP 200 with no choices in the response",)),
    Case("server-unknown-model", SERVER + "/unknown/v1#nope",
         (r"answered HTTP 404 .*The model `nope` does not exist.*check the URL, the model name 'nope'",)),
    # caches
    Case("cache-damaged-line", TRAIN + RELEASE_TEACHER,
         (r"cache/obqa/t\.jsonl:2: not a JSON record", r"make rationales"), prepare=cache_of("t", damaged_line=2)),
    Case("cache-of-another-teacher", TRAIN + RELEASE_TEACHER,
         (r"t\.jsonl:1: a record of teacher 'u', but this is teacher 't'",), prepare=cache_of("u", file_teacher="t")),
    Case("cache-of-another-source", TRAIN + RELEASE_TEACHER,
         (r"t\.jsonl: rationales made by release:flan-t5-xl, but TEACHERS says t=release:llama-2",),
         prepare=cache_of("t", source="release:flan-t5-xl")),
    # training
    Case("train-no-rationales-for-a-teacher", TRAIN + ' --teachers="t1=release:flan-t5-xl t2=release:llama-2"',
         (r"no train rationales of teacher 't2' in .*cache/obqa/t2\.jsonl: run `make rationales`",),
         prepare=cache_of("t1", source="release:flan-t5-xl")),
    Case("train-no-rationale-within-limit", TRAIN + RELEASE_TEACHER,
         (r"t: none of the 4 train examples \(--limit=4\) has a rationale in", r"same DATASET and LIMIT"),
         prepare=cache_of("t", first=100)),
    Case("train-nan-loss", TRAIN + " --method=finetune --student={nan_t5}",
         (r"non-finite loss at step 1 in task answer", r"--lr")),
    # issue 19, 1: every value checked, by the one flag parser, against the rule declared next to its field
    Case("train-batch-size-zero", TRAIN + " --method=finetune --batch_size=0", (r"--batch_size=0: must be >= 1$",)),
    Case("train-lr-negative", TRAIN + " --method=finetune --lr=-1", (r"--lr=-1: must be > 0$",)),
    Case("train-epochs-zero", TRAIN + " --method=finetune --epochs=0", (r"--epochs=0: must be >= 1$",)),
    Case("train-fraction-above-one", TRAIN + " --method=finetune --train_fraction=1.5",
         (r"--train_fraction=1\.5: must be in \(0, 1\]$",)),
    Case("make-alpha-negative", "make --no-print-directory train METHOD=tinyllm TEACHERS=t=release:llama-2 ALPHA=t=-1 "
         "DATA={data} CACHE={cache} OUT={out} DEVICE=cpu LIMIT=4 STUDENT={t5}",
         (r"--alpha: weight -1 of t must be >= 0", r"ALPHA= for make"), prepare=cache_of("t")),
    Case("make-rationales-no-teacher", 'make --no-print-directory rationales TEACHERS="" DATA={data} CACHE={cache} '
         "DEVICE=cpu LIMIT=2", (r"--teachers: no teacher given",)),
    Case("rationales-teacher-twice", RATIONALES + ' --teachers="a=release:llama-2 a=release:flan-t5-xl"',
         (r"--teachers: teacher name 'a' given twice",)),
    Case("rationales-top-p-zero", RATIONALES + " --top_p=0", (r"--top_p=0: must be in \(0, 1\]",)),
    Case("eval-scoring-unknown", EVAL + " --model={t5} --scoring=best",
         (r"--scoring='best': expected generate or rank",)),
    Case("eval-split-unknown", EVAL + " --model={t5} --splits=dev", (r"--splits=dev: 'dev' is not one of train, valid, test",)),
    Case("experiment-seeds-not-integers", "experiments.py sweep --seeds='0 x' --out={out}",
         (r"--seeds='0 x': expected integers", r"SEEDS= for make")),
    # issue 19, 2: a command that runs several things checks every one of them before the first starts
    Case("make-table-bad-seed-after-a-good-one", 'make --no-print-directory table SEEDS="0 x" TEACHERS=t=release:llama-2 '
         "DATA={data} CACHE={cache} OUT={out} DEVICE=cpu LIMIT=4 STUDENT={t5}",
         (r"--seed=x: expected int \(SEED= for make\)",), prepare=cache_of("t")),
    Case("rationales-second-teacher-unknown", RATIONALES + ' --teachers="t=release:llama-2 u=release:gpt-4"',
         (r"--teachers: u=release:gpt-4: teacher source release:gpt-4: the release has flan-t5-xl, llama-2",)),
    Case("rationales-second-teacher-truncated", RATIONALES + ' --teachers="t=release:llama-2 u={truncated_t5}"',
         (r"--teachers: u=.*truncated-t5: .*truncated-t5/model\.safetensors: truncated or not a safetensors file",)),
    Case("fractions-cache-of-a-later-row-missing", "experiments.py fractions --teachers=t=release:llama-2 --methods='finetune "
         "tinyllm' --fractions=1 --data={data} --cache={cache} --out={out} --limit=4 --device=cpu --student={t5}",
         (r"no train rationales of teacher 't' in .*cache/obqa/t\.jsonl: run `make rationales`",)),
    Case("study-data-of-a-later-dataset-missing", "experiments.py study --datasets='obqa arc' --methods='finetune lora' "
         "--teachers=t=release:llama-2 --data={data} --cache={cache} --out={out} --limit=4 --device=cpu --student={t5}",
         (r"arc/arc_\w+\.json: HTTP 404 from http://127\.0\.0\.1:\d+/missing/arc/arc_\w+\.json",),
         env={"TINYLLM_DATA_URL": "{url}/missing"}),
    # issue 19, 3: operating-system and file-format failures named in one line
    Case("make-out-under-a-file", "make --no-print-directory train METHOD=finetune DATA={data} CACHE={cache} "
         "OUT={scratch}/file/out DEVICE=cpu LIMIT=4 STUDENT={t5}",
         (r"--out=.*scratch/file/out/obqa/finetune: .*scratch/file is a file, not a folder", r"OUT= for make"),
         prepare=a_file_in_the_way),
    Case("data-under-a-file", RATIONALES + " --teachers=t=release:llama-2 --data={scratch}/file/data",
         (r"cannot create the folder .*scratch/file/data: Not a directory \(.*scratch/file is a file, not a folder\)",),
         prepare=a_file_in_the_way),
    Case("model-truncated-safetensors", EVAL + " --model={truncated_t5}",
         (r"truncated-t5/model\.safetensors: truncated or not a safetensors file \(the header places \d+ bytes of "
          r"tensor data, the file holds \d+\)",)),
    Case("student-truncated-safetensors", TRAIN + " --method=finetune --student={truncated_t5}",
         (r"truncated-t5/model\.safetensors: truncated or not a safetensors file",)),
    Case("model-config-not-json", EVAL + " --model={config_not_json_t5}",
         (r"config-not-json-t5/config\.json: not JSON \(.*truncated or damaged\)",)),
    Case("tokenizer-json-not-json", EVAL + " --model={tokenizer_json_damaged_llama}",
         (r"tokenizer-json-damaged-llama/tokenizer\.json: not JSON \(.*truncated or damaged\)",)),
    Case("tokenizer-damaged", EVAL + " --model={spiece_damaged_t5}",
         (r"a tokenizer file cannot be parsed, truncated or damaged .*spiece-damaged-t5/spiece\.model",)),
    Case("resume-state-damaged", TRAIN + " --method=finetune --resume=1",
         (r"out/obqa/run/last/trainer_state\.pt: cannot be read, truncated or not a trainer state", r"RESUME=0"),
         prepare=damaged_trainer_state),
    Case("download-no-network", RATIONALES + " --teachers=t=release:llama-2", (
        r"obqa/obqa_train\.json: download from http://127\.0\.0\.1:9/obqa/obqa_train\.json failed: ConnectionError",
        r"with no network, point TINYLLM_DATA_URL at a local copy"), prepare=empty_data,
         env={"TINYLLM_DATA_URL": "http://127.0.0.1:9"}),
    # eval
    Case("table-no-results", "eval.py table --out={out}", (r"no results in .*out/obqa/\*/results\.json",)),
]


# ---------------------------------------------------------------------------------------------------
# running them

@dataclass
class Outcome:
    returncode: int
    output: str  # stdout then stderr
    before: set[str]
    after: set[str]


def listing(case: SimpleNamespace) -> set[str]:
    """Every file (and link) under the case's DATA, CACHE and OUT, the downloader's lock file aside."""
    root = case.data.parent
    return {str(path.relative_to(root)) for folder in (case.data, case.cache, case.out) if folder.exists()
            for path in folder.rglob("*") if (path.is_file() or path.is_symlink()) and not is_lock_file(path)}


def base_env(world, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TINYLLM_DEBUG"}
    # nothing reaches the internet: the data and the hub are the loopback server
    env.update(TINYLLM_DATA_URL=str(world.release), HF_ENDPOINT=world.server.url, TINYLLM_HOME=str(home),
               OMP_NUM_THREADS="1")
    return env


def run_case(case: Case, world, root: Path) -> Outcome:
    folder = root / case.name
    paths = SimpleNamespace(data=folder / "data", cache=folder / "cache", out=folder / "out", scratch=folder / "scratch")
    shutil.copytree(world.template, paths.data)
    paths.scratch.mkdir(parents=True)
    if case.prepare:
        case.prepare(world, paths)
    names = {**{k: str(v) for k, v in vars(paths).items()}, **{k: v for k, v in vars(world).items() if isinstance(v, str)},
             "url": world.server.url}
    argv = shlex.split(case.command.format(**names))
    command = argv if argv[0] == "make" else [PYTHON, *argv]
    if case.memory_limit_kb:
        command = ["bash", "-c", f'ulimit -v {case.memory_limit_kb} && exec "$@"', "ulimit", *command]
    env = base_env(world, folder / "home") | {k: v.format(**names) for k, v in case.env.items()}
    before = listing(paths)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return Outcome(result.returncode, result.stdout + result.stderr, before, listing(paths))


@pytest.fixture(scope="module")
def outcomes(request, world, tmp_path_factory) -> dict[str, Outcome]:
    params = [item.callspec.params for item in request.session.items
              if getattr(item, "module", None) is request.module and hasattr(item, "callspec")]
    selected = {p["case"].name for p in params if "case" in p}  # what -k left: a single case runs alone
    root = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {case.name: pool.submit(run_case, case, world, root) for case in CASES if case.name in selected}
        return {name: future.result() for name, future in futures.items()}


def test_the_table_covers_the_issue():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)) and len(CASES) >= 30
    for kind in ("flag", "dataset", "download", "checksum", "model", "tokenizer", "cache", "server-500",
                 "server-429", "server-timeout", "server-garbage-json", "server-empty-choices",
                 "server-unknown-model", "train-nan", "within-limit", "no-rationales", "eval-wrong-architecture",
                 "out-of-memory", "disk-full", "make-"):
        assert any(kind in name for name in names), kind
    # issue 19: bad values (batch size, lr, α, epochs, fractions, seeds, scorings, splits, teachers), a mistake in a
    # later run of a command that runs several, and files: truncated, not JSON, a missing key, a file in the way
    for kind in ("batch-size-zero", "lr-negative", "alpha-negative", "epochs-zero", "fraction-above-one",
                 "seeds-not-integers", "scoring-unknown", "split-unknown", "no-teacher", "teacher-twice",
                 "table-bad-seed-after", "second-teacher", "later-row", "later-dataset", "out-under-a-file",
                 "truncated-safetensors", "config-not-json", "tokenizer-json-not-json", "tokenizer-damaged",
                 "resume-state-damaged", "no-network"):
        assert any(kind in name for name in names), kind


def test_help_shows_each_flags_rule(capsys):
    """The rule declared next to a field is what --help shows (and what the parser checks)."""
    import train

    with pytest.raises(SystemExit):
        cli.parse_flags(train.TrainConfig, ["--help"])
    lines = capsys.readouterr().out.splitlines()
    for flag, rule in (("--batch_size=8", "[>= 1]"), ("--lr=5e-05", "[> 0]"), ("--train_fraction=1.0", "[in (0, 1]]"),
                       ("--alpha=", "[name=weight ..., each >= 0]"), ("--method=tinyllm", "[one of tinyllm, finetune")):
        line = next(line for line in lines if line.startswith(f"  {flag}"))
        assert rule in line, line


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_expected_failure_is_one_clear_message(case: Case, outcomes: dict[str, Outcome]):
    outcome = outcomes[case.name]
    output = outcome.output
    assert outcome.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    block = output[output.index("error: "):]
    for pattern in case.expect:
        assert re.search(pattern, block, re.S), f"{pattern!r} not in:\n{block[:3000]}"
    for pattern in case.logged:
        assert re.search(pattern, output[:output.index("error: ")]), f"{pattern!r} not in:\n{output[:3000]}"
    assert sorted(outcome.after - outcome.before) == [], "files left behind"


# ---------------------------------------------------------------------------------------------------
# --help, bugs, --debug

def field_comment(config_cls: type, name: str) -> str:
    """The comment on a field's line, read with a plain regex (not the parser --help uses)."""
    for line in inspect.getsource(config_cls).splitlines():
        match = re.match(rf"\s+{name}: [^=]+ = .*?(?:  # (.*))?$", line)
        if match:
            return (match.group(1) or "").strip()
    raise AssertionError(f"{config_cls.__name__}.{name} not found in its source")


def config_class(module: str, name: str) -> type:
    return getattr(importlib.import_module(module), name)


HELP = [("tinyllm.py rationales", "tinyllm", "RationalesConfig"), ("train.py", "train", "TrainConfig"),
        ("eval.py", "eval", "EvalConfig"), ("eval.py table", "eval", "TableConfig"),
        ("experiments.py study", "experiments", "StudyConfig"), ("tests/bench.py", "bench", "BenchConfig")]


def assert_lists_every_field(help_text: str, command: str, config: type) -> None:
    lines = help_text.splitlines()
    assert lines[0] == f"usage: python {command} [--key=value ...]"
    for f in dataclasses.fields(config):
        line = next((line for line in lines if line.startswith(f"  --{f.name}=")), None)
        assert line is not None, f"{command} --help lacks --{f.name}:\n{help_text}"
        kind = f.type if isinstance(f.type, str) else f.type.__name__  # a str under `from __future__ import annotations`
        assert str(f.default) in line and re.search(rf" {kind}(  |$)", line), line
        comment = field_comment(defining_class(config, f.name), f.name)
        assert comment and comment in line, f"--{f.name} has no comment on its line: {line}"
    assert any(line.startswith("  --debug=0") for line in lines) and any(line.startswith("  --help") for line in lines)
    # below the usage: each line a flag or a short heading ("optimisation: the paper's defaults:"), nothing else
    flags = lines[lines.index(next(line for line in lines if line.startswith("flags (type"))) + 1:]
    stray = [line for line in flags if not (line.startswith("  --") or re.fullmatch(r" [a-z][^;()]{0,58}:", line))]
    assert not stray, f"{command} --help: lines that are neither a flag nor a heading: {stray}"


def defining_class(config: type, name: str) -> type:
    """The class whose body declares `name` (a subclass's, else a base's)."""
    return next(cls for cls in config.__mro__ if name in cls.__dict__.get("__annotations__", {}))


def test_help_lists_every_field_with_its_type_default_and_comment():
    """Each script's --help as the user runs it; the other commands of experiments.py through the same
    main() in this process (the same dispatch, a torch import less each)."""
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda h: subprocess.run([PYTHON, *h[0].split(), "--help"], cwd=REPO, capture_output=True,
                                                         text=True, timeout=120), HELP))
    for (command, module, name), result in zip(HELP, results):
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert_lists_every_field(result.stdout, command, config_class(module, name))


@pytest.mark.parametrize("script,command,config", [("experiments", "sweep", "SweepConfig"),
                                                   ("experiments", "fractions", "FractionsConfig"),
                                                   ("experiments", "ablations", "AblationsConfig"),
                                                   ("experiments", "report", "ReportConfig")])
def test_help_of_the_other_commands(script, command, config, capsys, monkeypatch):
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", command, "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main([command, "--help"])
    assert exit_.value.code == 0
    assert_lists_every_field(capsys.readouterr().out, f"{script}.py {command}", getattr(module, config))


def test_a_bug_keeps_its_traceback(world, tmp_path):
    """Anything unexpected is not dressed up as a user error: here read_examples is broken on purpose."""
    code = ("import runpy, sys, data\n"
            "def broken(path):\n"
            "    raise ZeroDivisionError('a bug in read_examples')\n"
            "data.read_examples = broken\n"
            f"sys.argv = ['tinyllm.py', 'rationales', '--data={world.template}', '--cache={tmp_path}', '--limit=2',\n"
            "            '--teachers=t=release:llama-2']\n"
            "runpy.run_path('tinyllm.py', run_name='__main__')\n")
    result = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=base_env(world, tmp_path / "home"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "ZeroDivisionError: a bug in read_examples" in result.stderr
    assert not any(line.startswith("error: ") for line in result.stderr.splitlines()), result.stderr


@pytest.mark.parametrize("how", ["--debug=1", "TINYLLM_DEBUG=1"])
def test_debug_shows_the_traceback_of_an_expected_failure(world, tmp_path, how):
    env = base_env(world, tmp_path / "home") | ({"TINYLLM_DEBUG": "1"} if how.startswith("TINYLLM") else {})
    flags = ["--debug=1"] if how.startswith("--") else []
    result = subprocess.run([PYTHON, "tinyllm.py", "rationales", "--dataset=csqa", *flags], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "cli.UserError" in result.stderr, result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("error: --dataset=csqa: not one of obqa")


# ---------------------------------------------------------------------------------------------------
# Ctrl-C: one line, exit 130, nothing half-written, and the next run continues

def interrupt_when(command: list[str], env: dict, ready: str, timeout: float = 120) -> tuple[int, str]:
    """Start `command`, send SIGINT once a line of its output matches `ready`; (exit status, output)."""
    # SIGINT back to its default in the child: a test run started in the background (`make test &`, nohup)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler, as it should not
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        seen.append(line)
        if re.search(ready, line):
            process.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline, "".join(seen)
    else:
        process.wait()
        raise AssertionError(f"exited before {ready!r}:\n{''.join(seen)}")
    rest, _ = process.communicate(timeout=60)
    return process.returncode, "".join(seen) + rest


def assert_one_interrupted_line(output: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1 and output.rstrip().endswith(lines[0]), output
    return lines[0]


def test_ctrl_c_during_rationales_keeps_the_cache_and_the_same_command_continues(world, tmp_path):
    delay = {"seconds": 0.2}

    def slow(handler) -> None:
        reply(200, chat("Because the question says so, the answer follows."), delay=delay["seconds"])(handler)

    world.server.hooks["/slow-ok/v1/chat/completions"] = slow
    cache = tmp_path / "cache"
    command = [PYTHON, "tinyllm.py", "rationales", f"--data={world.template}", f"--cache={cache}", "--limit=40",
               "--k=0", "--device=cpu", "--concurrency=1", f"--teachers=srv=openai:{world.server.url}/slow-ok/v1#stub"]
    env = base_env(world, tmp_path / "home")
    returncode, output = interrupt_when(command, env, r"^srv: \d+/40 ")
    assert returncode == 130
    line = assert_one_interrupted_line(output)
    assert line == (f"interrupted: the rationales made so far are kept in {cache / 'obqa'}/; the same command "
                    "makes only the missing ones")
    path = tinyllm.cache_file(cache, "obqa", "srv")
    records, good = tinyllm.read_jsonl(path)  # whole records only (a torn last line would be dropped)
    kept = len(records)
    assert 4 <= kept < 40 and [p.name for p in path.parent.iterdir() if not is_lock_file(p)] == [path.name]

    delay["seconds"] = 0.0
    result = subprocess.run(command[:-2] + ["--concurrency=8", command[-1]], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"srv (openai:{world.server.url}/slow-ok/v1#stub): {kept} cached, {40 - kept} to make" in result.stderr
    assert len(tinyllm.load_rationales(cache, "obqa", "srv")) == 40


def test_ctrl_c_during_training_keeps_the_last_checkpoint_and_resume_continues(world, tmp_path):
    run = tmp_path / "out" / "obqa" / "finetune"
    command = [PYTHON, "train.py", f"--student={world.t5}", "--method=finetune", f"--data={world.template}",
               f"--out={run}", "--limit=16", "--batch_size=2", "--epochs=100", "--save_every=2", "--eval_every=100000",
               "--log_every=1", "--device=cpu"]
    env = base_env(world, tmp_path / "home")
    returncode, output = interrupt_when(command, env, r"^step 3/800 ")
    assert returncode == 130
    line = assert_one_interrupted_line(output)
    match = re.fullmatch(rf"interrupted: the last checkpoint {re.escape(str(run / 'last'))} \(step (\d+)\) is kept: "
                         r"RESUME=1 \(--resume=1\) continues from it", line)
    assert match, line
    step = int(match.group(1))
    assert step >= 2 and step % 2 == 0
    assert sorted(p.name for p in run.iterdir() if not is_lock_file(p)) == ["last", "metrics.jsonl"]  # no temp folder

    result = subprocess.run(command + ["--resume=1", f"--stop_at={step + 1}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"resuming {run} at step {step}/800" in result.stdout


def test_eval_shows_progress_per_split(world, tmp_path):
    result = subprocess.run([PYTHON, "eval.py", f"--model={world.t5}", f"--data={world.template}",
                             f"--out={tmp_path / 'out'}", "--limit=3", "--batch_size=2", "--device=cpu",
                             "--max_new_tokens=4"], cwd=REPO, env=base_env(world, tmp_path / "home"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for split in ("test", "valid"):  # not a terminal: plain lines, the last one at 3/3
        assert re.search(rf"^obqa {split}: 3/3  [\d.]+ examples/s  ETA 0:00:00$", result.stderr, re.M), result.stderr


def test_experiments_py_lists_its_commands():
    import experiments
    with pytest.raises(SystemExit) as no_command:
        experiments.main([])
    assert "expected one of sweep, fractions, ablations, study, report" in str(no_command.value)
    listed = subprocess.run([PYTHON, "experiments.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout.startswith("usage: python experiments.py <command>")
    for command in ("sweep", "fractions", "ablations", "study", "report"):
        assert re.search(rf"^  {command} +\S", listed.stdout, re.M), listed.stdout
