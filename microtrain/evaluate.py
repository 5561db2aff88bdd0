"""Evaluate on-device training methods over many few-shot episodes: the paper's Table 1, Table 2
and Figure 1 on the shared data or your own.

    python -m microtrain.evaluate run [--protocol quick | paper] [--methods none,tinytrain]
                                      [--domains traffic_sign,omniglot] [--backbones mcunet-5fps]
                                      [--episodes 10 | --seeds 0-9]
                                      [--workers 2 | --scheduler tcp://HOST:8786] [--out runs/eval]
    python -m microtrain.evaluate report [--out runs/eval]
    python -m microtrain.evaluate estimate [--out runs/eval] [--domains 9 --episodes 200 --workers 1,8,64]

``--protocol`` picks a preset: ``quick`` (the default, for development: 10-way 5-shot episodes,
every method at batch 1, MCUNet-5fps) or ``paper`` (the paper's: Meta-Dataset episodes, the
meta-trained backbones, FullTrain and TinyTL at batch 100, the six methods of its Table 1). In
both, TinyTrain's MAC budget is 15% of FullTrain's backward MACs, as the paper's Table 2 implies.

``run`` adapts every (backbone, domain, episode seed, method) not finished in ``--out`` yet, one
record per task in ``OUT/episodes/<backbone>/<domain>/<method>/<seed>.json`` (written as each
task finishes: a rerun resumes, Ctrl-C keeps finished tasks), then writes the report. A task
that fails (training diverged, a budget that cannot be met, ...) is recorded with an ``error``
and the run goes on. Tasks run on ``--workers`` local processes (spawned, single-threaded:
N workers use N cores) or, with ``--scheduler``, on a Dask cluster (``pip install -e
'.[cluster]'``; see ``microtrain.cluster``). ``report`` (also run at the end of ``run``) rewrites
``OUT/results.json``, ``OUT/report.md`` and the figures from the episode files; ``estimate``
prints the mean seconds per task the records measured and a larger grid's wall time on N workers.

The grid itself is ``microtrain.evaluation``, the report ``microtrain.evaluation_report``. Bad
options: one line on stderr, exit status 2. Ctrl-C: exit status 130; SIGTERM: 143. Either ends the
worker processes; finished episodes are kept.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from functools import partial
from pathlib import Path

from .evaluation import (BACKBONES, DEFAULT_DOMAINS, DOMAINS, PAPER_METHODS, PROG, PROTOCOLS, GridError,
                         Terminated, add_settings_options, duration, execute, folder_settings, parse_seeds, plan_grid,
                         run_pool, settings_of, split_list)
from .paths import MissingSharedError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage + message
        """Bad options raise ``GridError`` (one line) instead of printing argparse's usage."""
        raise GridError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m microtrain.evaluate`` and its run/report/estimate commands."""
    from .methods import METHODS  # lazy: loads NumPy (see cmd_run)

    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=f"Options of each command: {PROG} COMMAND --help (COMMAND: run, report or estimate).\n"
                       "A run exits with status 0 also when some tasks failed: they are recorded, listed in\n"
                       "the report, and rerun by --retry-errors.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)  # the usage line lists every command
    r = sub.add_parser("run", help="adapt every (backbone, domain, episode, method), then write the report "
                                   "(the default command)",
                       description="Adapt every (backbone, domain, episode seed, method) not done yet in --out, "
                                   "one JSON per task, then write the report.")
    g = r.add_argument_group("what to evaluate")
    g.add_argument("--methods",
                   help=f"comma list from {', '.join(METHODS)} (default: quick protocol all, paper protocol "
                        f"{PROTOCOLS['paper']['methods']})")
    g.add_argument("--domains", default=",".join(DEFAULT_DOMAINS),
                   help="comma list of shared domains (" + ", ".join(DOMAINS) + ") or paths to a dataset "
                        "(class-per-folder directory, .zip of one, or .npz with x, y[, names]); a path is "
                        "named by its file stem. Default: the five target domains " + ",".join(DEFAULT_DOMAINS)
                        + " (tinyimagenet is an in-domain control, kept out of the averages)")
    g.add_argument("--backbones",
                   help=f"comma list of backbone names ({', '.join(BACKBONES)}: the shared ImageNet ones, converted "
                        "on first use, and their meta-trained versions, in weights/) or microtrain weight files "
                        f"(.npz, named by their stem). Default: quick protocol {PROTOCOLS['quick']['backbones']}, "
                        f"paper protocol {PROTOCOLS['paper']['backbones']}")
    seeds = g.add_mutually_exclusive_group()
    seeds.add_argument("--episodes", type=int, help="episodes per domain, seeds 0..N-1 (default 10)")
    seeds.add_argument("--seeds", help="episode seeds instead: 'a-b' (inclusive), or a comma list of seeds "
                                       "and ranges, e.g. 0-4,10")
    add_settings_options(r)
    g = r.add_argument_group("execution and output")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int,
                       help="local worker processes, one core each (default 2); 0 runs the tasks in this "
                            "process (debugging)")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="run the tasks on a Dask cluster instead: the scheduler's address (tcp://HOST:8786) or "
                            "the file `dask scheduler --scheduler-file` wrote (.json). Workers need microtrain "
                            "and the data and weight files at the same paths; records come back here")
    g.add_argument("--retry-errors", action="store_true",
                   help="also rerun tasks recorded with an error (by default every task with a file is done)")
    g.add_argument("--out", default="runs/eval", help="output folder (default %(default)s)")
    g.add_argument("--no-report", action="store_true", help="do not write the report at the end")

    rep = sub.add_parser("report", help="(re)write results.json, report.md and the figures from the episode files",
                         description="Read OUT/episodes/**.json and write OUT/results.json, OUT/report.md and "
                                     "OUT/figure1_<backbone>.png.")
    rep.add_argument("--out", default="runs/eval", help="the folder a run wrote (default %(default)s)")

    est = sub.add_parser("estimate", help="estimate a grid's wall time on N workers from the task times of a run",
                         description="Mean seconds per task of each (backbone, method) in OUT's records, and the wall "
                                     "time of a grid of --domains x --episodes with them on each number of --workers. "
                                     "Defaults: the paper's full comparison.")
    est.add_argument("--out", default="runs/eval", help="the folder a run wrote (default %(default)s)")
    est.add_argument("--backbones", default=None,
                     help="backbone keys of the records (default: those of OUT's protocol, "
                          f"{PROTOCOLS['paper']['backbones']} for a --protocol paper folder, else "
                          f"{','.join(BACKBONES[:3])})")
    est.add_argument("--methods", default=",".join(PAPER_METHODS), help="default: the paper's six, %(default)s")
    est.add_argument("--domains", type=int, default=9, help="domains in the grid (default %(default)s)")
    est.add_argument("--episodes", type=int, default=200, help="episodes per domain (default %(default)s)")
    est.add_argument("--workers", default="1,8,64", help="comma list of worker counts (default %(default)s)")
    return p


def parse_args(argv):
    """The parsed command line; ``run`` is assumed when no command is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "report", "estimate", "-h", "--help"):
        argv = ["run", *argv]  # run is the default command
    return build_parser().parse_args(argv)


def cmd_run(args, argv: list[str]) -> int:
    """``run``: plan the grid's missing tasks, run them (worker processes or a Dask cluster), write
    each record as it finishes and then the report; ``GridError`` on bad options."""
    # lazy: the report loads NumPy, and this module runs first in a spawned pool worker (evaluation)
    from .evaluation_report import write_report

    if args.seeds is not None:
        seeds = parse_seeds(args.seeds)
    else:
        n = 10 if args.episodes is None else args.episodes
        if n < 1:
            raise GridError("--episodes must be >= 1")
        seeds = list(range(n))
    workers = 2 if args.workers is None else args.workers
    if workers < 0:
        raise GridError("--workers must be >= 0")
    settings = settings_of(args)
    out = Path(args.out)
    tasks, skipped = plan_grid(out, split_list(args.methods, "methods"), split_list(args.domains, "domains"),
                               split_list(args.backbones, "backbones"), seeds, settings, args.retry_errors,
                               [PROG, *argv])
    n = {k: len({t[k] for t in tasks}) for k in ("backbone", "domain", "seed", "method")}
    where = (f" on the Dask cluster at {args.scheduler}" if args.scheduler else
             f" on {workers} worker process(es)" if workers else " in this process")
    print(f"{len(tasks) + skipped} tasks: {skipped} already in {out}, {len(tasks)} to run" + where
          + (f" ({n['backbone']} backbone(s) x {n['domain']} domain(s) x {n['seed']} episode(s) x "
             f"{n['method']} method(s))" if tasks else ""), flush=True)
    if tasks:
        start = time.perf_counter()
        if args.scheduler:
            from .cluster import run_on_cluster  # only with --scheduler: it needs dask, an optional extra

            finished, failed = execute(tasks, out, partial(run_on_cluster, address=args.scheduler))
        else:
            finished, failed = execute(tasks, out, partial(run_pool, workers=workers))
        print(f"finished {finished} task(s) in {duration(time.perf_counter() - start)}"
              + (f"; {failed} failed (recorded with an error; --retry-errors reruns them)" if failed else ""),
              flush=True)
    if not args.no_report:
        write_report(out)
    return 0


def cmd_estimate(args) -> int:
    """``estimate``: the wall time of a grid from the task seconds of the records in ``--out``."""
    # lazy: the report loads NumPy, and this module runs first in a spawned pool worker (evaluation)
    from .evaluation_report import estimate_wall_time, load_records

    workers = [int(w) for w in split_list(args.workers, "workers") if w.isdigit() and int(w) > 0]
    if len(workers) != len(split_list(args.workers, "workers")) or args.domains < 1 or args.episodes < 1:
        raise GridError("--workers must be a comma list of positive counts, --domains and --episodes >= 1")
    if not (Path(args.out) / "episodes").is_dir():
        raise GridError(f"{args.out}: no episodes/ folder (run `{PROG} run --out {args.out}` first)")
    backbones = args.backbones
    if backbones is None:  # a paper-protocol folder holds the meta-trained backbones' records only
        settings = folder_settings(Path(args.out))
        paper = settings is not None and settings["protocol"] == "paper"
        backbones = PROTOCOLS["paper"]["backbones"] if paper else ",".join(BACKBONES[:3])
    lines = estimate_wall_time(load_records(Path(args.out)), split_list(backbones, "backbones"),
                               split_list(args.methods, "methods"), args.domains, args.episodes, workers)
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    """The command line: 0 on success, 2 on bad input (one line on stderr), 130 on Ctrl-C, 143 on
    SIGTERM (finished records are kept)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        # lazy: these load NumPy, and this module runs first in a spawned pool worker (evaluation)
        from .adapt import UsageError
        from .checkpoint import CheckpointError
        from .data import DataError

        try:
            if args.command == "report":
                from .evaluation_report import write_report  # lazy: loads NumPy (see cmd_run)

                write_report(Path(args.out))
                return 0
            if args.command == "estimate":
                return cmd_estimate(args)
            return cmd_run(args, argv)
        except (UsageError, DataError, CheckpointError, MissingSharedError) as exc:
            raise GridError(str(exc)) from None
        except OSError as exc:  # e.g. an --out folder that cannot be written
            raise GridError(f"{exc.filename or args.out}: {exc.strerror or exc}") from None
    except GridError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished episodes are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: finished episodes are kept; rerun the same command to resume", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
