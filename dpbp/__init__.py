"""dpbp: data-parallel backpropagation for fully connected networks in NumPy over MPI."""

__version__ = "0.1.0"
