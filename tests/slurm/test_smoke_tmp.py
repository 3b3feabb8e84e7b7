import sys, os, subprocess
import pytest

@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_trivial(slurm, tmp_path):
    bindir = os.path.dirname(sys.executable)
    (tmp_path / "job.sh").write_text(f"""#!/bin/bash
export PATH={bindir}:$PATH
echo start $SLURM_NTASKS
mpirun -n $SLURM_NTASKS python -c 'from mpi4py import MPI; c=MPI.COMM_WORLD; print("rank", c.rank, "of", c.size)'
srun --mpi=pmi2 python -c 'from mpi4py import MPI; c=MPI.COMM_WORLD; print("srank", c.rank, "of", c.size)'
""")
    p = slurm.run(["timeout", "100", "sbatch", "--wait", "-n", "4", "-o", str(tmp_path/"out.txt"), str(tmp_path/"job.sh")], timeout=110, cwd=tmp_path)
    print(p.stdout, p.stderr)
    print((tmp_path/"out.txt").read_text())
    assert p.returncode == 0
