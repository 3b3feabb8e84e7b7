"""dpbp: data-parallel backpropagation for fully connected networks in NumPy over MPI.

    import dpbp
    run = dpbp.fit("configs/digits.toml")          # as python -m dpbp.train, returns params and metrics
    model = dpbp.load(run.run_dir); model.predict(x)

fit, load and UserError load on first use, so that ``import dpbp`` stays light (dpbp/api.py).
"""

from dpbp.threads import apply_default as _apply_default_blas_threads

__version__ = "0.1.0"

_apply_default_blas_threads()  # before anything imports numpy: BLAS reads its thread count when it loads

__all__ = ["fit", "load", "UserError", "__version__"]


def __getattr__(name):
    if name in ("fit", "load"):
        from dpbp import api
        return getattr(api, name)
    if name == "UserError":
        from dpbp.errors import UserError
        return UserError
    raise AttributeError(f"module 'dpbp' has no attribute {name!r}")
