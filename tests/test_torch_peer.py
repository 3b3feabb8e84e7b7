"""PyTorch as the peer (skipped where torch is not importable; the pinned version is torch==2.13.0, the
`peers` extra): every optimizer, with a warmup + cosine schedule and clipping, to float64 rounding.

1. dpbp.optim's optimizers against torch.optim on random gradients (tests/peers/torch_optim_check.py, also
   a script that prints the differences).
2. The whole training path: dpbp.fit on the 3-4-2 tanh network of tests/test_trainer.py against the same
   network as torch.nn.Linear layers, trained by torch.optim with torch's autograd and
   torch.nn.utils.clip_grad_norm_, the learning rate set on the param groups each update.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.peers.torch_optim_check import CASES, TOLERANCE, run_case  # noqa: E402
from tests.test_trainer import NAMES, STEPS, config, fit, lr_of, problem  # noqa: E402


@pytest.mark.parametrize("case", CASES)
def test_optimizers_match_torch_optim_to_float64_rounding(case):
    torch.set_default_dtype(torch.float64)
    ours, theirs = CASES[case]
    diff, scale, norm_diff = run_case(ours, theirs)
    assert diff <= TOLERANCE * max(1.0, scale), (case, diff)
    assert norm_diff <= 1e-12, (case, norm_diff)


TRAINING = {
    "sgd": (dict(kind="sgd", lr=0.3, momentum=0.0), lambda w, b, o: torch.optim.SGD([*w, *b], lr=o["lr"])),
    "sgd momentum": (dict(kind="sgd", lr=0.2, momentum=0.9),
                     lambda w, b, o: torch.optim.SGD([*w, *b], lr=o["lr"], momentum=0.9)),
    "nesterov": (dict(kind="sgd", lr=0.2, momentum=0.8, nesterov=True),
                 lambda w, b, o: torch.optim.SGD([*w, *b], lr=o["lr"], momentum=0.8, nesterov=True)),
    "adam": (dict(kind="adam", lr=0.05, betas=[0.8, 0.99], eps=1e-6),
             lambda w, b, o: torch.optim.Adam([*w, *b], lr=o["lr"], betas=(0.8, 0.99), eps=1e-6, foreach=False)),
    "adamw": (dict(kind="adamw", lr=0.05, weight_decay=0.3),
              lambda w, b, o: torch.optim.AdamW([{"params": w}, {"params": b, "weight_decay": 0.0}], lr=o["lr"],
                                                weight_decay=0.3, foreach=False)),
}


def torch_training(o, make_opt):
    x, y, init = problem()
    tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in init.items()}
    w, b = [tensors[k] for k in NAMES[0::2]], [tensors[k] for k in NAMES[1::2]]
    opt = make_opt(w, b, o)
    xt, yt = torch.tensor(x), torch.tensor(y)
    for t in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_of(t, o)
        opt.zero_grad()
        h = torch.tanh(xt @ w[0].T + b[0])
        out = h @ w[1].T + b[1]
        loss = 0.5 * ((out - yt) ** 2).sum() / len(x)  # squared_error, mean over the batch
        loss.backward()
        if o.get("clip_norm"):
            torch.nn.utils.clip_grad_norm_([*w, *b], o["clip_norm"])
        opt.step()
    return {k: v.detach().numpy() for k, v in tensors.items()}


@pytest.mark.parametrize("kind", TRAINING)
def test_training_matches_torch_to_float64_rounding(tmp_path, kind):
    torch.set_default_dtype(torch.float64)
    ours, make_opt = TRAINING[kind]
    o = {**ours, "schedule": "cosine", "warmup_steps": 2, "min_lr": 0.01, "clip_norm": 0.5}
    run = fit(tmp_path, config(**o))
    theirs = torch_training(o, make_opt)
    for k in NAMES:
        np.testing.assert_allclose(run.params[k], theirs[k], rtol=1e-12, atol=1e-14, err_msg=k)
