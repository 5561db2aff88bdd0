"""tools/bench.py's command line: bad options are argparse's one-line error (exit status 2)
before anything is measured."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "tools" / "bench.py"
_spec = importlib.util.spec_from_file_location("bench_cli_under_test", BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("argv, message", [
    (["step", "--batch", "x"], "bench.py step: error: argument --batch: takes comma-separated integers, got 'x'"),
    (["step", "--batch", "1,0"], "bench.py step: error: argument --batch: sizes must be >= 1, got '1,0'"),
    (["step", "--methods", "fulltrain,bogus"], "bench.py step: error: argument --methods: unknown bogus; choose from "
                                               "none, lastlayer, fulltrain, sparseupdate, tinytrain, "
                                               "tinytrain-plus"),
    (["step", "--backbones", "resnet"], "bench.py step: error: argument --backbones: unknown resnet; choose from "
                                        "mcunet-5fps, mbv2-w0.35, proxyless-w0.3"),
    (["--threads", "0", "step"], "bench.py: error: argument --threads: must be >= 1, got 0"),
    (["kernels", "--repeats", "0"], "bench.py kernels: error: argument --repeats: must be >= 1, got 0"),
    (["rss", "--runs", "x"], "bench.py rss: error: argument --runs: takes an integer, got 'x'"),
])
def test_bad_options_are_one_error_line_and_exit_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message


def test_good_options_are_parsed_into_their_values():
    args = bench.build_parser().parse_args(["step", "--batch", "100,25", "--backbones", "mbv2-w0.35"])
    assert args.batch == [1, 25, 100] and args.backbones == ["mbv2-w0.35"]  # batch 1: the per-image reference
    assert bench._step_methods(args.methods, args.batch) == ["fulltrain"]
    args = bench.build_parser().parse_args(["step", "--methods", "tinytrain,none"])
    assert args.batch == [1] and args.methods == ["none", "tinytrain"]  # STEP_METHODS order
    assert bench._step_methods(None, [1]) == list(bench.STEP_METHODS)


def test_the_script_exits_2_with_the_error_line():
    run = subprocess.run([sys.executable, str(BENCH), "step", "--batch", "x"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines()[-1].startswith("bench.py step: error: argument --batch:")
