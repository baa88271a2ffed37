"""What a sweep will ask for, before it starts: trials per experiment, the resources a trial asks for, and how
many trials fit the cluster at once (`--dry-run` prints it all).

A trial holds two sets of resources: its Tune trial's CPU (the driver of its Ray Train run) and the placement group
Ray Train makes for its workers. Tune reserves only the first: had the trial reserved its workers' bundles too, its
Train run would wait for resources held for it, forever. How many trials run at once comes from the sweep
(`--max-concurrent`, else the sweep file's `max_concurrent`), else from what the cluster can grow to (an
autoscaling cluster at the max_workers of its node types), else from what it has now (a fixed or local cluster).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

from flatray.config import RunConfig
from flatray.config.sweep import SearchSettings, SweepFile
from flatray.sweep.graph import first_point, grid_keys, order, validate_run

TRIAL_CPU = 1  # the Tune trial itself: it only drives its Ray Train run


def plan(sweep: SweepFile) -> dict[str, int]:
    """Trials per experiment, known before running (feed: best and group count the groups of the parent's grid)."""
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
        if exp.feed in ("best", "group"):  # one per group
            fed = math.prod(len(grids[exp.parent].get(k, [None])) for k in exp.group_by)
        counts[name] = fed * per_parent * (exp.levels if exp.method.chained else 1)
    return counts


def first_config(sweep: SweepFile, name: str) -> RunConfig:
    """The run config of an experiment's first search point: what its trials look like before running."""
    exp = sweep.experiments[name]
    return validate_run(sweep, name, first_point(exp.search.space if exp.search else {}))


def worker_bundle(cfg: RunConfig) -> dict[str, float]:
    """One Ray Train worker's resources, as Ray Train's ScalingConfig asks for them (a GPU worker asks no CPU unless
    resources_per_worker says so)."""
    scaling = cfg.scaling
    if scaling.resources_per_worker is None:
        bundle = {"GPU": 1.0} if scaling.use_gpu else {"CPU": 1.0}
    else:
        bundle = {k: float(v) for k, v in scaling.resources_per_worker.items() if v}
    if scaling.use_gpu:
        bundle.setdefault("GPU", 1.0)
    return bundle


def trial_bundles(cfg: RunConfig) -> list[dict[str, float]]:
    """A trial's whole footprint: its driver (the Tune trial) and its Ray Train workers."""
    return [{"CPU": float(TRIAL_CPU)}] + [worker_bundle(cfg)] * cfg.scaling.num_workers


def trial_resources(cfg: RunConfig) -> dict[str, float]:
    need: dict[str, float] = {}
    for bundle in trial_bundles(cfg):
        for k, v in bundle.items():
            need[k] = need.get(k, 0) + v
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


def shown(resources: dict[str, float]) -> str:
    """CPU, GPU and custom resources (not memory, node ids, or what placement groups hold: <resource>_group_<id>)."""
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items())
                     if k not in ("memory", "object_store_memory") and not k.startswith("node:") and "_group_" not in k)


def concurrency(sweep: SweepFile, requested: int | None, offered: dict[str, float], where: str) -> tuple[int, str]:
    """How many trials run at once, and why: --max-concurrent (`requested`), else the sweep file's max_concurrent,
    else as many as fit what `where` offers (what the cluster can grow to, or what it has)."""
    if requested:
        return requested, "--max-concurrent"
    if sweep.max_concurrent:
        return sweep.max_concurrent, "the sweep file's max_concurrent"
    return max_concurrent(sweep, offered), f"as many as fit {where}: {shown(offered)}"


def capacity() -> tuple[dict[str, float], str, bool]:
    """What the cluster this process is connected to can give trials, whence, and whether it autoscales: an
    autoscaling cluster at its largest (from its autoscaler's config), else the resources up now."""
    import ray

    found = autoscaler_config()
    if found is None:
        return ray.cluster_resources(), "the cluster as it is now (no autoscaler config found)", False
    config, path = found
    head = next(n["Resources"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
    return grown(config, head), f"the cluster grown to its node types' max_workers ({path})", True


def autoscaler_config() -> tuple[dict, str] | None:
    """The autoscaler's config of the connected cluster, and its path: the file the cluster's monitor (the autoscaler,
    on the head node) was started with; `ray up` writes it to the head's ~/ray_bootstrap_config.yaml with each node
    type's resources filled in. Ray keeps no copy in the GCS (checked with Ray 2.60), so this is found only from the
    head node (`ray exec`, `ray attach`, `ray job submit`); None there on a fixed cluster (a monitor without one)."""
    import psutil
    import ray
    import yaml

    cluster = f"--gcs-address={ray.get_runtime_context().gcs_address}"
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []  # None: another user's process
        if cluster in cmdline and any(arg.endswith("monitor.py") for arg in cmdline):
            path = next((a.split("=", 1)[1] for a in cmdline if a.startswith("--autoscaling-config=")), None)
            return (yaml.safe_load(Path(path).expanduser().read_text()), path) if path else None
    return None


def grown(config: dict, head: dict[str, float]) -> dict[str, float]:
    """An autoscaling cluster's resources at its largest: the head, plus each worker node type at its max_workers,
    with at most the config's max_workers worker nodes in all (per resource: the nodes with the most of it)."""
    types = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    total = {k: float(v) for k, v in head.items()}
    for key in {k for t in types for k in t.get("resources", {})}:
        left = config.get("max_workers", math.inf)
        for node in sorted(types, key=lambda t: -t.get("resources", {}).get(key, 0)):
            count = min(node.get("max_workers", config.get("max_workers", 0)), left)
            total[key] = total.get(key, 0) + count * node.get("resources", {}).get(key, 0)
            left -= count
    return total


@contextmanager
def autoscaler_request(sweep: SweepFile, limit: int, autoscaling: bool):
    """While the sweep runs, ask an autoscaling cluster for the whole footprint of the trials it starts with (its
    root experiments' trials, at most `limit`): each trial's Tune and Train placement groups are demand it sees too,
    but the Train part only once its trial has started. A request reserves nothing, so no trial waits for resources
    held for it; it is withdrawn at the end, or the cluster would never shrink."""
    if not autoscaling:
        yield
        return
    from ray.autoscaler.sdk import request_resources

    counts, bundles, started = plan(sweep), [], 0
    for name in [n for n, e in sweep.experiments.items() if not e.parent]:
        take = min(counts[name], limit - started)
        bundles += trial_bundles(first_config(sweep, name)) * take
        started += take
    request_resources(bundles=bundles)
    try:
        yield
    finally:
        request_resources(bundles=[])
