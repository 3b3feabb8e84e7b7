"""A rank that dies before MPI_Init, on another host, under srun: its peers end by themselves.

srun --kill-on-bad-exit=0 (as launch/slurm.sbatch runs it, so that a stop can end ranks one by one)
leaves the other ranks of a task that dies early waiting in MPI_Init's fence, holding the GIL. Their
start-up deadline (dpbp.comm.start_up_deadline, DPBP_START_TIMEOUT) must end them, with one message.
"""

from __future__ import annotations

import sys
import time

import pytest

from tests.cluster.test_training import CONFIG, REPO, THREAD_VARIABLES, run_job

pytestmark = pytest.mark.cluster
DEADLINE_S = 5


@pytest.mark.timeout(300)
def test_a_rank_dead_before_mpi_init_ends_the_others_within_the_start_deadline(cluster, tmp_path):
    script = tmp_path / "job.sh"
    train = f"{sys.executable} -m dpbp.train --config {CONFIG} --set train.steps=2 --out {tmp_path / 'run'} --quiet"
    script.write_text("#!/bin/bash\n"
                      f"export DPBP_START_TIMEOUT={DEADLINE_S}\n"
                      "srun --mpi=pmi2 --kill-on-bad-exit=0 bash -c "
                      f"'if [ \"$SLURM_PROCID\" = 2 ]; then exit 7; fi; exec {train}'\n"
                      "echo \"srun exit $?\"\n")
    env = {k: v for k, v in cluster.env.items() if k not in THREAD_VARIABLES}
    env["PYTHONPATH"] = str(REPO)
    t0 = time.monotonic()
    info, log, _ = run_job(cluster, tmp_path, ["-N", "2", "-n", "3", script], env)
    took = time.monotonic() - t0
    assert info["JobState"] in ("COMPLETED", "FAILED"), (info["JobState"], log)
    assert took < DEADLINE_S + 60, (took, log)
    assert log.count(f"MPI start-up did not finish within {DEADLINE_S} s") == 1, log
    assert "task 2: Exited with exit code 7" in log, log
    assert "srun exit 0" not in log, log
    assert not (tmp_path / "run").exists(), "nothing trained, nothing written"
