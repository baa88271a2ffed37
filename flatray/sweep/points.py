"""The points of one experiment for one parent trial: each grid point times `num_samples` draws of the rest of the
search space, by Optuna TPE (Ray Tune's OptunaSearch, one study per grid point) or at random, seeded by the
experiment and its parent so that a re-run draws the same points."""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass, field

from flatray.config import trial_id
from flatray.config.sweep import SearchSettings, SweepFile
from flatray.sweep.graph import grid_keys


def _tune_domain(domain: str, values: list):
    from ray import tune

    return {"choice": lambda: tune.choice(values), "uniform": lambda: tune.uniform(*values),
            "loguniform": lambda: tune.loguniform(*values), "randint": lambda: tune.randint(*values)}[domain]()


@dataclass
class Points:
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
    def create(cls, sweep: SweepFile, name: str, parent: dict | None) -> "Points":
        exp = sweep.experiments[name]
        search = exp.search or SearchSettings()
        grid = {k: search.space[k][next(iter(search.space[k]))] for k in grid_keys(exp)}
        rest = {k: d for k, d in search.space.items() if k not in grid}
        points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
        samples = search.num_samples if rest else 1  # a pure grid has nothing to sample twice
        seed = int(trial_id({"experiment": name}, [parent["id"]] if parent else []), 16) % 2**31
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
                name, values = next(iter(domain.items()))
                point[key] = {"choice": lambda: self.rng.choice(values), "uniform": lambda: self.rng.uniform(*values),
                              "loguniform": lambda: math.exp(self.rng.uniform(math.log(values[0]), math.log(values[1]))),
                              "randint": lambda: self.rng.randrange(*values)}[name]()
        return point, handle

    def tell(self, handle: tuple | None, score: float | None) -> None:
        if handle is None:
            return
        group, inner_id = handle
        if score is None:
            self.inner[group].on_trial_complete(inner_id, None, error=True)
        else:
            self.inner[group].on_trial_complete(inner_id, {self.optuna["metric"]: score})
