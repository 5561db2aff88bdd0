"""microtrain: TinyTrain-style on-device few-shot training for tiny CNNs, in NumPy + Numba."""
import os

# The 1x1 convolutions run on NumPy's BLAS with matrices of at most a few hundred columns: BLAS
# threads cost more than they give there (measured: a default adaptation trains in 9.6 s with one
# OpenBLAS thread, 35.7 s with two on 2 cores) and stall on a busy board. This takes effect only
# if NumPy is not loaded yet; a value the user set wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

__version__ = "0.1.0"
