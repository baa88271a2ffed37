"""Sweep files: a named graph of experiments over run configs, validated before anything starts.

A sweep file (sweeps/*.yaml) has a name, storage, W&B settings, `defaults` (a partial run config shared by every
run) and named `experiments`. An experiment has a kind, run-config overrides (`config`), and either a search over
run-config keys (searched experiments) or a parent experiment whose finished trials feed it (dependent
experiments: IMP levels, transfers, CoFi students, PTQ, SQuAT, sharpness).

This module only reads and checks the file and expands what can be known before running: the experiment graph in
dependency order, the static part of each trial's run config, trial ids. Running it is flatray.sweep's job.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flatray import config as config_lib
from flatray.config import ConfigError, RunConfig

# Experiment kinds and the run kind each one runs as. Dependent kinds take their parent trial's best checkpoint.
RUN_KIND = {"finetune": "finetune", "imp": "finetune", "transfer": "finetune", "structured": "structured",
            "ptq": "ptq", "squat": "squat", "sharpness": "sharpness"}
NEEDS_PARENT = {"imp", "transfer", "structured", "ptq", "squat", "sharpness"}
DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Search(Section):
    space: dict[str, dict[str, list]] = Field(default_factory=dict,
                                              description="run-config key -> {grid|choice|uniform|loguniform|randint: values}")
    algorithm: Literal["optuna", "grid", "random"] = "optuna"
    scheduler: Literal["asha", "none"] = "asha"
    num_samples: int = Field(1, ge=1, description="samples of the non-grid part of the space (times every grid point)")
    metric: str = "score"
    mode: Literal["max", "min"] = "max"

    @field_validator("space")
    @classmethod
    def _domains(cls, space):
        for key, domain in space.items():
            if len(domain) != 1 or next(iter(domain)) not in DOMAINS:
                raise ValueError(f"{key}: one of {', '.join(DOMAINS)} with its values, e.g. {{grid: [adam, sam]}}")
            kind, values = next(iter(domain.items()))
            if kind in ("uniform", "loguniform", "randint"):
                if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                    raise ValueError(f"{key}: {kind} takes [low, high] with low < high, got {values}")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"{key}: loguniform needs low > 0, got {values}")
            elif not values:
                raise ValueError(f"{key}: {kind} needs at least one value")
        return space


class Experiment(Section):
    kind: Literal["finetune", "imp", "transfer", "structured", "ptq", "squat", "sharpness"]
    config: dict[str, Any] = Field(default_factory=dict, description="run-config overrides (nested or dotted keys)")
    search: Search | None = None
    parent: str | None = None
    feed: Literal["each", "best"] = Field("each", description="which finished parent trials feed this experiment")
    group_by: list[str] = Field(default_factory=list, description="with feed: best, the best parent per group")
    parent_levels: list[int] | None = Field(None, description="with an imp parent: only its trials at these levels "
                                            "feed this experiment (e.g. [5] for tickets at 50%); default all")
    levels: int = Field(9, ge=1, description="imp: pruning levels after the dense parent (sparsity = level x step): "
                        "9 x 0.1 gives P1's 10 rounds, 0% to 90%")
    sparsity_step: float = Field(0.1, gt=0, lt=1)
    retries: int = Field(1, ge=0, description="re-runs of a failed trial from its last checkpoint")

    @model_validator(mode="after")
    def _parent_rules(self):
        if self.kind in NEEDS_PARENT and not self.parent:
            raise ValueError(f"kind {self.kind} needs a parent experiment")
        if self.kind == "finetune" and self.parent:
            raise ValueError("kind finetune has no parent (use imp or transfer to start from a parent's outputs)")
        if self.kind == "imp" and self.search and (self.search.algorithm != "grid" or any(
                "grid" not in d and "choice" not in d for d in self.search.space.values())):
            raise ValueError("an imp experiment's search is a grid (each point starts a chain of levels): "
                             "algorithm: grid, with grid or choice values only")
        if self.kind == "imp" and round(self.levels * self.sparsity_step, 9) >= 1:
            raise ValueError(f"levels x sparsity_step must stay below 1, got {self.levels} x {self.sparsity_step}")
        return self


class WandbSettings(Section):
    project: str = "flatray"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online when WANDB_API_KEY is set and W&B is reachable, else offline")


class SweepFile(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage: str = Field("results", description="local folder or s3:// / gs:// URI; trials go to <storage>/<name>/")
    wandb: WandbSettings = WandbSettings()
    defaults: dict[str, Any] = Field(default_factory=dict, description="a partial run config shared by every run")
    experiments: dict[str, Experiment] = Field(min_length=1)


# ---------------------------------------------------------------------------------------------------------------


def _merge(base: dict, overrides: dict) -> dict:
    """Deep merge; dotted keys in `overrides` address nested sections."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        node, *rest = key.split(".")
        if rest:
            value = {".".join(rest): value}
        if isinstance(value, dict) and isinstance(out.get(node), dict):
            out[node] = _merge(out[node], value)
        else:
            out[node] = _merge({}, value) if isinstance(value, dict) else copy.deepcopy(value)
    return out


def _field_exists(dotted: str) -> bool:
    model: type[BaseModel] = RunConfig
    for part in dotted.split("."):
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return part == dotted.split(".")[-1]
    return True


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
        visiting.append(name)
        parent = experiments[name].parent
        if parent:
            visit(parent)
        visiting.pop()
        done.append(name)

    for name in experiments:
        visit(name)
    return done


def set_kind(raw: dict, kind: str) -> dict:
    """The run kind of an experiment kind. PTQ measures int8 CPU latency, so its trials run on CPU workers even
    when the sweep's defaults ask for GPUs."""
    raw["kind"] = RUN_KIND[kind]
    if kind == "ptq" and raw.get("scaling", {}).get("use_gpu"):
        raw["scaling"] = {**raw["scaling"], "use_gpu": False, "resources_per_worker": None}
        raw.setdefault("deepspeed", {})["precision"] = "fp32"
    return raw


def raw_config(sweep: SweepFile, name: str, inherited: dict, point: dict) -> dict:
    """A trial's run config before validation: the defaults, the searched values inherited from its parent trial,
    the experiment's config, then its own point (later wins), with the experiment's run kind."""
    exp = sweep.experiments[name]
    raw = _merge(_merge(sweep.defaults, inherited), exp.config)
    return set_kind(_merge(raw, point), exp.kind)


def _inherited(sweep: SweepFile, name: str) -> dict:
    """The first search point of each ancestor, as a child trial inherits its parent's point."""
    exp = sweep.experiments[name]
    if not exp.parent:
        return {}
    parent = sweep.experiments[exp.parent]
    return {**_inherited(sweep, exp.parent), **first_point(parent.search.space if parent.search else {})}


def first_point(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """One point of a search space (the first value / the low end), to validate the resolved config with."""
    return {key: next(iter(domain.values()))[0] for key, domain in space.items()}


def validate_run(sweep: SweepFile, name: str, point: dict[str, Any]) -> RunConfig:
    """The run config of one trial of `name` at `point`; a ConfigError names the experiment."""
    exp = sweep.experiments[name]
    raw = raw_config(sweep, name, _inherited(sweep, name), point)
    # What the parent trial provides exists only at run time: stand-ins that pass the checks.
    if exp.kind in NEEDS_PARENT and "model" not in raw:
        raw["model"] = "tiny-bert"
    if exp.kind == "imp":
        raw.setdefault("prune", {}).update(sparsity=exp.sparsity_step, parent="parent://best-checkpoint")
    if exp.kind == "transfer":
        raw.setdefault("prune", {})["mask"] = "parent://mask.safetensors"
    try:
        return config_lib.from_dict(raw, source=f"experiment {name!r}")
    except ConfigError as err:
        raise ConfigError(str(err).replace("invalid run config", f"invalid sweep {sweep.name!r}", 1)) from None


def trial_id(run_config: RunConfig | dict, parent_ids: list[str] = ()) -> str:
    """open_lth's idea: a trial is addressed by a hash of everything that determines it, its parents included."""
    payload = run_config.model_dump(mode="json", exclude={"output", "address"}) \
        if isinstance(run_config, RunConfig) else run_config
    text = json.dumps({"config": payload, "parents": sorted(parent_ids)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load(path: str | Path, overrides: list[str] = ()) -> SweepFile:
    """Read and check a sweep file: schema, parents, search spaces, and each experiment's run config."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"sweep file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid sweep ({path}): not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid sweep ({path}): expected a mapping at the top level, got {type(raw).__name__}")
    for key, value in config_lib.parse_overrides(list(overrides)):
        config_lib.set_dotted(raw, key, value)
    try:
        sweep = SweepFile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(config_lib.explain(err, str(path), SweepFile)) from None
    for name in order(sweep.experiments):
        exp = sweep.experiments[name]
        space = exp.search.space if exp.search else {}
        for key in space:
            if not _field_exists(key):
                raise ConfigError(f"experiments.{name}.search.space: {key!r} is not a run-config key "
                                  f"(e.g. optimizer.rho, train.lr, train.seed, squat.lr_steps)")
        if exp.parent_levels and sweep.experiments[exp.parent].kind != "imp":
            raise ConfigError(f"experiments.{name}.parent_levels: got {exp.parent_levels}; expected nothing, "
                              f"since its parent {exp.parent!r} is not an imp experiment")
        if exp.parent_levels and not all(1 <= lv <= sweep.experiments[exp.parent].levels for lv in exp.parent_levels):
            raise ConfigError(f"experiments.{name}.parent_levels: got {exp.parent_levels}; expected levels in "
                              f"1..{sweep.experiments[exp.parent].levels} of {exp.parent!r}")
        for key in exp.group_by:
            if not _field_exists(key):
                raise ConfigError(f"experiments.{name}.group_by: {key!r} is not a run-config key")
        validate_run(sweep, name, first_point(space))
        for key, domain in space.items():  # every listed value of a grid/choice must be valid too
            for value in domain.get("grid", domain.get("choice", []))[1:]:
                validate_run(sweep, name, {**first_point(space), key: value})
    return sweep
