"""`python -m flatray.sweep SWEEP.yaml [--dry-run] [--resume] [--address] [--storage] [--max-concurrent] [--set]`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from flatray import storage
from flatray.config import ConfigError
from flatray.sweep import graph, preflight
from flatray.sweep.lock import SweepLock
from flatray.sweep.plan import capacity, concurrency, local_cpus, print_plan
from flatray.sweep.tune import root_of, run


def results_table(outcomes, order):
    from flatray.sweep.status import results_table as table  # status imports Ray Tune

    return table(outcomes, order)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flatray.sweep",
        description="Run a sweep file as Ray Tune trials: searched fine-tuning runs (Optuna/random/grid, ASHA) and "
                    "the runs that depend on them (IMP levels, ticket transfers, CoFi, PTQ, SQuAT, sharpness), each a "
                    "Ray Train + DeepSpeed run, tracked in W&B. Outputs go to <storage>/<sweep name>/<trial id>/ "
                    "(docs/SWEEPS.md). Re-running a sweep skips its finished trials.",
        epilog="example: python -m flatray.sweep sweeps/smoke.yaml --dry-run",
    )
    parser.add_argument("sweep_file", help="sweep YAML (see sweeps/ and docs/SWEEPS.md)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the experiment graph, trials per experiment, the resources a trial asks for and "
                             "what the cluster offers; start nothing")
    parser.add_argument("--resume", action="store_true",
                        help="continue the sweep in its storage folder even if the sweep file changed (finished "
                             "trials whose ids are unchanged are kept; interrupted ones continue from their checkpoint)")
    parser.add_argument("--address", help="Ray cluster address, e.g. auto on a `ray up` cluster (default: local Ray)")
    parser.add_argument("--storage", help="override the sweep's storage: a local folder or s3:// / gs:// URI")
    parser.add_argument("--max-concurrent", type=int, metavar="N",
                        help="at most N trials at once (default: as many as the cluster's resources hold)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the sweep file, e.g. --set defaults.train.epochs=1 (repeatable)")
    parser.add_argument("--rerun-other-versions", action="store_true",
                        help="run again the finished trials made by another flatray version, git commit or library "
                             "version (they are listed otherwise, and kept)")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    args = parser.parse_args(argv)

    try:
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent: got {args.max_concurrent}; expected at least 1")
        sets = list(args.set) + ([f"storage={args.storage}"] if args.storage else [])
        sweep = graph.load(args.sweep_file, sets)
        # An unwritable storage, a missing model or an unknown hub id fails here, not in a trial after Ray started.
        warnings = preflight.check(sweep, dry_run=args.dry_run)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in warnings:
        print(f"warning: {line}")
    root = root_of(sweep)
    if args.dry_run:
        if args.address:
            import ray

            ray.init(address=args.address)
            offered, where, _ = capacity()  # an autoscaling cluster at its largest, else what it has now
        else:
            import torch

            # What run() would give a local Ray (more CPUs than cores: each worker runs one thread).
            offered = {"CPU": float(local_cpus(sweep)), "GPU": float(torch.cuda.device_count())}
            where = f"local Ray on this machine ({os.cpu_count()} cores)"
        print_plan(sweep, root, offered, where)
        limit, why = concurrency(sweep, args.max_concurrent, offered, where)
        print(f"at most {limit} trial(s) at once ({why})")
        return 0

    text = Path(args.sweep_file).read_text() + "".join(f"# --set {s}\n" for s in sets)
    started = time.time()
    try:
        with SweepLock(root):  # one driver per sweep folder: a second one would train every trial again
            outcomes = run(sweep, text, args.address, args.max_concurrent, args.resume,
                           rerun_other_versions=args.rerun_other_versions)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\n[flatray] sweep {sweep.name} finished in {time.time() - started:.0f} s\n")
    print(results_table(outcomes, graph.order(sweep.experiments)))
    wandb_dir = storage.local_dir(root) / "wandb"
    print(f"\ntrial folders: {root}/<trial id>/ (docs/SWEEPS.md)")
    if wandb_dir.is_dir():
        print(f"W&B runs: {wandb_dir}  (offline runs upload, parents first, with: "
              f"python -m flatray.tracking sync {wandb_dir})")
    if not args.no_report:
        try:
            from flatray import report

            out = report.report(root, sweep.wandb)
            print(f"report: {out}" + (f" (and {storage.join(root, 'report')})" if "://" in root else ""))
        except Exception as err:  # a report problem never hides the sweep's results
            print(f"warning: report failed: {err}", file=sys.stderr)
    failed = [s for _, s in outcomes.values() if s.get("status") == "failed"]
    if failed:
        print(f"{len(failed)} trial(s) failed; see summary.json in their folders", file=sys.stderr)
    return 1 if failed else 0
