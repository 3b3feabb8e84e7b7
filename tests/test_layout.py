"""The dependency direction of dpbp/, held: each module imports only from its own floor or the floors below.

    floor 0  errors, threads, pmi_relay            the stdlib only
    floor 1  maths: layers, losses, model, optim,  numpy only (workers: its threads, the stdlib only)
                    workers
             leaves: data/, partition, checkpoint, config
    floor 2  comm                                  the only module that imports mpi4py
    floor 3  reduce
    floor 4  wiring: step, runs, progress, faults, cli
    floor 5  commands (python -m dpbp.X) and the package's API

Imports inside functions count too (a lazy import is still a dependency). The table is README's module
map in code; a new module must be placed here, so that where it sits is a decision, not an accident.
"""

from __future__ import annotations

import ast
import os
import sys

import pytest

from tests.conftest import REPO

MATHS = {"layers", "losses", "model", "optim", "workers"}
FLOORS = {
    0: {"errors", "threads", "pmi_relay"},
    1: MATHS | {"data", "partition", "checkpoint", "config"},
    2: {"comm"},
    3: {"reduce"},
    4: {"step", "runs", "progress", "faults", "cli", "watchdog"},
    5: {"__init__", "__main__", "train", "evaluate", "verify", "predict", "bench", "report", "launch", "export",
        "api"},
}
FLOOR = {name: floor for floor, names in FLOORS.items() for name in names}
# Third-party packages a module may import (lazily where optional): numpy everywhere but floor 0.
THIRD_PARTY = {"comm": {"mpi4py"}}
OPTIONAL = {"tqdm", "threadpoolctl", "matplotlib", "onnx", "onnxruntime", "torch", "sklearn"}


def modules():
    """{dotted name: path} of every module in dpbp/."""
    found = {}
    for folder, _, files in os.walk(os.path.join(REPO, "dpbp")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__") if rel != "dpbp.__init__" else rel] = path
    return found


def group(dotted):
    """The name FLOORS knows a module by: dpbp.data.rows -> data, dpbp.step -> step."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path, dotted):
    """(dpbp modules, top-level third-party packages) that the file imports, anywhere in it."""
    tree = ast.parse(open(path).read())
    ours, theirs = set(), set()
    package = dotted if path.endswith("__init__.py") else dotted.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
            names = [base] if base != "dpbp" else [f"dpbp.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "dpbp" or name.startswith("dpbp."):
                ours.add(name)
            elif name.split(".")[0] not in sys.stdlib_module_names and name != "__future__":
                theirs.add(name.split(".")[0])
    return ours, theirs


MODULES = modules()


def test_every_module_has_a_floor():
    unplaced = sorted(m for m in MODULES if group(m) not in FLOOR)
    assert not unplaced, f"place these modules in tests/test_layout.py's FLOORS (and README's map): {unplaced}"


@pytest.mark.parametrize("dotted", sorted(MODULES))
def test_imports_point_down(dotted):
    me = group(dotted)
    ours, theirs = imports(MODULES[dotted], dotted)
    up = sorted(m for m in ours if group(m) in FLOOR and FLOOR[group(m)] > FLOOR[me])
    assert not up, f"{dotted} (floor {FLOOR[me]}) imports from a floor above it: {up}"
    if me in MATHS:
        other = sorted(m for m in ours if group(m) not in MATHS)
        assert not other, f"{dotted} is maths and may import only maths and numpy, not {other}"
    allowed = {"numpy"} | THIRD_PARTY.get(me, set()) | (OPTIONAL if FLOOR[me] >= 4 else set())
    if FLOOR[me] == 0:
        allowed = OPTIONAL & {"threadpoolctl"} if me == "threads" else set()
    if me == "data":
        allowed |= {"sklearn"}  # only to find its bundled digits file, lazily
    assert theirs <= allowed, f"{dotted} imports {sorted(theirs - allowed)}; allowed here: {sorted(allowed)}"


def test_no_module_imports_a_command_except_commands():
    commands = FLOORS[5] - {"__init__"}
    for dotted, path in MODULES.items():
        if FLOOR[group(dotted)] == 5:
            continue
        ours, _ = imports(path, dotted)
        assert not {m for m in ours if group(m) in commands}, dotted


def test_the_import_scanner_sees_lazy_and_relative_imports(tmp_path):
    """The check above is only as good as `imports`: it must find imports inside functions."""
    path = tmp_path / "mod.py"
    path.write_text("import numpy\ndef f():\n    from dpbp.step import Trainer\n    import mpi4py.MPI\n")
    ours, theirs = imports(str(path), "dpbp.mod")
    assert ours == {"dpbp.step"} and theirs == {"numpy", "mpi4py"}
