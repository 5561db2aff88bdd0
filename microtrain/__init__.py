"""microtrain: TinyTrain-style on-device few-shot training for tiny CNNs, in NumPy + Numba."""
__version__ = "0.1.0"
