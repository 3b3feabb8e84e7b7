"""Under `mpirun -n P python -m pytest --with-mpi tests/mpi`: only rank 0 reports in full.

Other ranks stay silent unless one of their tests fails, which they report on stderr with their rank,
so a failure on any rank is seen once and the exit status is non-zero either way.
"""

from __future__ import annotations

import os
import sys

import pytest


def _rank():
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if config.getoption("with_mpi", default=False) and _rank() > 0:
        tr = config.pluginmanager.getplugin("terminalreporter")
        if tr is not None:
            config.pluginmanager.unregister(tr)


def pytest_runtest_logreport(report):
    if report.failed and _rank() > 0:
        print(f"[rank {_rank()}] FAILED {report.nodeid}\n{report.longreprtext}", file=sys.stderr, flush=True)
