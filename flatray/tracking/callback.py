"""The live side: a Ray Tune callback on the driver that keeps one W&B run per trial.

Each trial's run has the sweep as its group and the experiment kind as its job type; its outputs (model checkpoint,
pruning mask, quantized export) are logged as artifacts and its parents' outputs are declared as its inputs, so
W&B's lineage graph follows the sweep's experiment graph. W&B never stops a sweep: every W&B call is wrapped, and a
failure costs one warning line in the log.

W&B not answering never costs a trial its run: when it does not answer at the start the runs are opened offline
(one console line says so), and when an online run fails to open later (each wait bounded by
runs.INIT_TIMEOUT_S) the callback goes offline for the rest of the sweep. `python -m flatray.tracking sync` uploads
the offline runs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ray.tune import Callback

from flatray import storage
from flatray.config.sweep import WandbSettings
from flatray.tracking import runs
from flatray.tracking.runs import (artifact_name, base_url, consumed, declare_input, offline_notice, output_artifact,
                                   outputs, run_id, run_mode)

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
        runs_dir = Path(wandb_dir or storage.join(root, "wandb"))
        # W&B writes its runs to <dir>/wandb/: its dir is the parent of a folder named wandb.
        self.wandb_dir = str(runs_dir.parent if runs_dir.name == "wandb" else runs_dir)
        self.runs_dir = str(Path(self.wandb_dir) / "wandb")  # where the offline-run-* folders land
        self.mode = run_mode(settings, self.runs_dir)
        self._runs: dict[str, Any] = {}  # Tune trial id -> open W&B run
        # Trials whose online run failed to open: W&B keeps a failed run's id taken until its service restarts
        # (wandb.teardown), which would end the open runs; their results wait here until none is open.
        self._waiting: dict[str, dict] = {}

    def __getstate__(self):  # Tune pickles its callbacks (tuner.pkl); open runs do not travel
        return {**self.__dict__, "_runs": {}, "_waiting": {}}

    def _safe(self, what: str, trial_id: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - W&B must never fail a trial or the sweep
            log.warning("W&B %s failed for trial %s (%s: %s); the sweep goes on", what, trial_id,
                        type(err).__name__, _first_line(err))
            return None

    # -- Tune hooks: each one wrapped whole, and the steps that can fail alone wrapped again ----------------------

    def on_trial_start(self, iteration, trials, trial, **info):
        self._safe("start", _name(trial), self._start, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run = self._runs.get(trial.trial_id)
        if run is not None:
            self._safe("log", _name(trial), self._log, run, result)
        elif trial.trial_id in self._waiting:
            self._waiting[trial.trial_id]["results"].append(dict(result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._safe("end", _name(trial), self._end, trial, False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._safe("end", _name(trial), self._end, trial, True)

    def on_experiment_end(self, trials, **info):
        self.close()

    def close(self) -> None:
        """Finish the runs still open (trials that never ended, e.g. an interrupted sweep) as not done."""
        for _ in range(2):  # then those of the trials still waiting for an offline run
            for trial_id, run in list(self._runs.items()):
                self._safe("finish", trial_id, run.finish, exit_code=1)
            self._runs.clear()
            self._safe("offline start", "(waiting)", self._open_waiting)
        if self.mode != "disabled":
            # Wait here for W&B's service to write out every run: its atexit hook is not reliable under Ray's
            # driver, and a run whose last records were still buffered would read back unfinished.
            import wandb

            self._safe("teardown", "(all)", wandb.teardown)

    # -- the work ------------------------------------------------------------------------------------------------

    def _start(self, trial) -> None:
        rec = trial.config.get("flatray")
        if self.mode == "disabled" or not rec or trial.trial_id in self._runs or trial.trial_id in self._waiting:
            return  # (a restarted trial keeps its run)
        # A trial that continues from its checkpoint (its sweep was stopped and run again) reports only the epochs
        # after it; the earlier ones may never have reached the W&B run of the stopped sweep: its run starts with them.
        resumed = self._safe("read of the checkpoint's history", rec["id"], _checkpoint_history, rec) or []
        try:
            run = self._open(rec)
        except Exception as err:
            if self.mode != "online":
                raise
            # W&B answered the check at the start but not now: offline from here on, this trial included.
            self.mode = "offline"
            offline_notice(base_url(), self.runs_dir, f"{type(err).__name__}: {_first_line(err)}")
            self._waiting[trial.trial_id] = {"trial": trial, "results": resumed, "ended": None}
            self._open_waiting()
            return
        self._runs[trial.trial_id] = run
        self._fill(run, rec, resumed)

    def _open(self, rec: dict):
        import wandb

        os.makedirs(self.wandb_dir, exist_ok=True)
        lineage = {k: rec.get(k) for k in ("experiment", "id", "parents", "point", "level")}
        return wandb.init(
            id=run_id(self.sweep, rec["id"]), project=self.settings.project, entity=self.settings.entity,
            group=self.sweep, job_type=rec["kind"], name=f'{rec["experiment"]}-{rec["id"]}',
            config={**rec["config"], "flatray": lineage}, dir=self.wandb_dir, mode=self.mode, resume="allow",
            reinit="create_new",  # one process holds the runs of all running trials
            # console off: the driver's output is Tune's, not one trial's; stats off: trials train on workers.
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True, use_dot_wandb=False,
                                    init_timeout=runs.INIT_TIMEOUT_S, finish_timeout=runs.FINISH_TIMEOUT_S),
        )

    def _fill(self, run, rec: dict, results: list[dict]) -> None:
        """A new run's inputs (its parents' outputs), then the results it missed."""
        for parent in rec.get("parents") or []:
            summary = storage.read_json(storage.join(self.root, parent, "summary.json"))
            if summary is None:
                log.warning("W&B: no summary.json for parent %s of trial %s: no inputs declared", parent, rec["id"])
                continue
            for what in consumed(rec["kind"], summary):
                self._safe(f"input {artifact_name(summary, what)}", rec["id"], declare_input, run, summary, what)
        for result in results:
            self._safe("log", rec["id"], self._log, run, result)

    def _open_waiting(self) -> None:
        """Open the waiting trials' runs offline and log what they reported meanwhile, once no other run is open."""
        if not self._waiting or self._runs:
            return
        import wandb

        wandb.teardown()  # frees the ids of the runs that failed to open
        waiting_trials, self._waiting = self._waiting, {}
        for trial_id, waiting in waiting_trials.items():
            trial = waiting["trial"]
            rec = trial.config["flatray"]
            run = self._safe("offline start", rec["id"], self._open, rec)
            if run is None:
                continue
            self._runs[trial_id] = run
            self._fill(run, rec, waiting["results"])
            if waiting["ended"] is not None:
                self._end(trial, waiting["ended"])

    def _log(self, run, result: dict) -> None:
        metrics = {k: v for k, v in _flatten(result).items() if _is_metric(k, v)}
        epoch = result.get("epoch")
        run.log(metrics, step=int(epoch) if isinstance(epoch, (int, float)) else None)

    def _end(self, trial, failed: bool) -> None:
        if trial.trial_id in self._waiting:
            self._waiting[trial.trial_id]["ended"] = failed
            return
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
        # The last epoch's row is committed only by a later step or the finish, and would then overwrite these.
        self._safe("log", rec["id"], run.log, {}, commit=True)
        self._safe("summary", rec["id"], run.summary.update, final)
        self._safe("finish", rec["id"], run.finish, exit_code=1 if status == "failed" else 0)
        self._open_waiting()


def _trial_error(trial) -> str | None:
    # Tune's local error.txt: written before on_trial_error (trial.get_error() reads storage, synced later).
    path = trial.error_file
    return Path(path).read_text() if path and Path(path).exists() else None


def _checkpoint_history(rec: dict) -> list[dict]:
    """The history.json of the checkpoint Ray Train resumes the trial from, [] when it has none: the latest one in
    the run's checkpoint_manager_snapshot.json (a checkpoint folder written but not yet listed there is not used)."""
    output = (rec.get("config") or {}).get("output") or {}
    if not output.get("storage_path") or not output.get("name"):
        return []
    run_dir = storage.join(output["storage_path"], output["name"])
    snapshot = storage.read_json(storage.join(run_dir, "checkpoint_manager_snapshot.json")) or {}
    latest = max((c["checkpoint_dir_name"] for c in snapshot.get("checkpoint_results") or []), default=None)
    return (storage.read_json(storage.join(run_dir, latest, "history.json")) or []) if latest else []


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0]


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
