"""External checkpoint layouts mapped to microtrain's layer names (``weights/README.md``).

Two layouts, both already unpickled by ``torch_archive.py``:

- ``int8-dict``: tiny-training's MCU models (../shared/checkpoints/README.md): dicts and NumPy
  arrays, no tensor storage. Dequantised in float64, then cast to float32:
  ``W = W_q * w_scale``, ``b = b_q * w_scale * x_scale``.
- ``torch-state-dict``: float checkpoints of the MCUNet / once-for-all family, a state_dict,
  conv (bias=False) + BatchNorm per layer, keys ``blocks.{i}.mobile_inverted_conv.*`` (model zoo)
  or ``blocks.{i}.conv.*`` (tiny-training). BatchNorm is folded into the conv. Strides and
  shortcuts are not in a state_dict: they come from the network's net-config JSON (``config``),
  which must agree with the weights on everything else.

``from_int8_dict`` and ``from_state_dict`` return the parsed layers; ``assemble`` turns them into
``(arch, arrays)``, checked against the weight format.
"""
from __future__ import annotations

import math
import re

import numpy as np

from .checks import (CheckpointError, check_keys, expect_shape, numeric_array, pos_int, raise_keys,
                     square_kernel)
from .weight_format import check_arrays

DEFAULT_BN_EPS = 1e-3  # the MCUNet / once-for-all zoo's BatchNorm eps when the config names none
DEFAULT_RESOLUTION = 128  # the project's input size, used when a checkpoint does not say
ACTIVATION = "relu6"  # the model's fixed activation; a config asking for another is refused


def assemble(name, resolution, in_channels, first, blocks, feature_mix, classifier, source):
    """Arch dict + arrays from parsed layers: ``first = (w, b, stride)``; each block a dict with
    ``expand`` ((w, b) or None), ``depthwise``, ``project`` ((w, b)), ``stride``, ``residual``."""
    arrays: dict[str, np.ndarray] = {}

    def put(key, wb):
        arrays[f"{key}.weight"] = np.ascontiguousarray(wb[0], dtype=np.float32)
        arrays[f"{key}.bias"] = np.ascontiguousarray(wb[1], dtype=np.float32)

    put("first_conv", first[:2])
    arch_blocks = []
    for i, b in enumerate(blocks):
        if b["expand"] is not None:
            put(f"blocks.{i}.expand", b["expand"])
        put(f"blocks.{i}.depthwise", b["depthwise"])
        put(f"blocks.{i}.project", b["project"])
        arch_blocks.append({
            "expand": None if b["expand"] is None else int(b["expand"][0].shape[0]),
            "kernel": int(b["depthwise"][0].shape[-1]),
            "stride": int(b["stride"]),
            "out": int(b["project"][0].shape[0]),
            "residual": bool(b["residual"]),
        })
    if feature_mix is not None:
        put("feature_mix", feature_mix)
    if classifier is not None:
        put("classifier", classifier)
    arch = {
        "name": name,
        "resolution": int(resolution),
        "in_channels": int(in_channels),
        "first_conv": {"out": int(first[0].shape[0]), "kernel": int(first[0].shape[-1]), "stride": int(first[2])},
        "blocks": arch_blocks,
        "feature_mix": None if feature_mix is None else {"out": int(feature_mix[0].shape[0])},
        "source": source,
    }
    check_arrays(arch, arrays)
    return arch, arrays


# ---------------------------------------------------------------------------------------------
# int8-dict checkpoints (tiny-training's MCU models)
# ---------------------------------------------------------------------------------------------

_INT8_CONV = ("in_channel", "out_channel", "kernel_size", "stride", "groups", "params")
_INT8_CONV_OPTIONAL = ("in_shape", "out_shape", "depthwise", "act")
_INT8_PARAMS = ("weight", "bias", "w_scales", "x_scale", "x_zero", "y_scale", "y_zero")


def _int8_conv(conv, where: str, in_channels: int, kind: str):
    """Dequantised (w, b, stride) of one conv dict; ``kind`` is 'conv', 'pointwise' or 'depthwise'."""
    check_keys(conv, _INT8_CONV, _INT8_CONV_OPTIONAL, where)
    if conv.get("act") is not None:
        raise CheckpointError(f"'{where}.act' = {conv['act']!r:.40}: unsupported (activations are fixed ReLU6)")
    params = conv["params"]
    check_keys(params, _INT8_PARAMS, (), f"{where}.params")
    wq = numeric_array(params["weight"], f"{where}.params.weight")
    out = pos_int(conv["out_channel"], f"{where}.out_channel")
    if pos_int(conv["in_channel"], f"{where}.in_channel") != in_channels:
        raise CheckpointError(f"'{where}.in_channel' = {conv['in_channel']}, but the previous layer gives {in_channels} channels")
    k = square_kernel(conv["kernel_size"], f"{where}.kernel_size")
    groups = pos_int(conv["groups"], f"{where}.groups")
    if kind == "depthwise":
        if groups != in_channels or out != in_channels:
            raise CheckpointError(f"'{where}' is not depthwise: groups {groups}, {in_channels} -> {out} channels")
        expect_shape(wq, (out, 1, k, k), f"{where}.params.weight")
    else:
        if groups != 1:
            raise CheckpointError(f"'{where}.groups' = {groups}: grouped convs are not supported")
        if kind == "pointwise" and k != 1:
            raise CheckpointError(f"'{where}.kernel_size' = {conv['kernel_size']}: expected a 1x1 conv")
        expect_shape(wq, (out, in_channels, k, k), f"{where}.params.weight")
    if wq.dtype.kind not in "iu":
        raise CheckpointError(f"'{where}.params.weight' is {wq.dtype}, expected int8")
    bq = numeric_array(params["bias"], f"{where}.params.bias")
    scales = numeric_array(params["w_scales"], f"{where}.params.w_scales")
    expect_shape(bq, (out,), f"{where}.params.bias")
    expect_shape(scales, (out,), f"{where}.params.w_scales")
    x_scale = params["x_scale"]
    if not isinstance(x_scale, (int, float, np.floating)) or not math.isfinite(x_scale) or x_scale <= 0:
        raise CheckpointError(f"'{where}.params.x_scale' = {x_scale!r:.40} is not a positive number")
    if not np.isfinite(scales).all():
        raise CheckpointError(f"'{where}.params.w_scales' holds non-finite values")
    # float64 first: biases saturated at +-2^31 meet w_scales ~ 4e-9 (README pitfall)
    s = scales.astype(np.float64)
    w = (wq.astype(np.float64) * s[:, None, None, None]).astype(np.float32)
    b = (bq.astype(np.float64) * s * float(x_scale)).astype(np.float32)
    stride = pos_int(conv["stride"], f"{where}.stride")
    if kind == "pointwise" and stride != 1:
        raise CheckpointError(f"'{where}.stride' = {stride}: a 1x1 conv must have stride 1")
    return w, b, stride


def from_int8_dict(ck: dict):
    """The parsed layers of a tiny-training int8 dict (``assemble``'s arguments after the name),
    dequantised to float32."""
    check_keys(ck, ("first_conv", "blocks"), ("feature_mix", "classifier"), "")
    fc = ck["first_conv"]
    if not isinstance(fc, dict):
        raise CheckpointError("'first_conv' is not a conv dict")
    in_channels = pos_int(fc.get("in_channel"), "first_conv.in_channel")
    resolution = pos_int(fc.get("in_shape", DEFAULT_RESOLUTION), "first_conv.in_shape")
    first = _int8_conv(fc, "first_conv", in_channels, "conv")
    c = first[0].shape[0]
    if not isinstance(ck["blocks"], list) or not ck["blocks"]:
        raise CheckpointError("'blocks' is not a non-empty list")
    blocks = []
    for i, blk in enumerate(ck["blocks"]):
        where = f"blocks.{i}"
        check_keys(blk, ("depthwise", "pointwise2"), ("pointwise1", "residual", "se"), where)
        if blk.get("se") is not None:
            raise CheckpointError(f"'{where}.se': squeeze-and-excitation is not supported")
        expand = None
        hidden = c
        if blk.get("pointwise1") is not None:
            expand = _int8_conv(blk["pointwise1"], f"{where}.pointwise1", c, "pointwise")[:2]
            hidden = expand[0].shape[0]
        dw = _int8_conv(blk["depthwise"], f"{where}.depthwise", hidden, "depthwise")
        project = _int8_conv(blk["pointwise2"], f"{where}.pointwise2", hidden, "pointwise")[:2]
        residual = blk.get("residual") is not None
        out = project[0].shape[0]
        if residual and (dw[2] != 1 or out != c):
            raise CheckpointError(f"'{where}.residual' on a block with stride {dw[2]} and {c} -> {out} channels")
        blocks.append({"expand": expand, "depthwise": dw[:2], "project": project, "stride": dw[2], "residual": residual})
        c = out
    feature_mix = None
    if ck.get("feature_mix") is not None:
        feature_mix = _int8_conv(ck["feature_mix"], "feature_mix", c, "pointwise")[:2]
        c = feature_mix[0].shape[0]
    classifier = None
    if ck.get("classifier") is not None:
        w, b, _ = _int8_conv(ck["classifier"], "classifier", c, "pointwise")
        classifier = (w.reshape(w.shape[0], c), b)
    return resolution, in_channels, first, blocks, feature_mix, classifier


# ---------------------------------------------------------------------------------------------
# Float state_dicts of the MCUNet / once-for-all family
# ---------------------------------------------------------------------------------------------

_BN = ("weight", "bias", "running_mean", "running_var")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.([A-Za-z_]+)\.")
_BLOCK_WORDS = ("mobile_inverted_conv", "conv")  # model zoo, tiny-training


def _fold(sd, prefix: str, eps: float, shape: tuple):
    """(w, b) of the conv at ``prefix`` with its BatchNorm folded in (float64, then float32)."""
    w = numeric_array(sd[f"{prefix}.conv.weight"], f"{prefix}.conv.weight")
    expect_shape(w, shape, f"{prefix}.conv.weight")
    out = w.shape[0]
    bn = {}
    for part in _BN:
        key = f"{prefix}.bn.{part}"
        bn[part] = numeric_array(sd[key], key).astype(np.float64)
        expect_shape(bn[part], (out,), key)
    conv_bias = np.zeros(out)
    if f"{prefix}.conv.bias" in sd:
        conv_bias = numeric_array(sd[f"{prefix}.conv.bias"], f"{prefix}.conv.bias").astype(np.float64)
        expect_shape(conv_bias, (out,), f"{prefix}.conv.bias")
    if (bn["running_var"] < 0).any():
        raise CheckpointError(f"'{prefix}.bn.running_var' holds negative values")
    scale = bn["weight"] / np.sqrt(bn["running_var"] + eps)
    wf = (w.astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
    bf = ((conv_bias - bn["running_mean"]) * scale + bn["bias"]).astype(np.float32)
    return wf, bf


def _state_dict_layers(sd: dict):
    """Key layout of a state_dict (key prefixes such as DataParallel's 'module.' already removed
    by ``checkpoint.strip_key_prefix``): (the state_dict, block word, number of blocks, which
    blocks expand, whether there is a feature-mix layer, whether there is a classifier). Unknown
    or missing keys raise, naming them."""
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"state_dict key {bad[0]!r:.40} is not a string")
    found = {(int(m.group(1)), m.group(2)) for m in map(_BLOCK_KEY.match, sd) if m}
    words = {w for _, w in found if w in _BLOCK_WORDS}
    if len(words) > 1:
        raise CheckpointError("state_dict mixes the 'blocks.N.mobile_inverted_conv.' and 'blocks.N.conv.' key layouts")
    if not words:
        raise CheckpointError("state_dict has no 'blocks.N.mobile_inverted_conv.*' or 'blocks.N.conv.*' keys: "
                              "not an MCUNet / once-for-all network")
    word = words.pop()
    n_blocks = 1 + max(i for i, w in found if w == word)
    expands = [any(k.startswith(f"blocks.{i}.{word}.inverted_bottleneck.") for k in sd) for i in range(n_blocks)]
    has_mix = any(k.startswith("feature_mix_layer.") for k in sd)
    has_classifier = any(k.startswith("classifier.") for k in sd)

    prefixes = ["first_conv"]
    for i in range(n_blocks):
        if expands[i]:
            prefixes.append(f"blocks.{i}.{word}.inverted_bottleneck")
        prefixes += [f"blocks.{i}.{word}.depth_conv", f"blocks.{i}.{word}.point_linear"]
    if has_mix:
        prefixes.append("feature_mix_layer")
    required = [f"{p}.conv.weight" for p in prefixes] + [f"{p}.bn.{part}" for p in prefixes for part in _BN]
    optional = {f"{p}.bn.num_batches_tracked" for p in prefixes} | {f"{p}.conv.bias" for p in prefixes}
    if has_classifier:
        required += ["classifier.linear.weight", "classifier.linear.bias"]
    required_set = set(required)
    raise_keys([k for k in required if k not in sd],
                [k for k in sd if k not in required_set and k not in optional])
    return sd, word, n_blocks, expands, has_mix, has_classifier


def _config_block(cfg_blocks, i: int):
    blk = cfg_blocks[i]
    if not isinstance(blk, dict):
        raise CheckpointError(f"config: 'blocks.{i}' is not an object")
    conv = blk.get("mobile_inverted_conv", blk.get("conv"))
    if not isinstance(conv, dict):
        raise CheckpointError(f"config: 'blocks.{i}' has no 'mobile_inverted_conv' (or 'conv') object")
    if conv.get("name", "MBInvertedConvLayer") != "MBInvertedConvLayer":
        raise CheckpointError(f"config: 'blocks.{i}' is a {conv.get('name')!r:.40}, only MBInvertedConvLayer is supported")
    if conv.get("use_se") or conv.get("no_dw"):
        raise CheckpointError(f"config: 'blocks.{i}': use_se / no_dw are not supported")
    shortcut = blk.get("shortcut")
    if shortcut is not None and (not isinstance(shortcut, dict) or shortcut.get("name") != "IdentityLayer"):
        raise CheckpointError(f"config: 'blocks.{i}.shortcut' must be null or an IdentityLayer")
    return conv, shortcut is not None


def _check_act(layer: dict, key: str) -> None:
    act = layer.get("act_func", ACTIVATION)
    if act != ACTIVATION:
        raise CheckpointError(f"config: '{key}.act_func' = {act!r:.40}; microtrain's networks use {ACTIVATION}")


def _check_config_value(layer: dict, field: str, actual, key: str) -> None:
    """A config field that the weights also determine must agree with them."""
    if field in layer and layer[field] is not None:
        given = layer[field]
        if field == "kernel_size":
            given = square_kernel(given, f"config {key}.kernel_size")
        if given != actual:
            raise CheckpointError(f"config: '{key}.{field}' = {layer[field]!r:.40}, but the weights give {actual}")


def from_state_dict(sd: dict, config, bn_eps):
    """The parsed layers of a zoo / tiny-training float state_dict (``assemble``'s arguments after
    the name), BatchNorm folded with ``bn_eps`` (None: the config's, else 1e-3); ``config`` (the
    net-config dict) gives the strides and shortcuts and must agree with the weights."""
    sd, word, n_blocks, expands, has_mix, has_classifier = _state_dict_layers(sd)
    if config is not None and not isinstance(config, dict):
        raise CheckpointError("config: the net-config JSON must be an object")
    if bn_eps is None:
        bn_eps = DEFAULT_BN_EPS
        if config is not None and isinstance(config.get("bn"), dict) and config["bn"].get("eps") is not None:
            bn_eps = config["bn"]["eps"]
    if not isinstance(bn_eps, (int, float)) or not bn_eps >= 0:
        raise CheckpointError(f"BatchNorm eps {bn_eps!r:.40} is not a non-negative number")

    # weights first: their shapes give channels and kernel sizes, and name keys in errors
    first_w = numeric_array(sd["first_conv.conv.weight"], "first_conv.conv.weight")
    expect_shape(first_w, (None, None, None, None), "first_conv.conv.weight")
    k = square_kernel(first_w.shape[2:], "first_conv.conv.weight kernel")
    in_channels = first_w.shape[1]
    first = _fold(sd, "first_conv", bn_eps, (None, in_channels, k, k))
    c = first[0].shape[0]
    parsed = []
    for i in range(n_blocks):
        pre = f"blocks.{i}.{word}"
        expand = None
        hidden = c
        if expands[i]:
            expand = _fold(sd, f"{pre}.inverted_bottleneck", bn_eps, (None, c, 1, 1))
            hidden = expand[0].shape[0]
        dw_w = numeric_array(sd[f"{pre}.depth_conv.conv.weight"], f"{pre}.depth_conv.conv.weight")
        expect_shape(dw_w, (hidden, 1, None, None), f"{pre}.depth_conv.conv.weight")
        kdw = square_kernel(dw_w.shape[2:], f"{pre}.depth_conv.conv.weight kernel")
        dw = _fold(sd, f"{pre}.depth_conv", bn_eps, (hidden, 1, kdw, kdw))
        project = _fold(sd, f"{pre}.point_linear", bn_eps, (None, hidden, 1, 1))
        parsed.append((c, expand, dw, project))
        c = project[0].shape[0]
    feature_mix = _fold(sd, "feature_mix_layer", bn_eps, (None, c, 1, 1)) if has_mix else None
    if feature_mix is not None:
        c = feature_mix[0].shape[0]
    classifier = None
    if has_classifier:
        w = numeric_array(sd["classifier.linear.weight"], "classifier.linear.weight")
        expect_shape(w, (None, c), "classifier.linear.weight")
        b = numeric_array(sd["classifier.linear.bias"], "classifier.linear.bias")
        expect_shape(b, (w.shape[0],), "classifier.linear.bias")
        classifier = (w.astype(np.float32), b.astype(np.float32))

    if config is None:
        raise CheckpointError("the strides of first_conv and of each block cannot be determined from a state_dict; "
                              "pass the network's net-config JSON (--config)")
    # the config gives strides and shortcuts, and must agree with the weights on the rest
    for key in ("first_conv", "blocks"):
        if key not in config:
            raise CheckpointError(f"config: missing key '{key}'")
    fc = config["first_conv"]
    if not isinstance(fc, dict):
        raise CheckpointError("config: 'first_conv' is not an object")
    _check_act(fc, "first_conv")
    _check_config_value(fc, "kernel_size", k, "first_conv")
    _check_config_value(fc, "in_channels", in_channels, "first_conv")
    _check_config_value(fc, "out_channels", first[0].shape[0], "first_conv")
    first = (*first, pos_int(fc.get("stride"), "config first_conv.stride"))
    cfg_blocks = config["blocks"]
    if not isinstance(cfg_blocks, list) or len(cfg_blocks) != n_blocks:
        n = len(cfg_blocks) if isinstance(cfg_blocks, list) else "no"
        raise CheckpointError(f"config has {n} blocks, the state_dict {n_blocks}")
    blocks = []
    for i, (cin, expand, dw, project) in enumerate(parsed):
        conv, residual = _config_block(cfg_blocks, i)
        key = f"blocks.{i}.mobile_inverted_conv"
        _check_act(conv, key)
        hidden = dw[0].shape[0]
        out = project[0].shape[0]
        _check_config_value(conv, "in_channels", cin, key)
        _check_config_value(conv, "out_channels", out, key)
        _check_config_value(conv, "kernel_size", dw[0].shape[-1], key)
        ratio = conv.get("expand_ratio")
        if ratio is not None and (ratio == 1) != (expand is None):
            raise CheckpointError(f"config: '{key}.expand_ratio' = {ratio}, but the state_dict "
                                  f"{'has no' if expand is None else 'has an'} inverted_bottleneck in block {i}")
        mid = conv.get("mid_channels")
        if mid is None and ratio not in (None, 1):
            mid = round(cin * ratio)
        if expand is not None and mid is not None and mid != hidden:
            raise CheckpointError(f"config: '{key}' expands to {mid} channels, the weights to {hidden}")
        stride = pos_int(conv.get("stride"), f"config {key}.stride")
        if residual and (stride != 1 or cin != out):
            raise CheckpointError(f"config: 'blocks.{i}.shortcut' on a block with stride {stride} and {cin} -> {out} channels")
        blocks.append({"expand": expand, "depthwise": dw, "project": project, "stride": stride, "residual": residual})
    if "feature_mix_layer" in config:
        mix = config["feature_mix_layer"]
        if (mix is not None) != has_mix:
            raise CheckpointError(f"config {'has a' if mix is not None else 'has no'} feature_mix_layer, the state_dict "
                                  f"{'has' if has_mix else 'has none'}")
        if mix is not None:
            if not isinstance(mix, dict):
                raise CheckpointError("config: 'feature_mix_layer' is not an object")
            _check_act(mix, "feature_mix_layer")
            _check_config_value(mix, "kernel_size", 1, "feature_mix_layer")
            _check_config_value(mix, "out_channels", feature_mix[0].shape[0], "feature_mix_layer")
    if classifier is not None and isinstance(config.get("classifier"), dict):
        _check_config_value(config["classifier"], "in_features", classifier[0].shape[1], "classifier")
        _check_config_value(config["classifier"], "out_features", classifier[0].shape[0], "classifier")
    resolution = pos_int(config.get("resolution", DEFAULT_RESOLUTION), "config resolution")
    return resolution, in_channels, first, blocks, feature_mix, classifier
