"""Bad input, generated: config files and --set values, checkpoint/--init files, data files.

Each loader must either accept the input (and then return something sound) or raise UserError: never
another exception (a traceback for the user), never a hang, never unpickling. Derandomized, so CI sees
the same cases every run; the examples are small so the whole file takes seconds.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import string
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dpbp import checkpoint as ckpt
from dpbp.config import OPTIONS, load_config, parse_override
from dpbp.data import load_npz, to_dataset
from dpbp.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:Stored array in format")  # numpy's note on odd names

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ---------------------------------------------------------------- TOML values, written by hand

bare_keys = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=8)
scalars = st.one_of(
    st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.dates(),
    st.datetimes(min_value=datetime.datetime(1900, 1, 1), max_value=datetime.datetime(2100, 1, 1)),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, (int, datetime.date)):
        return v.isoformat() if isinstance(v, datetime.date) else str(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


def schema_or_random_key():
    known = st.sampled_from(sorted(OPTIONS))
    return st.one_of(known, known, st.builds(lambda s, k: f"{s}.{k}", bare_keys, bare_keys), bare_keys)


@st.composite
def config_documents(draw):
    """A TOML document of [section] tables holding keys from the schema (mostly) with arbitrary values."""
    entries = draw(st.dictionaries(schema_or_random_key(), values, max_size=6))
    tables = {}
    for key, value in entries.items():
        section, _, name = key.rpartition(".")
        tables.setdefault(section, {})[name] = value
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in tables.pop("", {}).items()]
    for section, table in tables.items():
        lines.append(f"[{section}]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def accepted_config_is_sound(cfg):
    for key, value in cfg.items():
        kind = OPTIONS[key].kind
        assert isinstance(value, kind) and not (kind is int and isinstance(value, bool)), (key, value)
        if kind is float:
            assert math.isfinite(value), (key, value)


@FUZZ
@given(config_documents())
def test_config_documents_load_or_raise_user_error(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    try:
        cfg = load_config(str(path))
    except UserError:
        return
    accepted_config_is_sound(cfg)


@FUZZ
@given(st.one_of(st.text(max_size=60), st.binary(max_size=60).map(lambda b: b.decode("latin-1"))))
def test_arbitrary_config_text_loads_or_raises_user_error(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        accepted_config_is_sound(load_config(str(path)))
    except UserError:
        pass


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=30),
                          st.builds(lambda k, v: f"{k}={toml_value(v)}", schema_or_random_key(), values),
                          st.builds(lambda k, v: f"{k}={v}", st.sampled_from(sorted(OPTIONS)), st.text(max_size=12))),
                max_size=4))
def test_set_overrides_load_or_raise_user_error(overrides):
    try:
        for text in overrides:
            parse_override(text)
        accepted_config_is_sound(load_config(None, overrides))
    except UserError:
        pass


# ---------------------------------------------------------------- .npz files: checkpoints and --init

NAMES, SHAPES = ["layers.0.weight", "layers.0.bias"], [(3, 2), (3,)]

any_dtype = st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes(),
                      hnp.array_dtypes(allow_subarrays=True))
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
arrays = st.builds(lambda dtype, shape: (dtype, shape), any_dtype, shapes).flatmap(
    lambda ds: hnp.arrays(ds[0], ds[1]))
names = st.one_of(st.sampled_from(NAMES + ["__meta__", "optim.velocity"]),
                  st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=8))


def npz_bytes(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return buf.getvalue()


def npy_bytes(a):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=True)
    return buf.getvalue()


def load_params_or_user_error(path):
    try:
        params = ckpt.load_params(path, NAMES, SHAPES)
    except UserError:
        return None
    assert [p.shape for p in params.values()] == SHAPES
    assert all(p.dtype == np.float64 and np.isfinite(p).all() for p in params.values())
    return params


@FUZZ
@given(st.dictionaries(names, st.one_of(arrays, st.just(np.array([{"x": 1}], object))), max_size=4))
def test_init_files_of_any_arrays_load_or_raise_user_error(tmp_path, members):
    path = tmp_path / "p.npz"
    path.write_bytes(npz_bytes({f"{name}.npy": npy_bytes(a) for name, a in members.items()}))
    load_params_or_user_error(path)
    try:
        ckpt.load(path)
    except UserError:
        pass


@FUZZ
@given(st.lists(st.integers(min_value=0, max_value=2 ** 62), min_size=0, max_size=3),
       st.sampled_from(["<f8", "<f4", ">f8", "|O", "<U7", "|V8", "<c16", "|b1", "<i8"]),
       st.integers(min_value=0, max_value=200))
def test_npy_headers_declaring_any_size_are_refused_or_read(tmp_path, shape, descr, payload_size):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    path = tmp_path / "h.npz"
    path.write_bytes(npz_bytes({"layers.0.weight.npy": header.getvalue() + b"\x01" * payload_size}))
    load_params_or_user_error(path)


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory):
    """(bytes of a checkpoint file, its arrays)."""
    path = tmp_path_factory.mktemp("ckpt") / "ckpt-00000001.npz"
    rng = np.random.default_rng(1)
    ckpt.save(path, {"layers.0.weight": rng.random((3, 2)), "layers.0.bias": rng.random(3),
                     "optim.velocity": rng.random(9)}, {"step": 1})
    return path.read_bytes(), ckpt.load(path)[0]


@FUZZ
@given(data=st.data())
def test_damaged_checkpoints_are_detected_or_intact(tmp_path, valid_checkpoint, data):
    original, saved = valid_checkpoint
    path = tmp_path / "ckpt-00000001.npz"
    blob = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(blob) - 1))
        if how == "flip":
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "cut":
            del blob[at:at + data.draw(st.integers(1, 64))]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        if not blob:
            break
    path.write_bytes(bytes(blob))
    try:
        arrays, meta = ckpt.load(path)
    except UserError:
        return
    assert meta["step"] == 1 and set(arrays) == set(saved)  # damage in bytes that hold no data
    for name, a in saved.items():
        assert arrays[name].tobytes() == a.tobytes(), name


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_are_never_a_checkpoint(tmp_path, blob):
    path = tmp_path / "r.npz"
    path.write_bytes(blob)
    with pytest.raises(UserError):
        ckpt.load(path)
    assert ckpt.newest_valid(tmp_path, lambda w: None) is None


# ---------------------------------------------------------------- data files (data.path)


@FUZZ
@given(st.dictionaries(st.sampled_from(["x", "y", "z"]), arrays, max_size=3))
def test_data_files_of_any_arrays_load_or_raise_user_error(tmp_path, members):
    path = tmp_path / "d.npz"
    path.write_bytes(npz_bytes({f"{name}.npy": npy_bytes(a) for name, a in members.items()}))
    try:
        x, y = load_npz(str(path))
        data = to_dataset(x, y, 2, 3, "fuzz")
    except UserError:
        return
    assert data.x.shape[1] == 2 and data.t.shape == (len(data.x), 3) and np.isfinite(data.t).all()
