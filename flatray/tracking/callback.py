"""The live side: a Ray Tune callback on the driver that keeps one W&B run per trial.

Each trial's run has the sweep as its group and the experiment kind as its job type; its outputs (model checkpoint,
pruning mask, quantized export) are logged as artifacts and its parents' outputs are declared as its inputs, so
W&B's lineage graph follows the sweep's experiment graph. W&B never stops a sweep: every W&B call is wrapped, and a
failure costs one warning line in the log.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ray.tune import Callback

from flatray import storage
from flatray.config.sweep import WandbSettings
from flatray.tracking.runs import artifact_name, consumed, declare_input, output_artifact, outputs, run_id, wandb_mode

log = logging.getLogger("flatray.tracking")  # the package's name: what users (and tests) filter W&B warnings by

# Tune's bookkeeping in every result, not metrics of the run.
TUNE_KEYS = {"timestamp", "training_iteration", "done", "pid", "hostname", "node_ip", "date", "trial_id", "config",
             "checkpoint_dir_name", "iterations_since_restore", "should_checkpoint", "experiment_tag",
             "episodes_total", "timesteps_total", "timesteps_since_restore", "time_since_restore"}


class WandbTrials(Callback):
    """One W&B run per Tune trial (driver-side), with its parents' outputs as inputs and its own as outputs.

    root: the sweep's folder (<storage>/<sweep>, local or s3:// gs://), trial folders are root/<id>/.
    wandb_dir: local folder for the runs (offline-run-*), default <root>/wandb.
    """

    def __init__(self, settings: WandbSettings, sweep: str, root: str, wandb_dir: str | None = None):
        self.settings, self.sweep, self.root = settings, sweep, root
        wandb_dir = Path(wandb_dir or storage.join(root, "wandb"))
        # W&B writes its runs to <dir>/wandb/: its dir is the parent of a folder named wandb.
        self.wandb_dir = str(wandb_dir.parent if wandb_dir.name == "wandb" else wandb_dir)
        self.mode = wandb_mode(settings)
        self._runs: dict[str, Any] = {}  # Tune trial id -> open W&B run

    def __getstate__(self):  # Tune pickles its callbacks (tuner.pkl); open runs do not travel
        return {**self.__dict__, "_runs": {}}

    def _safe(self, what: str, trial_id: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - W&B must never fail a trial or the sweep
            first = (str(err).strip().splitlines() or [""])[0]
            log.warning("W&B %s failed for trial %s (%s: %s); the sweep goes on", what, trial_id,
                        type(err).__name__, first)
            return None

    # -- Tune hooks: each one wrapped whole, and the steps that can fail alone wrapped again ----------------------

    def on_trial_start(self, iteration, trials, trial, **info):
        self._safe("start", _name(trial), self._start, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run = self._runs.get(trial.trial_id)
        if run is not None:
            self._safe("log", _name(trial), self._log, run, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._safe("end", _name(trial), self._end, trial, False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._safe("end", _name(trial), self._end, trial, True)

    def on_experiment_end(self, trials, **info):
        self.close()

    def close(self) -> None:
        """Finish the runs still open (trials that never ended, e.g. an interrupted sweep) as not done."""
        for trial_id, run in list(self._runs.items()):
            self._safe("finish", trial_id, run.finish, exit_code=1)
        self._runs.clear()

    # -- the work ------------------------------------------------------------------------------------------------

    def _start(self, trial) -> None:
        rec = trial.config.get("flatray")
        if self.mode == "disabled" or not rec or trial.trial_id in self._runs:  # a restarted trial keeps its run
            return
        import wandb

        os.makedirs(self.wandb_dir, exist_ok=True)
        lineage = {k: rec.get(k) for k in ("experiment", "id", "parents", "point", "level")}
        run = wandb.init(
            id=run_id(self.sweep, rec["id"]), project=self.settings.project, entity=self.settings.entity,
            group=self.sweep, job_type=rec["kind"], name=f'{rec["experiment"]}-{rec["id"]}',
            config={**rec["config"], "flatray": lineage}, dir=self.wandb_dir, mode=self.mode, resume="allow",
            reinit="create_new",  # one process holds the runs of all running trials
            # console off: the driver's output is Tune's, not one trial's; stats off: trials train on workers.
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True, init_timeout=30,
                                    use_dot_wandb=False),
        )
        self._runs[trial.trial_id] = run
        for parent in rec.get("parents") or []:
            summary = storage.read_json(storage.join(self.root, parent, "summary.json"))
            if summary is None:
                log.warning("W&B: no summary.json for parent %s of trial %s: no inputs declared", parent, rec["id"])
                continue
            for what in consumed(rec["kind"], summary):
                self._safe(f"input {artifact_name(summary, what)}", rec["id"], declare_input, run, summary, what)

    def _log(self, run, result: dict) -> None:
        metrics = {k: v for k, v in _flatten(result).items() if _is_metric(k, v)}
        epoch = result.get("epoch")
        run.log(metrics, step=int(epoch) if isinstance(epoch, (int, float)) else None)

    def _end(self, trial, failed: bool) -> None:
        run = self._runs.pop(trial.trial_id, None)
        if run is None:
            return
        rec = trial.config["flatray"]
        path = storage.join(self.root, rec["id"], "summary.json")
        summary = self._safe("read of summary.json", rec["id"], storage.read_json, path) or {}
        status = "failed" if failed else summary.get("status", "done")
        for what in [] if failed else outputs(summary):
            self._safe(f"output {what}", rec["id"], lambda w: run.log_artifact(output_artifact(summary, w)), what)
        final = {**(summary.get("metrics") or {}), "status": status}
        error = summary.get("error") or (failed and _trial_error(trial))
        if error:  # the exception line ends the traceback
            final["error"] = str(error).strip().splitlines()[-1][:1000]
        self._safe("summary", rec["id"], run.summary.update, final)
        self._safe("finish", rec["id"], run.finish, exit_code=1 if status == "failed" else 0)


def _trial_error(trial) -> str | None:
    # Tune's local error.txt: written before on_trial_error (trial.get_error() reads storage, synced later).
    path = trial.error_file
    return Path(path).read_text() if path and Path(path).exists() else None


def _name(trial) -> str:
    return (trial.config.get("flatray") or {}).get("id") or str(trial)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "config":
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_metric(key: str, value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and key not in TUNE_KEYS and not key.startswith("time_"))
