"""optim.shard checkpoints hold the whole optimizer state: a sharded run resumes unsharded (and the reverse)
bitwise, against one uninterrupted run (reproducible mode, so the rank count does not change the bits)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.conftest import dpbp, load_params

SETS = ["data.name='random'", "model.sizes=[100,1000,200,10]", "optim.kind='adam'", "optim.lr=0.001",
        "optim.clip_norm=1.0", "loss.l2=0.001", "comm.reduce='reproducible'", "data.batch_size=32",
        "train.checkpoint_every=3", "train.eval_every=0", "data.val_fraction=0.0"]


def _train(out, steps, shard, ranks, resume=False):
    args = ["--resume", out] if resume else ["--out", out]
    sets = [x for s in [*SETS, f"train.steps={steps}", f"optim.shard={shard}"] for x in ("--set", s)]
    dpbp("train", *args, *sets, "--quiet", ranks=ranks, check=True, timeout=300)


@pytest.mark.parametrize("first,second", [(("true", 2), ("false", None)), (("false", None), ("true", 3))])
def test_sharded_checkpoint_resumes_unsharded_and_back(tmp_path, first, second):
    whole = str(tmp_path / "whole")
    _train(whole, 6, "false", None)
    part = str(tmp_path / "part")
    _train(part, 3, *first)
    with np.load(os.path.join(part, "ckpt-00000003.npz")) as f:
        assert f["optim.exp_avg"].size == sum(f[k].size for k in f.files if k.startswith("layers."))
    _train(part, 6, *second, resume=True)
    got, expected = load_params(os.path.join(part, "final.npz")), load_params(os.path.join(whole, "final.npz"))
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].tobytes() == expected[k].tobytes(), k
