"""The command line every script shares: flags and --help, one-line errors and Ctrl-C, progress, whole files, devices.

Every script (tinyllm.py, train.py, eval.py, experiments.py, tests/bench.py) reads its `--key=value` flags with
parse_flags, checked against the rules declared next to its config dataclass's fields (flag), with `--help`
read from the dataclass's source, and runs under run_main: an expected failure (UserError, out of memory, a full
disk, a file the system refuses) prints one `error: ...` block, Ctrl-C one line saying what was kept. Files are
written whole or not at all (atomic_write). The device and the torchrun rank come from setup_distributed.
Nothing here knows about datasets, models or the method: the floor just above the models.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import errno
import fcntl
import inspect
import io
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tokenize
import traceback
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TextIO

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- errors, interrupts, progress
# Shared by every script; run_main (below) is the handler.

class UserError(SystemExit):
    """An expected failure, caused by the user's input or environment (a flag, a file, a server, the
    disk), never by a bug: the message names the culprit and, where there is one, the fix (the flag,
    variable or command). Each script's entry point (run_main) prints it as one block without
    a traceback (`--debug=1` or TINYLLM_DEBUG=1 adds it); anything else is a bug and keeps its traceback.

    A SystemExit rather than an Exception on purpose: (1) `raise SystemExit(message)`, Python's own
    idiom for "stop with this message", already was the convention here, so the two are treated
    alike; (2) where no handler runs (a notebook, a forgotten entry point) Python still prints only
    the message and exits 1; (3) a broad `except Exception` in library code cannot swallow it and
    carry on."""

    def __init__(self, message: str):  # one message, never an exit status
        super().__init__(message)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a job scheduler, `make` stopping its recipe): handled as Ctrl-C is, so that every cleanup that
    a Ctrl-C runs (no half-written file, the note of what was kept) runs for it too. run_main installs it."""

    signal_name = "SIGTERM"


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def on_stop(note: str | Callable[[], str], failed_writes: bool = True) -> Iterator[None]:
    """A stop inside the block, Ctrl-C, SIGTERM or (unless failed_writes=False) a failed write such as a full
    disk: the entry point's handler prints `note` after it (what was kept, how to go on; a callable is asked at
    that moment). The innermost block wins: its note is attached to the exception on the way out, and outer
    blocks leave it alone."""
    try:
        yield
    except (KeyboardInterrupt, OSError) as stop:
        if isinstance(stop, OSError) and not failed_writes:
            raise
        if not hasattr(stop, "kept"):
            stop.kept = note() if callable(note) else note
        raise


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_bytes(n: float) -> str:
    units, power = ("B", "kB", "MB", "GB"), 0
    while n >= 1000 and power < len(units) - 1:
        n, power = n / 1000, power + 1
    return f"{n:.0f} B" if power == 0 else f"{n:.1f} {units[power]}"


class Progress:
    """`label: done/total  rate unit/s  [tokens/s]  ETA` for one long step (downloads, rationales,
    evaluation). On a terminal the line is rewritten in place (\r, at most 10 times a second); in a
    log (CI, a file) a plain line every `every` seconds and one at the end. With `delay` > 0 nothing
    is shown for a step that ends within `delay` seconds. unit="B" prints sizes as kB/MB/GB;
    total=None (a size the server did not send) leaves out the total and the ETA."""

    open_line: ClassVar[bool] = False  # a \r line is not ended yet: end_line() before other output

    def __init__(self, label: str, total: int | None, unit: str = "items", every: float = 5.0,
                 delay: float = 0.0, stream: TextIO | None = None):
        self.label, self.total, self.unit, self.every, self.delay = label, total, unit, every, delay
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done, self.shown = 0, False
        self.start = time.perf_counter()
        self.last = self.start - every  # a log gets its first line as soon as the delay is over

    def update(self, done: int, tokens: int | None = None) -> None:
        """`done` more units finished; `tokens` is the running total of generated tokens, if any."""
        self.done += done
        now = time.perf_counter()
        finished = self.total is not None and self.done >= self.total
        if (now - self.start < self.delay and not (finished and self.shown)) or not self.done:
            return  # a quick step shows nothing; nor does a batch that made nothing
        if not finished and now - self.last < (0.1 if self.tty else self.every):
            return
        self.last, self.shown = now, True
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        size = format_bytes if self.unit == "B" else str
        line = f"{self.label}: {size(self.done)}" + (f"/{size(self.total)}" if self.total is not None else "")
        line += f"  {format_bytes(rate)}/s" if self.unit == "B" else f"  {rate:.2f} {self.unit}/s"
        if tokens is not None:
            line += f"  {tokens / elapsed:.1f} tokens/s"
        if self.total is not None:
            line += f"  ETA {format_seconds((self.total - self.done) / rate) if rate else '?'}"
        if self.tty:
            Progress.open_line = not finished
            print("\r" + line + ("\n" if finished else ""), end="", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """The step is over (needed only where the total was not known): end its terminal line."""
        if self.shown:
            Progress.end_line()

    @staticmethod
    def end_line() -> None:
        """End a half-drawn terminal line, so that a message printed next starts on its own line."""
        if Progress.open_line:
            print(file=sys.stderr, flush=True)
            Progress.open_line = False


# ----------------------------------------------------------------------------- files: written whole or not at all

def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list, so that a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, content: bytes | str) -> None:
    """Temp file in the same folder + fsync + os.replace: readers see the old file or the new one (text
    is written as UTF-8). Every file of the project is written so (the model files keep their own copy)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:  # a full disk, Ctrl-C: no temp file left behind
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)
        raise
    fsync_path(path.parent)


def os_error_of(error: BaseException) -> OSError | None:
    """The OSError behind an error a third-party writer raised: safetensors says "... (os error 27)", torch.save a
    RuntimeError whose context is the OSError. None when it is not a failed write."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        found = re.search(r"\(os error (\d+)\)", str(seen))
        if found:
            return OSError(int(found.group(1)), os.strerror(int(found.group(1))))
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Around a third-party writer (safetensors, torch.save to an open file): an error that stands for a failed
    write becomes that OSError, naming `path`, which run_main reports in one line as it does any failed write."""
    try:
        yield
    except Exception as error:
        os_error = os_error_of(error)
        if os_error is None:
            raise
        if os_error.filename is None:
            os_error.filename = str(path)
        if os_error is error:
            raise
        raise os_error from error


# One writer per run folder and per rationale cache file: an flock, which the OS drops when its process ends,
# however it ends (kill -9 too), so no lock is ever stale; the lock file itself stays, naming the last holder.

LOCK_FILE = ".lock"  # in a run folder; a cache file's lock is `.<name>.lock` beside it
_held: dict[Path, list] = {}  # lock file -> [open file, depth]: this process's locks, re-entrant


def folder_lock(folder: str | Path, flag: str = "--out") -> contextlib.AbstractContextManager:
    """The one writer of a run folder: its lock file is inside it."""
    return exclusive(Path(folder) / LOCK_FILE, folder, flag)


def file_lock(path: str | Path, flag: str = "--cache") -> contextlib.AbstractContextManager:
    """The one writer of a file (a rationale cache file, appended to): its lock file is beside it."""
    path = Path(path)
    return exclusive(path.with_name(f".{path.name}.lock"), path, flag)


@contextlib.contextmanager
def exclusive(lock: Path, target: str | Path, flag: str) -> Iterator[None]:
    """The block as the one writer of `target` (a run folder, or a cache file), through the flock of `lock`: taken
    before any work, held to the end, re-entrant within a process (an experiment's run holds it around train and
    eval). Another process holding it: a UserError naming the holder (pid, command) and what to do. Readers of
    finished files take no lock."""
    path = lock.absolute()
    if path in _held:
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{target} is in use by {holder}: one writer at a time, or their files would mix; wait for it "
                        f"to end (or stop it), or choose another {flag}") from None
    handle.seek(0)
    handle.truncate()
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    handle.write(f"pid {os.getpid()} ({command if len(command) <= 200 else command[:199] + '…'})\n")
    handle.flush()
    _held[path] = [handle, 1]
    try:
        yield
    finally:
        _held.pop(path)
        handle.close()  # closing the file releases the flock


def code_revision(folder: Path = Path(__file__).resolve().parent) -> str | None:
    """The git commit of the code in `folder`, with "-dirty" when a tracked file differs from it; None outside a
    git checkout or without git. Each run's train.json records it ("code"), so that a result names its code."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True,
                              timeout=60).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


# ----------------------------------------------------------------------------- devices and torchrun ranks

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


def setup_distributed(device_flag: str, backend: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process: one process, or one rank of torchrun (RANK, WORLD_SIZE,
    LOCAL_RANK), which takes GPU LOCAL_RANK and joins the process group (NCCL on CUDA, gloo on the CPU, or
    `backend`). Without torchrun's rendezvous (no MASTER_ADDR) a rank runs alone, as its RANK says."""
    device = torch.device(resolve_device(device_flag))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank = int(os.environ.get("RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if "MASTER_ADDR" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return rank, world, device


# ----------------------------------------------------------------------------- command line: flags, --help, errors
# Every script (tinyllm.py, train.py, eval.py, tests/bench.py) reads its flags with parse_flags and
# runs under run_main: one flag syntax, one --help, one way errors and Ctrl-C are reported.

@dataclass(frozen=True)
class Rule:
    """What a flag's value must be, declared once next to its config field (`flag`): `text` is shown by
    --help, `test(value)` returns what is wrong (None when the value is fine) or raises a UserError of its
    own. `empty_is_value`: `--key=` is that value and is checked, rather than keeping the default."""
    text: str
    test: Callable[[typing.Any], str | None]
    empty_is_value: bool = False


def flag(default: typing.Any, rule: Rule | None = None) -> typing.Any:
    """A config field whose value must follow `rule`: `batch_size: int = flag(8, at_least(1))`."""
    return dataclasses.field(default=default, metadata={"rule": rule} if rule else {})


def _number(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def at_least(low: float) -> Rule:
    return Rule(f">= {low:g}", lambda v: None if _number(v) and v >= low else f"must be >= {low:g}")


def above(low: float) -> Rule:
    return Rule(f"> {low:g}", lambda v: None if _number(v) and v > low else f"must be > {low:g}")


def fraction() -> Rule:
    return Rule("in (0, 1]", lambda v: None if _number(v) and 0 < v <= 1 else "must be in (0, 1]")


def one_of(*choices: object) -> Rule:
    listed = ", ".join(map(str, choices))
    return Rule(f"one of {listed}", lambda v: None if v in choices else f"not one of {listed}")


def split_list(value: str) -> list[str]:
    """"a, b c" -> ["a", "b", "c"]: a list flag's items, comma- or space-separated."""
    return [item for item in re.split(r"[,\s]+", value) if item]


def some_of(*choices: str, at_least_one: bool = True) -> Rule:
    """A comma- or space-separated list of `choices`, each at most once."""
    listed = ", ".join(choices)

    def test(value: str) -> str | None:
        items = split_list(value)
        unknown = [item for item in items if item not in choices]
        if unknown:
            return f"{unknown[0]!r} is not one of {listed}"
        if len(set(items)) != len(items):
            return "each at most once"
        return "no value given" if at_least_one and not items else None

    return Rule(f"comma-separated, of {listed}", test)


BOOL = one_of(0, 1)  # int flags that are switches
AUTO_BOOL = one_of(-1, 0, 1)  # -1: the default or the checkpoint's


# flag -> the make variable that sets it: a message about a flag names both
MAKE_VARIABLES = {name: name.upper() for name in (
    "dataset", "datasets", "teachers", "student", "alpha", "alphas", "method", "methods", "teacher", "device",
    "limit", "train_limit", "scoring", "data", "cache", "out", "resume", "seed", "seeds", "sweep", "fractions")}


def flag_problem(name: str, value: object, problem: str) -> UserError:
    shown = f"{value:g}" if isinstance(value, float) else value
    variable = MAKE_VARIABLES.get(name)
    return UserError(f"--{name}={shown}: {problem}" + (f" ({variable}= for make)" if variable else ""))


def check_flags(config: ConfigT) -> ConfigT:
    """Every field of a config against the rule declared next to it (flag), then the config's own check()
    of fields together, if it has one: what parse_flags does for each script, and the experiments for each
    run they plan, before anything starts."""
    for f in dataclasses.fields(config):
        rule = f.metadata.get("rule")
        value = getattr(config, f.name)
        problem = rule.test(value) if rule else None
        if problem:
            raise flag_problem(f.name, value, problem)
    if hasattr(config, "check"):
        config.check()
    return config


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
    rules = {f.name: f.metadata.get("rule") for f in dataclasses.fields(config_cls)}
    shown = [(heading, f"--{name}={shell_quote(default)}", kind, comment + (f" [{rules[name].text}]" if rules[name] else ""))
             for heading, name, kind, default, comment in rows]
    shown += [("every script", f"--{name}" + ("=0" if name == "debug" else ""), "bool" if name == "debug" else "",
               comment) for name, comment in GLOBAL_FLAGS.items()]
    width = min(max(len(flag) for _, flag, _, _ in shown), 36)
    lines = [f"usage: python {script_of(config_cls, command)} [--key=value ...]", doc, "",
             "flags (type, then what it is [the values allowed]; --key= with no value keeps the default):"]
    previous = ""
    for heading, flag, kind, comment in shown:
        if heading != previous:
            lines.append(f" {heading}:")
            previous = heading
        lines.append(f"  {flag:<{width}}  {kind:<5}  {comment}".rstrip())
    return "\n".join(lines)


def shell_quote(value: str) -> str:
    return f'"{value}"' if not value or " " in value else value


ConfigT = typing.TypeVar("ConfigT")  # a script's config dataclass


def parse_flags(config_cls: type[ConfigT], args: list[str], command: str = "") -> ConfigT:
    """`--key=value` overrides of a config dataclass, converted to its field types and checked against the
    rules declared next to the fields (check_flags). An empty value keeps the default (the Makefile passes
    unset variables as empty), unless the field's rule says it is a value. --help prints every field from the
    dataclass source and exits; --debug is run_main's."""
    if any(arg in ("--help", "-h", "help") for arg in args):
        print(flags_help(config_cls, command))
        raise SystemExit(0)
    return check_flags(config_cls(**read_flags(config_cls, args, command)))


def read_flags(config_cls: type, args: list[str], command: str = "") -> dict[str, typing.Any]:
    """{field: value} of the `--key=value` flags in `args`, each converted to its field's type (not yet checked
    against the rules: check_flags does that, on the whole config)."""
    types = typing.get_type_hints(config_cls)
    rules = {f.name: f.metadata.get("rule") for f in dataclasses.fields(config_cls)}
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
        if value == "" and not (rules[key] and rules[key].empty_is_value):
            continue
        kind = types[key]
        if kind is bool:
            values[key] = parse_bool(key, value)
            continue
        try:
            values[key] = kind(value)
        except ValueError:
            raise flag_problem(key, value, f"expected {kind.__name__}") from None
    return values


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
        size = (format_bytes(int(asked.group(1))) if asked.group(1).isdigit() else asked.group(1)) if asked else ""
        return f"out of memory{f' (tried to allocate {size})' if size else ''}: {memory_hint}"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        where = f" writing {error.filename}" if error.filename else ""
        what = ("a file too large for the size limit (`ulimit -f`) or the file system" if error.errno == errno.EFBIG
                else "no space left on the disk")
        return (f"{what}{where}: free some space, or point DATA=, CACHE=, OUT= (or TINYLLM_HOME) at a disk with "
                "room; files written completely are kept, no partial one is left")
    if isinstance(error, OSError) and error.filename is not None:
        return os_problem(error)
    return None


# what the innermost frame of an OSError was doing, by its function's name or its line: the first match
OPERATIONS = (("mkdir", "cannot create the folder"), ("replace", "cannot move"), ("rename", "cannot move"),
              ("unlink", "cannot remove"), ("rmtree", "cannot remove"), ("copy", "cannot copy"),
              ("write", "cannot write"), ("open", "cannot open"), ("read", "cannot read"), ("load", "cannot read"),
              ("stat", "cannot look at"), ("dir", "cannot list"))


def os_problem(error: OSError) -> str:
    """A file or folder the operating system refused (not a directory, permission, a file that vanished): one
    line, `<operation> <path>: <reason>`, and what is in the way where we can see it."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{frames[-1].name} {frames[-1].line}".lower() if frames else ""
    operation = next((verb for word, verb in OPERATIONS if word in where), "cannot use")
    path = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
    reason = error.strerror or str(error)
    if error.errno == errno.EEXIST and Path(error.filename).is_file():
        reason += " (a file, not a folder)"
    elif error.errno == errno.ENOTDIR:
        blocker = Path(error.filename)
        while blocker != blocker.parent and not (blocker.exists() or blocker.is_symlink()):
            blocker = blocker.parent
        if blocker.exists() and not blocker.is_dir():
            reason += f" ({blocker} is a file, not a folder)"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason += "; check its permissions, or point DATA=, CACHE=, OUT= (or TINYLLM_HOME) elsewhere"
    return f"{operation} {path}: {reason}"


def check_folder(path: str | Path, what: str) -> None:
    """Before any work: `path` is a folder we can write into, or one we can create (no file in the way, the
    permission to). `what` names it for the message (--out, --cache)."""
    path = Path(path)
    existing = path.absolute()
    while existing != existing.parent and not existing.exists():
        existing = existing.parent
    variable = MAKE_VARIABLES.get(what.removeprefix("--"))
    other = f"choose another {what}" + (f" ({variable}= for make)" if variable else "")
    if not existing.is_dir():
        raise UserError(f"{what}={path}: {existing} is a file, not a folder; {other}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what}={path}: no permission to write in {existing}; {other}")


def run_main(main: Callable[[list[str]], object], memory_hint: str) -> None:
    """Run a script's main(argv) as its `if __name__ == "__main__":` line: an expected failure
    (expected_failure) prints one `error: ...` block and exits 1, with the traceback first under
    --debug=1 / TINYLLM_DEBUG=1, and what was kept (on_stop) after it; Ctrl-C and SIGTERM print one line saying
    what was kept and exit 130 / 143 (128 + the signal, as a shell reports it); a bug keeps Python's traceback.
    `memory_hint`
    names the flags that lower the memory this script needs."""
    argv = sys.argv[1:]
    debug = debug_requested(argv)
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        main(argv)
    except KeyboardInterrupt as interrupt:
        Progress.end_line()
        if debug:
            traceback.print_exc()
        by = getattr(interrupt, "signal_name", "")
        print(f"interrupted{f' ({by})' if by else ''}: {getattr(interrupt, 'kept', 'nothing was in progress')}",
              file=sys.stderr, flush=True)
        raise SystemExit(143 if by else 130) from None  # 128 + the signal's number, as a shell reports it
    except BaseException as error:
        Progress.end_line()
        message = expected_failure(error, memory_hint)
        if message is None:
            raise  # a bug (or a plain exit): Python prints the traceback
        if debug:
            traceback.print_exc()
        kept = getattr(error, "kept", None)
        print(f"error: {message}" + (f"; {kept}" if kept else ""), file=sys.stderr, flush=True)
        raise SystemExit(1) from None
