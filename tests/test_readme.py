"""README.md stays true: its config table is the schema's, its links land, and its commands run.

Every command in a fenced block that starts with `python -m dpbp` or `mpirun ... -m dpbp` (also after `&&`)
runs here, in README order, from a scratch copy of the repository (so relative paths such as configs/ and
runs/demo work and a command may use what an earlier one wrote). Commands that train or benchmark get
small step counts appended (see SHORT: the last --set or --spec wins), so the whole README runs in a
minute or two. A leading `env -u NAME` / `NAME=value` prefix is honoured, except that tests never change
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE. A command expected to fail says so in a trailing comment: `# exits 2`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from dpbp.config import README_BEGIN, README_END, reference_markdown
from tests.conftest import REPO, clean_env, dpbp, mpirun_exe

README = os.path.join(REPO, "README.md")
SHORT = {"dpbp.train": ["--set", "train.steps=20"],
         "dpbp.bench": ["--spec", "2-2-2", "--repeats", "1", "--threads", "1"]}
PROTECTED = {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"}  # the common brief: tests leave these alone
ENV_PREFIX = re.compile(r"^(env(\s+-u\s+\S+)*\s+)?(\w+=\S*\s+)*")
SHELL_OPERATORS = {"|", "||", "&", ";", ">", ">>", "<", "2>", "2>&1"}

# Commands that cannot run here: {a piece of the command: the reason}. Keep this short: every entry is
# a README line that can go stale unnoticed.
EXEMPT: dict[str, str] = {
    "data.path=big_x.npy": "a memory measurement on a 2 GiB .npy file that the README does not create",
}


def readme_text():
    with open(README) as f:
        return f.read()


def readme_commands(text):
    """[(command line, expected exit status)] in README order."""
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


COMMANDS = readme_commands(readme_text())
RUNNABLE = [(c, status) for c, status in COMMANDS if not any(piece in c for piece in EXEMPT)]


def argv_for(command):
    """(argument list, environment changes) for a README command: this interpreter and mpirun, short runs."""
    argv = shlex.split(command)
    bad = SHELL_OPERATORS.intersection(argv)
    assert not bad, f"README command {command!r} uses shell syntax {sorted(bad)}; keep dpbp commands plain"
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
            argv += extra
    return argv, env


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A copy of the repository without its runs, as a user's checkout would be."""
    root = tmp_path_factory.mktemp("readme") / "dpbp"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".git", "runs", ".venv", "venv", "__pycache__",
                                                              "*.egg-info", ".pytest_cache"))
    return root


def test_readme_shows_the_commands_it_promises():
    """The extraction itself works: training on several ranks, a report, the config table."""
    cmds = [c for c, _ in COMMANDS]
    assert any(c.startswith("mpirun ") and "dpbp.train" in c for c in cmds), cmds
    assert any("dpbp.report" in c for c in cmds), cmds
    assert any("--resume" in c for c in cmds), cmds
    assert any("dpbp.config" in c for c in cmds), cmds


def test_every_exemption_names_one_readme_command():
    """An exemption outliving its command (or matching several) would hide README lines from the test."""
    for piece in EXEMPT:
        assert sum(piece in c for c, _ in COMMANDS) == 1, piece
    assert len(RUNNABLE) == len(COMMANDS) - len(EXEMPT)


@pytest.mark.parametrize("command,status", RUNNABLE, ids=[f"{i:02d}" for i in range(len(RUNNABLE))])
def test_readme_command_runs(scratch, command, status):
    argv, changes = argv_for(command)
    env = clean_env()
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env["PYTHONPATH"] = str(scratch)  # the copy's dpbp, as `python -m` from a checkout would use
    proc = subprocess.run(argv, cwd=scratch, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == status, f"{command}\n-> {' '.join(argv[1:])}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    for written in re.findall(r"wrote (\S+) and (\S+)", proc.stdout):  # dpbp.report's files
        for path in written:
            assert os.path.getsize(os.path.join(scratch, path)) > 0, path


def test_config_reference_is_the_schema():
    text = readme_text()
    assert text.count(README_BEGIN) == 1 and text.count(README_END) == 1
    table = text.split(README_BEGIN + "\n")[1].split(README_END)[0]
    assert table == reference_markdown(), ("README's config table differs from dpbp/config.py; "
                                           "run: python -m dpbp.config --readme README.md")


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_within_the_readme_land_on_headings():
    text = readme_text()
    body = re.sub(r"```.*?```", "", text, flags=re.S)
    anchors = {slug(h) for h in re.findall(r"^#{1,6} (.+)$", body, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", body)
    assert links, "expected links to README sections"
    missing = sorted(set(links) - anchors)
    assert not missing, f"links to no heading: {missing}; headings: {sorted(anchors)}"


def test_config_regeneration_rewrites_a_stale_table(tmp_path):
    """`python -m dpbp.config --readme FILE` is the fix the table test recommends: check it works."""
    stale = tmp_path / "README.md"
    stale.write_text(f"intro\n{README_BEGIN}\n| old | table |\n{README_END}\nrest\n")
    proc = dpbp("config", "--readme", stale, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert stale.read_text() == f"intro\n{README_BEGIN}\n{reference_markdown()}{README_END}\nrest\n"


def section(text, name):
    start = text.index(f"<!-- section: {name} -->")
    end = text.find("<!-- section:", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_how_it_works_quotes_the_code_as_it_is():
    """Every statement quoted next to a formula (python blocks, and inline code with a call) is in dpbp/."""
    how = section(readme_text(), "how-it-works")
    source = ""
    for folder, _, files in os.walk(os.path.join(REPO, "dpbp")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    source += f.read()
    squeeze = lambda code: re.sub(r"\s+", " ", code).strip()  # noqa: E731
    source = squeeze(source)
    quoted = []
    for block in re.findall(r"```python\n(.*?)```", how, flags=re.S):
        for line in block.splitlines():
            code = line.split("  #")[0] if not line.lstrip().startswith("#") else ""
            quoted += [c for c in code.split("; ") if c.strip()]
    quoted += [c for c in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", how, flags=re.S)) if "(" in c]
    assert len(quoted) > 15, quoted
    missing = [c for c in quoted if squeeze(c) not in source]
    assert not missing, f"README 'How it works' quotes code that dpbp/ no longer has: {missing}"


def test_how_it_works_names_functions_that_exist():
    """`losses.squared_error`, `model.MLP.backward` ...: every module.name in the section resolves."""
    import importlib
    how = section(readme_text(), "how-it-works")
    from dpbp.config import OPTIONS
    names = set(re.findall(r"`((?:layers|losses|model|optim|reduce|comm|train|config)(?:\.\w+)+)`", how))
    names -= set(OPTIONS)  # comm.reduce, comm.bucket_mb ... are config keys
    assert len(names) >= 6, names
    for dotted in sorted(names):
        module, *attrs = dotted.split(".")
        obj = importlib.import_module(f"dpbp.{module}")
        for attr in attrs:
            assert hasattr(obj, attr), f"README names {dotted}, but {obj!r} has no {attr!r}"
            obj = getattr(obj, attr)
