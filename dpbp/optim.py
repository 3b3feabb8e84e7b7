"""SGD with momentum over the flat parameter buffer. Its state is explicit, for checkpoints.

v <- mu v + g ;  w <- w - eta v      (mu = 0 is the seed's plain update w <- w - eta dE/dw)

The optimizer sees only the reduced gradient, so every rank applies the identical update.
"""

from __future__ import annotations

import numpy as np

BLOCK = 1 << 17  # values updated together: the block's w, v, g and eta v stay in cache between passes


class SGD:
    def __init__(self, params, lr, momentum=0.0):
        self.params, self.lr, self.momentum = params, lr, momentum
        self.velocity = np.zeros_like(params) if momentum else None
        n = params.size
        self._update = np.empty(min(BLOCK, n), params.dtype)  # eta v for one block
        self._blocks = [slice(a, min(a + BLOCK, n)) for a in range(0, n, BLOCK)]

    def step(self, grad):
        """Update params in place from grad (same shape and dtype as params).

        NumPy cannot fuse v *= mu, v += g, eta v, w -= eta v into one pass, so they run block by block:
        each block's arrays are read from memory once and stay in cache for the other passes, and no
        parameter-sized temporary is needed. Measured on the 784-1024-1024-10 float32 step (1 thread):
        14.99 -> 13.95 ms alone, 11.02 -> 10.27 ms per rank at 2 ranks (there, two processes' parameter,
        gradient and velocity arrays do not fit the shared L3 cache together).
        """
        params, v, lr, mu, update = self.params, self.velocity, self.lr, self.momentum, self._update
        for b in self._blocks:
            u = update[:b.stop - b.start]
            if v is None:
                np.multiply(grad[b], lr, out=u)
            else:
                vb = v[b]
                vb *= mu
                vb += grad[b]
                np.multiply(vb, lr, out=u)
            params[b] -= u

    def state(self):
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state(self, state):
        if self.velocity is not None:
            self.velocity[...] = state["velocity"]
