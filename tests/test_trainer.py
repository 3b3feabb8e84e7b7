"""The trainer's features through the whole training path (dpbp.fit -> train -> Trainer.step), against
references written out here: a hand-written forward/backward of a 3-4-2 tanh network (checked against
finite differences below), torch.optim's update formulas and the schedules' formulas in plain NumPy,
clipping as torch.nn.utils.clip_grad_norm_ defines it, dropout masks from the documented hash (recomputed
with Python integers in tests/test_dropout.py), and early stopping's rule applied to the recorded
held-out losses.

Every step is the whole data set (data.shuffle = false, batch = rows), so the reference needs no sampler.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import dpbp
from dpbp.comm import SerialComm
from tests.conftest import load_params
from tests.test_dropout import reference_u

SIZES = [3, 4, 2]
ROWS, STEPS = 12, 8
NAMES = ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]


def problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROWS, 3))
    y = np.stack([np.sin(x[:, 0]) + x[:, 1], x[:, 2] * x[:, 0]], axis=1)
    init = {"layers.0.weight": rng.normal(size=(4, 3)), "layers.0.bias": rng.normal(size=4) * 0.1,
            "layers.1.weight": rng.normal(size=(2, 4)), "layers.1.bias": rng.normal(size=2) * 0.1}
    return x, y, init


def config(**optim):
    return {"model": {"sizes": SIZES, "activation": "tanh", "output": "identity"},
            "loss": {"kind": "squared_error", "reduction": "mean", "l2": optim.pop("l2", 0.0)},
            "data": {"batch_size": ROWS, "shuffle": False, "micro_batch": optim.pop("micro_batch", 0)},
            "train": {"steps": STEPS, "log_every": 1, "eval_every": 0, "checkpoint_every": 0},
            "seed": 7, "optim": optim}


def fit(tmp_path, cfg, name="run", **kw):
    x, y, init = problem()
    return dpbp.fit(cfg, x=x, y=y, init=init, out=str(tmp_path / name), comm=SerialComm(), **kw)


# ---------------------------------------------------------------- the reference network, by hand


def forward(p, x, scale=None):
    """scale: (rows, 4) dropout factors m / (1 - p) on the hidden layer's output, or None."""
    a = np.tanh(x @ p["layers.0.weight"].T + p["layers.0.bias"])
    h = a if scale is None else a * scale
    return a, h, h @ p["layers.1.weight"].T + p["layers.1.bias"]


def loss(p, x, y, l2=0.0, scale=None):
    o = forward(p, x, scale)[2]
    return 0.5 * np.sum((o - y) ** 2) / len(x) + l2 / 2 * sum(np.sum(p[k] ** 2) for k in NAMES[0::2])


def backward(p, x, y, l2=0.0, scale=None):
    """dE/dp of loss() by the chain rule written out."""
    a, h, o = forward(p, x, scale)
    d2 = (o - y) / len(x)
    dh = d2 @ p["layers.1.weight"]
    d1 = (dh if scale is None else dh * scale) * (1 - a ** 2)
    g = {"layers.0.weight": d1.T @ x, "layers.0.bias": d1.sum(0), "layers.1.weight": d2.T @ h,
         "layers.1.bias": d2.sum(0)}
    for k in NAMES[0::2]:
        g[k] = g[k] + l2 * p[k]
    return g


def test_the_hand_written_backward_is_the_finite_difference_gradient():
    x, y, p = problem()
    scale = np.where(np.random.default_rng(1).random((ROWS, 4)) < 0.3, 0.0, 1 / 0.7)
    for l2, s in [(0.0, None), (0.01, scale)]:
        g = backward(p, x, y, l2, s)
        for k in NAMES:
            numeric = np.zeros_like(p[k])
            for i in np.ndindex(p[k].shape):
                up, down = ({**p, k: p[k].copy()} for _ in range(2))
                up[k][i] += 1e-6
                down[k][i] -= 1e-6
                numeric[i] = (loss(up, x, y, l2, s) - loss(down, x, y, l2, s)) / 2e-6
            np.testing.assert_allclose(g[k], numeric, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- torch.optim's formulas, plainly


def lr_of(t, o):
    """The issue's schedule formulas, t the 0-based update, T = STEPS."""
    lr, warm = o.get("lr", 0.1), o.get("warmup_steps", 0)
    if t < warm:
        return lr * (t + 1) / warm
    kind = o.get("schedule", "constant")
    if kind == "step":
        return lr * o.get("gamma", 0.1) ** ((t - warm) // o.get("step_size", 100))
    if kind == "cosine":
        lo = o.get("min_lr", 0.0)
        return lo + (lr - lo) * (1 + math.cos(math.pi * (t - warm) / (STEPS - warm))) / 2
    return lr


def reference_run(o, l2=0.0, masks=None, decay_biases=False):
    """STEPS updates of the reference network with the optimizer and schedule of optim keys `o`;
    masks(t) gives step t's dropout factors (rows, 4). Returns (params, [lr per step], [grad norm])."""
    x, y, p = problem()
    p = {k: v.copy() for k, v in p.items()}
    kind, mu, clip = o.get("kind", "sgd"), o.get("momentum", 0.9), o.get("clip_norm", 0.0)
    b1, b2 = o.get("betas", [0.9, 0.999])
    eps, wd = o.get("eps", 1e-8), o.get("weight_decay", 0.01)
    state = {k: {"v": np.zeros_like(p[k]), "m": np.zeros_like(p[k]), "s": np.zeros_like(p[k])} for k in NAMES}
    lrs, norms = [], []
    for t in range(STEPS):
        lr = lr_of(t, o)
        g = backward(p, x, y, l2, None if masks is None else masks(t))
        norm = math.sqrt(sum(np.sum(g[k] ** 2) for k in NAMES))
        if clip:
            g = {k: v * min(1.0, clip / (norm + 1e-6)) for k, v in g.items()}
        for k in NAMES:
            st = state[k]
            if kind == "sgd":  # torch.optim.SGD, dampening 0
                st["v"] = mu * st["v"] + g[k] if mu else g[k]
                d = (g[k] + mu * st["v"]) if o.get("nesterov") else st["v"]
                p[k] = p[k] - lr * d
            else:  # torch.optim.Adam / AdamW
                if kind == "adamw" and (k.endswith("weight") or decay_biases):
                    p[k] = p[k] - lr * wd * p[k]
                st["m"] = b1 * st["m"] + (1 - b1) * g[k]
                st["s"] = b2 * st["s"] + (1 - b2) * g[k] ** 2
                m_hat, v_hat = st["m"] / (1 - b1 ** (t + 1)), st["s"] / (1 - b2 ** (t + 1))
                p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
        lrs.append(lr)
        norms.append(norm)
    return p, lrs, norms


def assert_close(params, expected, rtol=1e-10):
    for k in NAMES:
        np.testing.assert_allclose(params[k], expected[k], rtol=rtol, atol=1e-13, err_msg=k)


OPTIMIZERS = {
    "sgd": dict(kind="sgd", lr=0.3, momentum=0.0),
    "sgd momentum": dict(kind="sgd", lr=0.2, momentum=0.9),
    "nesterov": dict(kind="sgd", lr=0.2, momentum=0.8, nesterov=True),
    "adam": dict(kind="adam", lr=0.05, betas=[0.8, 0.99], eps=1e-6),
    "adamw": dict(kind="adamw", lr=0.05, betas=[0.9, 0.999], weight_decay=0.3),
}
SCHEDULES = {
    "constant": {},
    "step": dict(schedule="step", step_size=3, gamma=0.5),
    "cosine": dict(schedule="cosine", min_lr=0.01),
    "warmup + cosine": dict(schedule="cosine", warmup_steps=3, min_lr=0.005),
    "warmup + step": dict(schedule="step", warmup_steps=2, step_size=2, gamma=0.7),
    "warmup + constant": dict(warmup_steps=4),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_training_follows_the_optimizer_and_schedule_formulas(tmp_path, optimizer, schedule):
    o = {**OPTIMIZERS[optimizer], **SCHEDULES[schedule]}
    run = fit(tmp_path, config(**o))
    expected, lrs, _ = reference_run(o)
    assert_close(run.params, expected)
    steps = [r for r in run.metrics if "split" not in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["lr"] for r in steps], lrs, rtol=1e-12)


def test_adamw_decays_the_weights_only(tmp_path):
    o = dict(kind="adamw", lr=0.05, weight_decay=0.5)
    run = fit(tmp_path, config(**o))
    assert_close(run.params, reference_run(o)[0])
    everything = reference_run(o, decay_biases=True)[0]  # the same with the biases decayed too: not it
    for k in ["layers.0.bias", "layers.1.bias"]:
        assert not np.allclose(run.params[k], everything[k], rtol=1e-6), k


def test_l2_is_the_coupled_term_inside_the_gradient(tmp_path):
    o = dict(kind="adam", lr=0.05)
    run = fit(tmp_path, config(**o, l2=0.1))
    assert_close(run.params, reference_run(o, l2=0.1)[0])


@pytest.mark.parametrize("optimizer", ["sgd momentum", "adam"])
def test_clipping_scales_the_reduced_gradient_to_the_max_norm(tmp_path, optimizer):
    o = dict(OPTIMIZERS[optimizer])
    norms = reference_run(o)[2]
    o["clip_norm"] = float(np.median(norms))  # about half the steps clipped
    expected, _, clipped_norms = reference_run(o)
    assert any(n > o["clip_norm"] for n in clipped_norms) and any(n < o["clip_norm"] for n in clipped_norms)
    run = fit(tmp_path, config(**o))
    assert_close(run.params, expected)
    unclipped = fit(tmp_path, config(**OPTIMIZERS[optimizer]), "unclipped")
    assert not np.allclose(unclipped.params["layers.0.weight"], run.params["layers.0.weight"])


@pytest.mark.parametrize("micro", [1, 4, 5, 11])
def test_micro_batches_train_like_the_whole_batch(tmp_path, micro):
    o = dict(kind="adam", lr=0.05)
    whole = fit(tmp_path, config(**o), "whole")
    run = fit(tmp_path, config(**o, micro_batch=micro), "micro")
    assert_close(run.params, whole.params, rtol=1e-12)
    assert_close(run.params, reference_run(o)[0])


@pytest.mark.parametrize("micro", [4, 8])
def test_micro_batches_are_bitwise_the_whole_batch_in_reproducible_mode(tmp_path, micro):
    """Reproducible mode adds the rows' gradients chunk by chunk (comm.chunk) in an exact accumulator, so
    cutting the share into micro-batches of whole chunks changes no bit."""
    cfg = lambda m: {**config(kind="adam", lr=0.05, micro_batch=m), "comm": {"reduce": "reproducible", "chunk": 4}}  # noqa: E731
    whole = fit(tmp_path, cfg(0), "whole")
    run = fit(tmp_path, cfg(micro), "micro")
    for k in NAMES:
        assert run.params[k].tobytes() == whole.params[k].tobytes(), k


# ---------------------------------------------------------------- dropout through the trainer


def hidden_masks(p, seed=7):
    """Step t's factors m / (1 - p) of the hidden layer (layer 0) for the rows at global positions 0..ROWS-1,
    from the documented hash."""
    def at(t):
        u = np.array([[reference_u(seed, t, n, 0, j) for j in range(4)] for n in range(ROWS)])
        return np.where(u >= p, 1.0 / (1.0 - p), 0.0)
    return at


@pytest.mark.parametrize("optimizer", ["sgd momentum", "adam"])
def test_dropout_training_uses_the_documented_masks_and_evaluation_none(tmp_path, optimizer):
    o, p = OPTIMIZERS[optimizer], 0.3
    masks = hidden_masks(p)
    assert 0 < sum(int((masks(t) == 0).sum()) for t in range(STEPS)) < STEPS * ROWS * 4
    cfg = config(**o)
    cfg["model"]["dropout"] = p
    cfg["train"]["eval_every"] = STEPS
    x, y, init = problem()
    run = dpbp.fit(cfg, x=x, y=y, val=(x, y), init=init, out=str(tmp_path / "r"), comm=SerialComm())
    expected = reference_run(o, masks=masks)[0]
    assert_close(run.params, expected)
    assert not np.allclose(expected["layers.0.weight"], reference_run(o)[0]["layers.0.weight"])
    # held-out evaluation and predict: the forward pass without dropout
    val = [r for r in run.metrics if r.get("split") == "val"]
    assert val[-1]["loss"] == pytest.approx(loss(run.params, x, y), rel=1e-12)
    np.testing.assert_allclose(dpbp.load(run.run_dir).predict(x), forward(run.params, x)[2], rtol=1e-12)


def test_dropout_drops_the_fraction_p_of_hidden_units_in_training(tmp_path):
    """A single-row batch: layer 1's weight gradient column j is d2 h_j, zero exactly where unit j was
    dropped (tanh of a nonzero net is nonzero), so its zero columns count the dropped units."""
    from dpbp.config import load_config
    from dpbp.data import load_data
    from dpbp.step import Trainer
    p, hidden = 0.2, 3000
    cfg = load_config({"model": {"sizes": [5, hidden, 3], "dropout": p}, "data": {"name": "random"}, "loss": {"l2": 0.0}})
    data, _ = load_data(cfg)
    trainer = Trainer(cfg, SerialComm(), data)
    rng = np.random.default_rng(0)
    trainer.model.load({"layers.0.weight": rng.normal(size=(hidden, 5)), "layers.0.bias": rng.normal(size=hidden),
                        "layers.1.weight": rng.normal(size=(3, hidden)), "layers.1.bias": np.zeros(3)})
    dropped = []
    for t in range(5):
        trainer._t = t
        trainer.gradient(np.array([t]))
        gW1 = trainer.grads.nabla_w[1]
        dropped.append(int(np.all(gW1 == 0, axis=0).sum()))
    N = 5 * hidden
    assert abs(sum(dropped) - N * p) < 6 * math.sqrt(N * p * (1 - p))
    assert len(set(dropped)) > 1  # a new mask every step


# ---------------------------------------------------------------- early stopping and best.npz


def overfitting(patience, steps=60):
    rng = np.random.default_rng(3)
    x, xv = rng.normal(size=(2, 16, 3))
    y, yv = rng.normal(size=(2, 16, 2))  # noise: the held-out loss rises as the network learns the training set
    cfg = config(kind="adam", lr=0.05)
    cfg["model"]["sizes"] = [3, 16, 2]
    cfg["data"]["batch_size"] = 16
    cfg["train"].update(steps=steps, eval_every=2, early_stop_patience=patience, log_every=10)
    return cfg, dict(x=x, y=y, val=(xv, yv))


def test_early_stopping_stops_after_patience_evaluations_without_a_new_best(tmp_path):
    cfg, arrays = overfitting(0)
    full = dpbp.fit(cfg, **arrays, out=str(tmp_path / "full"), comm=SerialComm())
    val = [r for r in full.metrics if r.get("split") == "val"]
    losses = [r["loss"] for r in val]
    best = int(np.argmin(losses))
    assert 0 < best < len(losses) - 4, losses  # it does overfit: a minimum, then rising
    patience = 3
    # the rule, on the recorded losses: stop at the evaluation that makes `patience` in a row without a new best
    since, best_so_far, stop = 0, math.inf, None
    for i, value in enumerate(losses):
        since, best_so_far = (0, value) if value < best_so_far else (since + 1, best_so_far)
        if since == patience:
            stop = i
            break
    cfg, arrays = overfitting(patience)
    run = dpbp.fit(cfg, **arrays, out=str(tmp_path / "stopped"), comm=SerialComm())
    val_run = [r for r in run.metrics if r.get("split") == "val"]
    assert [r["step"] for r in val_run] == [r["step"] for r in val[:stop + 1]]
    assert [r["loss"] for r in val_run] == losses[:stop + 1]
    best_step = val[int(np.argmin(losses[:stop + 1]))]["step"]
    assert val_run[-1]["best_step"] == best_step
    assert val_run[-1]["best_loss"] == min(losses[:stop + 1])
    # best.npz holds the parameters of step best_step: a run of exactly best_step steps ends with them
    cfg_b, _ = overfitting(0, steps=best_step)
    short = dpbp.fit(cfg_b, **arrays, out=str(tmp_path / "short"), comm=SerialComm())
    best_params = load_params(os.path.join(run.run_dir, "best.npz"))
    for k in NAMES:
        assert best_params[k].tobytes() == short.params[k].astype(best_params[k].dtype).tobytes(), k


# ---------------------------------------------------------------- every new key's error message


@pytest.mark.parametrize("sets, message", [
    (["optim.kind='rmsprop'"], "optim.kind = 'rmsprop'"),
    (["optim.kind='rmsprop'"], "sgd"),
    (["optim.kind='rmsprop'"], "adamw"),
    (["optim.betas=[0.9, 1.0]"], "two numbers in [0, 1)"),
    (["optim.betas=[-0.1, 0.9]"], "two numbers in [0, 1)"),
    (["optim.betas=[0.9]"], "two numbers in [0, 1)"),
    (["optim.eps=0"], "optim.eps = 0.0 is out of range; allowed: > 0"),
    (["optim.weight_decay=-1"], "optim.weight_decay = -1.0 is out of range; allowed: >= 0"),
    (["optim.momentum=1"], "optim.momentum = 1.0 is out of range; allowed: 0 <= momentum < 1"),
    (["optim.nesterov=1"], "optim.nesterov"),
    (["optim.nesterov=true", "optim.kind='adam'"], "optim.nesterov = true needs optim.kind = 'sgd'"),
    (["optim.nesterov=true", "optim.momentum=0"], "with optim.momentum > 0"),
    (["optim.schedule='linear'"], "optim.schedule = 'linear'"),
    (["optim.schedule='linear'"], "cosine"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps = -1 is out of range; allowed: >= 0"),
    (["optim.schedule='cosine'", "optim.warmup_steps=10", "train.steps=10"],
     "optim.schedule = 'cosine' needs optim.warmup_steps (10) < train.steps (10)"),
    (["optim.min_lr=-0.1"], "optim.min_lr = -0.1 is out of range; allowed: >= 0"),
    (["optim.step_size=0"], "optim.step_size = 0 is out of range; allowed: > 0"),
    (["optim.gamma=0"], "optim.gamma = 0.0 is out of range; allowed: > 0"),
    (["optim.clip_norm=-1"], "optim.clip_norm = -1.0 is out of range; allowed: >= 0"),
    (["optim.shard='yes'"], "optim.shard"),
    (["model.dropout=1.0"], "model.dropout = 1.0 is out of range; allowed: 0 <= p < 1"),
    (["model.dropout=-0.1"], "model.dropout = -0.1 is out of range"),
    (["data.micro_batch=-2"], "data.micro_batch = -2 is out of range; allowed: >= 0"),
    (["train.early_stop_patience=-1"], "train.early_stop_patience = -1 is out of range; allowed: >= 0"),
])
def test_bad_trainer_settings_are_refused_with_one_clear_message(sets, message):
    from dpbp.config import load_config
    from dpbp.errors import UserError
    with pytest.raises(UserError) as e:
        load_config(None, sets)
    assert message in str(e.value), str(e.value)
