"""README.md and docs/*.md stay true: their commands run, their links land, the config table is the schema's,
the code, files and functions they name exist, and README's module map names every module in dpbp/.

Every command in a fenced block that starts with `python -m dpbp` or `mpirun ... -m dpbp` (also after `&&`)
runs here, README first and then docs/*.md in name order, each in its file's order, all from one scratch copy
of the repository (so relative paths such as configs/ and runs/demo work and a command may use what an
earlier one wrote). Commands that train or benchmark are cut short (see SHORT: the last --set wins; a
benchmark's --spec choices are replaced), so all of them run in a minute or two. A leading
`env -u NAME` / `NAME=value` prefix is honoured, except that tests never change OPENBLAS_CORETYPE /
OPENBLAS_L2_SIZE. A command expected to fail says so in a trailing comment: `# exits 2`.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from dpbp.config import OPTIONS, README_BEGIN, README_END, reference_markdown
from tests.conftest import REPO, clean_env, dpbp, mpirun_exe

README = "README.md"
DOCS_DIR = os.path.join(REPO, "docs")
DOCS = [README] + sorted(f"docs/{name}" for name in os.listdir(DOCS_DIR) if name.endswith(".md"))
CONFIG_DOC = "docs/config.md"  # the one copy of the generated config table
SHORT = {"dpbp.train": ["--set", "train.steps=20"],
         "dpbp.bench": ["--spec", "2-2-2", "--repeats", "1", "--threads", "1"]}
REPLACED = {"dpbp.bench": {"--spec"}}  # options SHORT replaces rather than adds to (--spec appends)
PROTECTED = {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"}  # the common brief: tests leave these alone
ENV_PREFIX = re.compile(r"^(env(\s+-u\s+\S+)*\s+)?(\w+=\S*\s+)*")
SHELL_OPERATORS = {"|", "||", "&", ";", ">", ">>", "<", "2>", "2>&1"}
FLOORS = ["commands", "wiring", "communication", "leaves"]

# Commands that cannot run here: {a piece of the command: the reason}. Keep this short: every entry is
# a documented line that can go stale unnoticed.
EXEMPT: dict[str, str] = {
    "data.path=big_x.npy": "a memory measurement on a 2 GiB .npy file that the docs do not create",
}


def text_of(doc):
    with open(os.path.join(REPO, doc)) as f:
        return f.read()


def prose(text):
    """The text outside fenced blocks."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def commands_in(text):
    """[(command line, expected exit status)] in the order of the text."""
    found, in_block, pending = [], False, ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        line = (pending + " " + raw.strip()).strip() if pending else raw.strip()
        if line.endswith("\\"):  # a continued line
            pending = line[:-1]
            continue
        pending = ""
        body, _, comment = line.partition(" #")
        expect = re.search(r"\bexits? (\d+)", comment)
        for part in body.split("&&"):
            part = part.strip()
            bare = ENV_PREFIX.sub("", part)
            if bare.startswith("python -m dpbp") or (bare.startswith("mpirun ") and " -m dpbp" in bare):
                found.append((part, int(expect.group(1)) if expect else 0))
    return found


COMMANDS = [(doc, command, status) for doc in DOCS for command, status in commands_in(text_of(doc))]
RUNNABLE = [(doc, c, status) for doc, c, status in COMMANDS if not any(piece in c for piece in EXEMPT)]
RUN_IDS = [f"{os.path.basename(doc)[:-3]}-{i:02d}" for i, (doc, _, _) in enumerate(RUNNABLE)]


def argv_for(command):
    """(argument list, environment changes) for a documented command: this interpreter and mpirun, short runs."""
    argv = shlex.split(command)
    bad = SHELL_OPERATORS.intersection(argv)
    assert not bad, f"documented command {command!r} uses shell syntax {sorted(bad)}; keep dpbp commands plain"
    env = {}
    if argv[0] == "env":
        argv.pop(0)
        while argv[0] == "-u":
            env[argv[1]] = None
            del argv[:2]
    while re.match(r"^\w+=", argv[0]):
        name, _, value = argv.pop(0).partition("=")
        env[name] = value
    env = {k: v for k, v in env.items() if k not in PROTECTED}
    argv = [sys.executable if a in ("python", "python3") else a for a in argv]
    if argv[0] == "mpirun":
        argv[0] = mpirun_exe()
    for module, extra in SHORT.items():
        if module in argv:
            for option in REPLACED.get(module, ()):
                while option in argv:
                    i = argv.index(option)
                    del argv[i:i + 2]
            argv += extra
    return argv, env


def test_short_runs_replace_a_benchmarks_specs():
    """The bench's --spec appends, so a documented large spec must be dropped, not joined, by SHORT."""
    argv, env = argv_for("OMP_NUM_THREADS=1 python -m dpbp.bench --spec 784-1024-1024-10 --threads 1 --set a=1")
    assert argv[1:] == ["-m", "dpbp.bench", "--threads", "1", "--set", "a=1",
                        "--spec", "2-2-2", "--repeats", "1", "--threads", "1"]
    assert env == {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A copy of the repository without its runs, as a user's checkout would be."""
    root = tmp_path_factory.mktemp("readme") / "dpbp"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".git", "runs", ".venv", "venv", "__pycache__",
                                                              "*.egg-info", ".pytest_cache"))
    return root


def test_readme_shows_the_commands_it_promises():
    """The extraction itself works: training on several ranks, resume, a report; the docs' verify and config."""
    cmds = [c for doc, c, _ in COMMANDS if doc == README]
    assert any(c.startswith("mpirun ") and "dpbp.train" in c for c in cmds), cmds
    assert any("dpbp.report" in c for c in cmds), cmds
    assert any("--resume" in c for c in cmds), cmds
    assert any("dpbp.verify" in c for c in cmds), cmds
    assert any("dpbp.config" in c for doc, c, _ in COMMANDS if doc == CONFIG_DOC)
    assert any("dpbp.verify" in c for doc, c, _ in COMMANDS if doc == "docs/verify.md")


def test_every_exemption_names_one_documented_command():
    """An exemption outliving its command (or matching several) would hide documented lines from the test."""
    for piece in EXEMPT:
        assert sum(piece in c for _, c, _ in COMMANDS) == 1, piece
    assert len(RUNNABLE) == len(COMMANDS) - len(EXEMPT)


@pytest.mark.parametrize("doc,command,status", RUNNABLE, ids=RUN_IDS)
def test_documented_command_runs(scratch, doc, command, status):
    argv, changes = argv_for(command)
    env = clean_env()
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env["PYTHONPATH"] = str(scratch)  # the copy's dpbp, as `python -m` from a checkout would use
    proc = subprocess.run(argv, cwd=scratch, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == status, f"{doc}: {command}\n-> {' '.join(argv[1:])}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    for written in re.findall(r"wrote (\S+) and (\S+)", proc.stdout):  # dpbp.report's files
        for path in written:
            assert os.path.getsize(os.path.join(scratch, path)) > 0, path


# ------------------------------------------------------------------------------------ the config table

def test_config_reference_is_the_schema():
    text = text_of(CONFIG_DOC)
    assert text.count(README_BEGIN) == 1 and text.count(README_END) == 1
    table = text.split(README_BEGIN + "\n")[1].split(README_END)[0]
    assert table == reference_markdown(), (f"{CONFIG_DOC}'s config table differs from dpbp/config.py; "
                                           f"run: python -m dpbp.config --readme {CONFIG_DOC}")


def test_the_config_table_has_one_copy():
    """Only docs/config.md holds the generated table; elsewhere it would go stale unchecked."""
    holders = [doc for doc in DOCS if README_BEGIN in text_of(doc) or README_END in text_of(doc)]
    assert holders == [CONFIG_DOC], holders


def test_config_regeneration_rewrites_a_stale_table(tmp_path):
    """`python -m dpbp.config --readme FILE` is the fix the table test recommends: check it works."""
    stale = tmp_path / "config.md"
    stale.write_text(f"intro\n{README_BEGIN}\n| old | table |\n{README_END}\nrest\n")
    proc = dpbp("config", "--readme", stale, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert stale.read_text() == f"intro\n{README_BEGIN}\n{reference_markdown()}{README_END}\nrest\n"


# ------------------------------------------------------------------------------------------------ links

def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc):
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose(text_of(doc)), flags=re.M)}


def test_slug_is_githubs():
    assert slug("Scaling, on paper") == "scaling-on-paper"
    assert slug("Ranks x threads") == "ranks-x-threads"
    assert slug("The δ recursion, for any depth") == "the-δ-recursion-for-any-depth"


@pytest.mark.parametrize("doc", DOCS)
def test_links_land(doc):
    """Every link to a section lands on a heading, every link to a file names a file of the repository."""
    links = re.findall(r"\]\(([^)\s]+)\)", prose(text_of(doc)))
    assert links, f"{doc} links nowhere"
    here = os.path.dirname(os.path.join(REPO, doc))
    broken = []
    for link in links:
        if re.match(r"^[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(here, path)) if path else os.path.join(REPO, doc)
        if not target.startswith(REPO + os.sep) or not os.path.exists(target):
            broken.append(f"{link}: no such file")
        elif anchor and anchor not in anchors(os.path.relpath(target, REPO)):
            broken.append(f"{link}: no such heading")
    assert not broken, f"{doc}: {broken}"


def test_readme_links_every_docs_page():
    linked = {os.path.normpath(p) for p in re.findall(r"\]\((docs/[^)#\s]+)", prose(text_of(README)))}
    assert linked == set(DOCS[1:]), sorted(set(DOCS[1:]) ^ linked)


# ------------------------------------------------------------------ files, functions and code they name

def dpbp_sources():
    """{path relative to REPO: text} of every .py in dpbp/, listed now."""
    found = {}
    for folder, dirs, files in os.walk(os.path.join(REPO, "dpbp")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    found[os.path.relpath(path, REPO)] = f.read()
    return found


REPO_PATH = re.compile(r"(?<![\w./-])((?:dpbp|tests|launch|configs|docs|\.ci)/[\w./-]*)")


@pytest.mark.parametrize("doc", DOCS)
def test_named_files_exist(doc):
    """`dpbp/reduce.py`, `tests/test_verify.py`, `launch/slurm.sbatch`, configs/xor.toml ... all exist."""
    paths = {p.rstrip(".,:") for p in REPO_PATH.findall(text_of(doc))}
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(REPO, p)))
    assert not missing, f"{doc} names files that do not exist: {missing}"


def test_named_files_check_catches_a_missing_file():
    assert REPO_PATH.findall("see `dpbp/gone.py`, RUN_DIR/launch.log and configs/xor.toml.") == \
        ["dpbp/gone.py", "configs/xor.toml."]


FILE_SUFFIXES = {"py", "md", "toml", "npz", "npy", "json", "jsonl", "png", "csv", "log", "sh", "gz"}


def classes_in_dpbp():
    """{class name: module under dpbp} for every class defined at the top level of a dpbp module."""
    found = {}
    for path, source in dpbp_sources().items():
        module = path[len("dpbp/"):-3].replace(os.sep, ".").removesuffix(".__init__")
        for node in ast.parse(source).body:
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, module)
    return found


def references(text):
    """Dotted names in inline code that name dpbp: `losses.squared_error`, `model.MLP.backward`,
    `dpbp.comm.MPIComm.allreduce_sum_`, `Trainer.gradient` (a class of dpbp) -- not config keys, not files."""
    modules = {p[len("dpbp/"):-3].replace(os.sep, ".").removesuffix(".__init__") for p in dpbp_sources()}
    classes = classes_in_dpbp()
    found = set()
    for span in re.findall(r"`([^`\n]+)`", prose(text)):
        dotted = span.removesuffix("()").removeprefix("dpbp.")
        if not re.fullmatch(r"\w+(\.\w+)+", dotted) or dotted in OPTIONS:
            continue
        if dotted.rsplit(".", 1)[1] in FILE_SUFFIXES:
            continue
        head = dotted.split(".")[0]
        if head in classes:
            found.add(f"{classes[head]}.{dotted}")
        elif head in modules or any(m.startswith(head + ".") for m in modules):
            found.add(dotted)
    return found


def resolve(dotted):
    """Import the longest dpbp module prefix of `dotted`, then follow the attributes; the missing part or None."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("dpbp." + ".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return f"{obj.__name__ if hasattr(obj, '__name__') else obj!r} has no {attr!r}"
            obj = getattr(obj, attr)
        return None
    return f"no module dpbp.{parts[0]}"


@pytest.mark.parametrize("doc", DOCS)
def test_named_functions_exist(doc):
    """Every `module.function` and `Class.method` a page names resolves in dpbp."""
    names = references(text_of(doc))
    problems = {name: resolve(name) for name in sorted(names)}
    problems = {name: why for name, why in problems.items() if why}
    assert not problems, f"{doc} names what dpbp does not have: {problems}"


def test_references_are_found_and_checked():
    """The reference finder sees modules, classes and dpbp.-prefixed names, skips config keys and files,
    and a name that does not exist fails to resolve."""
    found = references("`losses.squared_error`, `Trainer.gradient`, `dpbp.comm.MPIComm.allreduce_sum_`, "
                       "`optim.lr`, `comm.reduce`, `RUN_DIR/launch.log`, `config.toml`, `np.matmul`")
    assert {"losses.squared_error", "comm.MPIComm.allreduce_sum_"} <= found, found
    assert any(name.endswith(".Trainer.gradient") for name in found), found
    assert not {"optim.lr", "comm.reduce", "config.toml", "np.matmul"} & found, found
    assert resolve("losses.squared_error") is None
    assert resolve("losses.no_such_loss") is not None
    assert resolve("nosuchmodule.f") is not None
    assert len(references(text_of(README))) >= 6


def quoted_code(doc):
    """Statements a page quotes from dpbp/: every line of its python blocks and, in the derivation (all of
    docs/how-it-works.md, README's formula section), inline code with a call in it."""
    text = text_of(doc)
    quoted = []
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            code = line.split("  #")[0] if not line.lstrip().startswith("#") else ""
            quoted += [c for c in code.split("; ") if c.strip()]
    if doc == "docs/how-it-works.md":
        derivation = text
    elif doc == README:
        derivation = section(text, "formulas")
    else:
        derivation = ""
    quoted += [c for c in re.findall(r"`([^`\n]+)`", prose(derivation)) if "(" in c]
    return quoted


def section(text, name):
    start = text.index(f"<!-- section: {name} -->")
    end = text.find("<!-- section:", start + 1)
    return text[start:end if end >= 0 else len(text)]


@pytest.mark.parametrize("doc", DOCS)
def test_quoted_code_is_in_dpbp(doc):
    """Every statement quoted next to a formula is, whitespace aside, in dpbp/ as it is now."""
    squeeze = lambda code: re.sub(r"\s+", " ", code).strip()  # noqa: E731
    source = squeeze("\n".join(dpbp_sources().values()))
    quoted = quoted_code(doc)
    if doc in (README, "docs/how-it-works.md"):
        assert len(quoted) >= (5 if doc == README else 15), quoted
    missing = [c for c in quoted if squeeze(c) not in source]
    assert not missing, f"{doc} quotes code that dpbp/ no longer has: {missing}"


def test_formula_table_pairs_each_seed_formula_with_its_function():
    """README shows the seed's four formulas and the sum rule, each beside the function that computes it."""
    rows = [r for r in section(text_of(README), "formulas").splitlines() if r.startswith("| $")]
    expect = [("δ^{(L)}", "losses.squared_error"), ("(W^{(l+1)})^{\\mathsf T}", "layers.dense_backward"),
              ("out^{(l-1)}_j", "layers.dense_backward"), ("w \\leftarrow w - η", "optim.SGD.step"),
              ("\\sum_n", "FastReducer.allreduce")]
    assert len(rows) == len(expect), rows
    for row, (formula, function) in zip(rows, expect):
        assert formula in row and f"`{function}`" in row, (formula, function, row)
    assert "`model.MLP.backward`" in rows[0] and "`model.MLP.backward`" in rows[1]


# ---------------------------------------------------------------------------------------- the module map

def module_map():
    """[(floor, name)] from README's module map; the data/ row contributes data/ and each data/xxx.py."""
    rows = []
    for line in section(text_of(README), "module-map").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] not in FLOORS:
            continue
        name = cells[1].strip("`")
        rows.append((cells[0], name))
        if name == "data/":
            rows += [(cells[0], "data/" + n) for n in re.findall(r"`(\w+\.py)`", cells[2])]
    return rows


def modules_now():
    """Every .py in dpbp/, as the map spells it: train.py, data/sampler.py (data/__init__.py as data/)."""
    names = {os.path.relpath(p, "dpbp").replace(os.sep, "/") for p in dpbp_sources()}
    return {"data/" if n == "data/__init__.py" else n for n in names}


def test_module_map_names_every_module():
    named = {name for _, name in module_map()}
    unnamed = sorted(modules_now() - named)
    assert not unnamed, f"README's module map does not name {unnamed}: add a row (floor, module, its one job)"


def test_module_map_names_only_modules_that_exist():
    named = {name for _, name in module_map()}
    stale = sorted(named - modules_now())
    assert not stale, f"README's module map names modules dpbp/ does not have: {stale}"


def test_module_map_is_ordered_by_floor_and_names_each_module_once():
    rows = module_map()
    floors = [FLOORS.index(floor) for floor, _ in rows]
    assert floors == sorted(floors), "rows go commands, wiring, communication, leaves"
    names = [name for _, name in rows]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert {"commands", "wiring", "communication", "leaves"} == {floor for floor, _ in rows}
