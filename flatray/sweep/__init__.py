"""A sweep: `python -m flatray.sweep SWEEP.yaml [--dry-run] [--resume] [--address] [--storage] [--max-concurrent]`.

The sweep file (flatray.config.sweep) is a graph of experiments. Every run in it, searched or dependent, is one Ray Tune
trial of a single Tune experiment, and each trial runs a Ray Train `TorchTrainer` (DeepSpeed workers) for its run
config. `SweepSearcher` is the Tune `Searcher` that walks the graph: it draws the searched experiments' points
(Optuna TPE, random or grid) and releases a child trial the moment its own parent trial finishes
(`on_trial_complete`), so an IMP chain, a transfer or a PTQ run never waits for unrelated trials. `SweepScheduler`
early-stops with ASHA inside each searched group only, never IMP levels or a teacher's children.

Trials are addressed by a hash of what determines them (docs/SWEEPS.md); their folders `<storage>/<sweep>/<id>/`
hold `trial.json`, `summary.json` (written atomically at the end: its presence means finished) and Ray Train's
checkpoints. Running a sweep again, or with --resume, skips finished trials and continues interrupted ones from their
last checkpoint (Ray Train restores a run whose name and storage already hold one).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from flatray import config as config_lib
from flatray import storage
from flatray.config import sweep as sweepfile
from flatray.config import ConfigError, RunConfig
from flatray.config.sweep import SweepFile

log = logging.getLogger("flatray.sweep")
STATUS_EVERY_S = 30
TRIAL_CPU = 1  # the Tune trial itself: it only drives its Ray Train run


# --------------------------------------------------------------------------------------------------- trial records


def _flat(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; dotted keys stay as they are."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def make_record(sweep: SweepFile, root: str, name: str, point: dict, parent: dict | None = None,
                parent_summary: dict | None = None, level: int | None = None) -> dict:
    """The trial of experiment `name` at `point`, fed by `parent`: its id, its folder and its resolved run config."""
    exp = sweep.experiments[name]
    own = set(_flat(exp.config))
    inherited = {k: v for k, v in (parent or {}).get("point", {}).items() if k not in own}
    raw = sweepfile.raw_config(sweep, name, inherited, point)
    raw.pop("output", None)
    parents = [parent["id"]] if parent else []
    tid = sweepfile.trial_id({"experiment": name, "kind": exp.kind, "config": raw, "level": level}, parents)
    folder = storage.join(root, tid)

    if parent:  # what the child takes from its parent trial (docs/SWEEPS.md)
        outputs = (parent_summary or {}).get("outputs", {})
        if exp.kind == "imp":
            raw.setdefault("prune", {}).update(parent=outputs.get("model"), sparsity=round(level * exp.sparsity_step, 6))
        elif exp.kind == "transfer":
            raw.setdefault("prune", {})["mask"] = outputs.get("mask")
        else:
            raw["model"] = outputs.get("model")
    raw["output"] = {"storage_path": folder, "name": "train"}
    record = {"id": tid, "sweep": sweep.name, "experiment": name, "kind": exp.kind, "parents": parents,
              "level": level, "point": {**inherited, **point}, "config": raw, "dir": folder}
    cfg = config_lib.from_dict(raw, source=f"trial {tid} of experiment {name!r}")
    record["config"] = cfg.model_dump(mode="json")
    return record


# --------------------------------------------------------------------------------------------------- search


def _tune_domain(kind: str, values: list):
    from ray import tune

    return {"choice": lambda: tune.choice(values), "uniform": lambda: tune.uniform(*values),
            "loguniform": lambda: tune.loguniform(*values), "randint": lambda: tune.randint(*values)}[kind]()


def grid_keys(exp) -> list[str]:
    """The keys an experiment's search enumerates (grid values; choice values too with algorithm: grid)."""
    search = exp.search or sweepfile.Search()
    kinds = ("grid", "choice") if search.algorithm == "grid" else ("grid",)
    return [k for k, d in search.space.items() if next(iter(d)) in kinds]


@dataclass
class Search:
    """The points of one experiment for one parent trial (or none, for a root): each grid point x `num_samples`
    samples of the rest. Each grid point has its own Optuna study (a 2-bit and a 4-bit run are not one objective)."""

    experiment: str
    parent: dict | None
    todo: list = field(default_factory=list)  # grid points still to draw, in order
    rest: dict = field(default_factory=dict)  # the non-grid part of the space
    optuna: dict | None = None  # OptunaSearch arguments, when the rest is drawn by Optuna
    inner: dict = field(default_factory=dict)  # grid point -> its OptunaSearch
    rng: random.Random | None = None
    drawn: int = 0

    @classmethod
    def create(cls, sweep: SweepFile, name: str, parent: dict | None) -> "Search":
        exp = sweep.experiments[name]
        search = exp.search or sweepfile.Search()
        grid = {k: search.space[k][next(iter(search.space[k]))] for k in grid_keys(exp)}
        rest = {k: d for k, d in search.space.items() if k not in grid}
        points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
        samples = search.num_samples if rest else 1  # a pure grid has nothing to sample twice
        seed = int(sweepfile.trial_id({"experiment": name}, [parent["id"]] if parent else []), 16) % 2**31
        out = cls(name, parent, todo=[p for _ in range(samples) for p in points], rest=rest, rng=random.Random(seed))
        if rest and search.algorithm == "optuna":
            space = {k: _tune_domain(*next(iter(d.items()))) for k, d in rest.items()}
            out.optuna = dict(space=space, metric=search.metric, mode=search.mode, seed=seed)
        return out

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.parent['id'] if self.parent else 'root'}"

    def draw(self) -> tuple[dict, tuple | None] | None:
        """The next point and a handle to tell its result with, or None when this search is exhausted."""
        if not self.todo:
            return None
        grid_point = self.todo.pop(0)
        point, handle = dict(grid_point), None
        self.drawn += 1
        if self.optuna is not None:
            import optuna
            from ray.tune.search.optuna import OptunaSearch

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            group = json.dumps(grid_point, sort_keys=True, default=str)
            if group not in self.inner:
                self.inner[group] = OptunaSearch(**self.optuna)
            handle = (group, f"{self.key}/{self.drawn}")
            point.update(self.inner[group].suggest(handle[1]))
        else:
            for key, domain in self.rest.items():
                kind, values = next(iter(domain.items()))
                point[key] = {"choice": lambda: self.rng.choice(values), "uniform": lambda: self.rng.uniform(*values),
                              "loguniform": lambda: math.exp(self.rng.uniform(math.log(values[0]), math.log(values[1]))),
                              "randint": lambda: self.rng.randrange(*values)}[kind]()
        return point, handle

    def tell(self, handle: tuple | None, score: float | None) -> None:
        if handle is None:
            return
        group, inner_id = handle
        if score is None:
            self.inner[group].on_trial_complete(inner_id, None, error=True)
        else:
            self.inner[group].on_trial_complete(inner_id, {self.optuna["metric"]: score})


# --------------------------------------------------------------------------------------------------- the searcher


def _searcher_base():
    from ray.tune.search import Searcher

    return Searcher


class SweepSearcher(_searcher_base()):
    """Walks the experiment graph for Tune: `suggest` hands out ready trials (children first), `on_trial_complete`
    records the outcome and releases the finished trial's children."""

    def __init__(self, sweep: SweepFile, root: str):
        super().__init__(metric="score", mode="max")
        self.sweep, self.root = sweep, root
        self.order = sweepfile.order(sweep.experiments)
        self.children = collections.defaultdict(list)
        for name in self.order:
            if sweep.experiments[name].parent:
                self.children[sweep.experiments[name].parent].append(name)
        self.searches: list[Search] = [Search.create(sweep, n, None) for n in self.order
                                       if not sweep.experiments[n].parent]
        self.ready: collections.deque = collections.deque()  # (record, its Search, tell handle)
        self.running: dict[str, tuple] = {}  # Tune trial id -> (record, its Search, tell handle)
        self.outcomes: dict[str, tuple[dict, dict]] = {}  # trial id -> (record, summary)
        self.fed_best: set[str] = set()
        self.stopped: set[str] = set()  # Tune trial ids the scheduler stopped early (SweepScheduler adds them)
        self.skipped = 0  # finished in an earlier run of the sweep

    # Tune checkpoints searchers; the sweep resumes from its trial folders instead.
    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass

    def suggest(self, trial_id: str):
        while True:
            item = self._next()
            if item is None:
                return self.FINISHED if self._complete_all() else None
            record = item[0]
            summary = storage.read_json(storage.join(record["dir"], "summary.json"))
            if summary and summary.get("status") in ("done", "stopped"):
                self.skipped += 1  # finished before: not run again, but its children are released
                self._finish(item, summary)
                continue
            self.running[trial_id] = item
            return {"flatray": record, "retries": self.sweep.experiments[record["experiment"]].retries}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        item = self.running.pop(trial_id, None)
        if item is None:
            return
        record = item[0]
        path = storage.join(record["dir"], "summary.json")
        summary = storage.read_json(path)
        if summary is None:
            if not error and trial_id not in self.stopped:
                return  # interrupted (Ctrl-C): no summary, so a resumed sweep continues it from its checkpoint
            summary = {"id": record["id"], "experiment": record["experiment"], "kind": record["kind"],
                       "status": "failed" if error else "stopped",
                       "metrics": {k: v for k, v in (result or {}).items() if isinstance(v, (int, float))},
                       "history": [], "checkpoint": None, "outputs": {}, "ended": time.time(),
                       "error": "the trial's process died" if error else None}
            storage.write_json(path, summary)
        self._finish(item, summary)

    # ---------------------------------------------------------------------------------------------------------

    def _next(self):
        """A ready dependent trial first (a parent's children start as soon as it ends), else a new point."""
        if self.ready:
            return self.ready.popleft()
        for search in self.searches:
            while (drawn := search.draw()) is not None:
                point, handle = drawn
                level = 1 if self.sweep.experiments[search.experiment].kind == "imp" else None
                item = self._item(search.experiment, point, search.parent, level, search, handle)
                if item is not None:
                    return item
        self.searches = [s for s in self.searches if s.todo]  # exhausted: their trials hold them until told
        return None

    def _item(self, name, point, parent, level, search: Search, handle):
        parent_summary = self.outcomes[parent["id"]][1] if parent else None
        try:
            record = make_record(self.sweep, self.root, name, point, parent, parent_summary, level)
        except ConfigError as err:  # e.g. the parent left no mask to transfer: this trial fails, the sweep goes on
            log.warning("experiment %s: cannot start a trial: %s", name, err)
            failed = {"id": None, "experiment": name, "status": "failed", "metrics": {}, "error": str(err)}
            search.tell(handle, None)
            self.outcomes[f"invalid-{len(self.outcomes)}"] = ({"experiment": name, "point": point}, failed)
            return None
        return record, search, handle

    def _finish(self, item, summary: dict) -> None:
        record, search, handle = item
        self.outcomes[record["id"]] = (record, summary)
        done = summary.get("status") == "done"
        search.tell(handle, summary.get("metrics", {}).get("score") if done else None)
        if not done:
            return
        exp = self.sweep.experiments[record["experiment"]]
        if exp.kind == "imp" and record["level"] < exp.levels:  # the next level of this chain
            nxt = self._item(record["experiment"], {}, record, record["level"] + 1, search, None)
            if nxt:
                self.ready.appendleft(nxt)
        # First in line, in the file's order: a dependent trial starts before any new root point is drawn.
        self.searches[0:0] = [Search.create(self.sweep, child, record) for child in self.children[record["experiment"]]
                              if self.sweep.experiments[child].feed == "each"
                              and self._feeds(self.sweep.experiments[child], record)]
        self._feed_best()

    def _feeds(self, child_exp, record) -> bool:
        return not child_exp.parent_levels or record.get("level") in child_exp.parent_levels

    def _feed_best(self) -> None:
        """feed: best waits until the parent experiment is complete, then takes the best trial of each group."""
        for name in self.order:
            exp = self.sweep.experiments[name]
            if exp.feed != "best" or not exp.parent or name in self.fed_best or not self._complete(exp.parent):
                continue
            self.fed_best.add(name)
            groups: dict[tuple, tuple[dict, dict]] = {}
            for record, summary in self.outcomes.values():
                if (record.get("experiment") != exp.parent or summary.get("status") != "done"
                        or not self._feeds(exp, record)):
                    continue
                flat = _flat(record["config"])
                group = tuple(json.dumps(flat.get(k)) for k in exp.group_by)
                score = summary["metrics"].get("score", -math.inf)
                sign = 1 if (self.sweep.experiments[exp.parent].search or sweepfile.Search()).mode == "max" else -1
                if group not in groups or sign * score > sign * groups[group][1]["metrics"].get("score", -math.inf):
                    groups[group] = (record, summary)
            self.searches[0:0] = [Search.create(self.sweep, name, record) for record, _ in groups.values()]

    def _complete(self, name: str) -> bool:
        """No trial of `name` is running, ready or still to be drawn, and none can be released any more."""
        exp = self.sweep.experiments[name]
        if exp.parent and not self._complete(exp.parent):
            return False
        if exp.parent and exp.feed == "best" and name not in self.fed_best:
            return False
        return not (any(s.experiment == name and s.todo for s in self.searches)
                    or any(item[0]["experiment"] == name for item in self.ready)
                    or any(item[0]["experiment"] == name for item in self.running.values()))

    def _complete_all(self) -> bool:
        self._feed_best()
        return all(self._complete(n) for n in self.order) and not self.ready


# --------------------------------------------------------------------------------------------------- the scheduler


def _fifo_base():
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler


class SweepScheduler(_fifo_base()):
    """ASHA early stopping within each searched group (one experiment, one parent, one grid point) that asks for it;
    every other trial (IMP levels, PTQ, CoFi, sharpness, single runs) runs to its end."""

    def __init__(self, sweep: SweepFile, stopped: set[str]):
        super().__init__()
        self.sweep, self.stopped = sweep, stopped
        self.groups: dict[str, object] = {}

    def _asha(self, trial):
        from ray.tune.schedulers import ASHAScheduler

        cfg = trial.config.get("flatray")
        if not cfg:
            return None
        exp = self.sweep.experiments[cfg["experiment"]]
        if not exp.search or exp.search.scheduler != "asha" or cfg["kind"] not in ("finetune", "transfer", "squat"):
            return None
        # One bracket per search (experiment, parent trial) and grid point: a 2-bit run never competes with a 4-bit one.
        grid_point = {k: cfg["point"].get(k) for k in grid_keys(exp)}
        key = f"{cfg['experiment']}/{cfg['parents'][0] if cfg['parents'] else 'root'}/{json.dumps(grid_point, default=str)}"
        if key not in self.groups:
            epochs = cfg["config"]["train"]["epochs"]
            self.groups[key] = ASHAScheduler(time_attr="epoch", metric=exp.search.metric, mode=exp.search.mode,
                                             max_t=max(1, epochs), grace_period=1, reduction_factor=2)
        return self.groups[key]

    def on_trial_add(self, tune_controller, trial):
        asha = self._asha(trial)
        if asha:
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        asha = self._asha(trial)
        if asha and "epoch" in result and asha.metric in result:
            decision = asha.on_trial_result(tune_controller, trial, result)
            if decision == self.STOP:
                self.stopped.add(trial.trial_id)
            return decision
        return self.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result):
        asha = self._asha(trial)
        if asha and result and asha.metric in result:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        asha = self._asha(trial)
        if asha:
            asha.on_trial_remove(tune_controller, trial)


# --------------------------------------------------------------------------------------------------- the trainable


def run_trial(tune_config: dict) -> None:
    """A Tune trial: one Ray Train run of the trial's config, retried from its last checkpoint on failure."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from flatray import train

    record, retries = tune_config["flatray"], tune_config["retries"]
    record = {**record, "started": time.time()}
    folder = record["dir"]
    storage.write_json(storage.join(folder, "trial.json"), record)
    cfg = RunConfig.model_validate(record["config"])
    start, error = time.time(), None
    for attempt in range(1, retries + 2):
        storage.append_line(storage.join(folder, "attempts.jsonl"), {"attempt": attempt, "start": time.time()})
        try:
            # Same name and storage as before: Ray Train restores the run's latest checkpoint, and the workers
            # continue from it (flatray.train.worker.finetune).
            result = train.make_trainer(cfg, callbacks=[TuneReportCallback()]).fit()
            break
        except Exception as err:  # ray.train.TrainingFailedError: a worker raised
            error = err
            print(f"[flatray] trial {record['id']} ({record['experiment']}) attempt {attempt}/{retries + 1} "
                  f"failed: {str(err).splitlines()[0][:300]}", flush=True)
    else:
        storage.write_json(storage.join(folder, "summary.json"), {
            "id": record["id"], "experiment": record["experiment"], "kind": record["kind"], "status": "failed",
            "metrics": {}, "history": [], "checkpoint": None, "outputs": {}, "attempts": retries + 1,
            "wall_s": time.time() - start, "ended": time.time(), "error": f"{type(error).__name__}: {error}"[:4000]})
        raise error
    storage.write_json(storage.join(folder, "summary.json"), summarize(record, result, attempt, time.time() - start))


def summarize(record: dict, result, attempts: int, wall_s: float) -> dict:
    from flatray.methods import lsq
    from flatray.methods import imp as prune
    from flatray.methods import ptq as quantize

    ckpt = result.checkpoint
    path = None
    if ckpt is not None:
        scheme = record["dir"].split("://")[0] + "://" if "://" in record["dir"] else ""
        path = ckpt.path if "://" in ckpt.path or not scheme else scheme + ckpt.path
    history = storage.read_json(storage.join(path, "history.json")) if path else None
    outputs = {"model": None, "mask": None, "export": None}
    if path:
        files = set(storage.list_files(path))
        outputs["model"] = path if "config.json" in files and record["kind"] != "ptq" else None
        outputs["mask"] = storage.join(path, prune.MASK_FILE) if prune.MASK_FILE in files else None
        for name in (lsq.EXPORT_FILE, quantize.INT8_FILE):
            if name in files:
                outputs["export"] = storage.join(path, name)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str, bool))}
    return {"id": record["id"], "experiment": record["experiment"], "kind": record["kind"], "status": "done",
            "metrics": metrics, "history": history or [], "checkpoint": path, "outputs": outputs,
            "attempts": attempts, "wall_s": wall_s, "ended": time.time(), "error": None}


# --------------------------------------------------------------------------------------------------- status


def _callback_base():
    from ray.tune import Callback

    return Callback


class Status(_callback_base()):
    """A line per experiment every STATUS_EVERY_S seconds and when a trial ends: running / pending (released or
    still to be drawn) / done / stopped / failed."""

    def __init__(self, searcher: SweepSearcher, every_s: float = STATUS_EVERY_S):
        self.searcher, self.every_s, self.last = searcher, every_s, 0.0

    def _print(self) -> None:
        counts = collections.defaultdict(collections.Counter)
        for record, _, _ in self.searcher.running.values():
            counts[record["experiment"]]["running"] += 1
        for record, _, _ in self.searcher.ready:
            counts[record["experiment"]]["pending"] += 1
        for search in self.searcher.searches:
            counts[search.experiment]["pending"] += len(search.todo)
        for record, summary in self.searcher.outcomes.values():
            counts[record["experiment"]][summary["status"]] += 1
        parts = []
        for name in self.searcher.order:
            c = counts[name]
            shown = " ".join(f"{k} {c[k]}" for k in ("running", "pending", "done", "stopped", "failed") if c[k])
            parts.append(f"{name}: {shown or '-'}")
        print(f"[flatray] {time.strftime('%H:%M:%S')}  " + " | ".join(parts), flush=True)
        self.last = time.time()

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self.last > self.every_s:
            self._print()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._print()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print()


# --------------------------------------------------------------------------------------------------- plan (dry run)


def plan(sweep: SweepFile) -> dict[str, int]:
    """Trials per experiment, known before running (feed: best counts the groups of the parent's grid)."""
    grids: dict[str, dict] = {}
    counts: dict[str, int] = {}
    for name in sweepfile.order(sweep.experiments):
        exp = sweep.experiments[name]
        search = exp.search or sweepfile.Search()
        own = {k: search.space[k][next(iter(search.space[k]))] for k in grid_keys(exp)}
        rest = [k for k in search.space if k not in own]
        per_parent = math.prod(len(v) for v in own.values()) * (search.num_samples if rest else 1)
        grids[name] = {**(grids[exp.parent] if exp.parent else {}), **own}
        if not exp.parent:
            counts[name] = per_parent
            continue
        parent = sweep.experiments[exp.parent]
        fed = counts[exp.parent]
        if parent.kind == "imp" and exp.parent_levels:
            fed = fed // parent.levels * len(exp.parent_levels)
        if exp.feed == "best":
            fed = math.prod(len(grids[exp.parent].get(k, [None])) for k in exp.group_by)
        counts[name] = fed * per_parent * (exp.levels if exp.kind == "imp" else 1)
    return counts


def first_config(sweep: SweepFile, name: str) -> RunConfig:
    """The run config of an experiment's first search point: what its trials look like before running."""
    exp = sweep.experiments[name]
    return sweepfile.validate_run(sweep, name, sweepfile.first_point(exp.search.space if exp.search else {}))


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
        if exp.kind == "imp":
            how.append(f"{exp.levels} levels x {exp.sparsity_step:g}")
        print(f"  {'  ' * depth}{name} [{exp.kind}] {counts[name]} trial(s); {cfg.model} on {cfg.task}; "
              f"{'; '.join(how) or 'single run'}; asks {need}")
        for child in [n for n, e in sweep.experiments.items() if e.parent == name]:
            show(child, depth + 1)

    for name in [n for n, e in sweep.experiments.items() if not e.parent]:
        show(name, 0)
    print(f"{where} offers: " + ", ".join(f"{v:g} {k}" for k, v in sorted(offered.items())
                                          if k in ("CPU", "GPU", "memory") or not k.startswith("node")))


# --------------------------------------------------------------------------------------------------- running


def _local_cpus(sweep: SweepFile) -> int:
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


def _root(sweep: SweepFile) -> str:
    return storage.join(storage.absolute(sweep.storage), sweep.name)


def run(sweep: SweepFile, sweep_text: str, address: str | None = None, max_concurrent_trials: int | None = None,
        resume: bool = False, status_every_s: float = STATUS_EVERY_S) -> dict[str, tuple[dict, dict]]:
    """Run the sweep on Ray Tune; returns {trial id: (trial record, summary)}."""
    from ray import tune

    from flatray import train

    root = _root(sweep)
    previous = storage.read_text(storage.join(root, "sweep.yaml"))
    if previous is not None and previous != sweep_text and not resume:
        raise ConfigError(f"{root} holds a sweep run from a different sweep file; pass --resume to continue it with "
                          f"this file (finished trials with unchanged ids are kept), or pick another name/--storage")
    storage.write_text(storage.join(root, "sweep.yaml"), sweep_text)

    use_gpu = any(first_config(sweep, n).scaling.use_gpu for n in sweep.experiments)
    train.init_ray(address, _local_cpus(sweep), use_gpu)
    import ray

    offered = ray.cluster_resources()
    limit = max_concurrent_trials or max_concurrent(sweep, offered)
    searcher = SweepSearcher(sweep, root)
    wandb_dir = storage.join(root, "wandb") if "://" not in root else str(Path("wandb").resolve())
    callbacks = [Status(searcher, status_every_s)]
    if sweep.wandb.mode != "disabled":
        from flatray.tracking import WandbTrials, wandb_mode

        if wandb_mode(sweep.wandb) != "disabled":
            callbacks.append(WandbTrials(sweep.wandb, sweep.name, root, wandb_dir))
    print(f"[flatray] sweep {sweep.name}: up to {limit} trial(s) at once on {', '.join(f'{v:g} {k}' for k, v in offered.items() if k in ('CPU', 'GPU'))}; "
          f"outputs in {root}", flush=True)
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"cpu": TRIAL_CPU}),
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=SweepScheduler(sweep, searcher.stopped), num_samples=-1,
            max_concurrent_trials=limit,
            reuse_actors=True,  # a child trial starts in the actor its parent just left: no process start-up
            trial_name_creator=lambda t: f"{t.config['flatray']['experiment']}-{t.config['flatray']['id']}",
            trial_dirname_creator=lambda t: t.config["flatray"]["id"],
        ),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=storage.absolute(sweep.storage), callbacks=callbacks, verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),  # retries happen inside the trial, from its checkpoint
        ),
    )
    tuner.fit()
    if searcher.skipped:
        print(f"[flatray] {searcher.skipped} trial(s) had finished before and were not run again", flush=True)
    return dict(searcher.outcomes)


def results_table(outcomes: dict[str, tuple[dict, dict]], order: list[str] = ()) -> str:
    """One line per trial, in the graph's order: experiment, id, searched values, status, score and what the kind
    measures."""
    rank = {name: i for i, name in enumerate(order)}
    rows = [("experiment", "trial", "point", "status", "score", "details")]
    for record, summary in sorted(outcomes.values(), key=lambda o: (rank.get(o[0].get("experiment"), len(rank)),
                                                                    o[0].get("experiment", ""), o[0].get("level") or 0)):
        m = summary.get("metrics", {})
        details = []
        if record.get("level"):
            details.append(f"level {record['level']}")
        for key, fmt in (("sparsity", "sparsity {:.2f}"), ("size_ratio", "size x{:.2f}"), ("speedup", "speedup x{:.2f}"),
                         ("float/score", "float {:.4f}"), ("params", "params {:,.0f}"), ("export_bytes", "{:,.0f} bytes")):
            if isinstance(m.get(key), (int, float)) and (key != "sparsity" or m[key]):
                details.append(fmt.format(m[key]))
        details += [f"{k.split('/')[1]} {v:.4g}" for k, v in m.items() if k.startswith("sharpness/")]
        if summary.get("status") == "failed" and summary.get("error"):
            details.append(str(summary["error"]).splitlines()[0][:60])
        point = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in record.get("point", {}).items())
        score = f"{m['score']:.4f}" if isinstance(m.get("score"), (int, float)) else "-"
        rows.append((record.get("experiment", "?"), record.get("id") or "-", point or "-", summary.get("status", "?"),
                     score, "; ".join(details)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
        sweep = sweepfile.load(args.sweep_file, sets)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # A missing model or an unreachable hub dataset fails here, not in a trial (each one checked once).
    checks = {}
    for name in sweep.experiments:
        cfg = first_config(sweep, name)
        if sweep.experiments[name].kind in ("finetune", "imp", "transfer"):  # the others load a parent's model
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
    root = _root(sweep)
    if args.dry_run:
        if args.address:
            import ray

            ray.init(address=args.address)
            offered, where = ray.cluster_resources(), f"the cluster at {args.address}"
        else:
            import torch

            # What run() would give a local Ray (more CPUs than cores: each worker runs one thread).
            offered = {"CPU": float(_local_cpus(sweep)), "GPU": float(torch.cuda.device_count())}
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
    print(results_table(outcomes, sweepfile.order(sweep.experiments)))
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


if __name__ == "__main__":
    sys.exit(main())
