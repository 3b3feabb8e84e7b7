"""python -m dpbp.export: the ONNX graph runs in onnxruntime to dpbp.predict's outputs (standardization
included, raw features in), for every activation dpbp defines; bad input is one message and exit 2."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import dpbp
from dpbp.comm import SerialComm
from tests.conftest import dpbp as run_dpbp

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def raw_features(n, seed):
    """Unscaled features (one ×100 and shifted, one tiny) and three classes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) * [1.0, 100.0, 0.01] + [0.0, 50.0, -2.0]
    return x, np.digitize(x[:, 0] + (x[:, 1] - 50) / 100, [-0.5, 0.5])


def trained(tmp_path, sizes, activation, output, dtype="float64", standardize=True):
    x, y = raw_features(120, 0)
    if output == "identity":
        y = np.stack([x[:, 0], np.sin(x[:, 1] / 100)], axis=1)[:, :sizes[-1]]
    elif output == "sigmoid":
        y = np.eye(sizes[-1])[y % sizes[-1]]
    loss = "squared_error" if output == "identity" else "cross_entropy"
    cfg = {"model": {"sizes": sizes, "activation": activation, "output": output, "dtype": dtype},
           "loss": {"kind": loss}, "train": {"steps": 15}, "data": {"batch_size": 16, "standardize": standardize}}
    run = dpbp.fit(cfg, x=x, y=y, out=str(tmp_path / "run"), comm=SerialComm())
    return run.run_dir, x


def onnx_outputs(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dtype = np.float32 if session.get_inputs()[0].type == "tensor(float)" else np.float64
    return session.run(None, {"x": x.astype(dtype)})


@pytest.mark.parametrize("sizes,activation,output,dtype,standardize", [
    ([3, 8, 3], "tanh", "softmax", "float64", True),
    ([3, 6, 5, 3], "relu", "softmax", "float64", True),
    ([3, 6, 3], "sigmoid", "sigmoid", "float64", False),
    ([3, 7, 2], "identity", "identity", "float64", True),
    ([3, 8, 3], "tanh", "softmax", "float32", True),
])
def test_the_graph_computes_what_predict_computes(tmp_path, sizes, activation, output, dtype, standardize):
    from dpbp.export import build_graph
    run_dir, x = trained(tmp_path, sizes, activation, output, dtype, standardize)
    model = dpbp.load(run_dir)
    path = tmp_path / "m.onnx"
    path.write_bytes(build_graph(model).SerializeToString())
    got = onnx_outputs(path, x)
    want = model.predict(x)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got[0], want, **tol)
    if output in ("softmax", "sigmoid"):
        assert len(got) == 2
        np.testing.assert_array_equal(got[1], want.argmax(axis=1))


def test_the_command_writes_the_run_as_onnx_equal_to_dpbp_predict(tmp_path):
    run_dir, x = trained(tmp_path, [3, 8, 3], "tanh", "softmax")
    np.save(tmp_path / "new.npy", x[:40])
    run_dpbp("predict", "--params", os.path.join(run_dir, "final.npz"), "--data", tmp_path / "new.npy", "--out",
             tmp_path / "p.csv", check=True)
    proc = run_dpbp("export", run_dir, "--onnx", tmp_path / "out/model.onnx", check=True)
    assert "standardization included" in proc.stdout
    assert [n for n in os.listdir(tmp_path / "out")] == ["model.onnx"]  # atomic: no temporary file left
    table = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1)
    got = onnx_outputs(tmp_path / "out/model.onnx", x[:40])
    np.testing.assert_allclose(got[0], table[:, 2:], rtol=1e-13, atol=1e-16)
    np.testing.assert_array_equal(got[1], table[:, 1])


def test_a_parameters_file_with_only_its_json_exports_alike(tmp_path):
    """final.npz and final.json copied away from config.toml: the description alone is enough."""
    run_dir, x = trained(tmp_path, [3, 5, 3], "relu", "softmax")
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("final.npz", "final.json"):
        shutil.copy(os.path.join(run_dir, name), alone / name)
    run_dpbp("export", alone / "final.npz", "--onnx", tmp_path / "a.onnx", check=True)
    np.testing.assert_allclose(onnx_outputs(tmp_path / "a.onnx", x)[0], dpbp.load(run_dir).predict(x),
                               rtol=1e-12, atol=1e-14)


def test_every_activation_of_dpbp_has_its_onnx_operator_and_others_are_refused():
    from dpbp.export import ONNX_OPS, onnx_op
    from dpbp.layers import ACTIVATIONS
    assert set(ONNX_OPS) == set(ACTIVATIONS)
    with pytest.raises(dpbp.UserError, match="activation 'swish' has no ONNX operator"):
        onnx_op("swish")


def test_bad_input_is_one_message_and_exit_2(tmp_path):
    run_dir, _ = trained(tmp_path, [3, 4, 3], "tanh", "softmax")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a directory\n")
    cases = [
        ([tmp_path / "no-such-run", "--onnx", tmp_path / "m.onnx"], "no such run directory"),
        ([tmp_path / "empty", "--onnx", tmp_path / "m.onnx"], "is not a finished dpbp run"),
        ([run_dir, "--onnx", tmp_path / "a-file/m.onnx"], "cannot write there"),
        ([run_dir, "--onnx", tmp_path / "empty"], "is a directory"),
        ([run_dir], "--onnx"),
    ]
    for args, message in cases:
        proc = run_dpbp("export", *args, timeout=60)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.count(message) == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert not os.path.exists(tmp_path / "m.onnx")


def walkthrough():
    """(README's commands of the "A CSV, start to finish" block, docs/data.md's onnxruntime lines)."""
    import re
    from tests.conftest import REPO
    with open(os.path.join(REPO, "README.md")) as f:
        block = next(b for b in re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S) if "examples/pets.toml" in b)
    with open(os.path.join(REPO, "docs/data.md")) as f:
        code = next(b for b in re.findall(r"```py\n(.*?)```", f.read(), flags=re.S) if "onnxruntime" in b)
    return [line.partition(" #")[0].split() for line in block.strip().splitlines()], code


def test_the_csv_walkthrough_runs_to_an_onnx_file_that_predicts_the_names(tmp_path):
    """README's walkthrough as written (full length), then docs/data.md's onnxruntime lines on its output."""
    import subprocess
    import sys
    from tests.conftest import REPO, clean_env
    shutil.copytree(os.path.join(REPO, "examples"), tmp_path / "examples")
    commands, code = walkthrough()
    assert [c[2] for c in commands] == ["dpbp.train", "dpbp.evaluate", "dpbp.predict", "dpbp.export"]
    outputs = {}
    for argv in commands:
        assert argv[:2] == ["python", "-m"]
        outputs[argv[2]] = run_dpbp(argv[2].split(".")[1], *argv[3:], cwd=tmp_path, check=True).stdout
    accuracy = float(outputs["dpbp.evaluate"].split("accuracy ")[1].split()[0])
    assert accuracy >= 0.95, outputs["dpbp.evaluate"]  # the docs say 1.0; without standardize it is 0.80
    assert "true\\pred bird  cat  dog" in outputs["dpbp.evaluate"]
    with open(tmp_path / "runs/pets/predictions.csv") as f:
        names = [line.split(",")[1] for line in f.read().splitlines()[1:]]
    assert set(names) <= {"bird", "cat", "dog"} and len(names) == 8
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=clean_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == repr(names)


def test_dtype_float32_writes_a_float_graph_of_a_float64_model(tmp_path):
    run_dir, x = trained(tmp_path, [3, 8, 3], "tanh", "softmax")
    run_dpbp("export", run_dir, "--onnx", tmp_path / "f32.onnx", "--dtype", "float32", check=True)
    session = ort.InferenceSession(str(tmp_path / "f32.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    np.testing.assert_allclose(onnx_outputs(tmp_path / "f32.onnx", x)[0], dpbp.load(run_dir).predict(x),
                               rtol=1e-5, atol=1e-6)
