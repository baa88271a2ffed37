"""Early stopping for a sweep: one ASHA bracket per searched group, never across groups or methods."""

from __future__ import annotations

import json

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from flatray.config.sweep import SweepFile
from flatray.sweep.graph import grid_keys


class SweepScheduler(FIFOScheduler):
    """ASHA early stopping within each searched group (one experiment, one parent, one grid point) that asks for it,
    for methods the registry lets early stopping cut short; every other trial runs to its end."""

    def __init__(self, sweep: SweepFile, stopped: set[str]):
        super().__init__()
        self.sweep, self.stopped = sweep, stopped
        self.groups: dict[str, object] = {}

    def _asha(self, trial):
        cfg = trial.config.get("flatray")
        if not cfg:
            return None
        exp = self.sweep.experiments[cfg["experiment"]]
        if not exp.search or exp.search.scheduler != "asha" or not exp.method.early_stopping:
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
