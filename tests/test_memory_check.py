"""The memory check before training: every rank on the node against MemAvailable, each process against
RLIMIT_AS, optimizer state included; a run that cannot fit is refused up front (exit 2), leaving nothing."""

from __future__ import annotations

import os
import resource
import subprocess

import pytest

from dpbp import step
from dpbp.comm import SerialComm
from dpbp.config import load_config
from dpbp.errors import UserError
from tests.conftest import dpbp_command

SIZES = [64, 16000, 16000, 10]
N = 64 * 16000 + 16000 + 16000 * 16000 + 16000 + 16000 * 10 + 10  # weights and biases, written out


def cfg_of(*sets):
    return load_config(None, [f"model.sizes={SIZES}".replace(" ", ""), *sets])


@pytest.mark.parametrize("sets, state_bytes", [
    (["optim.momentum=0.0"], 0),
    ([], N * 8),  # sgd momentum: one velocity
    (["optim.kind='adam'"], 2 * N * 8),  # m and v
    (["optim.kind='adamw'", "model.dtype='float32'"], 2 * N * 4),
])
def test_the_need_counts_the_optimizer_state(sets, state_bytes):
    need = step.memory_need(cfg_of(*sets), 1000, 1)
    kind = cfg_of(*sets)["optim.kind"]
    assert need[f"{kind} state"] == state_bytes
    itemsize = 4 if "model.dtype='float32'" in sets else 8
    assert need["parameters and gradient"] == 2 * N * itemsize and need["reduction buffers"] == N * itemsize


def test_sharded_state_is_the_largest_ranks_whole_blocks():
    """ZeRO-1 shards are whole optimizer BLOCKs (the last one short): of ceil(N / BLOCK) blocks on 3 ranks the
    first rank holds ceil(blocks / 3) whole ones, a little more than N / 3; the check must count that rank."""
    from dpbp.optim import BLOCK
    need = step.memory_need(cfg_of("optim.kind='adam'", "optim.shard=true"), 1000, 3)
    blocks = -(-N // BLOCK)
    assert need["adam state"] == 2 * -(-blocks // 3) * BLOCK * 8
    assert need["adam state"] > 2 * -(-N // 3) * 8  # not simply a third


def test_every_rank_on_the_node_counts_against_memavailable():
    cfg = cfg_of()
    need = step.memory_need(cfg, 1000, 4)
    per_rank = sum(need.values())
    available = int(3.5 * per_rank)
    assert step.memory_problem(cfg, need, 3, available, None) is None
    message = step.memory_problem(cfg, need, 4, available, None)
    assert "the 4 ranks on this node need" in message and "MemAvailable" in message, message


def test_rlimit_as_is_per_process():
    cfg = cfg_of()
    need = step.memory_need(cfg, 1000, 1)
    per_rank = sum(need.values())
    assert step.memory_problem(cfg, need, 8, 100 * per_rank, per_rank + 1) is None
    message = step.memory_problem(cfg, need, 1, 100 * per_rank, per_rank - 1)
    assert "address-space limit (ulimit -v, RLIMIT_AS)" in message, message


class FourOnANode(SerialComm):
    def local_rank_size(self):
        return 0, 4


def test_check_memory_asks_the_communicator_how_many_ranks_share_the_node(monkeypatch):
    cfg = cfg_of()
    per_rank = sum(step.memory_need(cfg, 1000, 1).values())
    monkeypatch.setattr(step, "memory_limits", lambda: (2 * per_rank, None))
    step.check_memory(cfg, 1000, SerialComm())  # one rank fits
    with pytest.raises(UserError, match="the 4 ranks on this node"):
        step.check_memory(cfg, 1000, FourOnANode())


def test_a_model_beyond_ulimit_v_is_refused_up_front_and_leaves_nothing(tmp_path):
    """The issue's case: 257 M parameters under `ulimit -v 6000000` (KiB)."""
    limit = 6000000 * 1024
    cmd, env = dpbp_command("train", "--set", f"model.sizes={SIZES}".replace(" ", ""), "--out", "big")

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          preexec_fn=cap)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "address-space limit (ulimit -v, RLIMIT_AS)" in lines[0], proc.stderr
    assert "257,216,010 parameters" in lines[0], lines[0]
    assert os.listdir(tmp_path) == []  # no run directory, no runs/
