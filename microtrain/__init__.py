"""microtrain: TinyTrain-style on-device few-shot training for tiny CNNs, in NumPy + Numba."""
import os
import sys

from .paths import numba_cache_dir

# The 1x1 convolutions run on NumPy's bundled OpenBLAS with matrices of at most a few hundred
# columns: its threads cost more than they give there (measured: a default adaptation trains in
# 9.6 s with one OpenBLAS thread, 35.7 s with two on 2 cores) and stall on a busy board. Only
# OpenBLAS's own variable is set (OMP/MKL ones would also throttle a PyTorch loaded later); it
# takes effect only if NumPy is not loaded yet, and a value the user set wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _numba_cache_outside_checkout() -> None:
    """An installed copy caches Numba's compiled kernels in the user cache (paths.py), not beside
    its sources in site-packages, so uninstalling leaves nothing behind. A checkout keeps Numba's
    default (``__pycache__`` beside each kernel file); a ``NUMBA_CACHE_DIR`` the user set wins; a
    user cache that cannot be made is left to kernels/_jit.py's fallback. Set before Numba reads
    its configuration (at its import), or into that configuration when Numba came first."""
    folder = numba_cache_dir()
    if folder is None or "NUMBA_CACHE_DIR" in os.environ:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    if os.access(folder, os.W_OK | os.X_OK):
        os.environ["NUMBA_CACHE_DIR"] = str(folder)
        config = sys.modules.get("numba.core.config")
        if config is not None:
            config.CACHE_DIR = str(folder)


_numba_cache_outside_checkout()

__version__ = "0.1.0"


def load_classifier(path):
    """An adapted classifier written by ``python -m microtrain.adapt`` (``classifier.npz``):
    ``.predict(images)`` on file paths or uint8 arrays (see ``microtrain.classifier``)."""
    # Imported here, not above: `import microtrain` must not load Numba and the engine (see load).
    from .classifier import Classifier

    return Classifier.load(path)


def load(path):
    """A network from a microtrain weight file (``weights/README.md``): ``net.features(x)`` maps
    float32 (N, 3, R, R) images in [-1, 1] to pooled embeddings (N, C)."""
    # Imported here, not above: `import microtrain` (and every `microtrain.<module>`, which runs this
    # file first) must not load Numba and the engine; the readers (data, checkpoint) work without them.
    from .model import load as load_network

    return load_network(path)
