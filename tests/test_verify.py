"""python -m dpbp.verify: passes on a matrix of models at 1-4 ranks, and fails, naming the tensor, when a
gradient is corrupted (the corruption is injected here, by wrapping what the verifier calls)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dpbp import verify
from dpbp.comm import SerialComm
from dpbp.config import load_config
from dpbp.errors import EXIT_FAULT, EXIT_USAGE
from dpbp.model import count_params, param_names
from dpbp.step import Trainer
from tests.conftest import REPO

MODELS = {
    # the tutorial's network on its one sample: at P > 1 all ranks but one have nothing to compute
    "seed-2-2-2": ["--config", os.path.join(REPO, "configs/seed.toml")],
    # a deep tanh net, mean with l2, 30 samples: uneven shares at P = 4
    "deep-tanh": ["--config", os.path.join(REPO, "configs/spirals.toml"), "--set", "model.sizes=[2,16,16,16,16,2]",
                  "--set", "model.activation='tanh'", "--set", "loss.reduction='mean'", "--set", "loss.l2=0.01", "--set", "data.batch_size=30"],
    # softmax cross-entropy with l2 on 37 samples, through the reproducible reducer (8 chunks of 5)
    "softmax-ce-l2": ["--set", "data.name='random'", "--set", "model.sizes=[20,24,10]", "--set", "loss.l2=0.05",
                      "--set", "data.batch_size=37", "--set", "comm.reduce='reproducible'", "--set", "comm.chunk=5"],
    # float32 training gradient against the float64 reference, summed loss
    "float32": ["--config", os.path.join(REPO, "configs/spirals.toml"), "--set", "model.dtype='float32'",
                "--set", "loss.reduction='sum'", "--set", "data.batch_size=25"],
}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_verify_passes_at_1_to_4_ranks(run_cli, model):
    for P in (1, 2, 3, 4):
        proc = run_cli("verify", *MODELS[model], "--json", ranks=P)
        assert proc.returncode == 0, f"{model} at {P} ranks:\n{proc.stdout}\n{proc.stderr}"
        report = json.loads(proc.stdout)  # one JSON document: only rank 0 printed
        assert report["ok"] and report["ranks"] == P and not report["failed"]
        pairs = {}
        for r in report["rows"]:
            pairs.setdefault(r["tensor"], []).append(r["pair"])
        assert list(pairs) == param_names(len(report["sizes"]) - 1)  # every tensor, every pair of the four
        assert all(sorted(p) == ["1-2", "1-3", "1-4", "2-3", "2-4", "3-4"] for p in pairs.values())
        assert report["fd_checked"] == report["n_params"]  # small models: every parameter by differences
        if model == "float32":
            assert {r["rtol"] for r in report["rows"] if r["a"] == "allreduce"} >= {1e-4}


def test_table_is_printed_once_by_rank_0(run_cli):
    proc = run_cli("verify", *MODELS["deep-tanh"], ranks=3, check=True)
    assert proc.stdout.count("dpbp verify | 3 ranks") == 1
    assert proc.stdout.count("verify: all 60 comparisons within tolerance") == 1  # 5 layers x 2 x 6 pairs
    assert "FAIL" not in proc.stdout and proc.stderr.strip() == ""


# ---------------------------------------------------------------- corrupted gradients must fail


def _run(capsys, *args):
    status = verify.main([*args], SerialComm())
    out = capsys.readouterr()
    return status, out.out, out.err


def _failing(stdout):
    """{(tensor, pair)} of the table's FAIL rows."""
    bad, tensor = set(), None
    for line in stdout.splitlines():
        if line.startswith("layers.") or line.startswith("   "):
            tensor = line.split()[0] if line.startswith("layers.") else tensor
            if line.rstrip().endswith("FAIL"):
                bad.add((tensor, line.split()[1] if line.startswith("layers.") else line.split()[0]))
    return bad


@pytest.mark.parametrize("relative", [1e-3, 1e-8])
def test_a_corrupted_training_gradient_fails_naming_the_tensor(capsys, monkeypatch, relative):
    """One entry of layers.1.weight off by `relative` of the tensor's scale in what training computes.
    1e-8 is below what central differences can see, but not what the exact pairs see."""
    original = Trainer.gradient

    def corrupted(self, idx, stop=0.0):
        stats = original(self, idx, stop)
        W = self.grads.nabla_w[1]
        W[0, 0] += relative * np.max(np.abs(W))
        return stats

    monkeypatch.setattr(Trainer, "gradient", corrupted)
    status, out, err = _run(capsys, *MODELS["deep-tanh"])
    assert status == EXIT_FAULT
    assert "layers.1.weight" in err and "FAILED" in err
    expected = {("layers.1.weight", p) for p in ("1-2", "1-3", "1-4")} if relative > 1e-6 else \
        {("layers.1.weight", p) for p in ("1-2", "1-3")}
    assert _failing(out) == expected


def test_an_l2_term_added_twice_fails_against_finite_differences_on_weights_only(capsys, monkeypatch):
    """A wrong regulariser in the shared finishing step moves 1, 2 and 3 together; only the derivative of
    E_total itself (4) can tell, and biases carry no l2."""
    from dpbp import losses

    def twice(nabla_w, nabla_b, weights, l2, divisor, *rest):
        return losses.finish_gradient(nabla_w, nabla_b, weights, 2 * l2, divisor, *rest)

    monkeypatch.setattr("dpbp.step.finish_gradient", twice)
    monkeypatch.setattr("dpbp.verify.finish_gradient", twice)
    status, out, err = _run(capsys, *MODELS["deep-tanh"])
    assert status == EXIT_FAULT
    weights = [n for n in param_names(5) if n.endswith("weight")]
    assert _failing(out) == {(w, p) for w in weights for p in ("1-4", "2-4", "3-4")}
    assert all(w in err for w in weights) and "bias" not in err.split("(")[0]


def test_json_names_the_failing_tensor(capsys, monkeypatch):
    original = Trainer.gradient

    def corrupted(self, idx, stop=0.0):
        stats = original(self, idx, stop)
        self.grads.nabla_b[0][2] *= 1.01
        return stats

    monkeypatch.setattr(Trainer, "gradient", corrupted)
    status, out, _ = _run(capsys, *MODELS["softmax-ce-l2"], "--json")
    report = json.loads(out)
    assert status == EXIT_FAULT and not report["ok"] and report["failed"] == ["layers.0.bias"]


# ---------------------------------------------------------------- large models, kinks, bad input


def test_large_models_check_a_seeded_subset_of_every_tensor(capsys):
    args = ["--set", "data.name='random'", "--set", "model.sizes=[50,100,10]", "--set", "model.activation='relu'",
            "--set", "data.batch_size=16", "--json"]
    status, out, _ = _run(capsys, *args)
    report = json.loads(out)
    assert status == 0 and report["n_params"] == count_params([50, 100, 10]) > verify.FD_ALL_UP_TO
    assert 200 <= report["fd_checked"] + report["fd_skipped_at_kinks"] < report["n_params"]
    assert all(r["compared"] > 0 for r in report["rows"] if r["b"] == "fd")
    _, again, _ = _run(capsys, *args)
    assert json.loads(again)["rows"] == report["rows"]  # the subset is seeded


def test_steps_across_a_relu_kink_are_left_out():
    """A hidden relu unit whose input is 1e-9 from its kink: central differences of its incoming weight
    and bias straddle the kink and are skipped; the rest are checked."""
    cfg = load_config(None, ["model.sizes=[1,1,1]", "model.activation='relu'", "model.output='identity'",
                             "loss.kind='squared_error'", "loss.l2=0.0"])
    params = {"layers.0.weight": np.array([[1.0]]), "layers.0.bias": np.array([-1.0 + 1e-9]),
              "layers.1.weight": np.array([[2.0]]), "layers.1.bias": np.array([0.5])}
    values, skipped = verify.fd_gradient(cfg, SerialComm(), params, np.array([[1.0]]), np.array([[0.0]]),
                                         np.arange(4))
    assert skipped.tolist() == [True, True, False, False]
    out = 1e-9  # relu(1 * 1 - 1 + 1e-9); E = 1/2 (2 out + 0.5)^2
    np.testing.assert_allclose(values[2:], [(2 * out + 0.5) * out, 2 * out + 0.5], rtol=1e-6, atol=1e-9)


def test_bad_arguments_are_one_clear_error(run_cli, tmp_path):
    proc = run_cli("verify", "--fd", "-1")
    assert proc.returncode == EXIT_USAGE and "--fd" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("verify", "--init", tmp_path / "missing.npz")
    assert proc.returncode == EXIT_USAGE and "missing.npz" in proc.stderr and "Traceback" not in proc.stderr
