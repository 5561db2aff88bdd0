"""The device path on 64-bit ARM, checked on this machine under an emulated Cortex-A53.

The boards microtrain is for (Raspberry Pi Zero 2: Cortex-A53; Jetson Nano: Cortex-A57) are
aarch64, and the engine compiles its Numba kernels for whatever CPU it runs on. This runs the
device path there, on Debian's arm64 Python 3.11 with the aarch64 wheels of numba, llvmlite,
NumPy and Pillow, under ``qemu-user`` emulating a Cortex-A53, the kernels compiled for that CPU
(``NUMBA_CPU_NAME``) as Numba compiles them on a Pi Zero 2:

1. kernels: ``tests/test_kernels.py`` (every kernel, forward, input gradient and channel-selected
   weight gradient, against its NumPy twin in ``microtrain/kernels/reference.py``, with the
   tests' own error bounds) under the Hypothesis profile ``aarch64``: 8 reproducible drawn
   shapes per op family instead of 100;
2. bits: each kernel family (forward, input gradient, channel-selected weight gradient; head and
   element-wise kernels; subnormal inputs) on the same host-made inputs on both platforms: the
   outputs that differ at all must agree to ``RTOL`` of their largest value, and the check lists
   which are bit-identical and which differ;
3. adaptation: ``python -m microtrain.adapt --way 5 --shot 5 --query-shots 5 --epochs 1`` on the
   host and on aarch64, compared: the same layers, channel counts and updated weight rows, the
   same accuracies before and after, the same planned memory and backward MACs; weights within
   ``ADAPTED_ATOL`` and selection scores and losses within ``ADAPTED_RTOL`` (the platforms sum in
   a different order where a kernel or OpenBLAS may reorder a reduction, and training amplifies
   it: see README, "Platforms");
4. prediction: ``python -m microtrain.predict`` with the host's adapted classifier on a few images
   of the episode's classes, host and aarch64 compared the same way. HOOK: it runs when
   ``microtrain/predict.py`` exists (issue 11); until then it says in one line that it did not.

    python tools/arm_check.py                   # build or reuse the emulated sysroot, run 1-4
    python tools/arm_check.py --if-available    # .ci/run: one line, exit 0, when it cannot be set up

The sysroot (about 420 MB) is built once by ``../shared/tools/aarch64-sysroot.sh`` (needs root for
apt-get and access to the Debian and PyPI registries) into ``--sysroot``, by default
``$XDG_CACHE_HOME/microtrain/aarch64-sysroot`` (``~/.cache/...``), and reused after; the tests'
pure-Python tools (pytest, Hypothesis) are added beside it at the host's versions. The emulated
kernels are cached in ``.numba_cache/aarch64-<cpu>/`` of the checkout. Emulated work runs under
``nice -n 5``. Exit status: 0 passed (or not set up, with ``--if-available``), 1 a part failed or
the platforms differ beyond the stated tolerances, 2 the emulator could not be set up.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from microtrain.paths import shared_dir  # noqa: E402

CPU = "cortex-a53"  # Raspberry Pi Zero 2's core: the smallest board the project targets
ADAPT_ARGS = ["--way", "5", "--shot", "5", "--query-shots", "5", "--epochs", "1"]
# Tolerances between host (x86-64) and aarch64 results. Forward and input-gradient kernels and the
# image pipeline give the same bits on both, or differ in the last bits where the host's OpenBLAS
# picks a kernel that sums a 1x1 convolution's products in another order (3.5e-7 of the largest
# value with OpenBLAS's 'Haswell' kernels on an AMD Zen 5). The kernels allowed to reorder a float32
# sum (weight gradients, pooling, norms: ``reassoc`` in microtrain/kernels/_jit.py) split it over as
# many vector lanes as the CPU has (8 with AVX2, 4 with NEON). Training amplifies such differences:
# the default adaptation on ONE x86-64 host, run with OPENBLAS_CORETYPE=SkylakeX and with Haswell,
# ends with weights up to 4.6e-5 apart (updates are up to 1.1e-2) and a last loss 1.1e-5 apart
# (relative), exactly the gap a CI run measured between its host and aarch64 (2026-12-01).
WEIGHT_ATOL = 1e-5      # absolute, on prediction scores from the same classifier
RTOL = 1e-5             # relative, on kernel outputs (the bits part)
ADAPTED_ATOL = 2e-4     # absolute, on adapted float32 weights and prototypes: 4x the gap above
ADAPTED_RTOL = 1e-4     # relative, on an adaptation's Fisher scores and losses: 9x the gap above
PREDICT_IMAGES_PER_CLASS = 2
TEST_TOOLS = ("pytest", "pluggy", "iniconfig", "packaging", "pygments", "hypothesis", "sortedcontainers")
# keys of report.json and of a classifier's provenance that describe the run (timings, memory as
# measured under qemu, a timestamp) rather than its results. outside_arena_step_bytes is
# tracemalloc's peak during one step: a few KB of Python's own objects (a Numba dispatch cache
# entry...), which depend on the process's history (on the same x86 host and commit, 3540 bytes in
# a CI run and 3594 in the same command run by hand); it is printed for both platforms instead.
VOLATILE_KEYS = {"time_seconds", "selection_share", "seconds", "peak_rss_mb", "peak_rss_bytes", "created",
                 "outside_arena_step_bytes"}


class Unavailable(Exception):
    """The emulator or the aarch64 sysroot cannot be set up here."""


class Mismatch(Exception):
    """A part failed, or host and aarch64 differ beyond the stated tolerances."""


class NotRun(Exception):
    """A part that cannot run in this checkout (the reason is printed, the check goes on)."""


def default_sysroot() -> Path:
    """Where the emulated aarch64 Python is built once and reused (under the user's cache folder)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "microtrain" / "aarch64-sysroot"


# --------------------------------------------------------------------------- set-up
class Emulator:
    """Runs commands on the emulated aarch64 Python of a sysroot built by aarch64-sysroot.sh."""

    def __init__(self, sysroot: Path):
        self.root = sysroot
        self.python = sysroot / "root" / "usr" / "bin" / "python3.11"
        self.site = sysroot / "site"
        self.test_site = sysroot / "test-site"
        self.qemu = shutil.which("qemu-aarch64-static")

    def ready(self) -> bool:
        return bool(self.qemu) and self.python.is_file() and (self.site / "numba").is_dir()

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(QEMU_LD_PREFIX=str(self.root / "root"), QEMU_CPU=CPU, NUMBA_CPU_NAME=CPU,
                   NUMBA_CACHE_DIR=str(REPO / ".numba_cache" / f"aarch64-{CPU}"),
                   PYTHONPATH=os.pathsep.join(map(str, (REPO, self.site, self.test_site))),
                   MICROTRAIN_SHARED=str(shared_dir()))
        return env

    def command(self, *args: str) -> list[str]:
        return ["nice", "-n", "5", self.qemu, str(self.python), *args]


def set_up(emu: Emulator, log) -> dict:
    """Build the sysroot if needed, add the test tools, and return the emulated library versions.
    Raises Unavailable with a one-line reason when this machine cannot run the emulator."""
    if not emu.ready():
        script = shared_dir() / "tools" / "aarch64-sysroot.sh"
        if not script.is_file():
            raise Unavailable(f"{script} not found (set MICROTRAIN_SHARED)")
        if not shutil.which("qemu-aarch64-static") and (os.geteuid() != 0 or not shutil.which("apt-get")):
            raise Unavailable("qemu-aarch64-static is not installed and apt-get cannot install it here (not root)")
        emu.root.mkdir(parents=True, exist_ok=True)
        setup_log = emu.root / "setup.log"
        log(f"building the aarch64 sysroot in {emu.root} (once; log in {setup_log})")
        env = dict(os.environ, NUMBA_VERSION=importlib.metadata.version("numba"))
        with open(setup_log, "w") as out:
            rc = subprocess.call(["nice", "-n", "5", "bash", str(script), str(emu.root)],
                                 stdout=out, stderr=subprocess.STDOUT, env=env, cwd=emu.root)
        emu.qemu = shutil.which("qemu-aarch64-static")
        if rc != 0 or not emu.ready():
            tail = setup_log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"the sysroot could not be built (exit {rc}): {tail[0]}")
    _add_test_tools(emu, log)
    probe = ("import json, platform, numba, numpy, llvmlite, PIL, pytest, hypothesis; "
             "from numba.core import config; "
             "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(), "
             "'numba': numba.__version__, 'llvmlite': llvmlite.__version__, 'numpy': numpy.__version__, "
             "'Pillow': PIL.__version__, 'cpu': config.CPU_NAME}))")
    done = subprocess.run(emu.command("-c", probe), env=emu.env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise Unavailable(f"the emulated Python does not start: {_last_line(done.stderr)}")
    info = json.loads(done.stdout)
    if info["machine"] != "aarch64":
        raise Unavailable(f"the emulated Python reports machine {info['machine']!r}, not aarch64")
    return info


def _add_test_tools(emu: Emulator, log) -> None:
    """pytest and Hypothesis (pure Python) for the emulated Python, at the host's versions."""
    try:
        pins = sorted(f"{name}=={importlib.metadata.version(name)}" for name in TEST_TOOLS)
    except importlib.metadata.PackageNotFoundError as exc:
        raise Unavailable(f"the host lacks {exc.name}: pip install -e '.[test]' first") from None
    stamp = emu.test_site / ".pins"
    if stamp.is_file() and stamp.read_text().split() == pins:
        return
    log(f"adding {', '.join(pins)} for the emulated Python")
    shutil.rmtree(emu.test_site, ignore_errors=True)
    with tempfile.TemporaryDirectory() as wheels:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                               "--platform", "manylinux2014_aarch64", "--python-version", "3.11", "-d", wheels,
                               *pins], capture_output=True, text=True)
        if done.returncode != 0:
            raise Unavailable(f"pip could not fetch the test tools: {_last_line(done.stderr)}")
        for wheel in Path(wheels).glob("*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(emu.test_site)
    stamp.write_text("\n".join(pins) + "\n")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def host_versions() -> dict:
    """This machine's architecture and the versions of Python, Numba, llvmlite, NumPy and Pillow."""
    import platform

    return {"machine": platform.machine(), "python": platform.python_version(),
            **{name: importlib.metadata.version(name) for name in ("numba", "llvmlite", "numpy", "Pillow")}}


# --------------------------------------------------------------------------- running
def run(cmd: list[str], env: dict | None, what: str, log_dir: Path) -> str:
    """Run ``cmd`` in the checkout; its output goes to ``log_dir/<what>.log``. Returns stdout;
    raises Mismatch naming the log on a non-zero exit."""
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log_file = log_dir / f"{what.replace(' ', '-')}.log"
    log_file.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{done.stdout}--- stderr\n{done.stderr}")
    if done.returncode != 0:
        raise Mismatch(f"{what} exited {done.returncode}: {_last_line(done.stderr or done.stdout)} "
                       f"(full output: {log_file})")
    return done.stdout


def host_command(*args: str) -> list[str]:
    """The command running this Python on the host (niced, so the emulator keeps its share)."""
    return ["nice", "-n", "5", sys.executable, *args]


# --------------------------------------------------------------------------- comparing
def json_differences(a, b, where: str = "", rtol: float = RTOL, atol: float = WEIGHT_ATOL) -> list[str]:
    """Where two JSON documents differ: floats beyond both ``rtol`` (relative) and ``atol``
    (absolute), anything else not equal; keys in VOLATILE_KEYS (timings, RSS) are skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where or '.'}: keys {sorted(set(a) ^ set(b))} on one platform only"]
        return [d for k in a if k not in VOLATILE_KEYS
                for d in json_differences(a[k], b[k], f"{where}.{k}", rtol, atol)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items on the host, {len(b)} on aarch64"]
        return [d for i, (x, y) in enumerate(zip(a, b))
                for d in json_differences(x, y, f"{where}[{i}]", rtol, atol)]
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if numbers and (isinstance(a, float) or isinstance(b, float)):
        same = math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b))
    else:
        same = type(a) is type(b) and a == b
    return [] if same else [f"{where}: host {a!r}, aarch64 {b!r}"]


def compare_arrays(name: str, a: np.ndarray, b: np.ndarray, atol: float = ADAPTED_ATOL,
                   rtol: float = ADAPTED_RTOL) -> tuple[float, list[str]]:
    """(max |a - b| over floats, differences): floats within ``atol``, anything else equal (text
    holding JSON compared as JSON, its numbers within ``rtol``)."""
    if a.shape != b.shape or (a.dtype != b.dtype and not a.dtype.kind == b.dtype.kind == "U"):
        return 0.0, [f"{name}: host {a.dtype} {a.shape}, aarch64 {b.dtype} {b.shape}"]
    if a.dtype.kind == "f":
        diff = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
        return diff, ([] if diff <= atol else [f"{name}: max |host - aarch64| {diff:.3g} > {atol:g}"])
    if np.array_equal(a, b):
        return 0.0, []
    try:  # metadata: a JSON string (0-d str array) or its UTF-8 bytes (uint8 array)
        texts = [bytes(x).decode() if x.dtype == np.uint8 else str(x.item()) for x in (a, b)]
        return 0.0, json_differences(*map(json.loads, texts), where=name, rtol=rtol, atol=atol)
    except (ValueError, UnicodeDecodeError):
        return 0.0, [f"{name}: differs"]


def updated_rows(adapted: dict, base: dict) -> dict[str, list[int]]:
    """For each array adaptation changed: the indices of its changed rows (output channels)."""
    rows = {}
    for name, value in adapted.items():
        if name in base and value.dtype.kind == "f" and value.shape == base[name].shape:
            changed = np.flatnonzero((value != base[name]).reshape(len(value), -1).any(axis=1)) if value.ndim else \
                np.flatnonzero(value != base[name])
            if changed.size:
                rows[name] = changed.tolist()
    return rows


def compare_adaptations(host: Path, arm: Path, base_weights: Path) -> tuple[list[str], list[str]]:
    """(facts, differences) between two ``adapt --out`` folders."""
    facts, diffs = [], []
    # the same report wherever it was written: the output folder's own path stands as <out>
    r_host, r_arm = (json.loads((d / "report.json").read_text().replace(json.dumps(str(d))[1:-1], "<out>"))
                     for d in (host, arm))
    sel_host = [(s["layer"], s["channels"], s["out_channels"]) for s in r_host["selection"]]
    sel_arm = [(s["layer"], s["channels"], s["out_channels"]) for s in r_arm["selection"]]
    if sel_host != sel_arm:
        diffs.append(f"selection: host {sel_host}, aarch64 {sel_arm}")
    for key in ("accuracy_before", "accuracy_after"):
        if r_host[key] != r_arm[key]:
            diffs.append(f"{key}: host {r_host[key]}, aarch64 {r_arm[key]}")
    diffs += json_differences(r_host, r_arm, "report.json", rtol=ADAPTED_RTOL)
    outside = [(r.get("memory") or {}).get("outside_arena_step_bytes") for r in (r_host, r_arm)]
    if outside[0] is not None:
        facts.append(f"allocated outside the arena in a step (Python objects): host {outside[0]} bytes, "
                     f"aarch64 {outside[1]} bytes")
    facts.append("selection " + ", ".join(f"{layer} {k}/{c}" for layer, k, c in sel_host)
                 + f"; accuracy {100 * r_host['accuracy_before']:.0f}% -> {100 * r_host['accuracy_after']:.0f}%"
                 + " on both")
    files = sorted(p.name for p in host.glob("*.npz"))
    if files != sorted(p.name for p in arm.glob("*.npz")):
        diffs.append(f"output files: host {files}, aarch64 {sorted(p.name for p in arm.glob('*.npz'))}")
        return facts, diffs
    with np.load(base_weights) as z:
        base = {k: z[k] for k in z.files}
    worst = (0.0, "")
    for fname in files:
        with np.load(host / fname) as zh, np.load(arm / fname) as za:
            a, b = {k: zh[k] for k in zh.files}, {k: za[k] for k in za.files}
        if set(a) != set(b):
            diffs.append(f"{fname}: arrays {sorted(set(a) ^ set(b))} on one platform only")
            continue
        for k in sorted(a):
            diff, found = compare_arrays(f"{fname}:{k}", a[k], b[k])
            diffs += found
            worst = max(worst, (diff, f"{fname}:{k}"))
        rows_host, rows_arm = updated_rows(a, base), updated_rows(b, base)
        if rows_host != rows_arm:
            differing = sorted(k for k in set(rows_host) | set(rows_arm) if rows_host.get(k) != rows_arm.get(k))
            diffs.append(f"{fname}: different rows updated in {differing}")
        elif rows_host:
            facts.append(f"{fname}: the same {sum(map(len, rows_host.values()))} rows updated in "
                         f"{len(rows_host)} arrays")
    facts.append(f"adapted arrays: max |host - aarch64| {worst[0]:.3g} ({worst[1]}; tolerance {ADAPTED_ATOL:g})")
    return facts, diffs


def predict_images(report: dict, work: Path) -> Path:
    """A class-per-folder set of a few images of each class of the adapted episode."""
    source = Path(report["data"])
    if source.suffix != ".zip":
        raise Mismatch(f"the prediction hook expects the shared zip the episode came from, got {source}")
    folder = work / "predict-images"
    with zipfile.ZipFile(source) as zf:
        names = sorted(n for n in zf.namelist() if not n.endswith("/"))
        for cls in report["episode"]["classes"]:
            for member in [n for n in names if n.startswith(f"{cls}/")][:PREDICT_IMAGES_PER_CLASS]:
                target = folder / member
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
    return folder


def parse_json_output(text: str, what: str):
    """A command's stdout as one JSON document or JSON lines; ``Mismatch`` naming ``what`` if neither."""
    try:
        return json.loads(text)
    except ValueError:
        try:  # JSON lines
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            raise Mismatch(f"{what} --json printed something that is not JSON: {text[:200]!r}") from None


# --------------------------------------------------------------------------- kernels bit for bit
def kernel_outputs(inputs: dict) -> dict:
    """Every kernel family's outputs on the same inputs (``kernel_inputs``), to compare the two
    platforms bit for bit: forward, input gradient and channel-selected weight gradient of each
    layer kind at MCUNet-like shapes, the element-wise and head kernels, and a depthwise and a
    pointwise layer on subnormal inputs (a CPU flushing them to zero shows here)."""
    import microtrain.kernels as K

    i, out = inputs, {}
    ch = i["channels"]

    def triple(name, fwd, bwd_in, bwd_w, x, w, b, dy, x_sel=None):
        out[f"{name}.forward"] = np.empty(dy.shape, np.float32)
        fwd(out[f"{name}.forward"], x, w, b)
        out[f"{name}.backward_input"] = np.empty_like(x)
        bwd_in(out[f"{name}.backward_input"], dy, w)
        out[f"{name}.backward_weight"] = np.empty((len(ch),) + w.shape[1:], np.float32)
        bwd_w(out[f"{name}.backward_weight"], dy, x if x_sel is None else x_sel, ch)

    for s in (1, 2):
        x, w, b, dy = i[f"conv_s{s}.x"], i[f"conv_s{s}.w"], i[f"conv_s{s}.b"], i[f"conv_s{s}.dy"]
        triple(f"conv3x3_s{s}", lambda o, x, w, b: K.conv2d_forward(o, x, w, b, s, 1),
               lambda d, g, w: K.conv2d_backward_input(d, g, w, s, 1),
               lambda d, g, x, c: K.conv2d_backward_weight(d, g, x, s, 1, c), x, w, b, dy)
    for k, s in DEPTHWISE_CASES:
        x, w, b, dy = (i[f"dw{k}_s{s}.{n}"] for n in ("x", "w", "b", "dy"))
        triple(f"depthwise{k}x{k}_s{s}", lambda o, x, w, b: K.depthwise_forward(o, x, w, b, s),
               lambda d, g, w: K.depthwise_backward_input(d, g, w, s),
               lambda d, g, x, c: K.depthwise_backward_weight(d, g, x, s, c), x, w, b, dy,
               np.ascontiguousarray(x[:, ch]))
    for name in ("pointwise", "pointwise_subnormal"):
        triple(name, K.pointwise_forward, K.pointwise_backward_input, K.pointwise_backward_weight,
               *(i[f"{name}.{n}"] for n in ("x", "w", "b", "dy")))
    x = i["dw_subnormal.x"]
    out["depthwise3x3_subnormal.forward"] = np.empty_like(x)
    K.depthwise_forward(out["depthwise3x3_subnormal.forward"], x, i["dw3_s1.w"], i["dw3_s1.b"] * 0, 1)
    x = i["pointwise.dy"]
    out["relu6.forward"] = np.empty_like(x)
    K.relu6_forward(out["relu6.forward"], x * 4)
    out["bias.backward"] = np.empty(len(ch), np.float32)
    K.bias_backward(out["bias.backward"], x, ch)
    out["global_avg_pool.forward"] = np.empty(x.shape[:2], np.float32)
    K.global_avg_pool_forward(out["global_avg_pool.forward"], x)
    # the head's kernels each on host-made inputs, so no difference is passed on from another
    g, z, norms, protos = i["head.x"], i["head.z"], i["head.norms"], i["head.protos"]
    out["l2_normalize.forward"] = np.empty_like(g)
    K.l2_normalize_forward(out["l2_normalize.forward"], np.empty(len(g), np.float32), g)
    out["l2_normalize.backward"] = np.empty_like(g)
    K.l2_normalize_backward(out["l2_normalize.backward"], i["head.dz"], z, norms)
    out["cosine_logits.forward"] = np.empty((len(z), len(protos)), np.float32)
    K.cosine_logits_forward(out["cosine_logits.forward"], z, protos, 10.0)
    out["cosine_logits.backward"] = np.empty_like(z)
    K.cosine_logits_backward(out["cosine_logits.backward"], i["head.logits"], protos, 10.0)
    out["softmax_cross_entropy.forward"] = np.empty_like(i["head.logits"])
    loss = K.softmax_cross_entropy_forward(out["softmax_cross_entropy.forward"], i["head.logits"], i["head.labels"])
    out["softmax_cross_entropy.loss"] = np.array([loss])
    # the image pipeline: Pillow's decoder (PNG and JPEG), then microtrain's resize
    from microtrain.data import decode_image, resize

    for j, name in enumerate(i["images.names"]):
        out[f"image {name}"] = resize(decode_image(i[f"images.{j}"].tobytes(), str(name), 128).transpose(2, 0, 1), 128)
    return out


DEPTHWISE_CASES = ((3, 1), (5, 2), (7, 1))


def kernel_inputs(seed: int = 0) -> dict:
    """Random float32 inputs for ``kernel_outputs`` (made on the host, read on both platforms)."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    i = {"channels": np.array([5, 0, 11, 3, 7, 30, 47], np.int64)}
    for s in (1, 2):  # MCUNet's first conv: 3 -> 16 channels, 3x3
        i.update({f"conv_s{s}.x": f(1, 3, 33, 33), f"conv_s{s}.w": f(48, 3, 3, 3), f"conv_s{s}.b": f(48),
                  f"conv_s{s}.dy": f(1, 48, 33 if s == 1 else 17, 33 if s == 1 else 17)})
    for k, s in DEPTHWISE_CASES:
        i.update({f"dw{k}_s{s}.x": f(2, 48, 15, 15), f"dw{k}_s{s}.w": f(48, 1, k, k), f"dw{k}_s{s}.b": f(48),
                  f"dw{k}_s{s}.dy": f(2, 48, 15 if s == 1 else 8, 15 if s == 1 else 8)})
    i.update({"pointwise.x": f(2, 96, 8, 8), "pointwise.w": f(160, 96, 1, 1), "pointwise.b": f(160),
              "pointwise.dy": f(2, 160, 8, 8)})
    tiny = np.float32(1e-39)  # below float32's smallest normal, 1.18e-38
    i.update({"pointwise_subnormal.x": i["pointwise.x"] * tiny, "pointwise_subnormal.w": i["pointwise.w"],
              "pointwise_subnormal.b": np.zeros(160, np.float32), "pointwise_subnormal.dy": i["pointwise.dy"]})
    i["dw_subnormal.x"] = i["dw3_s1.x"] * tiny
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    x = f(2, 160)
    i.update({"head.x": x, "head.z": unit(x), "head.norms": np.linalg.norm(x, axis=1).astype(np.float32),
              "head.dz": f(2, 160), "head.protos": unit(f(5, 160)), "head.logits": f(2, 5) * 10,
              "head.labels": np.array([1, 4], np.int64)})
    names = []
    for archive in ("traffic_sign.zip", "flowers.zip"):  # PNG 32x32 (upscaled), JPEG 84x84
        with zipfile.ZipFile(shared_dir() / "data" / archive) as zf:
            for member in sorted(n for n in zf.namelist() if not n.endswith("/"))[:2]:
                i[f"images.{len(names)}"] = np.frombuffer(zf.read(member), np.uint8)
                names.append(f"{archive}:{member}")
    i["images.names"] = np.array(names)
    return i


# --------------------------------------------------------------------------- the check
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sysroot", type=Path, default=default_sysroot(),
                   help="where the aarch64 sysroot is built once and reused (default %(default)s)")
    p.add_argument("--if-available", action="store_true",
                   help="when the emulator cannot be set up here, say so in one line and exit 0")
    p.add_argument("--work", type=Path, help="keep logs and outputs in this folder (default: a temporary one)")
    p.add_argument("--emit-kernels", nargs=2, metavar=("INPUTS", "OUTPUTS"), type=Path, help=argparse.SUPPRESS)
    p.add_argument("--parts", default=",".join(PARTS),
                   help="comma-separated subset of %(default)s (predict uses the adaptation's outputs)")
    args = p.parse_args(argv)
    parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    if not parts or set(parts) - set(PARTS):
        p.error(f"--parts takes names among {', '.join(PARTS)}")
    if args.emit_kernels:  # the bits part runs this on each platform
        with np.load(args.emit_kernels[0]) as z:
            np.savez(args.emit_kernels[1], **kernel_outputs({k: z[k] for k in z.files}))
        return 0

    t0 = time.perf_counter()
    say = lambda line: print(f"arm_check: {line}", flush=True)  # noqa: E731
    emu = Emulator(args.sysroot.resolve())
    try:
        arm = set_up(emu, say)
    except (Unavailable, OSError) as exc:  # OSError: e.g. a sysroot folder that cannot be written
        say(f"aarch64 check not run: {exc}")
        return 0 if args.if_available else 2
    host = host_versions()
    say(f"host {host['machine']} Python {host['python']}, numba {host['numba']}, llvmlite {host['llvmlite']}, "
        f"NumPy {host['numpy']}, Pillow {host['Pillow']}")
    say(f"emulated {arm['machine']} ({arm['cpu']}, qemu-user) Python {arm['python']}, numba {arm['numba']}, "
        f"llvmlite {arm['llvmlite']}, NumPy {arm['numpy']}, Pillow {arm['Pillow']} (set up in "
        f"{time.perf_counter() - t0:.0f} s)")
    differing = [k for k in ("numba", "llvmlite", "numpy", "Pillow") if host[k] != arm[k]]
    if differing:
        say(f"note: library versions differ between the platforms ({', '.join(differing)}): "
            "a difference below may come from them")

    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="arm_check."))
    work.mkdir(parents=True, exist_ok=True)
    failures, not_run = [], []
    for name in parts:
        t = time.perf_counter()
        try:
            for line in PARTS[name](emu, work):
                say(f"{name}: {line}")
            say(f"{name}: ok ({time.perf_counter() - t:.0f} s)")
        except NotRun as exc:
            not_run.append(name)
            say(f"{name}: not run: {exc}")
        except Mismatch as exc:
            failures.append(name)
            for line in str(exc).splitlines():
                say(f"{name}: FAILED {line}")
    wall = time.perf_counter() - t0
    if failures:
        say(f"aarch64 check FAILED ({', '.join(failures)}) in {wall:.0f} s; logs in {work}")
        return 1
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)  # kept above, on a failure, for its logs
    ran = [name for name in parts if name not in not_run]
    say(f"aarch64 check passed in {wall:.0f} s ({', '.join(ran) or 'nothing'} on aarch64"
        + (f"; not run: {', '.join(not_run)})" if not_run else ")"))
    return 0


def part_kernels(emu: Emulator, work: Path):
    """The kernel tests (tests/test_kernels.py) under the emulator."""
    out = run(emu.command("-m", "pytest", "-p", "no:cacheprovider", "--hypothesis-profile=aarch64",
                          "tests/test_kernels.py"), emu.env(), "kernels aarch64", work)
    yield f"tests/test_kernels.py on aarch64: {_last_line(out)}"


def compare_bits(host: dict, arm: dict) -> tuple[list[str], list[str], list[str]]:
    """(names with the same bits, "name relative-difference" of the others, differences beyond
    RTOL). A difference is relative to the output's largest magnitude, so a subnormal result
    flushed to zero on one platform counts as a difference of 1."""
    same, differ, diffs = [], [], []
    for name in host:
        a, b = host[name], arm.get(name)
        if b is None or a.shape != b.shape:
            diffs.append(f"{name}: host {a.shape}, aarch64 {None if b is None else b.shape}")
        elif np.array_equal(a, b):
            same.append(name)
        else:
            rel = float(np.max(np.abs(a.astype(np.float64) - b)) / max(float(np.max(np.abs(a))), 1e-45))
            differ.append(f"{name} {rel:.1e}")
            if not rel <= RTOL:
                diffs.append(f"{name}: host and aarch64 differ by {rel:.3g} of its largest value (> {RTOL:g})")
    return same, differ, diffs


def part_bits(emu: Emulator, work: Path):
    """Every kernel on the same inputs on both platforms; outputs equal bit for bit or within RTOL."""
    inputs, outputs = work / "kernel-inputs.npz", {}
    np.savez(inputs, **kernel_inputs())
    for platform_name, command, env in (("host", host_command, None), ("aarch64", emu.command, emu.env())):
        outputs[platform_name] = work / f"kernel-outputs-{platform_name}.npz"
        run(command("tools/arm_check.py", "--emit-kernels", str(inputs), str(outputs[platform_name])), env,
            f"kernels bit for bit {platform_name}", work)
    with np.load(outputs["host"]) as zh, np.load(outputs["aarch64"]) as za:
        same, differ, diffs = compare_bits({k: zh[k] for k in zh.files}, {k: za[k] for k in za.files})
    if diffs:
        raise Mismatch("\n".join(diffs))
    yield f"the same bits on both: {len(same)} of {len(same) + len(differ)} outputs ({', '.join(same)})"
    if differ:
        yield f"differ in the last bits (largest difference / largest value): {', '.join(differ)}"


def part_adaptation(emu: Emulator, work: Path):
    """The default adaptation on both platforms from the same weights; selection and accuracy compared."""
    from microtrain.adapt import DEFAULT_MODEL
    from microtrain.checkpoint import backbone_file

    base = backbone_file(DEFAULT_MODEL)  # on the host, before either run: the same weights for both
    outs = {}
    for platform_name, command, env in (("host", host_command, None), ("aarch64", emu.command, emu.env())):
        outs[platform_name] = work / f"adapt-{platform_name}"
        run(command("-m", "microtrain.adapt", *ADAPT_ARGS, "--model", DEFAULT_MODEL, "--quiet",
                    "--out", str(outs[platform_name])), env, f"adapt {platform_name}", work)
    facts, diffs = compare_adaptations(outs["host"], outs["aarch64"], base)
    if diffs:
        raise Mismatch("\n".join(diffs))
    yield from facts


def part_predict(emu: Emulator, work: Path):
    """predict.py with the host's classifier on both platforms; the predictions compared."""
    # HOOK for issue 11: runs `python -m microtrain.predict CLASSIFIER IMAGES --json` on both
    # platforms, with the classifier the host's adaptation wrote, once microtrain/predict.py exists.
    if not (REPO / "microtrain" / "predict.py").is_file():
        raise NotRun("microtrain/predict.py is not in this checkout yet (issue 11); this hook runs it once it is")
    host_out = work / "adapt-host"
    classifier = host_out / "classifier.npz"
    if not (host_out / "report.json").is_file():
        raise Mismatch(f"no adaptation outputs in {work}: the adaptation part failed or did not run")
    if not classifier.is_file():
        raise Mismatch(f"microtrain.predict exists but the adaptation wrote no {classifier.name} in {host_out}: "
                       "update tools/arm_check.py to the classifier's file name")
    images = predict_images(json.loads((host_out / "report.json").read_text()), work)
    results = {}
    for platform_name, command, env in (("host", host_command, None), ("aarch64", emu.command, emu.env())):
        out = run(command("-m", "microtrain.predict", str(classifier), str(images), "--json"), env,
                  f"predict {platform_name}", work)
        results[platform_name] = parse_json_output(out, "predict")
    diffs = json_differences(results["host"], results["aarch64"], "predict")
    if diffs:
        raise Mismatch("\n".join(diffs))
    count = sum(1 for _ in images.rglob("*") if _.is_file())
    yield f"the same output for {count} images on both (scores within {WEIGHT_ATOL:g})"


PARTS = {"kernels": part_kernels, "bits": part_bits, "adaptation": part_adaptation, "predict": part_predict}

if __name__ == "__main__":
    sys.exit(main())
