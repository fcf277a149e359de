"""data.py: pinned downloads from a loopback server, the six released datasets, validation, sampling."""
import functools
import http.server
import io
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import cli
import data
from conftest import REPO, download

# rows per split as released (PROVENANCE.md §6); PIQA's train is the pinned stand-in here
RELEASE_ROWS = {
    "arc": (1117, 295, 1165), "obqa": (4957, 500, 500), "piqa": (16113, 919, 919),
    "riddle": (3510, 511, 510), "pubmedqa": (500, 100, 400), "bioasq": (976, 109, 123),
}


@pytest.fixture
def release(assets) -> Path:
    return assets / "tinyllm_release"


@pytest.fixture(scope="module")
def release_data(tmp_path_factory) -> Path:
    """All six datasets with their rationale files, downloaded once through a loopback HTTP server."""
    from conftest import assets_dir
    if assets_dir() is None:
        pytest.skip("real assets not found: set TINYLLM_ASSETS to run this test")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(assets_dir() / "tinyllm_release"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    folder = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLLM_DATA_URL", f"http://127.0.0.1:{server.server_address[1]}")
        for dataset in data.DATASETS:
            download(dataset, folder, rationales=True)
    server.shutdown()
    server.server_close()
    return folder


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != data.LOCK_NAME)


def copy_dataset(release: Path, dataset: str, to: Path) -> Path:
    shutil.copytree(release / dataset, to / dataset, ignore=shutil.ignore_patterns("llm"))
    return to


# ----------------------------------------------------------------------------- downloads

def test_pinned_table_covers_every_release_file(release):
    on_disk = {str(p.relative_to(release)) for p in release.rglob("*.json")}
    assert on_disk == set(data.PINNED) and len(data.PINNED) == 93
    assert data.PIQA_TRAIN not in data.PINNED and data.PIQA_TRAIN_STAND_IN in data.PINNED


def test_git_blob_id_is_what_git_hash_object_prints(tmp_path):
    (tmp_path / "f").write_bytes(b"hello")  # `printf hello | git hash-object --stdin`
    assert data.git_blob_sha1(tmp_path / "f") == "b6fc4c620b67d95f953a5c1c1230aaab5db5a1b0"


def test_download_from_loopback_server_verifies_and_never_refetches(serve_folder, release, tmp_path, monkeypatch):
    server = serve_folder(release)
    monkeypatch.setenv("TINYLLM_DATA_URL", server.url + "/")
    folder = download("arc", tmp_path, rationales=True)
    assert folder == tmp_path / "arc"
    expected = ["arc/arc_train.json", "arc/arc_valid.json", "arc/arc_test.json"] + \
        [f"arc/llm/{s}_CoT_{k}.json" for s, n in (("train", 3), ("valid", 1), ("test", 3)) for k in range(n)]
    assert server.requests == ["/" + rel for rel in expected]
    assert leftovers(tmp_path) == sorted(expected)  # no .part left
    for rel in expected:
        assert (tmp_path / rel).read_bytes() == (release / rel).read_bytes()
    download("arc", tmp_path, rationales=True)
    data.load_split("arc", "valid", tmp_path)
    assert len(server.requests) == len(expected), "verified files must not be fetched again"


def test_checksum_mismatch_names_file_and_url_and_leaves_nothing(serve_folder, release, tmp_path, monkeypatch):
    source = copy_dataset(release, "arc", tmp_path / "src")
    body = bytearray((source / "arc/arc_valid.json").read_bytes())
    body[100] ^= 1  # same size: only the sha256 can tell
    (source / "arc/arc_valid.json").write_bytes(bytes(body))
    server = serve_folder(source)
    monkeypatch.setenv("TINYLLM_DATA_URL", server.url)
    with pytest.raises(data.DownloadError) as error:
        download("arc", tmp_path / "data")
    message = str(error.value)
    assert "arc/arc_valid.json" in message and f"{server.url}/arc/arc_valid.json" in message
    assert "checksum mismatch" in message and data.PINNED["arc/arc_valid.json"][1] in message
    assert leftovers(tmp_path / "data") == ["arc/arc_train.json"]  # fetched before; nothing of valid


def test_http_errors_name_file_and_url(serve_folder, tmp_path, monkeypatch):
    server = serve_folder(tmp_path / "empty")
    monkeypatch.setenv("TINYLLM_DATA_URL", server.url)
    with pytest.raises(data.DownloadError, match=r"obqa/obqa_train.json: HTTP 404 from http://127\.0\.0\.1:\d+/obqa/"):
        download("obqa", tmp_path / "data")

    def fail(handler):
        handler.send_error(500)
    server.hooks["/obqa/obqa_train.json"] = fail
    with pytest.raises(data.DownloadError, match=r"obqa/obqa_train.json: HTTP 500 .* from http://127"):
        data.load_split("obqa", "train", tmp_path / "data")
    assert leftovers(tmp_path / "data") == []


def test_truncated_body_is_an_error_and_leaves_nothing(serve_folder, release, tmp_path, monkeypatch):
    body = (release / "obqa/obqa_valid.json").read_bytes()

    def truncated(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[: len(body) // 2])
        handler.wfile.flush()
        handler.close_connection = True
    server = serve_folder(release)
    server.hooks["/obqa/obqa_valid.json"] = truncated
    monkeypatch.setenv("TINYLLM_DATA_URL", server.url)
    with pytest.raises(data.DownloadError) as error:
        data.fetch("obqa/obqa_valid.json", tmp_path)
    assert "obqa/obqa_valid.json" in str(error.value) and f"{server.url}/obqa/obqa_valid.json" in str(error.value)
    assert leftovers(tmp_path) == []


def range_server(body: bytes, seen: list):
    """A hook that honours `Range: bytes=N-` with a 206, and records the Range header of each request."""
    def serve(handler):
        wanted = handler.headers.get("Range")
        seen.append(wanted)
        start = int(wanted.split("=")[1].split("-")[0]) if wanted else 0
        handler.send_response(206 if wanted else 200)
        if wanted:
            handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        handler.send_header("Content-Length", str(len(body) - start))
        handler.end_headers()
        handler.wfile.write(body[start:])
    return serve


STOP_AT_64K = """
import os, sys, threading
sys.path.insert(0, {repo!r})
import requests, data
iter_content = requests.models.Response.iter_content

def stopping(self, *args, **kwargs):  # each chunk is written before the next is asked for
    for chunk in iter_content(self, *args, **kwargs):
        yield chunk
        if os.path.getsize({part!r}) >= 1 << 16:
            print("64k", flush=True)
            threading.Event().wait()  # until SIGKILL

requests.models.Response.iter_content = stopping
data.fetch({rel!r}, {data!r}, {url!r})
"""


def test_resume_after_a_killed_download(serve_folder, release, tmp_path):
    rel = "arc/arc_train.json"
    body = (release / rel).read_bytes()
    release_stall = threading.Event()

    def stall_halfway(handler):  # the first request: half the body, then nothing until the client dies
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[: len(body) // 2])
        handler.wfile.flush()
        release_stall.wait(30)
    server = serve_folder(release)
    server.hooks["/" + rel] = stall_halfway
    part = tmp_path / (rel + ".part")
    script = STOP_AT_64K.format(repo=str(REPO), part=str(part), rel=rel, data=str(tmp_path), url=server.url)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        # an event, not a poll: the child says when 64 KiB are in the .part file, then waits to be killed
        ready, _, _ = select.select([child.stdout], [], [], 60)
        assert ready and child.stdout.readline() == b"64k\n", "the download never reached 64 KiB"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
        release_stall.set()
    offset = part.stat().st_size
    assert 0 < offset < len(body) and not (tmp_path / rel).exists()

    seen = []
    server.hooks["/" + rel] = range_server(body, seen)
    assert data.fetch(rel, tmp_path, server.url) == tmp_path / rel
    assert seen == [f"bytes={offset}-"]
    assert (tmp_path / rel).read_bytes() == body and leftovers(tmp_path) == [rel]


def test_leftover_part_is_restarted_when_the_server_ignores_range(serve_folder, release, tmp_path):
    rel = "arc/arc_valid.json"
    (tmp_path / "arc").mkdir()
    (tmp_path / (rel + ".part")).write_bytes(b"garbage from an older, killed run")
    server = serve_folder(release)  # SimpleHTTPRequestHandler answers 200 to a Range request
    data.fetch(rel, tmp_path, server.url)
    assert (tmp_path / rel).read_bytes() == (release / rel).read_bytes() and leftovers(tmp_path) == [rel]


def test_stale_part_resumed_then_failing_its_checksum_is_fetched_again_once(serve_folder, release, tmp_path, caplog):
    rel = "arc/arc_valid.json"
    body = (release / rel).read_bytes()
    (tmp_path / "arc").mkdir()
    (tmp_path / (rel + ".part")).write_bytes(b"x" * 1000)  # not a prefix of the real file
    seen = []
    server = serve_folder(release)
    server.hooks["/" + rel] = range_server(body, seen)
    with caplog.at_level(logging.WARNING, logger="tinyllm.data"):
        data.fetch(rel, tmp_path, server.url)
    assert seen == ["bytes=1000-", None] and "fetching again from byte 0" in caplog.text
    assert (tmp_path / rel).read_bytes() == body and leftovers(tmp_path) == [rel]


def test_concurrent_fetches_of_one_file_download_it_once(serve_folder, release, tmp_path):
    server = serve_folder(release)
    results, errors = [], []

    def worker():
        try:
            results.append(data.fetch("bioasq/bioasq_train.json", tmp_path, server.url))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and results == [tmp_path / "bioasq/bioasq_train.json"] * 4
    assert server.requests == ["/bioasq/bioasq_train.json"]
    assert leftovers(tmp_path) == ["bioasq/bioasq_train.json"]


def test_file_url_and_folder_sources(release, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLLM_DATA_URL", release.as_uri())
    download("pubmedqa", tmp_path / "a")
    download("pubmedqa", tmp_path / "b", base_url=str(release))
    for folder in (tmp_path / "a", tmp_path / "b"):
        assert leftovers(folder) == [f"pubmedqa/pubmedqa_{s}.json" for s in ("test", "train", "valid")]
    with pytest.raises(data.DownloadError, match=r"bioasq/bioasq_train.json: not found at .*/nowhere/bioasq"):
        download("bioasq", tmp_path / "c", base_url=str(tmp_path / "nowhere"))
    assert leftovers(tmp_path / "c") == []


def test_piqa_train_falls_back_to_the_stand_in_only_when_the_source_lacks_it(serve_folder, release, tmp_path,
                                                                             monkeypatch, caplog):
    server = serve_folder(release)  # the release copy has no piqa_train.json: 404
    monkeypatch.setenv("TINYLLM_DATA_URL", server.url)
    with caplog.at_level(logging.WARNING, logger="tinyllm.data"):
        train = data.load_split("piqa", "train", tmp_path / "ok")
    assert len(train) == 16113 and "stand-in" in caplog.text and "piqa/piqa_train.json is not at" in caplog.text
    assert leftovers(tmp_path / "ok") == ["piqa/piqa_train.reconstructed.json"]
    assert server.requests == ["/piqa/piqa_train.json", "/piqa/piqa_train.reconstructed.json"]

    source = copy_dataset(release, "piqa", tmp_path / "src")  # a piqa_train.json that is not the pinned blob
    shutil.copy(source / "piqa/piqa_valid.json", source / "piqa/piqa_train.json")
    with pytest.raises(data.DownloadError, match=r"piqa/piqa_train.json: checksum mismatch .* git blob id"):
        download("piqa", tmp_path / "bad", base_url=str(source))
    assert leftovers(tmp_path / "bad") == []


# ----------------------------------------------------------------------------- the released datasets

@pytest.mark.parametrize("dataset", data.DATASETS)
def test_every_released_file_loads_with_the_release_row_counts(release_data, dataset):
    splits = {split: data.load_split(dataset, split, release_data) for split in data.SPLITS}
    assert tuple(len(splits[s]) for s in data.SPLITS) == RELEASE_ROWS[dataset]
    n_options = {"arc": 4, "obqa": 4, "piqa": 2, "riddle": 5, "pubmedqa": 3, "bioasq": 2}[dataset]
    for split in data.SPLITS:
        assert all(len(e.options) == n_options and 0 <= e.answer < n_options for e in splits[split])
        assert len(data.load_release_rationales(dataset, split, release_data)) == len(splits[split])


def test_obqa_is_json_lines_and_piqa_ids_become_strings(release_data):
    assert (release_data / "obqa/obqa_test.json").read_text().startswith('{"id": "8-343"')
    first = data.load_split("obqa", "test", release_data)[0]
    assert first == data.Example("8-343", first.question, ("make more phone calls", "quit eating lunch out",
                                 "buy less with monopoly money", "have lunch with friends"), 1)
    assert first.answer_text == "quit eating lunch out"
    assert data.load_split("piqa", "test", release_data)[0].id == "0"


MALFORMED = [
    ({"question": "q", "choices": ["x", "y"], "answer": "x"}, "missing field(s) id"),
    ({"id": "1", "question": "q", "choices": ["x"], "answer": "x"}, "at least 2 options"),
    ({"id": "1", "question": "q", "choices": "xy", "answer": "x"}, "at least 2 options"),
    ({"id": "1", "question": "q", "choices": ["x", " "], "answer": "x"}, "choice 1 must be a non-empty string"),
    ({"id": "1", "question": "q", "choices": ["x", 3], "answer": "x"}, "choice 1 must be a non-empty string"),
    ({"id": "1", "question": "", "choices": ["x", "y"], "answer": "x"}, "question must be a non-empty string"),
    ({"id": "1", "question": "q", "choices": ["x", "y"], "answer": "z"}, "answer 'z' matches 0 of the choices"),
    ({"id": "1", "question": "q", "choices": ["x", "y"], "answer": "x "}, "matches 0 of the choices"),
    ({"id": "1", "question": "q", "choices": ["x", "x", "y"], "answer": "x"}, "matches 2 of the choices"),
    ({"id": "1", "question": "q", "choices": ["x", "y"], "answer": 0}, "answer must be the text of one choice"),
    ({"id": None, "question": "q", "choices": ["x", "y"], "answer": "x"}, "id must be"),
    ({"id": "0", "question": "q", "choices": ["x", "y"], "answer": "x"}, "duplicate id"),
    (["not", "an", "object"], "expected an object"),
]


@pytest.mark.parametrize("row,problem", MALFORMED)
@pytest.mark.parametrize("layout", ["list", "lines"])
def test_malformed_rows_give_errors_naming_file_and_row(tmp_path, row, problem, layout):
    good = {"id": "0", "question": "q0", "choices": ["x", "y"], "answer": "y"}
    path = tmp_path / "bad.json"
    if layout == "list":
        path.write_text(json.dumps([good, row], indent=1))
        where = "row 1"
    else:
        path.write_text("\n".join(json.dumps(r) for r in (good, row)) + "\n")
        where = "row 1 (line 2)"
    with pytest.raises(cli.UserError) as error:
        data.read_examples(path)
    assert str(error.value).startswith(f"{path}: {where}") and problem in str(error.value), str(error.value)


def test_broken_json_line_and_empty_file_are_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[]")
    with pytest.raises(cli.UserError, match=rf"{path}: no examples"):
        data.read_examples(path)
    path.write_text('{"id": "0", "question": "q", "choices": ["x", "y"], "answer": "x"}\n{"id": "1", \n')
    with pytest.raises(cli.UserError, match=rf"{path}: line 2: not JSON"):
        data.read_examples(path)


def test_unknown_dataset_split_or_file(tmp_path):
    with pytest.raises(cli.UserError, match="unknown dataset 'csqa'"):
        data.load_split("csqa", "train", tmp_path)
    with pytest.raises(cli.UserError, match="unknown split 'dev'"):
        data.load_split("arc", "dev", tmp_path)
    with pytest.raises(ValueError, match="not a file of the TinyLLM release"):
        data.fetch("arc/arc_extra.json", tmp_path)


# ----------------------------------------------------------------------------- subsets and in-context examples

def test_limit_takes_the_first_n_of_each_split(release_data):
    full = {split: data.load_split("riddle", split, release_data) for split in data.SPLITS}
    small = {split: data.load_split("riddle", split, release_data, limit=7) for split in data.SPLITS}
    assert small == {s: full[s][:7] for s in data.SPLITS}
    assert data.load_split("riddle", "test", release_data, limit=0) == full["test"]


def test_train_fraction_is_a_seeded_nested_subset_in_file_order(release_data):
    train = data.load_split("obqa", "train", release_data)
    position = {e.id: i for i, e in enumerate(train)}
    subsets = {f: data.train_subset(train, f, seed=0) for f in (0.125, 0.25, 0.5, 1.0)}
    assert [len(subsets[f]) for f in (0.125, 0.25, 0.5, 1.0)] == [620, 1239, 2478, 4957]  # round(f * 4957)
    assert subsets[1.0] == train
    for small, large in ((0.125, 0.25), (0.25, 0.5)):
        assert {e.id for e in subsets[small]} < {e.id for e in subsets[large]}
    for subset in subsets.values():
        assert [position[e.id] for e in subset] == sorted(position[e.id] for e in subset)
    assert data.train_subset(train, 0.25, seed=1) != subsets[0.25]
    with pytest.raises(cli.UserError, match=r"--train_fraction=0.0: must be in"):
        data.train_subset(train, 0.0)


def test_in_context_examples_are_deterministic_and_never_the_example_itself(release_data):
    pool = data.load_split("obqa", "train", release_data)
    for example in pool[:300] + data.load_split("obqa", "test", release_data)[:50]:
        context = data.in_context_examples(example, pool, k=3, seed=0)
        assert len(context) == 3 and len({e.id for e in context}) == 3
        assert example.id not in {e.id for e in context}
        assert context == data.in_context_examples(example, pool, k=3, seed=0)
    differs = sum(data.in_context_examples(e, pool, seed=0) != data.in_context_examples(e, pool, seed=1)
                  for e in pool[:100])
    assert differs > 90
    assert all(data.in_context_examples(e, pool) == data.in_context_examples(e, pool, k=2, seed=0) for e in pool[:20])
    # stable across processes and Python versions: a golden draw (sha256-based, not hash())
    fog = data.load_split("obqa", "test", release_data)[1]
    assert [e.id for e in data.in_context_examples(fog, pool, k=2, seed=0)] == ["10-279", "1269"]
    assert data.stable_hash(0, "8-343") == 0x668ED8921916F55A
    tiny = pool[:3]
    assert data.in_context_examples(tiny[0], tiny, k=2) in (tiny[1:], tiny[:0:-1])
    with pytest.raises(cli.UserError, match="k=3 in-context examples, but the pool has only 2 other examples"):
        data.in_context_examples(tiny[0], tiny, k=3)
    assert data.in_context_examples(tiny[0], tiny, k=0) == []


# ----------------------------------------------------------------------------- progress

class Clock:
    """time.perf_counter under the test's control: each call moves it on by `step` seconds."""

    def __init__(self, step: float = 0.0):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_one_line_on_a_terminal_and_prints_plain_lines_in_a_log(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    terminal = Terminal()
    progress = cli.Progress("obqa test", 4, unit="examples", stream=terminal)
    for _ in range(4):
        clock.now += 1.0
        progress.update(1)
    assert terminal.getvalue() == "".join(f"\robqa test: {n}/4  1.00 examples/s  ETA 0:00:0{4 - n}" for n in range(1, 5)) + "\n"
    assert not cli.Progress.open_line  # the finished line is ended

    log = io.StringIO()  # not a terminal: the first update, then one line every 5 s, and the last
    progress = cli.Progress("llama-2", 10, unit="rationales", stream=log)
    for n in range(1, 11):
        clock.now += 1.0
        progress.update(1, tokens=20 * n)
    assert [line.split(":")[1].split()[0] for line in log.getvalue().splitlines()] == ["1/10", "6/10", "10/10"]
    assert log.getvalue().splitlines()[-1] == "llama-2: 10/10  1.00 rationales/s  20.0 tokens/s  ETA 0:00:00"


def test_progress_in_bytes_shows_only_for_a_step_longer_than_its_delay(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    log = io.StringIO()
    quick = cli.Progress("small.json", 1000, unit="B", delay=2.0, stream=log)
    clock.now += 1.0
    quick.update(1000)
    assert log.getvalue() == ""  # done within the delay: nothing to show
    slow = cli.Progress("big.bin", 3_000_000, unit="B", delay=2.0, stream=log)
    for _ in range(3):
        clock.now += 1.0
        slow.update(1_000_000)
    assert log.getvalue().splitlines() == ["big.bin: 2.0 MB/3.0 MB  1.0 MB/s  ETA 0:00:01",
                                           "big.bin: 3.0 MB/3.0 MB  1.0 MB/s  ETA 0:00:00"]


def test_a_slow_download_shows_its_progress(release, serve_folder, tmp_path, monkeypatch, capsys):
    server = serve_folder(release)
    monkeypatch.setattr(time, "perf_counter", Clock(step=1.5))  # every look at the clock: 1.5 s later
    data.fetch("obqa/obqa_valid.json", tmp_path, base_url=server.url)
    assert re.search(r"^obqa/obqa_valid\.json: 112\.2 kB/112\.2 kB  [\d.]+ kB/s  ETA 0:00:00$", capsys.readouterr().err,
                     re.M)


def test_code_revision_names_the_commit_and_whether_tracked_files_differ(tmp_path):
    """What train.json records as "code": the commit, "-dirty" when a tracked file is edited (an untracked one
    does not count), None outside a git checkout."""
    assert cli.code_revision(tmp_path) is None
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    (tmp_path / "train.py").write_text("a\n")
    subprocess.run(git + ["add", "train.py"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "a"], check=True)
    commit = subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert len(commit) == 40 and cli.code_revision(tmp_path) == commit
    (tmp_path / "results.json").write_text("{}\n")  # untracked: a run's output, not code
    assert cli.code_revision(tmp_path) == commit
    (tmp_path / "train.py").write_text("b\n")
    assert cli.code_revision(tmp_path) == commit + "-dirty"
