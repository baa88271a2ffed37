"""What a sweep will ask for, before it starts: trials per experiment, the resources a trial asks for, and how
many trials fit the cluster at once (`--dry-run` prints it all)."""

from __future__ import annotations

import math
import os

from flatray.config import RunConfig
from flatray.config.sweep import SearchSettings, SweepFile
from flatray.sweep.graph import first_point, grid_keys, order, validate_run

TRIAL_CPU = 1  # the Tune trial itself: it only drives its Ray Train run


def plan(sweep: SweepFile) -> dict[str, int]:
    """Trials per experiment, known before running (feed: best counts the groups of the parent's grid)."""
    grids: dict[str, dict] = {}
    counts: dict[str, int] = {}
    for name in order(sweep.experiments):
        exp = sweep.experiments[name]
        search = exp.search or SearchSettings()
        own = {k: search.space[k][next(iter(search.space[k]))] for k in grid_keys(exp)}
        rest = [k for k in search.space if k not in own]
        per_parent = math.prod(len(v) for v in own.values()) * (search.num_samples if rest else 1)
        grids[name] = {**(grids[exp.parent] if exp.parent else {}), **own}
        if not exp.parent:
            counts[name] = per_parent
            continue
        parent = sweep.experiments[exp.parent]
        fed = counts[exp.parent]
        if parent.method.chained and exp.parent_levels:
            fed = fed // parent.levels * len(exp.parent_levels)
        if exp.feed == "best":
            fed = math.prod(len(grids[exp.parent].get(k, [None])) for k in exp.group_by)
        counts[name] = fed * per_parent * (exp.levels if exp.method.chained else 1)
    return counts


def first_config(sweep: SweepFile, name: str) -> RunConfig:
    """The run config of an experiment's first search point: what its trials look like before running."""
    exp = sweep.experiments[name]
    return validate_run(sweep, name, first_point(exp.search.space if exp.search else {}))


def trial_resources(cfg: RunConfig) -> dict[str, float]:
    per = dict(cfg.scaling.resources_per_worker or {"CPU": 1, **({"GPU": 1} if cfg.scaling.use_gpu else {})})
    need = {k: v * cfg.scaling.num_workers for k, v in per.items()}
    need["CPU"] = need.get("CPU", 0) + TRIAL_CPU
    return need


def print_plan(sweep: SweepFile, root: str, offered: dict[str, float], where: str) -> None:
    counts = plan(sweep)
    print(f"sweep {sweep.name}: {sum(counts.values())} trials planned, outputs in {root}")
    print("experiment graph (trials; what each trial asks for):")

    def show(name: str, depth: int) -> None:
        exp = sweep.experiments[name]
        cfg = first_config(sweep, name)
        need = ", ".join(f"{v:g} {k}" for k, v in trial_resources(cfg).items())
        how = []
        if exp.search and exp.search.space:
            how.append(f"{exp.search.algorithm} over {', '.join(exp.search.space)}")
        if exp.parent:
            how.append(f"feed {exp.feed}" + (f" by {', '.join(exp.group_by)}" if exp.group_by else "")
                       + (f" at levels {exp.parent_levels}" if exp.parent_levels else ""))
        if exp.method.chained:
            how.append(f"{exp.levels} levels x {exp.sparsity_step:g}")
        print(f"  {'  ' * depth}{name} [{exp.kind}] {counts[name]} trial(s); {cfg.model} on {cfg.task}; "
              f"{'; '.join(how) or 'single run'}; asks {need}")
        for child in [n for n, e in sweep.experiments.items() if e.parent == name]:
            show(child, depth + 1)

    for name in [n for n, e in sweep.experiments.items() if not e.parent]:
        show(name, 0)
    print(f"{where} offers: " + ", ".join(f"{v:g} {k}" for k, v in sorted(offered.items())
                                          if k in ("CPU", "GPU", "memory") or not k.startswith("node")))



def local_cpus(sweep: SweepFile) -> int:
    """Local Ray's CPU count: the machine's, but at least two of the largest trial at once (oversubscribed on a
    small machine: each worker runs one thread), so that independent trials overlap."""
    biggest = max(trial_resources(first_config(sweep, n)).get("CPU", 1) for n in sweep.experiments)
    return max(os.cpu_count() or 1, int(math.ceil(2 * biggest)))


def max_concurrent(sweep: SweepFile, offered: dict[str, float]) -> int:
    """How many trials fit at once: Tune only sees the trial's own CPU, so it must not start trials whose Train
    workers could never get their resources (a deadlock)."""
    needs = [trial_resources(first_config(sweep, n)) for n in sweep.experiments]
    fits = [min(int(offered.get(k, 0) // v) for k, v in need.items() if v) for need in needs]
    return max(1, min(fits))
