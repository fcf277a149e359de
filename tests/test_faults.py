"""Faults a user meets beyond bad input, each reproduced for real in a child process on tiny weights: two writers
on one run folder or cache file, a full disk (a file size limit, RLIMIT_FSIZE) while a checkpoint, a results file
or a cache record is written, and SIGTERM / SIGINT at moments the child's own output chooses. Each ends in one
line; nothing half-written is left; no lock outlives its process; the same command then continues."""
from __future__ import annotations

import fcntl
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import cli
import tinyllm
from conftest import REPO, download

PYTHON = sys.executable
RELEASE = "a=release:flan-t5-xl b=release:llama-2"


@pytest.fixture(scope="module")
def world(tmp_path_factory, assets, tiny_t5) -> SimpleNamespace:
    """obqa's split files and release rationales in a data folder, and a rationale cache of 8 examples."""
    root = tmp_path_factory.mktemp("faults")
    download("obqa", root / "data", base_url=str(assets / "tinyllm_release"), rationales=True)
    tinyllm.rationales(tinyllm.RationalesConfig(dataset="obqa", teachers=RELEASE, data=str(root / "data"),
                                                cache=str(root / "cache"), limit=8, device="cpu"))
    env = {k: v for k, v in os.environ.items() if k != "TINYLLM_DEBUG"}
    env.update(TINYLLM_DATA_URL=str(assets / "tinyllm_release"), TINYLLM_HOME=str(root / "home"), OMP_NUM_THREADS="1")
    return SimpleNamespace(root=root, data=root / "data", cache=root / "cache", student=str(tiny_t5), env=env)


def train_command(world, out: Path, *flags: str) -> list[str]:
    return [PYTHON, "train.py", f"--student={world.student}", "--method=tinyllm", f"--teachers={RELEASE}",
            f"--data={world.data}", f"--cache={world.cache}", f"--out={out}", "--limit=8", "--batch_size=2",
            "--log_every=1", "--device=cpu", *flags]


CHILDREN: list[subprocess.Popen] = []  # killed after each test, so that a failed one leaves no paused child behind


@pytest.fixture(autouse=True)
def no_child_left():
    yield
    while CHILDREN:
        child = CHILDREN.pop()
        if child.poll() is None:
            child.kill()
            child.wait()


def start(command: list[str], env: dict, **kwargs) -> subprocess.Popen:
    # SIGINT back to its default in the child: a test run started in the background (`make test &`, nohup)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler, as it should not
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)
    CHILDREN.append(child)
    return child


def wait_for(process: subprocess.Popen, ready: str, timeout: float = 120) -> list[str]:
    """The child's output lines up to the first that matches `ready` (the moment the test acts at)."""
    seen, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        seen.append(line)
        if re.search(ready, line):
            return seen
        assert time.monotonic() < deadline, "".join(seen)
    process.wait()
    raise AssertionError(f"exited ({process.returncode}) before {ready!r}:\n{''.join(seen)}")


def signal_when(command: list[str], env: dict, ready: str, signum: int) -> tuple[int, str]:
    """Start `command`, send `signum` once a line of its output matches `ready`: (exit status, all output)."""
    process = start(command, env)
    seen = wait_for(process, ready)
    process.send_signal(signum)
    rest, _ = process.communicate(timeout=60)
    return process.returncode, "".join(seen) + rest


def last_line(output: str, prefix: str) -> str:
    """The one line starting with `prefix`, which must end the output, with no traceback anywhere."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and output.rstrip().endswith(lines[0]), output
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Half-written files: the temp files and folders every writer here uses before its rename."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if re.search(r"\.tmp", p.name))


def lock_is_free(lock: Path) -> bool:
    """Whether no process holds `lock`; a lock file that does not exist (a misnamed one) is an error, not free."""
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def limit_file_size(size: int):
    """preexec_fn: a file size limit (what `ulimit -f` sets): writes past it fail with EFBIG, as on a full disk."""
    def apply() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return apply


# ---------------------------------------------------------------------------------------------------
# one writer per run folder and per cache file

PAUSED = textwrap.dedent("""
    # {script}, paused after {module}.{function} has run when `when` holds, until the file GO exists: a moment the
    # test chooses (and can signal at)
    import pathlib, sys, time
    sys.path.insert(0, {repo!r})
    import {module}
    original = {module}.{function}
    def paused(*args, **kwargs):
        result = original(*args, **kwargs)
        if {when}:
            print("paused", flush=True)
            while not pathlib.Path({go!r}).exists():
                time.sleep(0.05)
        return result
    {module}.{function} = paused
    import {script_module}
    {script_module}.run_main({script_module}.main, "")
""")


def paused(tmp_path: Path, script: str, target: str, when: str, go: Path) -> Path:
    """A copy of `script`'s entry point that pauses after `target` ("module.function") returns while `when` (a
    condition on its `args`) holds: train.train_step at a chosen step, tinyllm.CacheWriter.write."""
    module, function = target.split(".", 1)
    path = tmp_path / f"paused_{script}"
    path.write_text(PAUSED.format(script=script, module=module, function=function, when=when, go=str(go),
                                  repo=str(REPO), script_module=script.removesuffix(".py")))
    return path


# train_step(student, rows, weights, optimizer, scheduler, cfg, step, rank, world)
AT_STEP = "args[6] == {step}"


def test_a_second_run_on_the_same_folder_stops_before_any_work_and_the_first_is_unharmed(world, tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    script = paused(tmp_path, "train.py", "train.train_step", AT_STEP.format(step=2), go)
    first = start([PYTHON, str(script), *train_command(world, out, "--epochs=2")[2:]], world.env)
    wait_for(first, r"^paused")
    # a second `make train` on the same OUT: refused at once, naming the first (pid, command) and what to do
    second = subprocess.run(train_command(world, out, "--epochs=2"), cwd=REPO, env=world.env, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 1 and "training " not in second.stdout, second.stdout  # checked its inputs, no more
    line = last_line(second.stderr, "error: ")
    assert re.fullmatch(rf"error: {re.escape(str(out))} is in use by pid {first.pid} \(paused_train\.py "
                        r"--student=.{1,200}\): one writer at a time, or their files would mix; wait for it to end \(or "
                        r"stop it\), or choose another --out", line), line
    # so is an eval writing there, and an experiment's run (below); a run on another folder is not blocked
    evaluation = subprocess.run([PYTHON, "eval.py", f"--model={world.student}", f"--data={world.data}",
                                 f"--out={out}", "--limit=2", "--device=cpu"], cwd=REPO, env=world.env,
                                capture_output=True, text=True, timeout=120)
    assert evaluation.returncode == 1 and f"is in use by pid {first.pid}" in evaluation.stderr
    other = subprocess.run(train_command(world, tmp_path / "other", "--epochs=1"), cwd=REPO, env=world.env,
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr[-2000:]
    go.touch()
    rest, _ = first.communicate(timeout=120)
    assert first.returncode == 0, rest
    # the first run is whole: every step logged once, in order, its checkpoints and train.json there
    steps = [int(m) for m in re.findall(r'"step": (\d+), "loss"', (out / "metrics.jsonl").read_text())]
    assert steps == list(range(1, 9)) and (out / "train.json").is_file() and (out / "best").is_dir()
    assert lock_is_free(out / cli.LOCK_FILE)


def test_a_killed_holder_leaves_no_stale_lock(world, tmp_path):
    """kill -9 while holding the run folder: the OS drops the flock, and the next run goes ahead at once."""
    out = tmp_path / "run"
    script = paused(tmp_path, "train.py", "train.train_step", AT_STEP.format(step=3), tmp_path / "never")
    first = start([PYTHON, str(script), *train_command(world, out, "--epochs=2", "--save_every=2")[2:]], world.env)
    wait_for(first, r"^paused")  # step 2 is saved
    assert not lock_is_free(out / cli.LOCK_FILE)
    first.kill()
    first.wait()
    assert lock_is_free(out / cli.LOCK_FILE)
    again = subprocess.run(train_command(world, out, "--epochs=2", "--save_every=2", "--resume=1"), cwd=REPO,
                           env=world.env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and f"resuming {out} at step 2/8" in again.stdout, again.stderr[-2000:]


def test_a_second_rationales_on_the_same_cache_file_stops_before_any_work(world, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(world.cache, cache)
    holder = cli.file_lock(tinyllm.cache_file(cache, "obqa", "b"))
    with holder:  # this test process appends to b's cache file, as a running `make rationales` would
        result = subprocess.run([PYTHON, "tinyllm.py", "rationales", "--dataset=obqa", f"--teachers={RELEASE}",
                                 f"--data={world.data}", f"--cache={cache}", "--limit=8", "--device=cpu"], cwd=REPO,
                                env=world.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "cached" not in result.stderr.replace(str(cache), "")
    line = last_line(result.stderr, "error: ")
    assert line.startswith(f"error: {tinyllm.cache_file(cache, 'obqa', 'b')} is in use by pid {os.getpid()} (")
    assert line.endswith("or choose another --cache")


def test_a_check_of_a_folder_in_use_stops_and_leaves_its_save_alone(world, tmp_path):
    """`make train CHECK=1` (as `make table` runs first) on a folder a run is saving into: the check would
    recover a killed save, which deletes temp folders, so it stops as a second writer does; the save is untouched."""
    out = tmp_path / "run"
    saving = out / ".last.tmp-12345"  # a checkpoint being written: save_checkpoint's temp folder, before its rename
    saving.mkdir(parents=True)
    with cli.folder_lock(out):  # this test process is the run that is saving
        result = subprocess.run(train_command(world, out, "--check_only=1"), cwd=REPO, env=world.env,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and f"is in use by pid {os.getpid()}" in last_line(result.stderr, "error: ")
    assert saving.is_dir()
    fresh = subprocess.run(train_command(world, tmp_path / "new", "--check_only=1"), cwd=REPO, env=world.env,
                           capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0 and "are fine (--check_only=1)" in fresh.stdout, fresh.stderr[-2000:]
    assert not (tmp_path / "new").exists()  # a check of a new folder creates nothing


# ---------------------------------------------------------------------------------------------------
# a full disk while writing: one line, nothing torn, the next run with room continues

def test_a_full_disk_during_a_checkpoint_ends_in_one_line_and_resume_continues(world, tmp_path):
    out = tmp_path / "run"
    command = train_command(world, out, "--epochs=2", "--save_every=2")
    result = subprocess.run(command, cwd=REPO, env=world.env, capture_output=True, text=True, timeout=120,
                            preexec_fn=limit_file_size(1_000_000))  # the tiny model's weights are 4.3 MB
    assert result.returncode == 1
    line = last_line(result.stderr, "error: ")
    assert re.fullmatch(rf"error: a file too large for the size limit \(`ulimit -f`\) or the file system writing "
                        rf"{re.escape(str(out / 'last'))}: free some space, .*; files written completely are kept, "
                        r"no partial one is left; no checkpoint was saved yet .*", line), line
    assert leftovers(out) == [] and not (out / "last").exists()
    assert lock_is_free(out / cli.LOCK_FILE)
    again = subprocess.run(command, cwd=REPO, env=world.env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and (out / "train.json").is_file(), again.stderr[-2000:]


def test_a_full_disk_writing_results_leaves_no_results_file(world, tmp_path):
    out = tmp_path / "run"
    command = [PYTHON, "eval.py", f"--model={world.student}", f"--data={world.data}", f"--out={out}", "--limit=4",
               "--device=cpu", "--max_new_tokens=4"]
    result = subprocess.run(command, cwd=REPO, env=world.env, capture_output=True, text=True, timeout=120,
                            preexec_fn=limit_file_size(600))  # predictions.jsonl is larger
    assert result.returncode == 1
    line = last_line(result.stderr, "error: ")
    assert line.startswith(f"error: a file too large for the size limit (`ulimit -f`) or the file system writing "
                           f"{out / 'predictions.jsonl'}: ") and line.endswith("; no result of this evaluation was "
                                                                             "written (they are written at the end); "
                                                                             "rerun the same command"), line
    assert sorted(p.name for p in out.iterdir()) == [cli.LOCK_FILE]  # no results.json, no temp file
    again = subprocess.run(command, cwd=REPO, env=world.env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and (out / "results.json").is_file(), again.stderr[-2000:]


def test_a_full_disk_appending_to_the_cache_keeps_whole_records_and_the_rerun_completes(world, tmp_path):
    cache = tmp_path / "cache"
    command = [PYTHON, "tinyllm.py", "rationales", "--dataset=obqa", f"--teachers={RELEASE}", f"--data={world.data}",
               f"--cache={cache}", "--limit=8", "--batch_size=2", "--device=cpu"]
    result = subprocess.run(command, cwd=REPO, env=world.env, capture_output=True, text=True, timeout=120,
                            preexec_fn=limit_file_size(3000))  # a few records of a's, not all 8
    assert result.returncode == 1
    path = tinyllm.cache_file(cache, "obqa", "a")
    line = last_line(result.stderr, "error: ")
    assert line.startswith(f"error: a file too large for the size limit (`ulimit -f`) or the file system writing "
                           f"{path}: ") and line.endswith(f"; the rationales made so far are kept in {cache / 'obqa'}/; "
                                                          "the same command makes only the missing ones"), line
    kept = tinyllm.load_rationales(cache, "obqa", "a")
    assert 1 <= len(kept) < 8 and leftovers(cache) == []  # whole records only (a torn last line is not read)
    again = subprocess.run(command, cwd=REPO, env=world.env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"a (release:flan-t5-xl): {len(kept)} cached, {8 - len(kept)} to make" in again.stderr
    assert len(tinyllm.load_rationales(cache, "obqa", "a")) == len(tinyllm.load_rationales(cache, "obqa", "b")) == 8


def test_third_party_write_errors_become_the_oserror_they_stand_for():
    """safetensors words a failed write "... (os error 27)", torch.save raises a RuntimeError from the OSError:
    cli.writing turns either into that OSError naming the path; anything else passes through untouched."""
    import errno

    class SafetensorError(Exception):
        pass

    with pytest.raises(OSError) as raised, cli.writing("/x/last"):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    assert (raised.value.errno, raised.value.filename) == (errno.EFBIG, "/x/last")
    with pytest.raises(OSError) as raised, cli.writing("/x/last"):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, "/x/last")
    assert cli.expected_failure(raised.value, "").startswith("no space left on the disk writing /x/last: ")
    with pytest.raises(ValueError), cli.writing("/x/last"):
        raise ValueError("a bug, not a write")


# ---------------------------------------------------------------------------------------------------
# SIGTERM and SIGINT: one line, no half-written file, no stale lock, the same command continues

@pytest.mark.parametrize("signum, code, name", [(signal.SIGTERM, 143, "interrupted (SIGTERM): "),
                                                (signal.SIGINT, 130, "interrupted: ")])
def test_a_signal_during_training_keeps_the_last_checkpoint(world, tmp_path, signum, code, name):
    out = tmp_path / "run"
    command = train_command(world, out, "--epochs=50", "--save_every=2", "--eval_every=100000")
    returncode, output = signal_when(command, world.env, r"^step 3/200 ", signum)
    assert returncode == code
    line = last_line(output, name)
    match = re.fullmatch(rf"{re.escape(name)}the last checkpoint {re.escape(str(out / 'last'))} \(step (\d+)\) is "
                         r"kept: RESUME=1 \(--resume=1\) continues from it", line)
    assert match, line
    assert leftovers(out) == [] and lock_is_free(out / cli.LOCK_FILE)
    step = int(match.group(1))
    again = subprocess.run(command + ["--resume=1", f"--stop_at={step + 1}"], cwd=REPO, env=world.env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and f"resuming {out} at step {step}/200" in again.stdout, again.stderr[-2000:]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_eval_writes_no_results(world, tmp_path, signum, code):
    out = tmp_path / "run"
    command = [PYTHON, "eval.py", f"--model={world.student}", f"--data={world.data}", f"--out={out}", "--limit=40",
               "--batch_size=2", "--device=cpu", "--max_new_tokens=8"]
    returncode, output = signal_when(command, world.env, r"^obqa test: \d+/40 ", signum)
    assert returncode == code
    assert last_line(output, "interrupted").endswith(": no result of this evaluation was written (they are written "
                                                     "at the end); rerun the same command")
    assert sorted(p.name for p in out.iterdir()) == [cli.LOCK_FILE] and lock_is_free(out / cli.LOCK_FILE)


def test_sigterm_during_rationales_keeps_the_cache(world, tmp_path):
    """SIGTERM once the first teacher's records are written (the release teacher writes them in one batch): they
    are kept, whole; the second teacher's are made by the same command."""
    cache = tmp_path / "cache"
    script = paused(tmp_path, "tinyllm.py", "tinyllm.CacheWriter.write", "True", tmp_path / "never")
    command = ["tinyllm.py", "rationales", "--dataset=obqa", f"--teachers={RELEASE}", f"--data={world.data}",
               f"--cache={cache}", "--limit=8", "--device=cpu"]
    returncode, output = signal_when([PYTHON, str(script), *command[1:]], world.env, r"^paused", signal.SIGTERM)
    assert returncode == 143
    assert last_line(output, "interrupted (SIGTERM): ") == (
        f"interrupted (SIGTERM): the rationales made so far are kept in {cache / 'obqa'}/; the same command makes "
        "only the missing ones")
    assert len(tinyllm.load_rationales(cache, "obqa", "a")) == 8 and leftovers(cache) == []
    assert not tinyllm.cache_file(cache, "obqa", "b").exists()
    path = tinyllm.cache_file(cache, "obqa", "a")
    assert lock_is_free(path.with_name(f".{path.name}.lock"))
    again = subprocess.run([PYTHON, *command], cwd=REPO, env=world.env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "a (release:flan-t5-xl): 8 cached, 0 to make" in again.stderr, again.stderr
    assert len(tinyllm.load_rationales(cache, "obqa", "b")) == 8


def test_sigterm_to_a_study_between_runs_keeps_every_finished_run(world, tmp_path):
    out = tmp_path / "out"
    command = [PYTHON, "experiments.py", "study", f"--student={world.student}", f"--teachers={RELEASE}",
               f"--data={world.data}", f"--cache={world.cache}", f"--out={out}", "--limit=8", "--device=cpu",
               "--seeds=0", "--train_args=--batch_size=4 --max_new_tokens=4", "--resamples=100"]
    returncode, output = signal_when(command, world.env, r"^--- run 2 of 2", signal.SIGTERM)
    assert returncode == 143
    line = last_line(output, "interrupted (SIGTERM): ")
    assert line.startswith("interrupted (SIGTERM): 1 of 2 runs are finished and kept"), line
    first, second = out / "study" / "obqa" / "finetune" / "seed0", out / "study" / "obqa" / "tinyllm" / "seed0"
    assert (first / "results.json").is_file() and not (second / "results.json").exists()
    lock = second / cli.LOCK_FILE  # absent when the signal came before the second run took its folder
    assert leftovers(out) == [] and (not lock.exists() or lock_is_free(lock))
    again = subprocess.run(command, cwd=REPO, env=world.env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "1 of 2 runs finished already (kept), 1 to run" in again.stdout
    assert (second / "results.json").is_file()
