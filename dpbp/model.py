"""The multilayer perceptron: forward pass and the delta recursion of the seed, batched.

Parameters live in ONE flat buffer and gradients in another; each layer's W, b, nabla_W, nabla_b is a
view into them, so the whole gradient is reduced with a single in-place Allreduce and the optimizer
updates every parameter with one vector operation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dpbp.layers import ACTIVATIONS, dense_backward, dense_forward, dropout_backward, dropout_forward, dropout_workspace
from dpbp.losses import LOSSES


def param_shapes(sizes):
    """[(n_out, n_in), (n_out,)] per dense layer, in buffer order."""
    shapes = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        shapes += [(n_out, n_in), (n_out,)]
    return shapes


def param_names(n_layers):
    """Torch-compatible names: layers.{k}.weight, layers.{k}.bias."""
    return [f"layers.{k}.{part}" for k in range(n_layers) for part in ("weight", "bias")]


def count_params(sizes):
    return sum(int(np.prod(s)) for s in param_shapes(sizes))


def views(flat, shapes):
    out, offset = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(flat[offset:offset + n].reshape(shape))
        offset += n
    return out


SEED_EXAMPLE = {  # the tutorial's 2-2-2 network: w1..w8 and one bias per layer
    "layers.0.weight": [[0.15, 0.20], [0.25, 0.30]],
    "layers.0.bias": [0.35, 0.35],
    "layers.1.weight": [[0.40, 0.45], [0.50, 0.55]],
    "layers.1.bias": [0.60, 0.60],
}


def initial_params(sizes, activation, seed, init="uniform"):
    """Float64 initial parameters, a pure function of the arguments (identical on every rank).

    uniform: W ~ U(-a, a) with a = sqrt(6 / fan_in) for relu (He) and sqrt(6 / (fan_in + fan_out))
    otherwise (Glorot); biases 0. seed_example: the tutorial's weights (2-2-2 only).
    """
    names = param_names(len(sizes) - 1)
    if init == "seed_example":
        return {k: np.array(v, dtype=np.float64) for k, v in SEED_EXAMPLE.items()}
    rng = np.random.default_rng([seed, 0x1D17])
    params = {}
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        a = np.sqrt(6.0 / n_in) if activation == "relu" else np.sqrt(6.0 / (n_in + n_out))
        params[names[2 * k]] = rng.uniform(-a, a, size=(n_out, n_in))
        params[names[2 * k + 1]] = np.zeros(n_out)
    return params


class Dropout(NamedTuple):
    """Training-time dropout for one forward pass: the keep-mask of hidden unit j of the sample at global
    batch position n in this step is a pure function of (seed, step, n, layer, j) (layers.dropout_forward)."""

    p: float
    seed: int
    step: int
    positions: np.ndarray  # (B,) the rows' positions in the global batch


class Grads:
    """One flat gradient buffer (n_params,) and its per-layer views nabla_w[l] (n_l+1, n_l), nabla_b[l] (n_l+1,).

    backward writes into whichever Grads it is given, so a caller can hand it a slice of a larger buffer
    (e.g. the reducer's, which also carries statistics through the same Allreduce) with no copy.
    """

    def __init__(self, flat, shapes):
        self.flat = flat
        gv = views(flat, shapes)
        self.nabla_w, self.nabla_b = gv[0::2], gv[1::2]


class MLP:
    """sizes = [n_0, n_1, ..., n_L]; hidden layers use `activation`, the last layer `output`.

    ``forward(x)`` then ``backward(y)`` leaves in nabla_w / nabla_b the gradient of the SUMMED error
    over the rows of x (the seed's E_total); nothing is averaged here.
    """

    def __init__(self, sizes, activation, output, loss, dtype="float64"):
        self.sizes = list(sizes)
        self.activation, self.output, self.loss_kind = activation, output, loss
        self.dtype = np.dtype(dtype)
        self.n_layers = len(sizes) - 1
        self.shapes = param_shapes(sizes)
        self.names = param_names(self.n_layers)
        self.n_params = count_params(sizes)
        self.params = np.zeros(self.n_params, self.dtype)
        pv = views(self.params, self.shapes)
        self.weights, self.biases = pv[0::2], pv[1::2]
        self.grads = self.grad_views(np.zeros(self.n_params, self.dtype))  # where backward writes by default
        self.f = [ACTIVATIONS[activation].f] * (self.n_layers - 1) + [ACTIVATIONS[output].f]
        self.f_prime_times = [ACTIVATIONS[activation].prime_times] * (self.n_layers - 1)
        self.loss = LOSSES[loss]
        self._rows, self._views_B = 0, None
        self._drop = None  # the last forward's Dropout, or None
        self._drop_rows = 0  # rows of the dropout buffers (and their hash workspaces), made on first use

    def grad_views(self, flat):
        """Grads over `flat` (n_params,) in this model's dtype and layout."""
        assert flat.shape == (self.n_params,) and flat.dtype == self.dtype
        return Grads(flat, self.shapes)

    @property
    def grad(self):
        """The default gradient buffer (n_params,)."""
        return self.grads.flat

    @property
    def nabla_w(self):
        return self.grads.nabla_w

    @property
    def nabla_b(self):
        return self.grads.nabla_b

    # ------------------------------------------------------------ parameters by name

    def tensors(self, flat=None):
        """{name: view} into `flat` (default: the parameters)."""
        return dict(zip(self.names, views(self.params if flat is None else flat, self.shapes)))

    def load(self, params):
        """Copy {name: array} into the flat buffer, casting to the model's dtype."""
        for name, view in self.tensors().items():
            view[...] = params[name]

    # ------------------------------------------------------------ workspace

    def _workspace(self, rows):
        """Activations out^(l), deltas and one scratch per layer for `rows` samples.

        Allocated once for the largest batch seen and reused as views: a step allocates nothing
        proportional to the model. The views for a batch size are kept too (the last one), so a
        step of the usual size does no per-layer Python work to find its buffers.
        """
        if rows > self._rows:
            self._rows = rows
            self._out = [np.empty((rows, n), self.dtype) for n in self.sizes]
            self._delta = [np.empty((rows, n), self.dtype) for n in self.sizes]
            self._scratch = [np.empty((rows, n), self.dtype) for n in self.sizes]
            self._views_B = None
        if self._views_B != rows:
            self._views_B = rows
            self._outs = [o[:rows] for o in self._out]
            self._deltas = [d[:rows] for d in self._delta]
            self._scratches = [s[:rows] for s in self._scratch]
        return self._outs

    def buffers(self, rows):
        """(outs, deltas): the (rows, n_l) activation and delta buffers a step of `rows` samples uses."""
        self._workspace(rows)
        return self._outs, self._deltas

    def input_buffer(self, rows):
        """The (rows, n_0) buffer that forward reads x from: fill it in place (e.g. np.take(..., out=))
        and pass it to forward to skip a copy."""
        return self._workspace(rows)[0]

    # ------------------------------------------------------------ forward / backward

    def forward(self, x, dropout=None):
        """x: (B, n_0) -> out^(L): (B, n_L). Keeps every layer's out^(l) for backward.

        dropout (training only): each hidden layer's output goes on to the next layer as
        out^(l) (.) m^(l) / (1 - p); out^(l) itself is kept for f'(net^(l)) in backward.
        """
        outs = self._workspace(x.shape[0])
        if x is not outs[0]:
            np.copyto(outs[0], x)  # also casts the input to the model's dtype
        self._drop = dropout if dropout is not None and dropout.p > 0.0 else None
        inputs = self._inputs_after_dropout(x.shape[0])
        weights, biases, f = self.weights, self.biases, self.f
        for l in range(self.n_layers):
            net = dense_forward(inputs[l], weights[l], biases[l], outs[l + 1])
            f[l](net, out=outs[l + 1])  # out^(l) = f(net^(l)), in place over net
            if self._drop is not None and l + 1 < self.n_layers:
                d = self._drop
                dropout_forward(inputs[l + 1], d.p, d.seed, d.step, d.positions, l, self._masks[l + 1],
                                self._drop_work[l], x=outs[l + 1])
        return outs[-1]

    def _inputs_after_dropout(self, rows):
        """Each layer's input for the last forward: out^(l), or with dropout out^(0) and the hidden layers'
        dropped-out copies (their masks in self._masks), in buffers as large as the workspace."""
        if self._drop is None:
            return self._outs
        if self._drop_rows < self._rows:
            if not self._drop_rows:
                self._drop_work = [dropout_workspace(n) for n in self.sizes[1:-1]]
            self._drop_rows = self._rows
            self._drop_in = [np.empty((self._rows, n), self.dtype) for n in self.sizes[1:-1]]
            self._drop_mask = [np.empty((self._rows, n), self.dtype) for n in self.sizes[1:-1]]
        self._masks = [None, *(m[:rows] for m in self._drop_mask)]
        return [self._outs[0], *(a[:rows] for a in self._drop_in)]

    def backward(self, y, grads=None, scale=1.0, ready=None):
        """y: (B, n_L) targets for the last forward. Fills grads.nabla_w, grads.nabla_b (default:
        self.grads); returns the summed E.

        delta^(L) = grad_out E (.) f'(net^(L))                  (losses.py)
        delta^(l) = (W^(l+1))^T delta^(l+1) (.) f'(net^(l))
        dE/dw_ij^(l) = sum over samples of out_j^(l-1) delta_i^(l)

        scale multiplies delta^(L), so the gradients are those of scale * E (backprop is linear in
        delta^(L)): 1 / (global batch) gives the mean's gradient for the price of B x n_L multiplies
        instead of a pass over every parameter. The returned E is never scaled.
        ready(l), if given, is called as soon as layer l's nabla_w[l] and nabla_b[l] are final
        (l = L-1 first), e.g. to start reducing them while backward goes on.
        """
        outs, deltas, scratches = self._outs, self._deltas, self._scratches
        L = self.n_layers
        E = self.loss(outs[-1], y, deltas[L], self.output, scratches[L])
        if scale != 1.0:
            deltas[L] *= scale
        grads = self.grads if grads is None else grads
        weights, nabla_w, nabla_b, f_prime_times = self.weights, grads.nabla_w, grads.nabla_b, self.f_prime_times
        inputs, drop = self._inputs_after_dropout(len(y)), self._drop
        for l in range(L - 1, -1, -1):
            dx = deltas[l] if l > 0 else None
            dense_backward(deltas[l + 1], inputs[l], weights[l], nabla_w[l], nabla_b[l], dx)
            if ready is not None:
                ready(l)
            if l > 0:
                if drop is not None:
                    dropout_backward(dx, self._masks[l])  # through s^(l) = m^(l) / (1 - p)
                f_prime_times[l - 1](dx, outs[l], scratches[l])
        return E
