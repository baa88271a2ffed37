"""The sweep-file schema: a named graph of experiments over run configs.

A sweep file (sweeps/*.yaml) has a name, storage, W&B settings, `defaults` (a partial run config shared by every
run) and named `experiments`. An experiment has a kind, run-config overrides (`config`), and either a search over
run-config keys (searched experiments) or a parent experiment whose finished trials feed it (dependent
experiments: IMP levels, transfers, CoFi students, PTQ, SQuAT, sharpness).

This module is the schema alone (each key, its type and its help); flatray.sweep.graph loads a file and checks
what spans experiments (parents, what each parent produces, every experiment's run config).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flatray import methods

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
# The searcher lists an experiment's points (grid points x samples) for each parent trial before drawing them: a
# bound keeps an absurd num_samples or grid an error here, not an exhausted memory after Ray has started.
MAX_POINTS = 100_000


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SearchSettings(Section):
    space: dict[str, dict[str, list]] = Field(default_factory=dict,
                                              description="run-config key -> {grid|choice|uniform|loguniform|randint: values}")
    algorithm: Literal["optuna", "grid", "random"] = "optuna"
    scheduler: Literal["asha", "none"] = "asha"
    num_samples: int = Field(1, ge=1, le=MAX_POINTS,
                             description="samples of the non-grid part of the space (times every grid point)")
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
                if (len(values) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
                        or values[0] >= values[1]):
                    raise ValueError(f"{key}: {kind} takes [low, high] with low < high, got {values}")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"{key}: loguniform needs low > 0, got {values}")
            elif not values:
                raise ValueError(f"{key}: {kind} needs at least one value")
        return space


class Experiment(Section):
    kind: str = Field(description="the method its trials run (flatray.methods), e.g. finetune, imp, transfer, ptq")
    config: dict[str, Any] = Field(default_factory=dict, description="run-config overrides (nested or dotted keys)")
    search: SearchSettings | None = None
    parent: str | None = None
    feed: Literal["each", "best", "group"] = Field(
        "each", description="which finished parent trials feed this experiment: each one; the best of each group "
        "once the parent experiment is complete; or all of each group at once (a trial per group, e.g. a contour)")
    group_by: list[str] = Field(default_factory=list, description="with feed: best or group, run-config keys whose "
                                "values make a group of parent trials (e.g. [train.seed]); none = one group")
    parent_levels: list[int] | None = Field(None, description="with an imp parent: only its trials at these levels "
                                            "feed this experiment (e.g. [5] for tickets at 50%); default all")
    levels: int = Field(9, ge=1, description="imp: pruning levels after the dense parent (sparsity = level x step): "
                        "9 x 0.1 gives P1's 10 rounds, 0% to 90%")
    sparsity_step: float = Field(0.1, gt=0, lt=1)
    retries: int = Field(1, ge=0, description="re-runs of a failed trial from its last checkpoint")

    @field_validator("kind")
    @classmethod
    def _known_method(cls, kind):
        if methods.canonical(kind) not in methods.names():
            raise ValueError(f"one of {', '.join(map(repr, methods.names()))}")
        return kind  # as written: trial ids hash it, so an alias keeps the ids of the name it stands for

    @property
    def method(self) -> methods.Method:
        return methods.get(self.kind)

    @model_validator(mode="after")
    def _parent_rules(self):
        method = self.method
        if method.needs and not self.parent:
            raise ValueError(f"kind {self.kind} needs a parent experiment")
        if not method.needs and self.parent:
            raise ValueError(f"kind {self.kind} has no parent (use a method that starts from a parent's outputs, "
                             f"e.g. {', '.join(m.name for m in methods.entries() if m.needs)})")
        if method.chained and self.search and (self.search.algorithm != "grid" or any(
                "grid" not in d and "choice" not in d for d in self.search.space.values())):
            raise ValueError(f"a {self.kind} experiment's search is a grid (each point starts a chain of levels): "
                             "algorithm: grid, with grid or choice values only")
        if method.chained and round(self.levels * self.sparsity_step, 9) >= 1:
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
    max_concurrent: int | None = Field(None, ge=1, description="at most this many trials at once (--max-concurrent "
                                       "wins); default: as many as the cluster holds at its largest")
    wandb: WandbSettings = WandbSettings()
    defaults: dict[str, Any] = Field(default_factory=dict, description="a partial run config shared by every run")
    experiments: dict[str, Experiment] = Field(min_length=1)
