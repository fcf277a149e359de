"""tinyllm.py: the rationale cache, the teachers (local, server, release) and hub downloads.

Offline: datasets come from the release folder in the assets (served over loopback HTTP where the
download path matters); servers and the hub are loopback stubs built from `serve_folder`.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import cli
import data
import tinyllm
from conftest import REPO, download



@pytest.fixture(scope="session")
def release(assets) -> Path:
    return assets / "tinyllm_release"


@pytest.fixture(scope="session")
def obqa_data(tmp_path_factory, release) -> Path:
    """OBQA (splits + the release's rationales) fetched once into a data folder shared by the tests."""
    folder = tmp_path_factory.mktemp("data")
    download("obqa", folder, base_url=str(release), rationales=True)
    return folder


def run(*flags: str) -> None:
    tinyllm.main(["rationales", *flags])


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- flags --------------------------------------------------------------------------------------

def test_flags_are_type_checked():
    cfg = tinyllm.parse_flags(tinyllm.RationalesConfig, ["--k=0", "--teacher_forcing=0", "--timeout=2.5", "--limit="])
    assert (cfg.k, cfg.teacher_forcing, cfg.timeout, cfg.limit) == (0, False, 2.5, 0)
    with pytest.raises(SystemExit, match="unknown flag --colour"):
        tinyllm.parse_flags(tinyllm.RationalesConfig, ["--colour=red"])
    with pytest.raises(SystemExit, match="--k=two: expected int"):
        tinyllm.parse_flags(tinyllm.RationalesConfig, ["--k=two"])
    with pytest.raises(SystemExit, match="--teacher_forcing=maybe: expected bool"):
        tinyllm.parse_flags(tinyllm.RationalesConfig, ["--teacher_forcing=maybe"])
    with pytest.raises(SystemExit, match="not name=source"):
        tinyllm.parse_teachers("flan-t5-xl")


# ---- the cache ----------------------------------------------------------------------------------

def record(id_: str, rationale: str, when: float, split: str = "train", error: str | None = None) -> dict:
    return dict(split=split, id=id_, teacher="t", source="s", prompt_sha256="h", rationale=rationale, raw=rationale,
                settings={}, stated_answer=None, degenerate=False, error=error, time=when)


def test_torn_last_line_is_dropped_and_cut_before_appending(tmp_path):
    path = tinyllm.cache_file(tmp_path, "obqa", "t")
    writer = tinyllm.CacheWriter(path)
    writer.write([record("a", "one", 1.0), record("b", "two", 2.0)])
    writer.close()
    with open(path, "ab") as f:  # a crash in the middle of a write
        f.write(b'{"split": "train", "id": "c", "rati')
    assert set(tinyllm.load_rationales(tmp_path, "obqa", "t")) == {"a", "b"}
    writer = tinyllm.CacheWriter(path)
    writer.write([record("c", "three", 3.0)])
    writer.close()
    assert [r["id"] for r in lines(path)] == ["a", "b", "c"]

    path.write_text(path.read_text().replace('"id": "b"', '"id": b'))  # damage that is not a crash
    with pytest.raises(cli.UserError, match=r"t\.jsonl:2: not a JSON record"):
        tinyllm.load_rationales(tmp_path, "obqa", "t")


def test_newer_record_wins_errors_are_not_rationales_and_compaction(tmp_path):
    writer = tinyllm.CacheWriter(tinyllm.cache_file(tmp_path, "obqa", "t"))
    writer.write([record("a", "old", 1.0), record("b", "", 1.0, error="ValueError: no text"),
                  record("a", "x", 1.0, split="valid")])
    writer.close()
    shard = tinyllm.CacheWriter(tinyllm.cache_file(tmp_path, "obqa", "t", rank=1))
    shard.write([record("a", "new", 2.0)])
    shard.close()
    assert {k: r["rationale"] for k, r in tinyllm.load_rationales(tmp_path, "obqa", "t").items()} == {"a": "new"}
    assert set(tinyllm.load_rationales(tmp_path, "obqa", "t", split="valid")) == {"a"}
    tinyllm.compact_cache(tmp_path, "obqa", "t")
    assert tinyllm.cache_files(tmp_path, "obqa", "t") == [tinyllm.cache_file(tmp_path, "obqa", "t")]
    assert [(r["split"], r["id"], r["rationale"]) for r in lines(tinyllm.cache_file(tmp_path, "obqa", "t"))] == [
        ("train", "a", "new"), ("train", "b", ""), ("valid", "a", "x")]


# ---- a teacher kind added the way the README shows: one class, one method, one registry line ----

class EchoTeacher:
    """States the gold answer (it sees it: teacher forcing) and counts what it is asked."""
    asked: list[str] = []

    def __init__(self, spec: str, cfg, device: str):
        self.batch_size = 3

    def generate(self, jobs: list[tinyllm.Job]) -> list[str]:
        EchoTeacher.asked += [job.example.id for job in jobs]
        return [f"{job.prompt.count('Answer')} answers seen. So the answer is "
                f"({'abcdefgh'[job.example.answer]}) {job.example.options[job.example.answer]}." for job in jobs]


@pytest.fixture
def echo(monkeypatch):
    monkeypatch.setitem(tinyllm.TEACHER_KINDS, "echo", EchoTeacher)
    EchoTeacher.asked = []
    return EchoTeacher


def test_changing_the_prompt_regenerates_changing_nothing_does_not(tmp_path, obqa_data, echo, capsys):
    flags = ["--dataset=obqa", "--teachers=e=echo:", f"--data={obqa_data}", f"--cache={tmp_path}", "--limit=10"]
    run(*flags)
    assert len(echo.asked) == 10
    path = tinyllm.cache_file(tmp_path, "obqa", "e")
    first = lines(path)
    assert len(first) == 10 and all(r["teacher"] == "e" and r["source"] == "echo:" for r in first)
    assert all(r["settings"]["k"] == 2 and r["settings"]["teacher_forcing"] is True for r in first)
    assert "stated answer = gold 10/10 (100.0%)" in capsys.readouterr().out

    echo.asked = []
    run(*flags)
    assert echo.asked == [] and lines(path) == first  # nothing changed: nothing made, file untouched

    run(*flags, "--limit=12")  # two more examples; the first ten keep their prompts
    assert len(echo.asked) == 2

    for change in ("--k=0", "--teacher_forcing=0", "--seed=1"):
        echo.asked = []
        run(*flags, change)
        assert len(echo.asked) == 10, change
    records = lines(path)
    assert len(records) == 12 and len({r["id"] for r in records}) == 12  # compacted: one per example
    by_id = {r["id"]: r for r in records}
    assert by_id[first[0]["id"]]["settings"]["seed"] == 1
    assert by_id[first[0]["id"]]["prompt_sha256"] != first[0]["prompt_sha256"]


def test_valid_split_and_rank_shards(tmp_path, obqa_data, echo, monkeypatch):
    flags = ["--dataset=obqa", "--teachers=e=echo:", f"--data={obqa_data}", f"--cache={tmp_path}", "--limit=5",
             "--splits=train,valid"]
    for rank in (0, 1):  # torchrun's env without a process group: each rank its own shard
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        run(*flags)
    shards = tinyllm.cache_files(tmp_path, "obqa", "e")
    assert [p.name for p in shards] == ["e.rank0.jsonl", "e.rank1.jsonl"]
    assert sorted(len(lines(p)) for p in shards) == [5, 5] and len(echo.asked) == 10
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    echo.asked = []
    run(*flags)  # one process: nothing to make, the shards merged into one file
    assert echo.asked == []
    assert tinyllm.cache_files(tmp_path, "obqa", "e") == [tinyllm.cache_file(tmp_path, "obqa", "e")]
    assert len(tinyllm.load_rationales(tmp_path, "obqa", "e", split="valid")) == 5
    with pytest.raises(SystemExit, match="--splits=test"):
        run(*flags, "--splits=test")


# ---- the paper's release ------------------------------------------------------------------------

def test_release_obqa_train_both_paper_teachers(tmp_path, release, serve_folder, monkeypatch, capsys):
    server = serve_folder(release)
    monkeypatch.setenv("TINYLLM_DATA_URL", server.url)  # data.py downloads from here
    start = time.perf_counter()
    run("--dataset=obqa", f"--data={tmp_path / 'data'}", f"--cache={tmp_path / 'cache'}", "--limit=0")
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    print(f"release import, OBQA train, both teachers, download included: {seconds:.1f} s")
    for teacher in ("flan-t5-xl", "llama-2"):
        rationales = tinyllm.load_rationales(tmp_path / "cache", "obqa", teacher)
        assert len(rationales) == 4957, teacher
        assert len(lines(tinyllm.cache_file(tmp_path / "cache", "obqa", teacher))) == 4957
        assert f"{teacher} train: 4957/4957 rationales" in out
    first = tinyllm.load_rationales(tmp_path / "cache", "obqa", "llama-2")["7-980"]
    assert first["rationale"].startswith("If the sun is not there, the plants will not sprout")
    assert first["source"] == "release:llama-2" and first["error"] is None
    assert tinyllm.load_rationales(tmp_path / "cache", "obqa", "flan-t5-xl")["7-980"]["rationale"] == \
        "Sun is responsible for plants sprouting, blooming and wilting."


def test_release_piqa_has_no_llama2_rationales(tmp_path, release, monkeypatch, capsys):
    monkeypatch.setenv("TINYLLM_DATA_URL", str(release))
    with pytest.raises(SystemExit, match="llama-2: no rationale for any piqa train example"):
        run("--dataset=piqa", f"--data={tmp_path / 'data'}", f"--cache={tmp_path / 'cache'}", "--limit=8")
    assert "the paper's release has no llama-2 rationale" in capsys.readouterr().out
    assert len(tinyllm.load_rationales(tmp_path / "cache", "piqa", "flan-t5-xl")) == 8
    assert tinyllm.load_rationales(tmp_path / "cache", "piqa", "llama-2") == {}


# ---- server teachers against a loopback stub -----------------------------------------------------

def reply(handler, status: int, body: bytes | dict, hold: threading.Event | None = None) -> None:
    """Answer; with `hold`, only once the test sets it (a server that hangs past the client's timeout)."""
    if hold is not None:
        hold.wait(60)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)
    except OSError:  # the client gave up (timeout) while we slept
        pass


def openai_stub(server, path: str, answer):
    """Hook `path`: answer(question, attempt, body) -> (status, body, hold); attempts counted per question.
    Every request body is kept in `bodies` for the test to check in its own thread: an assertion raised in
    the handler's thread would only drop the connection (http.server swallows it)."""
    examples = data.load_split("obqa", "train", server.data_dir, limit=server.limit)
    attempts: dict[str, int] = {}
    bodies: list[dict] = []
    lock = threading.Lock()

    def handle(handler):
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        prompt = body["messages"][0]["content"] if "messages" in body else body["prompt"]
        question = next(e.question for e in examples if e.question in prompt)
        with lock:
            bodies.append(body)
            attempts[question] = attempts.get(question, 0) + 1
            attempt = attempts[question]
        reply(handler, *answer(examples.index(next(e for e in examples if e.question == question)), attempt, body))

    server.hooks[path] = handle
    return examples, attempts, bodies


def chat(text, tokens: int = 7) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}}], "usage": {"completion_tokens": tokens}}


def test_server_teacher_retries_records_errors_and_reruns_only_those(tmp_path, obqa_data, serve_folder):
    server = serve_folder(tmp_path)
    server.data_dir, server.limit = obqa_data, 6

    hang = threading.Event()  # set only after the run: the request it holds can only end by the client's timeout

    def answer(index: int, attempt: int, body: dict):
        if index == 1 and attempt == 1:
            return 500, {"error": "overloaded"}, None
        if index == 2 and attempt <= 2:
            return 429, {"error": "slow down"}, None
        if index == 3 and attempt == 1:
            return 200, chat("too late"), hang  # hangs past the client's timeout
        if index == 4 and attempt == 1:
            return 200, b'{"choices": [', None  # malformed JSON: not about the example, retried like a 5xx
        if index == 5 and attempt == 1:
            return 200, chat("   "), None  # no text
        return 200, chat(f"Rationale {index}. So the answer is ({'abcd'[examples[index].answer]})."), None

    examples, attempts, bodies = openai_stub(server, "/v1/chat/completions", answer)
    # the timeout is far above what an immediate answer takes on a loaded machine: only the held request times out
    flags = ["--dataset=obqa", f"--teachers=srv=openai:{server.url}/v1#stub/model-7B", f"--data={obqa_data}",
             f"--cache={tmp_path / 'cache'}", "--limit=6", "--k=0", "--max_new_tokens=16", "--timeout=3",
             "--retries=3", "--backoff=0.01", "--concurrency=3"]
    try:
        run(*flags)
    finally:
        hang.set()
    assert len(bodies) == sum(attempts.values()) == 11
    assert all(b["model"] == "stub/model-7B" and b["max_tokens"] == 16 and b["temperature"] == 0.0
               for b in bodies), bodies
    cached = tinyllm.read_cache(tmp_path / "cache", "obqa", "srv")
    by_index = [cached[("train", e.id)] for e in examples]
    assert [r["rationale"] for r in by_index[:5]] == [f"Rationale {i}. So the answer is ({'abcd'[examples[i].answer]})."
                                                      for i in range(5)]
    assert [r["stated_answer"] == examples[i].answer for i, r in enumerate(by_index[:5])] == [True] * 5
    assert "no text" in by_index[5]["error"]
    assert [attempts[e.question] for e in examples] == [1, 2, 3, 2, 2, 1]
    assert set(tinyllm.load_rationales(tmp_path / "cache", "obqa", "srv")) == {e.id for e in examples[:5]}

    run(*flags)  # only the error is asked again; now it succeeds
    assert [attempts[e.question] for e in examples] == [1, 2, 3, 2, 2, 2]
    assert len(tinyllm.load_rationales(tmp_path / "cache", "obqa", "srv")) == 6
    assert len(lines(tinyllm.cache_file(tmp_path / "cache", "obqa", "srv"))) == 6


def test_server_that_stays_down_ends_the_run_and_keeps_what_is_done(tmp_path, obqa_data, serve_folder):
    server = serve_folder(tmp_path)
    server.data_dir, server.limit = obqa_data, 10
    state = {"up": 5}  # answers the first five requests, then 503 until it is told otherwise
    lock = threading.Lock()

    def answer(index: int, attempt: int, body: dict):
        with lock:
            state["up"] -= 1
            if state["up"] < 0:
                return 503, {"error": "down"}, None
        return 200, {"choices": [{"text": f"Because {index}."}]}, None

    examples, attempts, bodies = openai_stub(server, "/v1/completions", answer)
    flags = ["--dataset=obqa", f"--teachers=srv=openai-completions:{server.url}#base", f"--data={obqa_data}",
             f"--cache={tmp_path / 'cache'}", "--limit=10", "--concurrency=1", "--batch_size=1", "--retries=2",
             "--backoff=0.01"]
    with pytest.raises(SystemExit, match=r"srv: http://127\.0\.0\.1:\d+/v1/completions still failing after 3 "
                                         r"attempts: HTTP 503.*kept in the cache, rerun to continue"):
        run(*flags)
    assert len(tinyllm.load_rationales(tmp_path / "cache", "obqa", "srv")) == 5
    assert sum(attempts.values()) == 5 + 3  # the queued requests were not sent once it gave up
    assert len(bodies) == 8 and all("prompt" in b and "messages" not in b for b in bodies)  # the prompt as is

    state["up"] = 100
    run(*flags)
    assert len(tinyllm.load_rationales(tmp_path / "cache", "obqa", "srv")) == 10
    assert len(lines(tinyllm.cache_file(tmp_path / "cache", "obqa", "srv"))) == 10


def test_server_with_a_wrong_model_name_stops_at_once(tmp_path, obqa_data, serve_folder):
    server = serve_folder(tmp_path)
    server.data_dir, server.limit = obqa_data, 4
    examples, attempts, _ = openai_stub(server, "/v1/chat/completions",
                                        lambda index, attempt, body: (404, {"error": "model not found"}, None))
    with pytest.raises(SystemExit, match=r"answered HTTP 404 .*model not found.*check the URL, the model name 'nope'"):
        run("--dataset=obqa", f"--teachers=srv=openai:{server.url}/v1/#nope", f"--data={obqa_data}",
            f"--cache={tmp_path / 'cache'}", "--limit=4", "--concurrency=1")
    assert sum(attempts.values()) == 1 and tinyllm.read_cache(tmp_path / "cache", "obqa", "srv") == {}


def test_server_not_running_is_a_clear_error(tmp_path, obqa_data):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit, match=rf"srv: http://127\.0\.0\.1:{port}/v1/chat/completions still failing "
                                         r"after 2 attempts: ConnectionError"):
        run("--dataset=obqa", f"--teachers=srv=openai:http://127.0.0.1:{port}#m", f"--data={obqa_data}",
            f"--cache={tmp_path}", "--limit=3", "--retries=1", "--backoff=0.01")
    with pytest.raises(SystemExit, match="expected BASE_URL#MODEL"):
        run("--dataset=obqa", "--teachers=srv=openai:localhost:8000", f"--data={obqa_data}", f"--cache={tmp_path}",
            "--limit=3")


# ---- hub downloads against a loopback server shaped like /{repo}/resolve/{revision}/{file} -------

@pytest.fixture
def hub(tmp_path, serve_folder, monkeypatch):
    """A fake hub folder and server; every GET's (path, Authorization, Range) is recorded."""
    root = tmp_path / "hub_root"
    server = serve_folder(root)
    server.seen = []
    server.root_path = root
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("TINYLLM_HOME", str(tmp_path / "home"))

    def add(repo: str, revision: str, files: dict[str, bytes]) -> None:
        for name, content in files.items():
            path = root / repo / "resolve" / revision / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        for name in (*files, data.HUB_CONFIG, *data.HUB_OPTIONAL, "model.safetensors",
                     "model.safetensors.index.json"):
            url_path = f"/{repo}/resolve/{revision}/{name}"
            server.hooks.setdefault(url_path, record_and_serve)

    def record_and_serve(handler):
        server.seen.append((handler.path, handler.headers.get("Authorization"), handler.headers.get("Range")))
        return http.server.SimpleHTTPRequestHandler.do_GET(handler)

    server.add = add
    return server


WEIGHTS = os.urandom(300_000)
BASE_FILES = {"config.json": b'{"model_type": "t5"}', "spiece.model": b"sentencepiece bytes"}


def test_hub_single_file_with_token(hub, tmp_path):
    hub.add("org/tiny", "main", {**BASE_FILES, "model.safetensors": WEIGHTS})
    folder = data.resolve_model("org/tiny")
    assert folder == tmp_path / "home" / "hub" / "org--tiny" / "main"
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    assert (folder / "config.json").read_bytes() == BASE_FILES["config.json"]
    assert not list(folder.glob("*.part")) and not (folder / "tokenizer.model").exists()
    assert {auth for _, auth, _ in hub.seen} == {"Bearer hf_secret"}
    asked = len(hub.seen)
    assert data.resolve_model("org/tiny") == folder and len(hub.seen) == asked  # offline afterwards
    assert data.resolve_model(str(folder)) == folder  # a folder is used as is


def test_hub_sharded_pinned_revision(hub, tmp_path):
    shards = {"model-00001-of-00002.safetensors": WEIGHTS[:1000], "model-00002-of-00002.safetensors": WEIGHTS[1000:]}
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors"}}
    hub.add("org/big", "0123abc", {**BASE_FILES, "model.safetensors.index.json": json.dumps(index).encode(), **shards})
    hub.add("org/big", "main", {"config.json": b'{"model_type": "llama"}'})  # another revision, not asked for
    folder = data.resolve_model("org/big@0123abc")
    assert folder.name == "0123abc" and json.loads((folder / "config.json").read_text())["model_type"] == "t5"
    for name, content in shards.items():
        assert (folder / name).read_bytes() == content
    assert not any(path.endswith("/model.safetensors") for path, _, _ in hub.seen)


def test_hub_resumes_an_interrupted_download_and_checks_sha256(hub, tmp_path):
    hub.add("org/tiny", "main", BASE_FILES)
    half = len(WEIGHTS) // 2
    sha = hashlib.sha256(WEIGHTS).hexdigest()

    def flaky(handler):  # the first answer breaks off halfway; the next honours Range
        byte_range = handler.headers.get("Range")
        hub.seen.append((handler.path, handler.headers.get("Authorization"), byte_range))
        start = int(byte_range.removeprefix("bytes=").rstrip("-")) if byte_range else 0
        handler.send_response(206 if byte_range else 200)
        handler.send_header("Content-Length", str(len(WEIGHTS) - start))
        handler.send_header("X-Linked-Etag", f'"{sha}"')
        if byte_range:
            handler.send_header("Content-Range", f"bytes {start}-{len(WEIGHTS) - 1}/{len(WEIGHTS)}")
        handler.end_headers()
        handler.wfile.write(WEIGHTS[start:] if byte_range else WEIGHTS[:half])
        handler.close_connection = True

    hub.hooks["/org/tiny/resolve/main/model.safetensors"] = flaky
    folder = data.resolve_model("org/tiny")
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    asked = [rng for path, _, rng in hub.seen if path.endswith("/model.safetensors")]
    assert len(asked) == 2 and asked[0] is None  # the second asks for what the first did not bring
    assert 0 < int(asked[1].removeprefix("bytes=").rstrip("-")) <= half

    hub.add("org/bad", "main", BASE_FILES)
    hub.hooks["/org/bad/resolve/main/model.safetensors"] = lambda h: reply_bytes(h, WEIGHTS, etag="0" * 64)
    with pytest.raises(cli.UserError, match="org/bad@main: model.safetensors does not match the sha256"):
        data.resolve_model("org/bad")


def reply_bytes(handler, content: bytes, etag: str) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(content)))
    handler.send_header("ETag", f'"{etag}"')
    handler.end_headers()
    handler.wfile.write(content)


def test_hub_missing_files_and_denied_access_are_clear_errors(hub):
    hub.add("org/noconfig", "main", {"spiece.model": b"x", "model.safetensors": WEIGHTS})
    with pytest.raises(cli.UserError, match=r"org/noconfig@main: config.json not found \(404 from http://127"):
        data.resolve_model("org/noconfig")
    hub.add("org/noweights", "main", BASE_FILES)
    with pytest.raises(cli.UserError, match="org/noweights@main: neither model.safetensors nor model.safetensors.index"):
        data.resolve_model("org/noweights")
    hub.add("org/notokenizer", "main", {"config.json": b"{}", "model.safetensors": WEIGHTS})
    with pytest.raises(cli.UserError, match="org/notokenizer@main: no tokenizer file"):
        data.resolve_model("org/notokenizer")
    hub.hooks["/org/gated/resolve/main/config.json"] = lambda h: h.send_error(401)
    with pytest.raises(cli.UserError, match="org/gated@main: access denied .401.*HF_TOKEN"):
        data.resolve_model("org/gated")
    with pytest.raises(cli.UserError, match="not a folder, and not a hub id"):
        data.resolve_model("no/such/folder")


# ---- local teachers (t5.py / llama.py) on tiny random weights ------------------------------------

STOP_AFTER_TWO_RECORDS = """
import os, runpy, sys, threading
real_fsync = os.fsync

def fsync(fd):  # the cache writer's fsync: once two records are durable, say so and wait for SIGKILL
    real_fsync(fd)
    if os.path.exists({path!r}) and open({path!r}, "rb").read().count(b"\\n") >= 2:
        print("two records", flush=True)
        threading.Event().wait()

os.fsync = fsync
sys.argv = {argv!r}
sys.path.insert(0, os.path.dirname({script!r}))  # as `python tinyllm.py` would
runpy.run_path({script!r}, run_name="__main__")
"""


def test_local_teacher_survives_a_real_kill(tmp_path, obqa_data, tiny_t5, capsys):
    """SIGKILL `rationales` mid-run, run it again: one record per example, the same rationales as a
    run that was never interrupted."""
    n = 10
    flags = ["--dataset=obqa", f"--teachers=tiny={tiny_t5}", f"--data={obqa_data}", f"--limit={n}",
             "--batch_size=2", "--max_new_tokens=6", "--device=auto"]
    start = time.perf_counter()
    run(*flags, f"--cache={tmp_path / 'whole'}")
    seconds = time.perf_counter() - start
    whole = tinyllm.load_rationales(tmp_path / "whole", "obqa", "tiny")
    progress = capsys.readouterr().err
    assert re.search(rf"^tiny: {n}/{n}  [\d.]+ rationales/s  [\d.]+ tokens/s  ETA 0:00:00$", progress, re.M), progress
    print(f"tiny T5 teacher: {n / seconds:.1f} rationales/s (model load included)")
    assert len(whole) == n and all(r["settings"]["max_new_tokens"] == 6 for r in whole.values())

    path = tinyllm.cache_file(tmp_path / "killed", "obqa", "tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny matrices: threads only add contention
    script = tmp_path / "stops_after_two_records.py"
    script.write_text(STOP_AFTER_TWO_RECORDS.format(path=str(path), script=str(REPO / "tinyllm.py"),
                                                    argv=["tinyllm.py", "rationales", *flags,
                                                          f"--cache={tmp_path / 'killed'}"]))
    process = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    # an event, not a poll: the child says when its second record is on disk, then waits to be killed
    ready, _, _ = select.select([process.stdout], [], [], 120)
    assert ready and process.stdout.readline() == b"two records\n", \
        f"run ended before it could be killed: {process.stderr.read().decode() if process.poll() is not None else ''}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    process.stderr.close()
    written = path.read_bytes().count(b"\n")
    assert 2 <= written < n, written

    capsys.readouterr()
    run(*flags, f"--cache={tmp_path / 'killed'}")
    assert f"{written} cached, {n - written} to make" in capsys.readouterr().err  # only what the kill left undone
    records = lines(path)
    assert len(records) == n and len({r["id"] for r in records}) == n
    resumed = tinyllm.load_rationales(tmp_path / "killed", "obqa", "tiny")
    assert {i: r["rationale"] for i, r in resumed.items()} == {i: r["rationale"] for i, r in whole.items()}
    assert {i: r["prompt_sha256"] for i, r in resumed.items()} == {i: r["prompt_sha256"] for i, r in whole.items()}



def test_local_llama_teacher_chat_template_and_batching(tmp_path, obqa_data, tiny_llama, tiny_chat_llama):
    cfg = tinyllm.RationalesConfig(max_new_tokens=12)
    plain = tinyllm.LocalTeacher(str(tiny_llama), cfg, "cpu")
    chat = tinyllm.LocalTeacher(str(tiny_chat_llama), cfg, "cpu")
    assert (plain.kind, plain.chat, chat.chat) == ("llama", False, True)
    assert plain.encode("Q: why?") == plain.tokenizer.encode("Q: why?", bos=True)
    rendered = chat.tokenizer.apply_chat_template([{"role": "user", "content": "Q: why?"}])
    assert rendered.endswith("[user] Q: why?\n[assistant]")
    assert chat.encode("Q: why?") == chat.tokenizer.encode(rendered, bos=False)
    assert chat.encode("Q: why?")[0] == chat.tokenizer.bos_id  # once: the template's, no second one

    flags = ["--dataset=obqa", f"--teachers=chat={tiny_chat_llama}", f"--data={obqa_data}", "--limit=6",
             "--max_new_tokens=12", "--k=1"]
    run(*flags, f"--cache={tmp_path / 'one'}", "--batch_size=1")
    run(*flags, f"--cache={tmp_path / 'six'}", "--batch_size=6")  # left padding changes nothing
    one = tinyllm.load_rationales(tmp_path / "one", "obqa", "chat")
    six = tinyllm.load_rationales(tmp_path / "six", "obqa", "chat")
    assert len(one) == 6 and {i: r["raw"] for i, r in one.items()} == {i: r["raw"] for i, r in six.items()}
    assert any(r["raw"] for r in one.values())

    with pytest.raises(SystemExit, match="chat: no rationale for any obqa train example"):
        run(*flags, f"--cache={tmp_path / 'long'}", "--max_new_tokens=1024")
    errors = tinyllm.read_cache(tmp_path / "long", "obqa", "chat").values()
    assert all("exceeds the model's 1024 positions" in r["error"] for r in errors) and len(errors) == 6


def test_load_model_reads_the_kind_from_config(tiny_t5, tiny_llama, tmp_path, hub):
    hub.add("google/tiny-t5", "main", {p.name: p.read_bytes() for p in tiny_t5.iterdir() if p.is_file()})
    model, tokenizer, kind = data.load_model("google/tiny-t5")  # from the loopback hub
    assert kind == "t5" and tokenizer.eos_id == 1 and model.config.d_model == 32
    model, tokenizer, kind = data.load_model(str(tiny_llama))
    assert kind == "llama" and model.config.hidden_size == 32
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(cli.UserError, match=r"bert/config.json: .*bert"):
        data.load_model(str(bad))


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_continuous_batching_equals_decoding_each_prompt_alone(kind, tiny_llama, tiny_t5):
    """Seven prompts of different lengths through 3 rows: rows stop at different steps (an EOS that greedy
    decoding meets at different steps, or the row's own limit), refill from the queue, then shrink. Every
    output is the one-prompt-at-a-time greedy output."""
    import llama
    import t5
    import torch

    generator = torch.Generator().manual_seed(0)
    model = llama.Llama.from_pretrained(tiny_llama) if kind == "llama" else t5.T5.from_pretrained(tiny_t5)
    vocab = model.config.vocab_size
    prompts_ = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (5, 17, 9, 30, 2, 12, 8)]
    limits = [20, 3, 15, 9, 25, 1, 12]

    def alone(prompt: list[int], limit: int, eos: set[int]) -> list[int]:
        ids = torch.tensor([prompt])
        if kind == "llama":
            out = model.generate(ids, None, limit, eos_ids=list(eos))[0].tolist()
        else:
            out = model.generate(ids, torch.ones_like(ids), limit, eos_id=next(iter(eos)) if eos else -1)[0].tolist()
        ends = [i for i, token in enumerate(out) if token in eos]
        return out[:ends[0] + 1] if ends else out

    free_running = [alone(p, n, set()) for p, n in zip(prompts_, limits)]
    eos = {free_running[0][6]}  # met at step 7 by the first prompt, at other steps (or never) by the others
    expected = [alone(p, n, eos) for p, n in zip(prompts_, limits)]
    assert len({len(e) for e in expected}) >= 4  # rows really stop at different steps
    if kind == "llama":
        slots = llama.Slots(model, 3, max(len(p) + n for p, n in zip(prompts_, limits)), torch.device("cpu"))
    else:
        slots = t5.Slots(model, 3, max(limits), max(len(p) for p in prompts_), torch.device("cpu"))
    order = []
    for i, ids in tinyllm.continuous_generate(slots, prompts_, limits, eos, lambda logits: logits.argmax(-1)):
        order.append(i)
        assert ids == expected[i], i
    assert sorted(order) == list(range(len(prompts_))) and order != sorted(order)  # yielded as rows finish
    assert slots.rows < 3  # the tail ran on fewer rows


def test_sample_token_one_sampler_for_both_teacher_kinds():
    """tinyllm.sample_token is every local teacher's sampler (T5 and LLaMA alike): argmax at temperature 0;
    reproducible from its generator; drawing each token as often as its probability; top_p keeps the smallest
    set of tokens whose mass reaches it (a tiny top_p is greedy)."""
    import torch
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert tinyllm.sample_token(logits, 0.0, 1.0, None).tolist() == [0]
    draw = lambda seed, top_p=1.0: tinyllm.sample_token(  # noqa: E731
        logits.expand(20_000, 4), 1.0, top_p, torch.Generator().manual_seed(seed))
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    frequencies = torch.bincount(draw(2), minlength=4).float() / 20_000
    assert frequencies.tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.015)
    nucleus = torch.bincount(draw(3, top_p=0.7), minlength=4).float() / 20_000  # 0.5 + 0.3 reach 0.7
    assert nucleus.tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=0.015)
    assert set(draw(4, top_p=1e-6).tolist()) == {0}
    hot = torch.bincount(tinyllm.sample_token(logits.expand(20_000, 4), 2.0, 1.0, torch.Generator().manual_seed(5)),
                         minlength=4).float() / 20_000  # temperature 2: p ** (1/2), renormalised
    flat = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 0.5
    assert hot.tolist() == pytest.approx((flat / flat.sum()).tolist(), abs=0.015)


def test_is_stale_remakes_a_record_for_each_condition_alone():
    """The cache's remake rule, one condition at a time: a record made from the same source, settings and prompt
    stands; no record, an error, another source, other settings or another prompt each alone makes it stale."""
    settings = {"k": 2, "seed": 0, "teacher_forcing": True, "max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0}
    record = {"source": "openai:http://x/v1#m", "settings": dict(settings), "error": None,
              "prompt_sha256": "ab" * 32, "rationale": "r"}
    fresh = dict(record=record, source=record["source"], settings=settings, prompt_sha256=record["prompt_sha256"])
    assert tinyllm.is_stale(**fresh) is False
    changes = {"no record": dict(record=None),
               "an error": dict(record={**record, "error": "HTTP 500"}),
               "another source": dict(source="openai:http://y/v1#m"),
               "other settings": dict(settings={**settings, "k": 0}),
               "another prompt": dict(prompt_sha256="cd" * 32)}
    for what, change in changes.items():
        assert tinyllm.is_stale(**{**fresh, **change}) is True, what
    # a teacher that takes no prompt (the release) records None and is asked with None: it stands
    release = {**record, "prompt_sha256": None}
    assert tinyllm.is_stale(release, record["source"], settings, None) is False
