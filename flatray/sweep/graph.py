"""The experiment graph of a sweep file, without Ray: loading and checking it, and expanding trials.

`load` reads a sweep file and checks everything that can be known before running: the schema (flatray.config.sweep),
parents (known, acyclic), that each parent's method produces what its child's method needs (the registry,
flatray.methods), search keys, and the run config of every experiment at every listed grid value. `make_record`
expands one trial: its run config (defaults < inherited point < experiment config < own point), what it takes
from its parent trial (the method's `feed`) or, with feed: group, from every parent trial of its group (the
method's `feed_group`), its id and its folder.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from flatray import config as config_lib
from flatray import methods, storage
from flatray.config import ConfigError, RunConfig, trial_id
from flatray.config.errors import (exists, explain, field_exists, flatten, merge, parse_overrides, read_mapping,
                                   set_dotted, short_repr)
from flatray.config.sweep import MAX_POINTS, Experiment, SearchSettings, SweepFile

__all__ = ["first_point", "grid_keys", "load", "make_record", "order", "raw_config", "trial_id", "validate_run"]

# What a parent trial provides exists only at run time; these stand-ins pass the checks of a child's run config.
PLACEHOLDER_OUTPUTS = {"model": "parent://best-checkpoint", "mask": "parent://mask.safetensors",
                       "export": "parent://export"}
MAX_CHAIN = 32  # experiments in a line of parents (the graph is walked recursively)
# The run-config keys that are sections (mappings): the methods write into some of them (prune, scaling, deepspeed).
SECTIONS = {alias for name, field in RunConfig.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            for alias in [name, *getattr(field.validation_alias, "choices", [])]}


def order(experiments: dict[str, Experiment]) -> list[str]:
    """Experiment names parents-first; raises ConfigError on an unknown or cyclic parent."""
    for name, exp in experiments.items():
        if exp.parent and exp.parent not in experiments:
            raise ConfigError(f"experiments.{name}.parent: got {exp.parent!r}; expected one of {', '.join(experiments)}")
    done: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = " -> ".join(visiting[visiting.index(name):] + [name])
            raise ConfigError(f"experiments.{name}.parent: cyclic parents ({cycle}); expected a tree of experiments")
        if len(visiting) == MAX_CHAIN:  # before the recursion gets deep
            raise too_long(name)
        visiting.append(name)
        parent = experiments[name].parent
        if parent:
            visit(parent)
        visiting.pop()
        done.append(name)

    def too_long(name: str) -> ConfigError:
        return ConfigError(f"experiments.{name}.parent: a line of more than {MAX_CHAIN} experiments from a root to "
                           f"it; expected a shallower tree of experiments")

    for name in experiments:
        visit(name)
    depth: dict[str, int] = {}
    for name in done:
        parent = experiments[name].parent
        depth[name] = depth[parent] + 1 if parent else 1
        if depth[name] > MAX_CHAIN:
            raise too_long(name)
    return done


def grid_keys(exp: Experiment) -> list[str]:
    """The keys an experiment's search enumerates (grid values; choice values too with algorithm: grid)."""
    search = exp.search or SearchSettings()
    domains = ("grid", "choice") if search.algorithm == "grid" else ("grid",)
    return [k for k, d in search.space.items() if next(iter(d)) in domains]


def first_point(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """One point of a search space (the first value / the low end), to validate the resolved config with."""
    return {key: next(iter(domain.values()))[0] for key, domain in space.items()}


def raw_config(sweep: SweepFile, name: str, inherited: dict, point: dict) -> dict:
    """A trial's run config before validation: the defaults, the searched values inherited from its parent trial,
    the experiment's config, then its own point (later wins), with the method its trials run as."""
    exp = sweep.experiments[name]
    raw = merge(merge(merge(sweep.defaults, inherited), exp.config), point)
    for section in SECTIONS & raw.keys():  # before a method writes into one (e.g. prune: 5)
        if not isinstance(raw[section], dict):
            raise ConfigError(f"invalid sweep {sweep.name!r} (experiment {name!r}):\n  {section}: got "
                              f"{short_repr(raw[section])}; expected a mapping of {section} keys")
    method = exp.method
    raw["kind"] = method.runs_as or exp.kind  # as written (an alias keeps the trial ids of its name)
    if method.cpu_only and raw.get("scaling", {}).get("use_gpu"):
        # e.g. PTQ measures int8 CPU latency: its trials run on CPU workers even when the defaults ask for GPUs.
        raw["scaling"] = {**raw["scaling"], "use_gpu": False, "resources_per_worker": None}
        raw.setdefault("deepspeed", {})["precision"] = "fp32"
    return raw


def _inherited(sweep: SweepFile, name: str) -> dict:
    """The first search point of each ancestor, as a child trial inherits its parent's point."""
    exp = sweep.experiments[name]
    if not exp.parent:
        return {}
    parent = sweep.experiments[exp.parent]
    return {**_inherited(sweep, exp.parent), **first_point(parent.search.space if parent.search else {})}


def shared_point(points: list[dict]) -> dict:
    """The searched values every one of `points` has in common (what a child inherits from its group's trials)."""
    return {k: v for k, v in points[0].items() if all(k in p and p[k] == v for p in points[1:])} if points else {}


def _placeholder_group(sweep: SweepFile, name: str) -> list[tuple[dict, dict]]:
    """The parent trials of one group of a feed: group experiment, as the file lists them: the parent's grid points
    that differ outside group_by (each num_samples times, and once per IMP level), with stand-ins for their outputs."""
    exp = sweep.experiments[name]
    parent = sweep.experiments[exp.parent]
    search = parent.search or SearchSettings()
    keys = [k for k in grid_keys(parent) if k not in exp.group_by]
    sampled = [k for k in search.space if k not in grid_keys(parent)]
    copies = (search.num_samples if sampled and not set(sampled) & set(exp.group_by) else 1) * (
        len(exp.parent_levels or range(parent.levels)) if parent.method.chained else 1)
    members = []
    for values in itertools.product(*(next(iter(search.space[k].values())) for k in keys)):
        point = {**first_point(search.space), **dict(zip(keys, values))}
        config = validate_run(sweep, exp.parent, point).model_dump(mode="json")
        record = {"id": "parent", "point": {**_inherited(sweep, exp.parent), **point}, "config": config}
        members += [(record, PLACEHOLDER_OUTPUTS)] * copies
    return members


def validate_run(sweep: SweepFile, name: str, point: dict[str, Any]) -> RunConfig:
    """The run config of one trial of `name` at `point` (its parent's outputs stood in for); a ConfigError names
    the experiment."""
    exp = sweep.experiments[name]
    if exp.parent and exp.feed == "group":
        members = _placeholder_group(sweep, name)
        inherited = {**_inherited(sweep, exp.parent), **shared_point([r["point"] for r, _ in members])}
        raw = raw_config(sweep, name, inherited, point)
        try:
            exp.method.feed_group(raw, members, exp)
        except methods.ParentOutputMissing as err:
            raise ConfigError(f"experiments.{name}.group_by: got {exp.group_by} over the trials of parent "
                              f"{exp.parent!r}; {err}") from None
    else:
        raw = raw_config(sweep, name, _inherited(sweep, name), point)
    if exp.method.needs and exp.feed != "group":
        exp.method.feed(raw, PLACEHOLDER_OUTPUTS, exp, 1)
    try:
        return config_lib.from_dict(raw, source=f"experiment {name!r}")
    except ConfigError as err:
        raise ConfigError(str(err).replace("invalid run config", f"invalid sweep {sweep.name!r}", 1)) from None


def _check_parent_outputs(sweep: SweepFile, name: str) -> None:
    """A child whose parent's method cannot produce what the child needs is an error now, not a dense run later."""
    exp = sweep.experiments[name]
    parent = sweep.experiments[exp.parent]
    space = parent.search.space if parent.search else {}
    produced = parent.method.outputs_of(validate_run(sweep, exp.parent, first_point(space)))
    missing = [need for need in exp.method.needs if need not in produced]
    if missing:
        raise ConfigError(f"experiments.{name}.parent: got {exp.parent!r} (kind {parent.kind}), which produces "
                          f"{', '.join(sorted(produced)) or 'nothing'}; expected a parent that produces "
                          f"{', '.join(exp.method.needs)} (kind {exp.kind} needs {', '.join(missing)})")


def load(path: str | Path, overrides: list[str] = ()) -> SweepFile:
    """Read and check a sweep file: schema, parents, search spaces, and each experiment's run config."""
    path = Path(path)
    if not exists(path):
        raise ConfigError(f"sweep file {short_repr(str(path))} not found")
    raw = read_mapping(path, "sweep", example="name: my-sweep, experiments: {full: {kind: finetune}}")
    for key, value in parse_overrides(list(overrides)):
        set_dotted(raw, key, value)
    try:
        sweep = SweepFile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(explain(err, str(path), SweepFile, what="sweep")) from None
    for name in order(sweep.experiments):
        exp = sweep.experiments[name]
        space = exp.search.space if exp.search else {}
        grid = [len(next(iter(space[key].values()))) for key in grid_keys(exp)]
        points = math.prod(grid) * (exp.search.num_samples if len(grid) < len(space) else 1)
        if points > MAX_POINTS:
            raise ConfigError(f"experiments.{name}.search: {math.prod(grid):,} grid point(s) x num_samples "
                              f"{exp.search.num_samples:,} = {points:,} trials per parent trial; expected at most "
                              f"{MAX_POINTS:,}")
        for key in space:
            if not field_exists(RunConfig, key):
                raise ConfigError(f"experiments.{name}.search.space: {key!r} is not a run-config key "
                                  f"(e.g. optimizer.rho, train.lr, train.seed, squat.lr_steps)")
        parent = sweep.experiments[exp.parent] if exp.parent else None
        if exp.parent_levels and not parent.method.chained:
            raise ConfigError(f"experiments.{name}.parent_levels: got {exp.parent_levels}; expected nothing, "
                              f"since its parent {exp.parent!r} is not an imp experiment")
        if exp.parent_levels and not all(1 <= lv <= parent.levels for lv in exp.parent_levels):
            raise ConfigError(f"experiments.{name}.parent_levels: got {exp.parent_levels}; expected levels in "
                              f"1..{parent.levels} of {exp.parent!r}")
        for key in exp.group_by:
            if not field_exists(RunConfig, key):
                raise ConfigError(f"experiments.{name}.group_by: {key!r} is not a run-config key")
        if parent and (exp.feed == "group") != bool(exp.method.feed_group):
            expected = ("group: it takes several parent trials at once, e.g. feed: group, group_by: [train.seed]"
                        if exp.method.feed_group else "each or best: it takes one parent trial per trial")
            raise ConfigError(f"experiments.{name}.feed: got {exp.feed!r}; expected {expected} (kind {exp.kind})")
        validate_run(sweep, name, first_point(space))
        for key, domain in space.items():  # every listed value of a grid/choice must be valid too
            for value in domain.get("grid", domain.get("choice", []))[1:]:
                validate_run(sweep, name, {**first_point(space), key: value})
        if parent:
            _check_parent_outputs(sweep, name)
    return sweep


def make_record(sweep: SweepFile, root: str, name: str, point: dict, parent: dict | None = None,
                parent_summary: dict | None = None, level: int | None = None,
                group: list[tuple[dict, dict]] | None = None) -> dict:
    """The trial of experiment `name` at `point`, fed by `parent` (or, with feed: group, by every (record, summary)
    of `group`, in order): its id, its folder and its resolved run config. It inherits the searched values its
    parents share. Raises ConfigError when the parent trials did not leave what this method needs."""
    exp = sweep.experiments[name]
    members = group or ([(parent, parent_summary or {})] if parent else [])
    own = set(flatten(exp.config))
    inherited = {k: v for k, v in shared_point([r.get("point", {}) for r, _ in members]).items() if k not in own}
    raw = raw_config(sweep, name, inherited, point)
    raw.pop("output", None)
    parents = [r["id"] for r, _ in members]
    tid = trial_id({"experiment": name, "kind": exp.kind, "config": raw, "level": level}, parents)
    folder = storage.join(root, tid)
    if members:  # what the child takes from its parent trials (docs/SWEEPS.md)
        try:
            if group:
                exp.method.feed_group(raw, [(r, s.get("outputs", {})) for r, s in group], exp)
            else:
                exp.method.feed(raw, (parent_summary or {}).get("outputs", {}), exp, level)
        except methods.ParentOutputMissing as err:
            raise ConfigError(f"trial {tid} of experiment {name!r}: {err} (parent trial(s) {', '.join(parents)}, "
                              f"kind {exp.kind} needs {', '.join(exp.method.needs)})") from None
    raw["output"] = {"storage_path": folder, "name": "train"}
    record = {"id": tid, "sweep": sweep.name, "experiment": name, "kind": exp.kind, "parents": parents,
              "level": level, "point": {**inherited, **point}, "config": raw, "dir": folder}
    cfg = config_lib.from_dict(raw, source=f"trial {tid} of experiment {name!r}")
    record["config"] = cfg.model_dump(mode="json")
    return record
