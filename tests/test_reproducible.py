"""comm.reduce = "reproducible": bitwise the same results for every number of ranks.

The reducer is first driven in-process by P threads standing in for ranks (their "MPI" adds the
ranks' buffers in a different order on every rank, as a real MPI may), then the training command runs
under mpirun at P = 1..4 and its outputs are compared byte for byte.
"""

from __future__ import annotations

import json
import os
import threading
from fractions import Fraction

import numpy as np
import pytest

from dpbp.reduce import Layout, ReproducibleReducer
from tests.conftest import REPO

# ---------------------------------------------------------------- in-process ranks


class _World:
    """Collectives for `size` threads: each rank's buffer is combined in a rank-dependent order."""

    def __init__(self, size):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=30)

    def allreduce(self, rank, buf, op):
        self.slots[rank] = buf.copy()
        self.barrier.wait()
        order = np.random.default_rng(rank).permutation(self.size)  # not rank order, not the same twice
        result = self.slots[order[0]].copy()
        for r in order[1:]:
            op(result, self.slots[r], out=result)
        self.barrier.wait()
        buf[...] = result
        return buf


class _ThreadComm:
    def __init__(self, world, rank):
        self.world, self.rank, self.size = world, rank, world.size

    def allreduce_sum_(self, buf):
        return self.world.allreduce(self.rank, buf, np.add)

    def allreduce_max_(self, buf):
        return self.world.allreduce(self.rank, buf, np.maximum)


GROUPS = [(0, 7), (7, 12), (12, 112), (112, 113)]  # three "tensors" and a loss
N_BUF = 115  # + two exact entries: a count and the stop flag
LAYOUT = Layout([(7,), (5,), (100,)])  # the buffer above, as the reducer lays it out
assert LAYOUT.grid_groups() == GROUPS and LAYOUT.size == N_BUF


def chunk_values(c, dtype, spread=6.0):
    """The results of chunk c: a pure function of c (as a chunk's gradient is of its samples)."""
    rng = np.random.default_rng([c, 99])
    v = rng.normal(size=N_BUF) * 10.0 ** rng.uniform(-spread, 0, N_BUF)  # mixed signs and magnitudes
    v[7:12] *= 1e-30  # a tensor far below the others: it gets its own grid
    v[113] = c % 5  # a count
    return v.astype(dtype)


def reduce_on(P, batch, chunk, dtype, stops=None, values=chunk_values):
    """Run one reduction on P thread-ranks; returns each rank's result buffer."""
    world, results = _World(P), [None] * P

    def rank_main(rank):
        red = ReproducibleReducer(_ThreadComm(world, rank), LAYOUT, dtype, chunk)
        for a, b, piece in red.begin(batch):
            piece.buf[:] = values(a // chunk, dtype)
            red.add_piece(piece)
        red.result.buf[114] = 0 if stops is None else stops[rank]
        results[rank] = red.allreduce().buf.copy()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in results), "a thread-rank failed"
    return results


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("batch,chunk", [(40, 8), (37, 5), (10, 1), (3, 2), (300, 1)])
def test_reduction_is_bitwise_the_same_for_every_rank_count(dtype, batch, chunk):
    """P = 1..7, including P above the number of chunks (idle ranks) and 300 float32 chunks (past the
    256 for which the float32 grid needs no coarsening)."""
    reference = reduce_on(1, batch, chunk, dtype)[0]
    for P in range(2, 8):
        for rank, result in enumerate(reduce_on(P, batch, chunk, dtype)):
            assert result.tobytes() == reference.tobytes(), f"P={P} rank {rank}"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("batch,chunk", [(40, 8), (300, 1)])
def test_reduction_is_within_the_documented_bound_of_the_exact_sum(dtype, batch, chunk):
    """|result - exact sum| <= N 2^(2-p+s) m_t + ulp(result)/2 per entry (reduce.py's doc), with the exact sum
    in rational arithmetic; and counts are exact."""
    n_chunks = -(-batch // chunk)
    chunks = [chunk_values(c, dtype) for c in range(n_chunks)]
    result = reduce_on(3, batch, chunk, dtype)[0]
    p, w = np.finfo(dtype).nmant + 1, 8 * np.dtype(dtype).itemsize
    s = max(0, (n_chunks - 1).bit_length() - (w - p))
    for lo, hi in GROUPS:
        m = max(float(np.max(np.abs(c[lo:hi]))) for c in chunks)
        for i in range(lo, hi):
            exact = sum(Fraction(float(c[i])) for c in chunks)
            bound = Fraction(n_chunks) * Fraction(2.0 ** (2 - p + s)) * Fraction(m) + Fraction(
                float(np.spacing(np.abs(result[i])))) / 2
            assert abs(Fraction(float(result[i])) - exact) <= bound, (lo, i)
    assert result[113] == sum(c % 5 for c in range(n_chunks))


def test_stop_flags_count_once_per_rank_even_on_idle_ranks():
    """3 samples in 2 chunks on 4 ranks: ranks 2 and 3 compute nothing but their flags still arrive."""
    for P, stops in [(4, [0, 0, 0, 1]), (4, [1, 1, 1, 1]), (1, [1])]:
        for result in reduce_on(P, 3, 2, "float64", stops):
            assert result[114] == sum(stops)


def test_a_non_finite_chunk_makes_its_tensor_nan_on_every_rank():
    def values(c, dtype):
        v = chunk_values(c, dtype)
        if c == 3:
            v[20] = np.inf
        return v

    for result in reduce_on(3, 40, 8, "float64", values=values):
        assert np.isnan(result[12:112]).all()  # the tensor that held the inf
        assert np.isfinite(result[:12]).all() and np.isfinite(result[112:]).all()


def test_results_are_close_to_the_plain_float_sum():
    """Not merely reproducible: as accurate as adding in float64 (relative to the tensor's scale)."""
    chunks = [chunk_values(c, "float64") for c in range(5)]
    result = reduce_on(2, 40, 8, "float64")[0]
    plain = np.sum(chunks, axis=0)
    for lo, hi in GROUPS:
        scale = np.max(np.abs(plain[lo:hi]))
        assert np.max(np.abs(result[lo:hi] - plain[lo:hi])) <= 1e-14 * scale


# ---------------------------------------------------------------- the training command under mpirun


def _run_dir_outputs(run_dir):
    """{file: {array: bytes}} for final.npz and every checkpoint, and metrics.jsonl without timings."""
    found = {}
    for name in sorted(os.listdir(run_dir)):
        if name.endswith(".npz"):
            with np.load(run_dir / name, allow_pickle=False) as f:
                found[name] = {k: (f[k].dtype.str, f[k].shape, f[k].tobytes()) for k in f.files
                               if k != "__meta__"}
    timing = {"samples_per_s", "comm_s", "step_s", "time", "wall_s", "elapsed_s"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    found["metrics"] = [{k: v for k, v in r.items() if k not in timing and not k.endswith("_s")} for r in records]
    return found


CASES = {
    # float64; 37 samples in chunks of 5: 8 chunks, the last of 2, so no P here divides anything evenly
    "spirals-float64": ["--config", os.path.join(REPO, "configs/spirals.toml"), "--set", "data.batch_size=37",
                        "--set", "comm.chunk=5", "--set", "loss.l2=0.001"],
    # float32 with a held-out split (eval lines in metrics.jsonl, 7 eval chunks shared out over the ranks);
    # 50 samples = 3 chunks of 16 and one of 2
    "random-float32": ["--set", "data.name='random'", "--set", "model.sizes=[20,32,10]", "--set",
                       "model.dtype='float32'", "--set", "data.batch_size=50", "--set", "comm.chunk=16"],
    # 4 samples in 2 chunks: at P = 3 and 4 some ranks are idle
    "xor-idle-ranks": ["--config", os.path.join(REPO, "configs/xor.toml"), "--set", "comm.chunk=2",
                       "--set", "model.dtype='float32'"],
}
COMMON = ["--set", "train.steps=50", "--set", "train.log_every=10", "--set", "train.eval_every=25",
          "--set", "train.checkpoint_every=25", "--set", "train.keep_checkpoints=5", "--quiet"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_outputs_are_byte_identical_for_1_to_4_ranks(run_cli, tmp_path, case):
    args = [*CASES[case], *COMMON, "--set", "comm.reduce='reproducible'"]
    outputs = {}
    for P in (1, 2, 3, 4):
        proc = run_cli("train", *args, "--out", tmp_path / f"p{P}", ranks=P, check=True)
        outputs[P] = _run_dir_outputs(tmp_path / f"p{P}")
        idle = case == "xor-idle-ranks" and P > 2  # 2 chunks: said once, by rank 0
        assert proc.stderr.count(f"{P - 2} of {P} ranks stay idle") == (1 if idle else 0), proc.stderr
    assert {"final.npz", "ckpt-00000025.npz", "ckpt-00000050.npz", "metrics"} <= set(outputs[1])
    assert any(r.get("split") == "val" for r in outputs[1]["metrics"]) or case == "xor-idle-ranks"
    for P in (2, 3, 4):
        assert outputs[P].keys() == outputs[1].keys()
        for name in outputs[1]:
            assert outputs[P][name] == outputs[1][name], f"{case}: {name} differs between 1 and {P} ranks"


def test_fast_and_reproducible_agree_to_rounding(run_cli, tmp_path):
    """float64: fast mode at P = 1 and 3 and reproducible mode agree to 1e-10 relative after 50 steps,
    so reproducible mode is exact enough, not only repeatable."""
    args = [*CASES["spirals-float64"], *COMMON]
    run_cli("train", *args, "--set", "comm.reduce='reproducible'", "--out", tmp_path / "r", ranks=2, check=True)
    ref = _run_dir_outputs(tmp_path / "r")["final.npz"]
    for P in (1, 3):
        run_cli("train", *args, "--set", "comm.reduce='fast'", "--out", tmp_path / f"f{P}", ranks=P, check=True)
        with np.load(tmp_path / f"f{P}/final.npz") as f:
            for name, (dtype, shape, raw) in ref.items():
                if name.startswith("layers."):
                    expected = np.frombuffer(raw, dtype).reshape(shape)
                    scale = np.max(np.abs(expected))
                    assert np.max(np.abs(f[name] - expected)) <= 1e-10 * scale, (P, name)


def test_resuming_on_another_rank_count_continues_the_same_bits(run_cli, tmp_path):
    """25 steps on 2 ranks, then resumed on 3 ranks up to 50: the same bytes as 50 steps in one process."""
    args = [*CASES["spirals-float64"], *COMMON, "--set", "comm.reduce='reproducible'"]
    run_cli("train", *args, "--out", tmp_path / "one", check=True)
    run_cli("train", *args, "--set", "train.steps=25", "--out", tmp_path / "split", ranks=2, check=True)
    run_cli("train", *args, "--resume", tmp_path / "split", ranks=3, check=True)
    assert _run_dir_outputs(tmp_path / "split")["final.npz"] == _run_dir_outputs(tmp_path / "one")["final.npz"]
