#!/usr/bin/env python
"""Convert a backbone checkpoint into microtrain's weight file (format: weights/README.md).

    python tools/convert_ckpt.py IN [-o OUT] [--config NET_CONFIG_JSON] [--bn-eps EPS]
                                    [--state-dict-key KEY] [--prefix PREFIX]
    python tools/convert_ckpt.py --all [-o FOLDER]

IN is an int8-dict checkpoint (tiny-training's mcu_models) or a float PyTorch state_dict of the
MCUNet / once-for-all family (then --config, the network's net-config JSON, gives the strides),
bare or as training code saves it: inside a dict ({'model': sd, 'epoch': 5}, {'state_dict': sd,
...}) and with its keys under one prefix ('module.', 'model.'). When a file holds several
state_dicts or key prefixes, the error lists them; --state-dict-key and --prefix pick one.
OUT defaults to <stem of IN>.npz in the user cache (microtrain.paths.weights_dir():
$MICROTRAIN_HOME/weights, default ~/.cache/microtrain/weights). --all converts the three shared
backbones (../shared/checkpoints, or $MICROTRAIN_SHARED) into that folder (or FOLDER).
Torch is not needed. Bad input: a one-line error on stderr, exit status 2, no output file.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package, as the other tools

from microtrain.checkpoint import SHARED_CHECKPOINTS, CheckpointError, read_checkpoint, save_weights
from microtrain.paths import MissingSharedError, shared_file, weights_dir

PROG = "convert_ckpt"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of this tool
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _convert(src: Path, out: Path, config, bn_eps, state_dict_key=None, prefix=None) -> str:
    start = time.perf_counter()
    arch, arrays = read_checkpoint(src, config=config, bn_eps=bn_eps, state_dict_key=state_dict_key,
                                   prefix=prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(out, arch, arrays)
    convs = [k for k in arrays if k.endswith(".weight") and not k.startswith("classifier.")]
    return (f"{src} -> {out}: {arch['source']['kind']}, {len(arch['blocks'])} blocks, {len(convs)} convs, "
            f"{sum(arrays[k].size for k in convs):,} conv weights ({time.perf_counter() - start:.2f} s)")


def main(argv=None) -> int:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0],
                     epilog="Exit status: 0 converted, 2 bad input or usage.")
    parser.add_argument("input", nargs="?", type=Path, help="checkpoint to convert")
    parser.add_argument("-o", "--output", type=Path,
                        help="output .npz (default <stem>.npz in the user cache, paths.weights_dir()); with --all, the output folder")
    parser.add_argument("--config", type=Path, help="net-config JSON of a float state_dict (strides, shortcuts)")
    parser.add_argument("--bn-eps", type=float, default=None,
                        help="BatchNorm eps for folding (default: the config's bn.eps, else 1e-3)")
    parser.add_argument("--state-dict-key", metavar="KEY",
                        help="where the state_dict is in a checkpoint holding several, e.g. state_dict_ema "
                             "or model/state_dict (nested keys joined by /)")
    parser.add_argument("--prefix", help="keep the state_dict keys under this prefix (e.g. 'student.'; '' for "
                                         "keys without one) and remove it")
    parser.add_argument("--all", action="store_true", help=f"convert the shared {', '.join(SHARED_CHECKPOINTS)}")
    args = parser.parse_args(argv)
    if args.all == (args.input is not None):
        parser.error("give either one checkpoint IN or --all")
    for flag in ("config", "state_dict_key", "prefix"):
        if args.all and getattr(args, flag) is not None:
            parser.error(f"--{flag.replace('_', '-')} applies to one float checkpoint, not to --all")
    try:
        if args.all:
            folder = args.output if args.output is not None else weights_dir()
            jobs = [(shared_file("checkpoints", f"{name}.pkl"), folder / f"{name}.npz") for name in SHARED_CHECKPOINTS]
        else:
            out = args.output if args.output is not None else weights_dir() / f"{args.input.stem}.npz"
            jobs = [(args.input, out)]
        for src, out in jobs:
            print(_convert(src, out, args.config, args.bn_eps, args.state_dict_key, args.prefix))
    except (CheckpointError, MissingSharedError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an output folder that cannot be written
        print(f"{PROG}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
