"""Data files: every format gives back the arrays written to it, rows are read on demand, and every
kind of bad data stops before training with one message naming the file and what is wrong.

Files are written here with independent writers (struct for IDX, csv for CSV, numpy for .npy/.npz)
and what dpbp reads is compared with the arrays that went in.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpbp.config import load_config
from dpbp.data import load_data
from dpbp.data.rows import FileRows
from dpbp.errors import UserError
from tests.conftest import load_params, metrics, rchar

N, FEATURES, CLASSES = 60, 4, 3


def blobs(n=N, seed=0):
    """Three separable clusters in 4-D, float64 inputs and int64 labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.normal(0, 0.3, (n, FEATURES)) + np.eye(CLASSES, FEATURES)[y] * 2
    return x, y


def cfg(*overrides, sizes=(FEATURES, 8, CLASSES)):
    return load_config(None, [f"model.sizes={list(sizes)}", "data.val_fraction=0", *overrides])


def path_set(key, path):
    return f"{key}={json.dumps(str(path))}"


def write_idx(path, a, gz=False):
    """IDX as MNIST ships it: 0 0 type ndim, big-endian uint32 dims, then the values (big-endian)."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}[a.dtype]
    raw = struct.pack(f">BBBB{a.ndim}I", 0, 0, code, a.ndim, *a.shape) + a.astype(a.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def write_csv(path, header, rows):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join(str(v) for v in r) + "\n")


def everything(data):
    """(x, t, labels) of all rows, read through the lazy interface."""
    return data.batch(np.arange(len(data)))


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_gives_back_x_and_y(tmp_path, compressed):
    x, y = blobs()
    p = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(p, x=x, y=y)
    data, val = load_data(cfg(path_set("data.path", p)))
    assert val is None
    got_x, got_t, got_labels = everything(data)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_labels, y)
    np.testing.assert_array_equal(got_t, np.eye(CLASSES)[y])
    # Stored members are read from the file on demand; compressed ones must be inflated into memory.
    assert isinstance(data.x, FileRows) != compressed


def test_npy_pair_with_labels_and_with_regression_targets(tmp_path):
    x, y = blobs()
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    np.save(tmp_path / "y.npy", y.astype(np.int16))
    data, _ = load_data(cfg(path_set("data.path", tmp_path / "x.npy"), path_set("data.targets", tmp_path / "y.npy")))
    got_x, _, got_labels = everything(data)
    np.testing.assert_array_equal(got_x, x.astype(np.float32))
    np.testing.assert_array_equal(got_labels, y)
    targets = np.column_stack([x.sum(axis=1), x[:, 0] * 2])
    np.save(tmp_path / "t.npy", targets)
    data, _ = load_data(cfg(path_set("data.path", tmp_path / "x.npy"), path_set("data.targets", tmp_path / "t.npy"),
                            "model.output='identity'", "loss.kind='squared_error'", sizes=(FEATURES, 2)))
    assert data.labels is None
    np.testing.assert_array_equal(everything(data)[1], targets)


def test_csv_with_header_labels_and_several_target_columns(tmp_path):
    x, y = blobs()
    header = ["a", "label", "b", "c", "d"]
    write_csv(tmp_path / "d.csv", header, [[r[0], lab, *r[1:]] for r, lab in zip(x.tolist(), y.tolist())])
    data, _ = load_data(cfg(path_set("data.path", tmp_path / "d.csv"), "data.target_column='label'"))
    got_x, _, got_labels = everything(data)
    np.testing.assert_array_equal(got_x, x)  # repr of a float64 reads back exactly
    np.testing.assert_array_equal(got_labels, y)
    data, _ = load_data(cfg(path_set("data.path", tmp_path / "d.csv"), "data.target_column='c, d'",
                            "model.output='identity'", "loss.kind='squared_error'", sizes=(3, 2)))
    np.testing.assert_array_equal(everything(data)[0], np.column_stack([x[:, 0], y, x[:, 1]]))
    np.testing.assert_array_equal(everything(data)[1], x[:, 2:])


@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_are_flattened_and_scaled(tmp_path, gz):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (50, 3, 5), dtype=np.uint8)
    labels = rng.integers(0, 10, 50).astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    data, _ = load_data(cfg(path_set("data.path", tmp_path / f"train-images-idx3-ubyte{suffix}"),
                            path_set("data.targets", tmp_path / f"train-labels-idx1-ubyte{suffix}"), sizes=(15, 10)))
    got_x, got_t, got_labels = everything(data)
    np.testing.assert_array_equal(got_x, images.reshape(50, 15) / 255.0)
    assert got_x.min() >= 0 and got_x.max() <= 1
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(got_t.argmax(axis=1), labels)


def test_val_path_and_val_fraction(tmp_path):
    x, y = blobs()
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=x[:7], y=y[:7])
    train, val = load_data(cfg(path_set("data.path", tmp_path / "train.npz"), path_set("data.val_path", tmp_path / "test.npz"),
                               "data.val_fraction=0.5"))
    assert len(train) == N and len(val) == 7  # val_path replaces the split
    np.testing.assert_array_equal(everything(val)[0], x[:7])
    train, val = load_data(cfg(path_set("data.path", tmp_path / "train.npz"), "data.val_fraction=0.25"))
    assert len(val) == round(N * 0.25) and len(train) == N - len(val)
    # The two parts partition the file: every row in exactly one of them.
    rows = np.concatenate([everything(train)[0], everything(val)[0]])
    assert sorted(map(tuple, rows)) == sorted(map(tuple, x))
    again_train, _ = load_data(cfg(path_set("data.path", tmp_path / "train.npz"), "data.val_fraction=0.25"))
    np.testing.assert_array_equal(everything(again_train)[0], everything(train)[0])  # by seed, repeatable


# ---------------------------------------------------------------- rank-local reading


def test_rows_are_read_on_demand_and_nothing_else(tmp_path):
    """An 8 MiB .npy file of 64 KiB rows: reading 5 scattered rows costs 5 rows of I/O, not the file."""
    n, width = 128, 8192
    a = np.arange(n * width, dtype=np.float64).reshape(n, width)
    np.save(tmp_path / "big.npy", a)
    data, _ = load_data(cfg(path_set("data.path", tmp_path / "big.npy"), "data.name='xor'", sizes=(width, 2)),
                        need_targets=False)
    rows = np.array([100, 3, 77, 40, 5])
    before = rchar()
    got = data.x[rows]
    read = rchar() - before
    np.testing.assert_array_equal(got, a[rows])
    assert 5 * width * 8 <= read <= 5 * width * 8 + 4096, read


# ---------------------------------------------------------------- bad data: one clear message each


def bad(tmp_path, name, write):
    p = tmp_path / name
    write(p)
    return p


def expect_error(overrides, *needles, **kw):
    with pytest.raises(UserError) as e:
        load_data(cfg(*overrides, **kw))
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    return str(e.value)


def test_missing_or_misnamed_arrays(tmp_path):
    x, y = blobs()
    p = bad(tmp_path, "d.npz", lambda p: np.savez(p, x=x, labels=y))
    expect_error([path_set("data.path", p)], "d.npz", "has no array named 'y'", "it has: labels, x")
    p = bad(tmp_path, "x.npy", lambda p: np.save(p, x))
    expect_error([path_set("data.path", p)], "x.npy", "holds only inputs", "data.targets")
    p = bad(tmp_path, "d.csv", lambda p: write_csv(p, ["a", "b", "c", "d", "y"], [[1, 2, 3, 4, 0]]))
    expect_error([path_set("data.path", p), "data.target_column='label'"], "d.csv", "has no column 'label'",
                 "its header: a, b, c, d, y")
    expect_error([path_set("data.path", p)], "d.csv", "needs data.target_column")


def test_feature_count_and_target_width(tmp_path):
    x, y = blobs()
    p = bad(tmp_path, "d.npz", lambda p: np.savez(p, x=x[:, :3], y=y))
    expect_error([path_set("data.path", p)], "d.npz", "inputs have 3 features but model.sizes starts with 4")
    p = bad(tmp_path, "t.npz", lambda p: np.savez(p, x=x, y=np.zeros((N, 3))))
    expect_error([path_set("data.path", p), "model.output='identity'", "loss.kind='squared_error'"], "t.npz",
                 "targets have width 3 but model.sizes ends with 2", sizes=(FEATURES, 2))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y[:-1])
    expect_error([path_set("data.path", tmp_path / "x.npy"), path_set("data.targets", tmp_path / "y.npy")],
                 "targets file", "y.npy", f"{N - 1} targets for the {N} inputs")


def test_labels_outside_the_classes_name_the_first_row(tmp_path):
    x, y = blobs()
    y[[12, 40]] = [7, -1]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    expect_error([path_set("data.path", tmp_path / "x.npy"), path_set("data.targets", tmp_path / "y.npy")],
                 "targets file", "y.npy", "label 7 in row 12 is outside [0, 3)")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_inputs_names_the_first_row(tmp_path, value):
    x, y = blobs()
    x[17, 2] = x[33, 0] = value
    p = bad(tmp_path, "d.npz", lambda p: np.savez(p, x=x, y=y))
    expect_error([path_set("data.path", p)], "d.npz", "inputs hold NaN or inf, first in row 17")
    x[17, 2] = x[33, 0] = 1.0
    x[-1, 1] = value  # the very last row, in the last scan chunk
    p = bad(tmp_path, "e.npz", lambda p: np.savez(p, x=x, y=y))
    expect_error([path_set("data.path", p)], "e.npz", f"first in row {N - 1}")


def test_empty_files(tmp_path):
    p = bad(tmp_path, "d.npz", lambda p: p.write_bytes(b""))
    expect_error([path_set("data.path", p)], "d.npz", "is empty (0 bytes)")
    p = bad(tmp_path, "z.npz", lambda p: np.savez(p, x=np.zeros((0, FEATURES)), y=np.zeros(0, int)))
    expect_error([path_set("data.path", p)], "z.npz", "the data set is empty (0 samples)")
    p = bad(tmp_path, "h.csv", lambda p: write_csv(p, ["a", "b", "c", "d", "y"], []))
    expect_error([path_set("data.path", p), "data.target_column='y'"], "h.csv", "has a header but no data rows")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx(tmp_path, gz):
    images = np.random.default_rng(3).integers(0, 256, (20, 28, 28), dtype=np.uint8)  # incompressible
    write_idx(tmp_path / "img", images)
    write_idx(tmp_path / "lab", np.zeros(20, np.uint8))
    raw = (tmp_path / "img").read_bytes()[:-100]
    if gz:
        full = gzip.compress(raw + bytes(100))
        (tmp_path / "img").write_bytes(full[:len(full) // 2])
        needle = "truncated or damaged gzip"
    else:
        (tmp_path / "img").write_bytes(raw)
        needle = "is truncated: its header describes 20 x 28 x 28 values (15680 bytes of data) but the file " \
                 "holds only 15580"
    expect_error([path_set("data.path", tmp_path / "img"), path_set("data.targets", tmp_path / "lab")], "img", needle,
                 sizes=(784, 10))


def test_truncated_npy_and_unknown_format(tmp_path):
    x, y = blobs()
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "x.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:-8])
    np.save(tmp_path / "y.npy", y)
    expect_error([path_set("data.path", tmp_path / "x.npy"), path_set("data.targets", tmp_path / "y.npy")],
                 "x.npy", "is truncated")
    p = bad(tmp_path, "d.bin", lambda p: p.write_bytes(bytes(range(256)) * 4))
    expect_error([path_set("data.path", p)], "d.bin", "is not in a format dpbp reads")
    p = bad(tmp_path, "o.npz", lambda p: np.savez(p, x=np.array([object()] * 4, dtype=object).reshape(1, 4), y=[0]))
    expect_error([path_set("data.path", p)], "o.npz", "never unpickles")


def test_csv_ragged_row_and_non_number(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("a,b,c,d,y\n1,2,3,4,0\n1,2,3,4,1\n5,6,7,0\n1,2,3,4,2\n")
    expect_error([path_set("data.path", p), "data.target_column='y'"], "r.csv",
                 "line 4 has 4 fields but the header has 5 (a ragged row)")
    p.write_text("a,b,c,d,y\n1,2,3,4,0\n1,2,x3,4,1\n")
    expect_error([path_set("data.path", p), "data.target_column='y'"], "r.csv", "line 3, column 'c': 'x3' is not a number")


def test_npz_member_offsets_survive_zip64_extras(tmp_path):
    """A stored member is found through its local header, whatever extra fields the zip writer added."""
    x, y = blobs()
    with zipfile.ZipFile(tmp_path / "d.npz", "w", compression=zipfile.ZIP_STORED) as zf:
        for name, a in (("x", x), ("y", y)):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as m:
                np.lib.format.write_array(m, a)
    data, _ = load_data(cfg(path_set("data.path", tmp_path / "d.npz")))
    assert isinstance(data.x, FileRows)
    np.testing.assert_array_equal(everything(data)[0], x)


# ---------------------------------------------------------------- through the command


def test_fewer_samples_than_ranks_stops_before_training(run_cli, tmp_path):
    x, y = blobs(2)
    np.savez(tmp_path / "two.npz", x=x, y=y)
    proc = run_cli("train", "--set", path_set("data.path", tmp_path / "two.npz"), "--set", "model.sizes=[4,3]",
                   "--set", "data.val_fraction=0", "--out", tmp_path / "r", ranks=3, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("2 training samples for 3 ranks; every rank needs at least one") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r" / "final.npz").exists()


def test_bad_value_found_by_the_last_rank_is_reported_once(run_cli, tmp_path):
    """The NaN sits in the last rank's share of the scan; rank 0 prints the message, with the file row."""
    x, y = blobs()
    x[N - 2, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    proc = run_cli("train", "--set", path_set("data.path", tmp_path / "x.npy"), "--set",
                   path_set("data.targets", tmp_path / "y.npy"), "--set", "model.sizes=[4,3]", "--out",
                   tmp_path / "r", ranks=3, timeout=60)
    assert proc.returncode == 2, proc.stderr
    needle = f"data file '{tmp_path / 'x.npy'}': inputs hold NaN or inf, first in row {N - 2}"
    assert proc.stderr.count(needle) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_training_on_idx_files_equals_training_on_the_same_npz(run_cli, tmp_path):
    """MNIST-style files train exactly like the same numbers in an .npz: one config change."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (90, 6, 6), dtype=np.uint8)
    labels = ((images.reshape(90, -1).mean(axis=1) > 127) + 2 * (images[:, 0, 0] > 127)).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    np.savez(tmp_path / "same.npz", x=images.reshape(90, -1) / 255.0, y=labels.astype(np.int64))
    common = ["--set", "model.sizes=[36,16,4]", "--set", "train.steps=30", "--set", "data.batch_size=16",
              "--set", "train.eval_every=10", "--set", "data.val_fraction=0.2", "--quiet"]
    run_cli("train", *common, "--set", path_set("data.path", tmp_path / "same.npz"), "--out", tmp_path / "a",
            check=True, env={"DPBP_SERIAL": "1"})
    run_cli("train", *common, "--set", path_set("data.path", tmp_path / "train-images-idx3-ubyte.gz"),
            "--set", path_set("data.targets", tmp_path / "train-labels-idx1-ubyte"), "--out", tmp_path / "b",
            check=True, env={"DPBP_SERIAL": "1"})
    a, b = load_params(tmp_path / "a/final.npz"), load_params(tmp_path / "b/final.npz")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    _, val = metrics(tmp_path / "b")
    assert [r["step"] for r in val] == [10, 20, 30] and all(0 <= r["accuracy"] <= 1 for r in val)
    assert os.path.exists(tmp_path / "b/config.toml")


def test_lazy_rows_answer_numpy_calls_and_hash_like_arrays(tmp_path):
    """Code that treats data.x as an array (np.take into a buffer, np.asarray, a content digest) gets
    the same answers from a file read lazily as from the arrays in memory."""
    import hashlib
    x, y = blobs()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data, _ = load_data(cfg(path_set("data.path", tmp_path / "d.npz")))
    assert isinstance(data.x, FileRows)
    buf = np.empty((3, FEATURES))
    np.take(data.x, np.array([5, 0, 59]), axis=0, out=buf, mode="clip")
    np.testing.assert_array_equal(buf, x[[5, 0, 59]])
    np.testing.assert_array_equal(np.asarray(data.x), x)
    h = hashlib.sha256()
    data.update_hash(h)
    t = np.eye(CLASSES)[y]
    expected = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode() + x.tobytes() + f"{t.dtype.str}{t.shape}".encode()
                              + t.tobytes())
    assert h.hexdigest() == expected.hexdigest()


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(prefix=st.sampled_from([b"", b"\x00\x00\x08\x03", b"\x00\x00\x08\x01", b"\x93NUMPY\x01\x00", b"PK\x03\x04",
                               b"a,b,c,d,y\n", b"\x1f\x8b"]),
       body=st.binary(max_size=200), name=st.sampled_from(["d.csv", "d.npy", "d-idx3-ubyte", "d.gz", "d"]))
def test_any_bytes_load_or_raise_user_error(tmp_path, prefix, body, name):
    """Whatever a data file holds, loading it gives a sound Dataset or one UserError, never a crash."""
    p = tmp_path / name
    p.write_bytes(prefix + body)
    for targets in ("", str(p)):
        try:
            data, _ = load_data(cfg(path_set("data.path", p), f"data.targets={json.dumps(targets)}" if targets and
                                    not name.endswith(".csv") else "data.target_column='y'"))
        except UserError:
            continue
        x, t, _ = everything(data)
        assert x.shape == (len(data), FEATURES) and t.shape == (len(data), CLASSES) and np.isfinite(x).all()
