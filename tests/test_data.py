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


# ---------------------------------------------------------------- the held-out set: only when asked for


def test_a_data_file_trains_on_all_its_rows_unless_a_held_out_set_is_asked_for(tmp_path):
    x, y = blobs()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    sizes = f"model.sizes=[{FEATURES},8,{CLASSES}]"
    train, val = load_data(load_config(None, [sizes, path_set("data.path", tmp_path / "d.npz")]))
    assert val is None and len(train) == N
    np.testing.assert_array_equal(everything(train)[0], x)
    train, val = load_data(load_config(None, [sizes, path_set("data.path", tmp_path / "d.npz"),
                                              "data.val_fraction=0.25"]))
    assert (len(train), len(val)) == (N - 15, 15)
    # The default job keeps its held-out fifth of the digits: 0.2 of 1797 rounds to 359.
    train, val = load_data(load_config())
    assert (len(train), len(val)) == (1797 - 359, 359)


def test_without_shuffling_the_last_rows_are_held_out(tmp_path):
    x, y = blobs()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    train, val = load_data(cfg(path_set("data.path", tmp_path / "d.npz"), "data.val_fraction=0.25",
                               "data.shuffle=false"))
    np.testing.assert_array_equal(everything(train)[0], x[:N - 15])
    np.testing.assert_array_equal(everything(val)[0], x[N - 15:])
    np.testing.assert_array_equal(everything(val)[2], y[N - 15:])


# ---------------------------------------------------------------- the built-in digits, read directly


def test_digits_come_from_the_bundled_file_equal_to_load_digits():
    """The file's format, read here with gzip + csv: 1797 lines of 64 pixel counts 0..16 and a label."""
    import csv
    import gzip
    import importlib.util

    from sklearn.datasets import load_digits

    from dpbp.data.builtin import digits
    folder = importlib.util.find_spec("sklearn").submodule_search_locations[0]
    with gzip.open(os.path.join(folder, "datasets", "data", "digits.csv.gz"), "rt") as f:
        table = np.array([[int(float(v)) for v in row] for row in csv.reader(f)])
    assert table.shape == (1797, 65) and table[:, :64].min() == 0 and table[:, :64].max() == 16
    assert sorted(set(table[:, 64])) == list(range(10))
    x, y = digits()
    reference = load_digits()
    np.testing.assert_array_equal(x, reference.data / 16.0)
    np.testing.assert_array_equal(x, table[:, :64] / 16.0)
    np.testing.assert_array_equal(y, reference.target)
    assert y.dtype == np.int64 and x.dtype == np.float64


def test_the_default_job_does_not_import_scikit_learn(run_cli, tmp_path):
    proc = run_cli("train", "--set", "train.steps=1", "--out", tmp_path / "r", "--quiet",
                   env={"PYTHONPROFILEIMPORTTIME": "1", "DPBP_SERIAL": "1"})
    assert proc.returncode == 0, proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")]
    assert "dpbp.data.builtin" in imported and "numpy" in imported  # the profile is there
    assert not [m for m in imported if m.startswith("sklearn")], [m for m in imported if "sklearn" in m][:5]


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if not installed: imports and find_spec fail
    with pytest.raises(UserError) as e:
        load_data(load_config())
    assert "data.name = 'digits' needs scikit-learn" in str(e.value)
    assert 'pip install "dpbp[digits]"' in str(e.value)


# ---------------------------------------------------------------- targets the output cannot fit


def test_a_sigmoid_with_cross_entropy_refuses_targets_outside_0_1(tmp_path):
    x, _ = blobs()
    t = np.random.default_rng(4).random((N, 2))
    t[9, 1] = 1.5
    t[30, 0] = -0.25
    np.savez(tmp_path / "d.npz", x=x, y=t)
    sigmoid = ["model.output='sigmoid'", path_set("data.path", tmp_path / "d.npz")]
    expect_error(sigmoid, "d.npz", "target 1.5 in row 9 is outside [0, 1]", "sigmoid", "cross_entropy",
                 sizes=(FEATURES, 2))
    # Squared error has no such limit: the same file loads.
    load_data(cfg(*sigmoid, "loss.kind='squared_error'", sizes=(FEATURES, 2)))
    # One sigmoid unit with whole-number targets: 0/1 only.
    np.savez(tmp_path / "b.npz", x=x, y=np.r_[np.zeros(40, int), np.ones(19, int), [2]])
    expect_error(["model.output='sigmoid'", path_set("data.path", tmp_path / "b.npz")], "b.npz",
                 f"target 2 in row {N - 1} is outside [0, 1]", sizes=(FEATURES, 1))


def test_labels_1_to_k_suggest_shifting_them():
    with pytest.raises(UserError) as e:
        _load_labels(np.arange(N) % CLASSES + 1)
    assert "label 3 in row 2 is outside [0, 3)" in str(e.value)
    assert "the labels run 1..3: shift them to 0..2" in str(e.value)
    with pytest.raises(UserError) as e:  # labels 0..3: one too many, not shifted
        _load_labels(np.arange(N) % (CLASSES + 1))
    assert "outside [0, 3)" in str(e.value) and "shift" not in str(e.value)


def _load_labels(y, sizes=(FEATURES, 8, CLASSES)):
    from dpbp.data.dataset import check_values, make_dataset
    data = make_dataset(blobs()[0], y, sizes[0], sizes[-1], "labels")
    return check_values([data], None)


def test_more_outputs_than_classes_is_a_warning_returned_for_rank_0(tmp_path):
    x, _ = blobs()
    y = np.arange(N) % 2  # classes 0 and 1 of 0..3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    train, _ = load_data(cfg(path_set("data.path", tmp_path / "d.npz"), sizes=(FEATURES, 8, 4)))
    assert train.warnings == [f"data file '{tmp_path / 'd.npz'}': model.sizes ends with 4 outputs but the labels "
                              f"use only 2 classes (no label 2, 3): is the last entry of model.sizes right?"]
    train, _ = load_data(cfg(path_set("data.path", tmp_path / "d.npz"), sizes=(FEATURES, 8, 2)))
    assert train.warnings == []


# ---------------------------------------------------------------- CSV: class names and ignored columns


def write_named(path, x, names, extra=None):
    """CSV with an id column of text, four features and a column of class names."""
    header = ["id", "a", "b", "c", "d", "kind"]
    write_csv(path, header, [[f"s{i}", *r, n] for i, (r, n) in enumerate(zip(x.tolist(), names))])


ANIMALS = np.array(["dog", "cat", "bird"])


def test_csv_class_names_become_sorted_classes(tmp_path):
    x, y = blobs()
    write_named(tmp_path / "train.csv", x, ANIMALS[y])
    write_named(tmp_path / "test.csv", x[:5], ["dog"] * 5)  # a subset of the names: the training set's classes
    common = [path_set("data.path", tmp_path / "train.csv"), "data.target_column='kind'", "data.ignore_columns=['id']"]
    train, val = load_data(cfg(*common, path_set("data.val_path", tmp_path / "test.csv")))
    assert train.classes == ["bird", "cat", "dog"]
    expected = np.array([["bird", "cat", "dog"].index(n) for n in ANIMALS[y]])
    np.testing.assert_array_equal(everything(train)[2], expected)
    np.testing.assert_array_equal(everything(train)[0], x)
    np.testing.assert_array_equal(everything(val)[2], [2] * 5)
    assert val.classes == ["bird", "cat", "dog"]
    # data.classes fixes the names and their order.
    train, _ = load_data(cfg(*common, "data.classes=['dog','cat','bird']"))
    np.testing.assert_array_equal(everything(train)[2], y)
    assert train.classes == ["dog", "cat", "bird"]
    write_named(tmp_path / "fish.csv", x[:5], ["dog", "cat", "cat", "fish", "dog"])
    expect_error([*common, path_set("data.val_path", tmp_path / "fish.csv")], "held-out data file", "fish.csv",
                 "class 'fish' in row 3 is not one of the training set's classes (bird, cat, dog")
    # Predicting reads no targets, so names the training set never had do not matter there.
    data, _ = load_data(cfg(path_set("data.path", tmp_path / "fish.csv"), "data.target_column='kind'",
                            "data.ignore_columns=['id']", "data.classes=['dog','cat','bird']"), need_targets=False)
    np.testing.assert_array_equal(everything(data)[0], x[:5])
    write_named(tmp_path / "four.csv", x, np.r_[ANIMALS, ["ant"] * (N - 3)])
    expect_error([path_set("data.path", tmp_path / "four.csv"), "data.target_column='kind'",
                  "data.ignore_columns=['id']"], "four.csv",
                 "4 classes (ant, bird, cat, dog) but model.sizes ends with 3")


def test_a_target_column_mixing_numbers_and_names_is_refused(tmp_path):
    x, _ = blobs(4)
    write_named(tmp_path / "m.csv", x, ["cat", "1", "dog", "2"])
    expect_error([path_set("data.path", tmp_path / "m.csv"), "data.target_column='kind'",
                  "data.ignore_columns=['id']"], "m.csv",
                 "column 'kind' holds both numbers and class names (row 1: '1', row 0: 'cat'")


def test_ignored_columns_are_neither_features_nor_targets(tmp_path):
    x, y = blobs()
    header = ["id", "a", "b", "note", "c", "d", "label"]
    write_csv(tmp_path / "d.csv", header, [[f"row{i}", r[0], r[1], "free text", r[2], r[3], lab]
                                           for i, (r, lab) in enumerate(zip(x.tolist(), y.tolist()))])
    common = [path_set("data.path", tmp_path / "d.csv"), "data.target_column='label'"]
    data, _ = load_data(cfg(*common, "data.ignore_columns=['id', 'note']"))
    np.testing.assert_array_equal(everything(data)[0], x)
    np.testing.assert_array_equal(everything(data)[2], y)
    expect_error([*common, "data.ignore_columns=['id', 'notes']"], "d.csv",
                 "data.ignore_columns names 'notes', which is not one of its columns "
                 "(its header: id, a, b, note, c, d, label)")
    expect_error([*common, "data.ignore_columns=['id']"], "line 2, column 'note': 'free text' is not a number")
    with open(tmp_path / "d.csv", "a") as f:
        f.write("row60,1,2,x,3,4,0,5\n")  # one field too many, in the last line
    expect_error([*common, "data.ignore_columns=['id', 'note']"], f"line {N + 2} has 8 fields but the header has 7")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    expect_error([path_set("data.path", tmp_path / "d.npz"), "data.ignore_columns=['id']"],
                 "data.ignore_columns = ['id'] names CSV columns", "d.npz", "npz, not CSV")


# ---------------------------------------------------------------- data.standardize


class ThreadComm:
    """P ranks as threads of this process, with the allgather that standardize needs."""

    def __init__(self, rank, size, board, barrier):
        self.rank, self.size, self.board, self.barrier = rank, size, board, barrier

    def allgather(self, obj):
        self.barrier.wait()
        self.board[self.rank] = obj
        self.barrier.wait()
        got = list(self.board)
        self.barrier.wait()
        return got


def standardize_on(x, size):
    """dpbp's statistics computed by `size` ranks together (threads), as each rank sees them."""
    import threading

    from dpbp.data import standardize as stats
    board, barrier, results = [None] * size, threading.Barrier(size), [None] * size

    def rank(r):
        results[r] = stats.compute(x, ThreadComm(r, size, board, barrier))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_standardize_statistics_are_the_same_bits_for_any_number_of_ranks(monkeypatch):
    from dpbp.data import standardize as stats
    monkeypatch.setattr(stats, "_CHUNK_BYTES", 7 * 8 * 5)  # 7 rows per chunk: 15 chunks of 101 rows
    rng = np.random.default_rng(7)
    x = rng.normal(1e6, 1.0, (101, 5)) * rng.random(5) * 10.0 ** rng.integers(-8, 8, 5)  # wide range of scales
    x[:, 2] = 3.25  # constant: std 0, divisor 1
    one = stats.compute(x)
    for size in (2, 3, 4):
        for got in standardize_on(x, size):
            assert got.mean.tobytes() == one.mean.tobytes() and got.std.tobytes() == one.std.tobytes(), size
    # The figures: mean and population standard deviation written out here, with exact sums.
    import math
    mean = np.array([math.fsum(x[:, j]) / len(x) for j in range(5)])
    std = np.array([math.sqrt(math.fsum((x[:, j] - mean[j]) ** 2) / len(x)) for j in range(5)])
    np.testing.assert_allclose(one.mean, mean, rtol=1e-15)
    np.testing.assert_allclose(one.std[[0, 1, 3, 4]], std[[0, 1, 3, 4]], rtol=1e-9)
    assert std[2] == 0 and one.std[2] == 1.0


def test_standardize_uses_the_training_rows_and_applies_lazily(tmp_path):
    x, y = blobs()
    x[:, 3] = 5.0  # a constant feature becomes 0
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    train, val = load_data(cfg(path_set("data.path", tmp_path / "x.npy"), path_set("data.targets", tmp_path / "y.npy"),
                               "data.val_fraction=0.25", "data.standardize=true"))
    raw_train, _ = load_data(cfg(path_set("data.path", tmp_path / "x.npy"),
                                 path_set("data.targets", tmp_path / "y.npy"), "data.val_fraction=0.25"))
    rows = everything(raw_train)[0]  # the training part of the same split, not the whole file
    assert len(rows) == N - 15
    mean, std = rows.mean(axis=0), rows.std(axis=0)
    np.testing.assert_allclose(train.standardize.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(train.standardize.std[:3], std[:3], rtol=1e-12)
    assert train.standardize.std[3] == 1.0
    s = train.standardize
    np.testing.assert_array_equal(everything(train)[0], (rows - s.mean) / s.std)
    assert np.all(everything(train)[0][:, 3] == 0)
    _, raw_val = load_data(cfg(path_set("data.path", tmp_path / "x.npy"),
                               path_set("data.targets", tmp_path / "y.npy"), "data.val_fraction=0.25"))
    np.testing.assert_array_equal(everything(val)[0], (everything(raw_val)[0] - s.mean) / s.std)
    assert isinstance(train.x.base, type(raw_train.x))  # still read from the file per row, not copied
    # Saved statistics are applied instead of being computed again (evaluate, predict).
    other, _ = load_data(cfg(path_set("data.path", tmp_path / "x.npy"), path_set("data.targets", tmp_path / "y.npy"),
                             "data.standardize=true"), standardize=s)
    np.testing.assert_array_equal(everything(other)[0], (x - s.mean) / s.std)


def test_standardize_statistics_round_trip_through_arrays():
    from dpbp.data.standardize import Standardize
    s = Standardize(np.array([0.5, -2.0]), np.array([1.0, 3.0]))
    arrays = s.to_arrays()
    assert sorted(arrays) == ["standardize.mean", "standardize.std"]
    back = Standardize.from_arrays(arrays, "f.npz", 2)
    np.testing.assert_array_equal(back.mean, s.mean)
    np.testing.assert_array_equal(back.std, s.std)
    assert Standardize.from_arrays({"layers.0.weight": np.zeros(2)}, "f.npz", 2) is None
    with pytest.raises(UserError, match="the model has 3 input features"):
        Standardize.from_arrays(arrays, "f.npz", 3)
    with pytest.raises(UserError, match="finite and positive"):
        Standardize.from_arrays({**arrays, "standardize.std": np.array([1.0, 0.0])}, "f.npz", 2)
    with pytest.raises(UserError, match="not both"):
        Standardize.from_arrays({"standardize.mean": s.mean}, "f.npz", 2)
