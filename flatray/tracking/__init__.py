"""W&B tracking for a sweep: one W&B run per Tune trial, logged from the driver by a Ray Tune callback.

- runs: the W&B mode (one rule for the whole code base), run ids, a trial's artifacts and its inputs;
- callback: WandbTrials, the Ray Tune callback that opens, fills and finishes the runs during a sweep;
- offline: offline runs read back from their .wandb files, and `python -m flatray.tracking sync` (parents first;
  what a killed sweep left half-written is uploaded as far as it got or, when it holds nothing, skipped).

What a child takes from its parent and the artifact type of each output come from the method registry
(flatray.methods); tracking names no method.
"""

from flatray.tracking.offline import main, read_offline_runs, sync, sync_order, sync_plan
from flatray.tracking.runs import (ARTIFACT_TYPES, artifact_name, consumed, declare_input, output_artifact, outputs,
                                   run_id, run_mode, wandb_mode)

__all__ = ["ARTIFACT_TYPES", "WandbTrials", "artifact_name", "consumed", "declare_input", "main", "output_artifact",
           "outputs", "read_offline_runs", "run_id", "run_mode", "sync", "sync_order", "sync_plan", "wandb_mode"]


def __getattr__(name: str):
    # Lazy: WandbTrials subclasses ray.tune.Callback, and the report / `sync` must import this package without Ray.
    if name == "WandbTrials":
        from flatray.tracking.callback import WandbTrials

        return WandbTrials
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
