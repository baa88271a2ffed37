"""Configuration: the run schema (one section per method), the sweep-file schema, and their errors.

Every section forbids unknown keys. A wrong file raises `ConfigError` before any Ray or DeepSpeed work starts; its
message names the key, the bad value and what is allowed. Keys left out take the defaults of METHODS.md for the task
(max length, batch size, lr, epochs). This package imports neither torch, datasets nor Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flatray.config.errors import ConfigError, exists, explain, parse_overrides, read_mapping, set_dotted
from flatray.config.run import (CoFiConfig, DataConfig, DeepSpeedConfig, OptimizerConfig, OutputConfig, PruneConfig,
                                 PTQConfig, RunConfig, ScalingConfig, SharpnessConfig, SquatConfig, TrainConfig,
                                 trial_id)

RECIPES = Path(__file__).parent.parent / "recipes"

__all__ = ["CoFiConfig", "ConfigError", "DataConfig", "DeepSpeedConfig", "OptimizerConfig", "OutputConfig", "PTQConfig",
           "PruneConfig", "RunConfig", "ScalingConfig", "SharpnessConfig", "SquatConfig", "TrainConfig", "explain",
           "from_dict", "load", "parse_overrides", "set_dotted", "trial_id"]


def from_dict(raw: Any, source: str = "<dict>", overrides: list[str] = ()) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid run config ({source}): expected a mapping of keys at the top level, got {type(raw).__name__}")
    raw = json.loads(json.dumps(raw))  # deep copy; YAML gives plain types
    for key, value in parse_overrides(list(overrides)):
        set_dotted(raw, key, value)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(explain(err, source, RunConfig)) from None


def load(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Load and validate a run YAML. A bare name (e.g. 'smoke') loads flatray/recipes/<name>.yaml."""
    path = Path(path)
    if not exists(path) and path.suffix == "" and exists(RECIPES / f"{path}.yaml"):
        path = RECIPES / f"{path}.yaml"
    if not exists(path):
        names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise ConfigError(f"run file {str(path)!r} not found (built-in recipes: {names})")
    raw = read_mapping(path, "run config", example="model: tiny-bert, task: toy")
    return from_dict(raw, str(path), overrides)
