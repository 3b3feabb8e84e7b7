"""SGD with momentum over the flat parameter buffer. Its state is explicit, for checkpoints.

v <- mu v + g ;  w <- w - eta v      (mu = 0 is the seed's plain update w <- w - eta dE/dw)

The optimizer sees only the reduced gradient, so every rank applies the identical update.
"""

from __future__ import annotations

import numpy as np


class SGD:
    def __init__(self, params, lr, momentum=0.0):
        self.params, self.lr, self.momentum = params, lr, momentum
        self.velocity = np.zeros_like(params) if momentum else None
        self._update = np.empty_like(params)  # eta v, kept so a step allocates nothing

    def step(self, grad):
        """Update params in place from grad (same shape and dtype as params).

        Four passes over the parameters with momentum (v *= mu, v += g, eta v, w -= eta v), two
        without; NumPy cannot fuse them, and cutting the array into cache-sized blocks measured no faster.
        """
        update = self._update
        if self.velocity is None:
            np.multiply(grad, self.lr, out=update)
        else:
            v = self.velocity
            v *= self.momentum
            v += grad
            np.multiply(v, self.lr, out=update)
        self.params -= update

    def state(self):
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state(self, state):
        if self.velocity is not None:
            self.velocity[...] = state["velocity"]
