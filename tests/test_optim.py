"""dpbp.optim against torch.optim's formulas written out plainly here (whole-array NumPy, one line per
formula), the schedules against hand-computed values, clipping against np.linalg.norm, and the ZeRO-1
property: optimizers on slices of the buffer compute bitwise what the whole-buffer optimizer does."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpbp.model import MLP, param_shapes
from dpbp.optim import (BLOCK, SGD, Adam, AdamW, clip_by_norm, grad_norm, lr_at, make_optimizer, shard_slices,
                        weight_slices_of)

LRS = [0.1, 0.05, 0.2, 0.01, 0.15]  # a different rate every update: step(grad, lr) must use the one given


def gradients(n, steps, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=n).astype(dtype) for _ in range(steps)]


# ---------------------------------------------------------------- references (torch's formulas, plainly)


def ref_sgd(w, grads, lrs, mu, nesterov):
    w, v = w.copy(), np.zeros_like(w)
    for g, lr in zip(grads, lrs):
        v = mu * v + g
        d = g + mu * v if nesterov else v
        w = w - lr * d
    return w, v


def ref_adam(w, grads, lrs, b1, b2, eps, wd=0.0, decayed=None):
    """torch.optim.Adam / AdamW (decoupled, on the elements where `decayed` is True)."""
    w, m, v = w.copy(), np.zeros_like(w), np.zeros_like(w)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        if wd:
            w = np.where(decayed, w - lr * wd * w, w)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        denom = np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps
        w = w - lr / (1 - b1 ** t) * m / denom
    return w, m, v


# ---------------------------------------------------------------- SGD


@pytest.mark.parametrize("n", [10, 2 * BLOCK + 5])  # one block; several, the last one partial
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_step_is_the_momentum_formula(momentum, n):
    """The trainer's call: step(grad) without a rate uses the constructor's."""
    rng = np.random.default_rng(4)
    w0, g1, g2 = rng.normal(size=(3, n))
    params = w0.copy()
    opt = SGD(params, lr=0.1, momentum=momentum)
    opt.step(g1)
    opt.step(g2)
    v1 = g1
    v2 = momentum * v1 + g2
    np.testing.assert_allclose(params, w0 - 0.1 * v1 - 0.1 * v2, rtol=1e-14)


@pytest.mark.parametrize("n", [10, 2 * BLOCK + 5])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True), (0.5, True)])
def test_sgd_matches_torch_formulas_over_several_steps(momentum, nesterov, n):
    grads = gradients(n, len(LRS))
    w0 = np.random.default_rng(1).normal(size=n)
    params = w0.copy()
    opt = make_optimizer("sgd", params, 0.3, momentum=momentum, nesterov=nesterov)
    for g, lr in zip(grads, LRS):
        opt.step(g, lr)
    w, v = ref_sgd(w0, grads, LRS, momentum, nesterov)
    np.testing.assert_allclose(params, w, rtol=1e-13, atol=1e-15)
    if momentum:
        np.testing.assert_allclose(opt.state()["velocity"], v, rtol=1e-13, atol=1e-15)
    else:
        assert opt.state() == {}


def test_nesterov_differs_from_plain_momentum_by_the_lookahead():
    """One step from v = 0: plain moves lr g, Nesterov lr (g + mu g) = lr (1 + mu) g."""
    g = np.array([1.0, -2.0, 0.5])
    plain, nest = np.zeros(3), np.zeros(3)
    SGD(plain, 0.1, 0.9).step(g)
    SGD(nest, 0.1, 0.9, nesterov=True).step(g)
    np.testing.assert_allclose(plain, -0.1 * g, rtol=1e-15)
    np.testing.assert_allclose(nest, -0.1 * 1.9 * g, rtol=1e-15)


# ---------------------------------------------------------------- Adam, AdamW


@pytest.mark.parametrize("n", [7, 2 * BLOCK + 5])
@pytest.mark.parametrize("betas,eps", [((0.9, 0.999), 1e-8), ((0.8, 0.99), 1e-3)])
def test_adam_matches_torch_formulas_over_several_steps(betas, eps, n):
    grads = gradients(n, len(LRS), seed=2)
    w0 = np.random.default_rng(3).normal(size=n)
    params = w0.copy()
    opt = make_optimizer("adam", params, 1.0, betas=betas, eps=eps)
    for g, lr in zip(grads, LRS):
        opt.step(g, lr)
    w, m, v = ref_adam(w0, grads, LRS, *betas, eps)
    np.testing.assert_allclose(params, w, rtol=1e-12, atol=1e-14)
    state = opt.state()
    np.testing.assert_allclose(state["exp_avg"], m, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(state["exp_avg_sq"], v, rtol=1e-12, atol=1e-15)
    assert int(state["step"]) == len(LRS)


def test_adamw_matches_torch_formulas_and_decays_only_the_weights():
    sizes = [300, 400, 50]  # n = 140,450: the first weight spans a block boundary
    shapes = param_shapes(sizes)
    slices = weight_slices_of(shapes)
    n = sum(int(np.prod(s)) for s in shapes)
    decayed = np.zeros(n, bool)
    for a, b in slices:
        decayed[a:b] = True
    assert 0 < decayed.sum() < n
    grads = gradients(n, len(LRS), seed=5)
    w0 = np.random.default_rng(6).normal(size=n)
    params = w0.copy()
    opt = make_optimizer("adamw", params, 1.0, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                         weight_slices=slices)
    for g, lr in zip(grads, LRS):
        opt.step(g, lr)
    w, _, _ = ref_adam(w0, grads, LRS, 0.9, 0.99, 1e-8, 0.1, decayed)
    np.testing.assert_allclose(params, w, rtol=1e-12, atol=1e-14)


def test_adamw_with_zero_gradient_shrinks_weights_geometrically_and_leaves_biases():
    """g = 0 makes Adam's step 0 / (0 + eps) = 0, so only the decay acts: w (1 - lr lambda)^k on weights."""
    shapes = param_shapes([3, 4, 2])
    n = sum(int(np.prod(s)) for s in shapes)
    w0 = np.random.default_rng(7).normal(size=n)
    params = w0.copy()
    opt = AdamW(params, 0.1, weight_decay=0.5, weight_slices=weight_slices_of(shapes))
    for _ in range(3):
        opt.step(np.zeros(n))
    (a0, b0), (a1, b1) = weight_slices_of(shapes)
    assert (a0, b0, a1, b1) == (0, 12, 16, 24)  # W0 (4, 3), b0 (4,), W1 (2, 4), b1 (2,)
    np.testing.assert_allclose(params[a0:b0], w0[a0:b0] * 0.95 ** 3, rtol=1e-15)
    np.testing.assert_allclose(params[a1:b1], w0[a1:b1] * 0.95 ** 3, rtol=1e-15)
    np.testing.assert_array_equal(params[b0:a1], w0[b0:a1])
    np.testing.assert_array_equal(params[b1:], w0[b1:])


def test_weight_slices_of_the_model_shapes_are_exactly_its_weight_matrices():
    sizes = [5, 4, 3, 2]
    model = MLP(sizes, "tanh", "softmax", "cross_entropy")
    model.params[:] = np.arange(model.n_params)
    slices = weight_slices_of(model.shapes)
    assert len(slices) == len(model.weights)
    for (a, b), W in zip(slices, model.weights):
        np.testing.assert_array_equal(model.params[a:b], W.ravel())


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_float32_parameters_keep_float32_state_and_follow_the_float64_formulas(kind):
    n = 50
    grads = gradients(n, 3, seed=8, dtype=np.float32)
    w0 = np.random.default_rng(9).normal(size=n).astype(np.float32)
    params = w0.copy()
    opt = make_optimizer(kind, params, 0.1, momentum=0.9, weight_decay=0.1 if kind == "adamw" else 0.0,
                         weight_slices=[(0, 30)])
    for g, lr in zip(grads, LRS):
        opt.step(g, lr)
    assert params.dtype == np.float32 and all(a.dtype == np.float32 for k, a in opt.state().items() if k != "step")
    g64 = [g.astype(np.float64) for g in grads]
    if kind == "sgd":
        expected, _ = ref_sgd(w0.astype(np.float64), g64, LRS[:3], 0.9, False)
    else:
        decayed = np.arange(n) < 30
        expected, _, _ = ref_adam(w0.astype(np.float64), g64, LRS[:3], 0.9, 0.999, 1e-8,
                                  0.1 if kind == "adamw" else 0.0, decayed)
    np.testing.assert_allclose(params, expected, rtol=2e-5, atol=1e-5)


# ---------------------------------------------------------------- factory and state


def test_make_optimizer_returns_the_kind_asked_for():
    p = np.zeros(4)
    assert type(make_optimizer("sgd", p, 0.1)) is SGD
    assert type(make_optimizer("adam", p, 0.1)) is Adam
    assert type(make_optimizer("adamw", p, 0.1, weight_decay=0.01, weight_slices=[(0, 2)])) is AdamW


@pytest.mark.parametrize("kwargs,message", [
    ({"kind": "rmsprop"}, "unknown optimizer 'rmsprop'"),
    ({"kind": "sgd", "weight_decay": 0.1}, "weight_decay is for adamw"),
    ({"kind": "adam", "weight_decay": 0.1}, "weight_decay is for adamw"),
    ({"kind": "adam", "nesterov": True}, "nesterov is for sgd"),
    ({"kind": "sgd", "nesterov": True}, "nesterov needs a momentum"),
    ({"kind": "adam", "betas": (1.0, 0.9)}, "0 <= beta < 1"),
    ({"kind": "adamw", "weight_decay": 0.1, "weight_slices": [(2, 4), (0, 1)]}, "sorted, non-overlapping"),
    ({"kind": "adamw", "weight_decay": 0.1, "weight_slices": [(0, 5)]}, "inside [0, 4)"),
])
def test_bad_settings_are_refused_with_a_message(kwargs, message):
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError, match=re.escape(message)):
        make_optimizer(kind, np.zeros(4), 0.1, **kwargs)


KINDS = {  # name -> make_optimizer arguments (besides params); weight slices filled in per buffer
    "sgd": dict(kind="sgd", lr=0.1),
    "momentum": dict(kind="sgd", lr=0.1, momentum=0.9),
    "nesterov": dict(kind="sgd", lr=0.1, momentum=0.9, nesterov=True),
    "adam": dict(kind="adam", lr=0.01, betas=(0.9, 0.99)),
    "adamw": dict(kind="adamw", lr=0.01, weight_decay=0.1),
}


def build(name, params, slices):
    kw = dict(KINDS[name])
    if name == "adamw":
        kw["weight_slices"] = slices
    return make_optimizer(kw.pop("kind"), params, **kw)


@pytest.mark.parametrize("name", list(KINDS))
def test_state_round_trip_continues_bitwise(name):
    shapes = param_shapes([20, 30, 5])
    slices = weight_slices_of(shapes)
    n = sum(int(np.prod(s)) for s in shapes)
    grads = gradients(n, 6, seed=10)
    lrs = [0.1, 0.2, 0.05, 0.1, 0.3, 0.02]
    straight = np.random.default_rng(11).normal(size=n)
    opt = build(name, straight, slices)
    for g, lr in zip(grads[:3], lrs[:3]):
        opt.step(g, lr)
    saved_params = straight.copy()
    saved_state = {k: np.array(v, copy=True) for k, v in opt.state().items()}
    for g, lr in zip(grads[3:], lrs[3:]):
        opt.step(g, lr)

    resumed = saved_params.copy()
    opt2 = build(name, resumed, slices)
    opt2.load_state(saved_state)
    for g, lr in zip(grads[3:], lrs[3:]):
        opt2.step(g, lr)
    np.testing.assert_array_equal(resumed, straight)
    for k, v in opt.state().items():
        np.testing.assert_array_equal(opt2.state()[k], v)
    # and the state mattered: a fresh optimizer from the saved parameters ends elsewhere (but plain sgd)
    fresh = saved_params.copy()
    opt3 = build(name, fresh, slices)
    for g, lr in zip(grads[3:], lrs[3:]):
        opt3.step(g, lr)
    assert np.array_equal(fresh, straight) == (name == "sgd")


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_load_state_refuses_a_misshapen_or_missing_entry(name):
    opt = build(name, np.zeros(6), [(0, 4)])
    key = "velocity" if name == "momentum" else "exp_avg"
    state = {k: np.array(v, copy=True) for k, v in opt.state().items()}
    with pytest.raises(ValueError, match=f"{key!r} has shape \\(5,\\), expected \\(6,\\)"):
        opt.load_state({**state, key: np.zeros(5)})
    with pytest.raises(ValueError, match=f"has no {key!r}"):
        opt.load_state({k: v for k, v in state.items() if k != key})


# ---------------------------------------------------------------- ZeRO-1: slices == whole, bitwise

SHARD_SHAPES = param_shapes([300, 400, 50])  # n = 140,450 > BLOCK: shards cross the block boundary
SHARD_N = sum(int(np.prod(s)) for s in SHARD_SHAPES)
SHARD_GRADS = {dt: gradients(SHARD_N, 3, seed=12, dtype=dt) for dt in (np.float32, np.float64)}


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(list(KINDS)), dtype=st.sampled_from([np.float32, np.float64]),
       cuts=st.lists(st.integers(1, SHARD_N - 1), max_size=6, unique=True))
def test_optimizers_on_any_partition_of_the_buffer_update_bitwise_like_the_whole(name, dtype, cuts):
    slices = weight_slices_of(SHARD_SHAPES)
    w0 = np.random.default_rng(13).normal(size=SHARD_N).astype(dtype)
    whole, parts = w0.copy(), w0.copy()
    opt = build(name, whole, slices)
    bounds = [0, *sorted(cuts), SHARD_N]
    shards = [(lo, hi, build(name, parts[lo:hi], shard_slices(slices, lo, hi))) for lo, hi in zip(bounds, bounds[1:])]
    for g, lr in zip(SHARD_GRADS[dtype], LRS):
        opt.step(g, lr)
        for lo, hi, o in shards:
            o.step(g[lo:hi], lr)  # each "rank" sees its slice of the reduced gradient
        np.testing.assert_array_equal(parts, whole)
    for key, value in opt.state().items():
        if key == "step":
            assert all(int(o.state()["step"]) == int(value) for _, _, o in shards)
        else:
            np.testing.assert_array_equal(np.concatenate([o.state()[key] for _, _, o in shards]), value)


THREADED_SHAPES = param_shapes([600, 700, 40])  # n = 448,740: four BLOCKs, so 2 and 3 threads share them out
THREADED_N = sum(int(np.prod(s)) for s in THREADED_SHAPES)


@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("threads", [2, 3])
def test_an_update_on_several_threads_is_bitwise_the_one_thread_update(name, threads):
    """The blocks of an update run on a pool's threads (dpbp.workers); each element must still get the
    one-thread arithmetic: params and state bitwise equal to threads=1 after several updates."""
    slices = weight_slices_of(THREADED_SHAPES)
    w0 = np.random.default_rng(14).normal(size=THREADED_N).astype(np.float32)
    one, many = w0.copy(), w0.copy()
    kw = dict(KINDS[name])
    kind = kw.pop("kind")
    if name == "adamw":
        kw["weight_slices"] = slices
    single = make_optimizer(kind, one, **kw)
    threaded = make_optimizer(kind, many, **kw, threads=threads)
    assert len(threaded._split.parts) == threads  # the work really is shared out
    for g, lr in zip(gradients(THREADED_N, 3, seed=15, dtype=np.float32), LRS):
        single.step(g, lr)
        threaded.step(g, lr)
    np.testing.assert_array_equal(many, one)
    assert not np.array_equal(one, w0)
    for key, value in single.state().items():
        np.testing.assert_array_equal(threaded.state()[key], value)


def test_shard_slices_clip_and_shift_the_weight_slices():
    slices = [(0, 10), (12, 20), (25, 30)]
    assert shard_slices(slices, 5, 15) == [(0, 5), (7, 10)]
    assert shard_slices(slices, 10, 12) == []
    assert shard_slices(slices, 12, 31) == [(0, 8), (13, 18)]


# ---------------------------------------------------------------- learning-rate schedules


def test_warmup_rises_linearly_to_the_base_rate_then_constant():
    assert [lr_at(t, 0.4, "constant", warmup_steps=4) for t in range(6)] == pytest.approx(
        [0.1, 0.2, 0.3, 0.4, 0.4, 0.4], rel=1e-15)
    assert lr_at(0, 0.4) == 0.4 and lr_at(1000, 0.4) == 0.4


def test_step_schedule_multiplies_by_gamma_every_step_size_updates_after_warmup():
    got = [lr_at(t, 0.8, "step", warmup_steps=2, step_size=3, gamma=0.5) for t in range(11)]
    expected = [0.4, 0.8, 0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.2, 0.2, 0.2]
    assert got == pytest.approx(expected, rel=1e-15)


def test_cosine_schedule_from_the_base_rate_to_min_lr_at_total_steps():
    base, low, W, T = 0.5, 0.01, 10, 110
    assert lr_at(W - 1, base, "cosine", W, T, low) == pytest.approx(base, rel=1e-15)  # end of warmup
    assert lr_at(W, base, "cosine", W, T, low) == base  # cos 0 = 1
    assert lr_at(60, base, "cosine", W, T, low) == pytest.approx((base + low) / 2, rel=1e-15)  # half way
    assert lr_at(35, base, "cosine", W, T, low) == pytest.approx(low + (base - low) * (1 + math.sqrt(0.5)) / 2,
                                                                 rel=1e-14)  # a quarter: cos(pi/4)
    assert lr_at(T, base, "cosine", W, T, low) == low  # the endpoint exactly
    assert lr_at(T + 7, base, "cosine", W, T, low) == low  # and after it
    lrs = [lr_at(t, base, "cosine", W, T, low) for t in range(W, T + 1)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_cosine_without_warmup_starts_at_the_base_rate():
    assert lr_at(0, 0.3, "cosine", 0, 20, 0.0) == 0.3
    assert lr_at(20, 0.3, "cosine", 0, 20, 0.0) == 0.0


@pytest.mark.parametrize("args,message", [
    ((0, 0.1, "linear"), "unknown schedule 'linear'"),
    ((5, 0.1, "cosine", 5, 5), "total_steps > warmup_steps"),
    ((5, 0.1, "cosine", 0, None), "total_steps > warmup_steps"),
    ((5, 0.1, "step", 0, None, 0.0, 0), "step_size >= 1"),
])
def test_bad_schedules_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        lr_at(*args)


# ---------------------------------------------------------------- gradient clipping


def test_clipping_below_the_threshold_leaves_the_gradient_bitwise_alone():
    g = np.random.default_rng(14).normal(size=1000)
    norm = float(np.sqrt(np.sum(g ** 2)))
    before = g.copy()
    assert clip_by_norm(g, norm * 1.01) == pytest.approx(norm, rel=1e-13)
    np.testing.assert_array_equal(g, before)


@pytest.mark.parametrize("n,scratch", [(1000, None), (2 * BLOCK + 5, None), (5000, 64)])  # blocks; small scratch
def test_clipping_above_the_threshold_scales_like_torch(n, scratch):
    g = np.random.default_rng(15).normal(size=n)
    norm = np.linalg.norm(g)
    before = g.copy()
    got = clip_by_norm(g, 2.0, None if scratch is None else np.empty(scratch))
    assert got == pytest.approx(norm, rel=1e-13)
    np.testing.assert_allclose(g, before * (2.0 / (norm + 1e-6)), rtol=1e-14)
    assert np.linalg.norm(g) == pytest.approx(2.0 * norm / (norm + 1e-6), rel=1e-13)


def test_float32_norm_is_squared_and_accumulated_in_float64():
    """(1 + 2^-20)^2 = 1 + 2^-19 + 2^-40 loses its last term in float32, and float32 sums of 1s lose 2^-24s;
    in float64 both are exact, so the norm is exact to rounding."""
    g = np.full(1 << 16, 1.0 + 2.0 ** -20, np.float32)
    g[::2] = np.float32(2.0 ** -12)
    exact = math.sqrt((1 << 15) * (1.0 + 2.0 ** -20) ** 2 + (1 << 15) * 2.0 ** -24)
    assert grad_norm(g) == pytest.approx(exact, rel=1e-15)


def test_norm_has_the_same_bits_wherever_the_gradient_sits_in_memory():
    """Identical input, different alignment (as on another rank): identical norm, so identical clipping."""
    g = np.random.default_rng(16).normal(size=BLOCK + 1001)
    elsewhere = np.empty(g.size + 3)
    shifted = elsewhere[3:]
    shifted[:] = g
    assert grad_norm(shifted).hex() == grad_norm(g).hex()
    assert grad_norm(g.astype(np.float32)).hex() == grad_norm(shifted.astype(np.float32)).hex()


def test_non_finite_gradient_is_left_for_the_trainer_to_name():
    g = np.array([1.0, np.inf, 3.0])
    assert clip_by_norm(g, 1.0) == np.inf
    np.testing.assert_array_equal(g, [1.0, np.inf, 3.0])
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_by_norm(g, 0.0)
