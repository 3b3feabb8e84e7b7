"""dpbp: data-parallel backpropagation for fully connected networks in NumPy over MPI."""

from dpbp.threads import apply_default as _apply_default_blas_threads

__version__ = "0.1.0"

_apply_default_blas_threads()  # before anything imports numpy: BLAS reads its thread count when it loads
