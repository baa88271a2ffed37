"""`python -m flatray.sweep SWEEP.yaml [--dry-run] [--resume] [--address] [--storage] [--max-concurrent] [--set]`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

from flatray import storage
from flatray.config import ConfigError
from flatray.sweep import graph
from flatray.sweep.plan import first_config, local_cpus, max_concurrent, print_plan
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
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    args = parser.parse_args(argv)

    from flatray import data, models

    try:
        sets = list(args.set) + ([f"storage={args.storage}"] if args.storage else [])
        sweep = graph.load(args.sweep_file, sets)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # A missing model or an unreachable hub dataset fails here, not in a trial (each one checked once).
    checks = {}
    for name in sweep.experiments:
        cfg = first_config(sweep, name)
        if "model" not in sweep.experiments[name].method.needs:  # the others load their parent's model
            checks.setdefault(("model", cfg.model), (name, partial(models.resolve, cfg.model)))
        if cfg.data.source == "hub":
            checks.setdefault(("data", cfg.task, cfg.data.path),
                              (name, partial(data.check_hub, data.TASKS[cfg.task], cfg.data.path)))
    for name, check in checks.values():
        try:
            check()
        except (models.ModelNotFound, data.DataError) as err:
            if not args.dry_run:
                print(f"error: experiment {name!r}: {err}", file=sys.stderr)
                return 2
            print(f"warning: experiment {name!r}: {str(err).splitlines()[0]} (a real run would stop here)")
    root = root_of(sweep)
    if args.dry_run:
        if args.address:
            import ray

            ray.init(address=args.address)
            offered, where = ray.cluster_resources(), f"the cluster at {args.address}"
        else:
            import torch

            # What run() would give a local Ray (more CPUs than cores: each worker runs one thread).
            offered = {"CPU": float(local_cpus(sweep)), "GPU": float(torch.cuda.device_count())}
            where = f"local Ray on this machine ({os.cpu_count()} cores)"
        print_plan(sweep, root, offered, where)
        print(f"at most {max_concurrent(sweep, offered)} trial(s) at once" if not args.max_concurrent
              else f"at most {args.max_concurrent} trial(s) at once (--max-concurrent)")
        return 0

    text = Path(args.sweep_file).read_text() + "".join(f"# --set {s}\n" for s in sets)
    started = time.time()
    try:
        outcomes = run(sweep, text, args.address, args.max_concurrent, args.resume)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\n[flatray] sweep {sweep.name} finished in {time.time() - started:.0f} s\n")
    print(results_table(outcomes, graph.order(sweep.experiments)))
    wandb_dir = storage.join(root, "wandb")
    print(f"\ntrial folders: {root}/<trial id>/ (docs/SWEEPS.md)")
    if Path(wandb_dir).is_dir():
        print(f"W&B runs: {wandb_dir}  (offline runs upload, parents first, with: "
              f"python -m flatray.tracking sync {wandb_dir})")
    if not args.no_report:
        try:
            from flatray import report

            print(f"report: {report.report(root, sweep.wandb)}")
        except Exception as err:  # a report problem never hides the sweep's results
            print(f"warning: report failed: {err}", file=sys.stderr)
    failed = [s for _, s in outcomes.values() if s.get("status") == "failed"]
    if failed:
        print(f"{len(failed)} trial(s) failed; see summary.json in their folders", file=sys.stderr)
    return 1 if failed else 0
