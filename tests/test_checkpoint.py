"""Checkpoint files: atomic writes, damage detected by checksum, pruning, and the fallback to the previous
checkpoint when the newest is damaged (end to end under mpirun)."""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest

from dpbp import checkpoint as ckpt
from dpbp.errors import UserError
from tests.jobs import Job, assert_bitwise_equal, small

ARRAYS = {"layers.0.weight": np.arange(6.0).reshape(2, 3), "layers.0.bias": np.array([0.5, -1.0])}


def saved(tmp_path, name="a.npz", step=1):
    path = tmp_path / name
    ckpt.save(path, ARRAYS, {"step": step})
    return path


def test_round_trip_keeps_arrays_and_meta(tmp_path):
    arrays, meta = ckpt.load(saved(tmp_path, step=7))
    assert meta["step"] == 7 and set(arrays) == set(ARRAYS)
    for k in ARRAYS:
        assert arrays[k].dtype == ARRAYS[k].dtype and np.array_equal(arrays[k], ARRAYS[k])


def test_altered_numbers_in_a_well_formed_file_fail_the_checksum(tmp_path):
    """The zip's own CRCs are recomputed here, so only dpbp's SHA-256 can notice."""
    path = saved(tmp_path)
    with np.load(path) as f:
        members = {k: f[k] for k in f.files}
    members["layers.0.bias"] = members["layers.0.bias"] + 1e-12
    np.savez(path, **members)
    with pytest.raises(UserError, match="checksum mismatch"):
        ckpt.load(path)


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9, 0.999])
def test_truncated_file_is_an_error_naming_it(tmp_path, keep):
    path = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(UserError, match=str(path)):
        ckpt.load(path)


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = saved(tmp_path)
    before = path.read_bytes()

    def crash(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(path, {"layers.0.weight": np.zeros((2, 3))}, {"step": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.npz"]


def test_prune_keeps_the_newest_and_sweeps_leftover_temporaries(tmp_path):
    for step in (5, 10, 15, 20):
        ckpt.save(ckpt.checkpoint_path(tmp_path, step), ARRAYS, {"step": step})
    (tmp_path / ".tmp-abc.npz").write_bytes(b"half a checkpoint")  # a writer killed mid-write
    ckpt.prune(tmp_path, 2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000015.npz", "ckpt-00000020.npz"]


def test_newest_valid_skips_a_damaged_newest_and_sets_it_aside(tmp_path):
    for step in (10, 20):
        ckpt.save(ckpt.checkpoint_path(tmp_path, step), ARRAYS, {"step": step})
    newest = ckpt.checkpoint_path(tmp_path, 20)
    with open(newest, "r+b") as f:
        f.truncate(100)
    warnings = []
    arrays, meta, path = ckpt.newest_valid(tmp_path, warnings.append)
    assert meta["step"] == 10 and path == ckpt.checkpoint_path(tmp_path, 10)
    assert len(warnings) == 1 and "ckpt-00000020.npz" in warnings[0]
    assert os.path.exists(newest + ".damaged") and ckpt.list_checkpoints(tmp_path) == [path]


def test_newest_valid_refuses_a_sound_file_too_large_for_the_model(tmp_path):
    ckpt.save(ckpt.checkpoint_path(tmp_path, 1), {"layers.0.weight": np.zeros(1000)}, {"step": 1})
    with pytest.raises(ckpt.Refused, match="plausible"):
        ckpt.newest_valid(tmp_path, print, max_bytes=800)


NAMES, SHAPES = ["layers.0.weight", "layers.0.bias"], [(2, 3), (2,)]


def npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("arrays, message", [
    ({"layers.0.weight": np.ones((3, 2)), "layers.0.bias": np.ones(2)}, "has shape"),
    ({"layers.0.weight": np.ones((2, 3), complex), "layers.0.bias": np.ones(2)}, "dtype complex"),
    ({"layers.0.weight": np.array([["a"] * 3] * 2), "layers.0.bias": np.ones(2)}, "dtype <U1"),
    ({"layers.0.weight": np.full((2, 3), np.nan), "layers.0.bias": np.ones(2)}, "NaN"),
    ({"layers.0.weight": np.ones((2, 3))}, "no array named 'layers.0.bias'"),
    ({"layers.0.weight": np.array([None] * 6, object).reshape(2, 3), "layers.0.bias": np.ones(2)},
     "refusing to unpickle"),
])
def test_load_params_refuses_bad_arrays(tmp_path, arrays, message):
    path = tmp_path / "p.npz"
    path.write_bytes(npz_bytes(**arrays))
    with pytest.raises(UserError, match=message):
        ckpt.load_params(path, NAMES, SHAPES)


def npy_header_only(shape, descr="<f8", payload=b"\0" * 64):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue() + payload


@pytest.mark.parametrize("shape", [(10 ** 12,), (2 ** 40, 2 ** 30), (2, 3 * 10 ** 9)])
def test_huge_declared_sizes_are_refused_before_any_allocation(tmp_path, shape):
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("layers.0.weight.npy", npy_header_only(shape))
    with pytest.raises(UserError, match="declares"):
        ckpt.load(path)


def test_load_params_reads_a_checkpoint_and_casts_to_float64(tmp_path):
    path = tmp_path / "c.npz"
    ckpt.save(path, {"layers.0.weight": np.ones((2, 3), np.float32), "layers.0.bias": np.zeros(2, np.int32),
                     "optim.velocity": np.zeros(8)}, {"step": 3})
    params = ckpt.load_params(path, NAMES, SHAPES)
    assert all(p.dtype == np.float64 for p in params.values())
    assert np.array_equal(params["layers.0.weight"], np.ones((2, 3)))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_resume_with_a_damaged_newest_checkpoint_uses_the_previous_one(tmp_path, damage):
    args = small(30, "--set", "train.checkpoint_every=10")
    rc, _, err, _ = Job(*args, "--out", tmp_path / "whole", ranks=2).finish(timeout=60)
    assert rc == 0, err
    out_dir = tmp_path / "r"
    rc, _, err, _ = Job(*small(20, "--set", "train.checkpoint_every=10"), "--out", out_dir, ranks=2).finish(60)
    assert rc == 0, err
    newest = ckpt.checkpoint_path(out_dir, 20)
    data = bytearray(open(newest, "rb").read())
    if damage == "truncate":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 3] ^= 0x01
    open(newest, "wb").write(bytes(data))
    rc, out, err, _ = Job("--resume", out_dir, "--set", "train.steps=30", ranks=2).finish(timeout=60)
    assert rc == 0, err
    assert err.count("skipping damaged checkpoint") == 1 and "ckpt-00000020.npz" in err, err
    assert "resumed from" in out and "ckpt-00000010.npz" in out, out
    assert_bitwise_equal(out_dir / "final.npz", tmp_path / "whole/final.npz")
