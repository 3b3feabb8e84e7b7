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

    def step(self, grad):
        """Update params in place from grad (same shape and dtype as params)."""
        if self.velocity is None:
            self.params -= self.lr * grad if self.lr != 1.0 else grad
            return
        v = self.velocity
        v *= self.momentum
        v += grad
        self.params -= self.lr * v

    def state(self):
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state(self, state):
        if self.velocity is not None:
            self.velocity[...] = state["velocity"]
