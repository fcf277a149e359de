"""The foundation's contracts: runtime dependencies, the Makefile's interface, the user's layout."""
import ast
import json
import os
import re
import subprocess

import pytest

from conftest import REPO, make_tiny_t5

RUNTIME_SCRIPTS = ["tinyllm.py", "t5.py", "llama.py", "cli.py", "data.py", "prompts.py", "student.py", "train.py",
                   "eval.py", "experiments.py"]
RUNTIME_PACKAGES = {"torch", "sentencepiece", "safetensors", "numpy", "requests"}
# jinja2 (chat templates) is itself a dependency of torch, so it costs nothing extra.
TORCH_DEPENDENCIES = {"jinja2"}
# Imported lazily, only on the paths that need them: the optional extras for tokenizer.json models
# (Llama-3, Qwen2, SmolLM2) and for the PNG figures of eval.py (tables still print without it).
LAZY_PACKAGES = {"tokenizers", "matplotlib"}
# The top-level modules by floor, the ground first. A module imports only modules on floors below its own, at the
# top of the file: no import circle, and every file reads with only what it stands on.
FLOORS = [("t5", "llama"),  # the models: no project import at all, each stands alone
          ("cli",),  # the command line every script shares: flags, errors, progress, whole files, devices
          ("data",),  # datasets and checkpoints in
          ("prompts",),  # every prompt and the parsing of model text
          ("tinyllm", "student"),  # the teachers and the rationale cache; the student model, its loss and answers
          ("train", "eval"),  # the method and its training loop; evaluation, Table 1 and the paired statistics
          ("experiments",)]  # the paper's experiments and the study: runs of both, their tables and figures
MAKE_VARIABLES = ["DATASET", "TEACHERS", "STUDENT", "ALPHA", "METHOD", "DEVICE", "LIMIT", "DATA", "CACHE", "OUT",
                  "SEEDS", "ALPHAS", "SWEEP", "FRACTIONS", "METHODS"]


def test_requirements_are_the_users_runtime_list():
    names = set()
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[ ]", line, maxsplit=1)[0].lower())
    assert names == RUNTIME_PACKAGES, names


def test_runtime_scripts_import_only_runtime_packages_at_top_level():
    local = {name[:-3] for name in RUNTIME_SCRIPTS}
    stdlib = set(__import__("sys").stdlib_module_names)
    for script in RUNTIME_SCRIPTS:
        tree = ast.parse((REPO / script).read_text(), filename=script)
        for node in tree.body:  # top level only: lazy imports inside functions are allowed below
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in stdlib | local | RUNTIME_PACKAGES | TORCH_DEPENDENCIES | {"__future__"}, \
                    f"{script} imports {root}"
        for node in ast.walk(tree):  # anywhere: never transformers, the test-only reference
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for mod in mods:
                    root = mod.split(".")[0]
                    assert root in stdlib | local | RUNTIME_PACKAGES | TORCH_DEPENDENCIES | LAZY_PACKAGES | {"__future__", ""}, \
                        f"{script} imports {mod}"


def test_modules_import_only_floors_below_their_own_at_the_top_of_the_file():
    floor = {module: level for level, modules in enumerate(FLOORS) for module in modules}
    assert sorted(f"{module}.py" for module in floor) == sorted(RUNTIME_SCRIPTS)
    problems = []
    for module, level in floor.items():
        tree = ast.parse((REPO / f"{module}.py").read_text(), filename=f"{module}.py")
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):  # every import, module-level or inside a function
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for imported in (name.split(".")[0] for name in names if name.split(".")[0] in floor):
                where = f"{module}.py:{node.lineno} imports {imported}"
                if floor[imported] >= level:
                    problems.append(f"{where}, on floor {floor[imported]}, not below its own floor {level}")
                if id(node) not in top_level:
                    problems.append(f"{where} inside a function or block, not at the top of the file")
    assert not problems, "\n".join(problems)


def test_modules_open_with_a_one_line_docstring_naming_their_role():
    for script in RUNTIME_SCRIPTS:
        docstring = ast.get_docstring(ast.parse((REPO / script).read_text())) or ""
        first, _, rest = docstring.partition("\n")
        assert first.endswith(".") and (not rest or rest.startswith("\n")), f"{script}: {first!r} is not one line"


def test_make_help_lists_targets_and_variables_with_defaults():
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for target in ["setup", "test", "clean", "rationales", "train", "eval", "table", "bench", "all", "sweep",
                   "fractions", "ablations", "report"]:
        assert re.search(rf"^\s+{target}\s", out, re.M), f"make help does not list target {target}"
    for var in MAKE_VARIABLES:
        assert re.search(rf"\b{var}=", out), f"make help does not list variable {var}"
    assert "DATASET=obqa" in out and "STUDENT=google/flan-t5-small" in out and "LIMIT=0" in out


def test_make_table_says_run_k_of_n():
    """`make -n` runs the recipe's shell loop (it calls $(MAKE)) but each train/eval only as a dry run."""
    out = subprocess.run(["make", "-n", "--no-print-directory", "table", "TABLE_METHODS=inference finetune",
                          "TEACHERS=a=release:flan-t5-xl b=release:llama-2"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    runs = [line for line in out.splitlines() if line.startswith("table: run ")]
    assert runs == ["table: run 1 of 4: METHOD=inference", "table: run 2 of 4: METHOD=finetune",
                    "table: run 3 of 4: METHOD=dss TEACHER=a", "table: run 4 of 4: METHOD=dss TEACHER=b"]


def test_makefile_never_installs_a_bare_cuda_torch_without_a_gpu():
    dry = subprocess.run(["make", "-n", "-B", ".stamps/torch"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    cpu_branch = dry.split("else", 1)[1]
    assert "+cpu" in cpu_branch and "nvidia-smi" in dry


def test_readme_starts_with_the_main_job_and_the_tests():
    lines = [l.strip() for l in (REPO / "README.md").read_text().splitlines()]
    commands = [l for l in lines if l.startswith("make ")][:2]
    assert commands[0].startswith("make all"), commands
    assert commands[1].startswith("make test"), commands


def test_make_all_main_job_with_the_default_student_from_a_loopback_hub(tmp_path, assets, serve_folder):
    """The README's first command, `make all`, as a fresh user runs it: the default STUDENT
    (google/flan-t5-small) comes from a hub (here a loopback server laid out as
    /{repo}/resolve/{revision}/{file}, holding tiny random weights), the datasets from the release URL
    (the assets on another loopback server), the teachers are the paper's released rationales."""
    hub = tmp_path / "hub"
    repo = hub / "google" / "flan-t5-small" / "resolve" / "main"
    repo.mkdir(parents=True)
    make_tiny_t5(repo, assets / "t5_tokenizer" / "spiece.model")
    hub_server, data_server = serve_folder(hub), serve_folder(assets / "tinyllm_release")
    env = {**os.environ, "HF_ENDPOINT": hub_server.url, "TINYLLM_DATA_URL": data_server.url,
           "TINYLLM_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["make", "--no-print-directory", "all", "LIMIT=4", "DEVICE=cpu", f"DATA={tmp_path / 'data'}",
                          f"CACHE={tmp_path / 'cache'}", f"OUT={tmp_path / 'out'}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert any(p.endswith("/google/flan-t5-small/resolve/main/model.safetensors") for p in hub_server.requests)
    for teacher in ("flan-t5-xl", "llama-2"):
        assert len((tmp_path / "cache" / "obqa" / f"{teacher}.jsonl").read_text().splitlines()) == 4
    run = tmp_path / "out" / "obqa" / "tinyllm"
    assert (run / "best" / "model.safetensors").is_file() and (run / "best" / "spiece.model").is_file()
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["n"] == 4 and results["method"] == "tinyllm"


def test_the_mutation_tally_counts_and_names_what_no_test_explains(tmp_path, monkeypatch, capsys):
    """tests/mutants.py (the end of `make mutants`) on hand-made mutmut statuses: only the functions asked for
    count; a timeout is caught; a listed survivor is equivalent; an unlisted survivor, an unchecked mutant or a
    listed one that no test lets through any more makes it fail, each named."""
    import io
    import mutants
    equivalent = tmp_path / "equivalent_mutants.txt"
    monkeypatch.setattr(mutants, "EQUIVALENT", equivalent)
    results = "".join(f"    {name}: {status}\n" for name, status in [
        ("eval.x_f__mutmut_1", "killed"), ("eval.x_f__mutmut_2", "timeout"), ("eval.x_f__mutmut_3", "survived"),
        ("eval.x_g__mutmut_1", "survived"), ("eval.x_h__mutmut_1", "survived")])

    def tally(listed: str, *globs: str) -> tuple[int, str]:
        equivalent.write_text("# why each of these cannot change any output\n" + listed)
        monkeypatch.setattr("sys.stdin", io.StringIO(results))
        return mutants.main(list(globs)), capsys.readouterr().out

    code, out = tally("eval.x_f__mutmut_3 draws the same numbers\n", "eval.x_f*", "eval.x_g*")
    assert out.splitlines()[0] == ("4 mutants of 2 function patterns: 2 killed (1 of them by a timeout), "
                                   "1 equivalent (equivalent_mutants.txt), 1 survived")
    assert code == 1 and "  survived: eval.x_g__mutmut_1\n" in out and "`mutmut show <mutant>`" in out
    assert "eval.x_h" not in out
    code, out = tally("eval.x_f__mutmut_3 draws the same numbers\n", "eval.x_f*")
    assert code == 0 and out.splitlines()[0].endswith("1 equivalent (equivalent_mutants.txt), 0 survived")
    code, out = tally("eval.x_f__mutmut_1 was equivalent once\neval.x_f__mutmut_3 draws the same numbers\n", "eval.x_f*")
    assert code == 1 and "eval.x_f__mutmut_1 is listed in equivalent_mutants.txt but killed" in out
    with pytest.raises(SystemExit, match=r"equivalent_mutants.txt:2: eval.x_f__mutmut_3 has no reason"):
        tally("eval.x_f__mutmut_3\n", "eval.x_f*")
