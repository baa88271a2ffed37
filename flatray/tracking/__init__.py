"""W&B tracking for a sweep: one W&B run per Tune trial, logged from the driver by a Ray Tune callback.

Each trial's run has the sweep as its group and the experiment kind as its job type; its outputs (model checkpoint,
pruning mask, quantized export) are logged as artifacts and its parents' outputs are declared as its inputs, so
W&B's lineage graph follows the sweep's experiment graph. W&B never stops a sweep: every W&B call is wrapped, and a
failure costs one warning line in the log.

Lineage in offline mode. `Run.use_artifact` refuses to run offline (TypeError), and an artifact cannot be looked
up by name without the server. What `use_artifact(draft_artifact)` does online is log the draft as a *user-created*
artifact with `use_after_commit`; that works offline too: it writes an ArtifactRecord (user_created,
use_after_commit) to the run's .wandb file. On `wandb sync`, wandb-core's ArtifactSaver sends createArtifact
without the run as creator (user_created) and with digest deduplication, so when the parent's artifact with the
same name and content (same digest) is already on the server it gets that version back, and then calls useArtifact
for the child's run: parent run -> artifact version -> child run. The child therefore rebuilds the parent's
artifact exactly as the parent built it (same name, type and entries: `output_artifact` from the parent's summary.json).
Sync parents before children (`sync` below does, one run at a time in start order): `wandb sync` of a whole folder
runs in parallel in no set order, and a child synced first would create the version itself, without the parent
as its producer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray.tune import Callback

from flatray import storage
from flatray.config.sweep import WandbSettings

log = logging.getLogger(__name__)

# What a child trial takes from its parent trial (docs/SWEEPS.md), as the parent's artifact kinds.
CONSUMES = {"imp": ("model", "mask"), "transfer": ("mask",), "structured": ("model",), "ptq": ("model",),
            "squat": ("model",), "sharpness": ("model",)}
ARTIFACT_TYPES = {"model": "model", "mask": "mask", "export": "quantized-model"}
# Tune's bookkeeping in every result, not metrics of the run.
TUNE_KEYS = {"timestamp", "training_iteration", "done", "pid", "hostname", "node_ip", "date", "trial_id", "config",
             "checkpoint_dir_name", "iterations_since_restore", "should_checkpoint", "experiment_tag",
             "episodes_total", "timesteps_total", "timesteps_since_restore", "time_since_restore"}


def wandb_mode(settings: WandbSettings) -> str:
    """online | offline | disabled. WANDB_MODE wins; auto is online only with an API key and a reachable host."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if settings.mode != "auto":
        return settings.mode
    if not os.environ.get("WANDB_API_KEY"):
        return "offline"
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=2).close()
        return "online"
    except OSError:  # no route out (cluster nodes often have none): log offline, `wandb sync` later
        return "offline"


def run_id(sweep: str, trial_id: str) -> str:
    """The trial's W&B run id: stable across re-runs (resume), only characters W&B allows in ids, at most 64."""
    clean = lambda s: re.sub(r"[^A-Za-z0-9_.-]", "-", s)  # noqa: E731
    trial_id = clean(trial_id)[:64]
    return f"{clean(sweep)[:63 - len(trial_id)]}-{trial_id}".lstrip("-")


def artifact_name(summary: dict, what: str) -> str:
    """Deterministic, so that a child names the very artifact its parent logged."""
    return f'{summary["kind"]}-{summary["id"]}-{ARTIFACT_TYPES[what]}'


def output_artifact(summary: dict, what: str):
    """One output of a trial as a draft artifact, built the same way by the trial and by each of its children."""
    import wandb

    path = summary["outputs"][what]
    art = wandb.Artifact(artifact_name(summary, what), type=ARTIFACT_TYPES[what])
    if "://" in path:
        # s3:// gs://: the entry add_reference(path, checksum=False) makes, without its need for boto3 / GCS
        # clients on the driver: W&B stores the URI only.
        from wandb.sdk.artifacts.artifact_manifest_entry import ArtifactManifestEntry

        name = path.rstrip("/").rsplit("/", 1)[-1]
        art.manifest.add_entry(ArtifactManifestEntry(path=name, ref=path, digest=path))
    elif what == "model":
        # A reference to the checkpoint folder: multi-GB checkpoints are neither copied nor hashed (hashing them
        # would stall Tune's loop); the digest then depends on the file paths, enough since a trial's folder is
        # named by the hash of what determines it (its id).
        art.add_reference(Path(path).resolve().as_uri(), checksum=False)
    else:
        # immutable: uploaded at sync time from where it is, not copied into W&B's staging folder first.
        art.add_file(str(Path(path).resolve()), policy="immutable")
    return art


def _outputs(summary: dict) -> list[str]:
    return [what for what, path in (summary.get("outputs") or {}).items() if path and what in ARTIFACT_TYPES]


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
            for what in sorted(set(CONSUMES.get(rec["kind"], ())) & set(_outputs(summary))):
                self._safe(f"input {artifact_name(summary, what)}", rec["id"], _use, run, summary, what)

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
        for what in [] if failed else _outputs(summary):
            self._safe(f"output {what}", rec["id"], lambda w: run.log_artifact(output_artifact(summary, w)), what)
        final = {**(summary.get("metrics") or {}), "status": status}
        error = summary.get("error") or (failed and _trial_error(trial))
        if error:  # the exception line ends the traceback
            final["error"] = str(error).strip().splitlines()[-1][:1000]
        self._safe("summary", rec["id"], run.summary.update, final)
        self._safe("finish", rec["id"], run.finish, exit_code=1 if status == "failed" else 0)


def _use(run, summary: dict, what: str) -> None:
    # = run.use_artifact(draft) minus its offline guard and its blocking wait (see the module docstring).
    run._log_artifact(output_artifact(summary, what), is_user_created=True, use_after_commit=True)


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


# -- offline runs: read back, sync in order ----------------------------------------------------------------------


def _records(path: Path):
    """The records of a .wandb transaction log: a 7-byte header (":W&B", 0xBEE1, version 0), then LevelDB-log
    chunks in 32 KiB blocks (crc32 over type + data, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if kind == 0 or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return  # zero padding or a torn write at the end: what came before is complete
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):  # full or last chunk of a record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _set(tree: dict, item) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = json.loads(item.value_json)


def read_offline_runs(wandb_dir: str) -> list[dict]:
    """Every offline run under wandb_dir (the folder holding offline-run-*, or its parent), from its .wandb file:
    id, name, group, job_type, config, logged_artifacts and used_artifacts ({name, type, digest}), history (rows
    with _step), summary (without W&B's own _keys), exit_code (None if never finished), start_time, path."""
    base = Path(wandb_dir)
    files = sorted(base.glob("offline-run-*/*.wandb")) + sorted(base.glob("wandb/offline-run-*/*.wandb"))
    runs = []
    for file in files:
        run = {"path": str(file.parent), "config": {}, "summary": {}, "history": [], "logged_artifacts": [],
               "used_artifacts": [], "exit_code": None}
        for record in _records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run.update(id=r.run_id, name=r.display_name, group=r.run_group, job_type=r.job_type,
                           entity=r.entity, project=r.project, start_time=r.start_time.ToDatetime())
                for item in r.config.update:
                    _set(run["config"], item)
            elif kind == "config":
                for item in record.config.update:
                    _set(run["config"], item)
            elif kind == "summary":
                for item in record.summary.update:
                    _set(run["summary"], item)
            elif kind == "history":
                row = {}
                for item in record.history.item:
                    _set(row, item)
                run["history"].append(row)
            elif kind == "artifact":
                a = record.artifact
                used = a.user_created and a.use_after_commit
                run["used_artifacts" if used else "logged_artifacts"].append(
                    {"name": a.name, "type": a.type, "digest": a.digest})
            elif kind == "use_artifact":
                run["used_artifacts"].append({"name": record.use_artifact.name, "type": record.use_artifact.type,
                                              "digest": None})
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        run["config"].pop("_wandb", None)
        run["summary"] = {k: v for k, v in run["summary"].items() if not k.startswith("_")}
        runs.append(run)
    return runs


def sync_order(wandb_dir: str) -> list[str]:
    """The offline run folders in start order: a child starts after its parent ended, so parents come first."""
    return [run["path"] for run in sorted(read_offline_runs(wandb_dir), key=lambda run: run["start_time"])]


def sync(wandb_dir: str, *args: str) -> None:
    """`wandb sync` the offline runs one at a time, parents first (extra args go to `wandb sync`, e.g. -e ENTITY).
    Note: -e/-p move the runs only; their artifacts stay where they were logged (entity/project of the sweep file)."""
    for path in sync_order(wandb_dir):
        subprocess.run([sys.executable, "-m", "wandb", "sync", *args, path], check=False)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flatray.tracking",
                                     description="Upload a sweep's offline W&B runs, parents before children "
                                                 "(so W&B's lineage graph links them).")
    parser.add_argument("command", choices=["sync"])
    parser.add_argument("wandb_dir", help="<storage>/<sweep>/wandb")
    parser.add_argument("wandb_args", nargs=argparse.REMAINDER, help="passed on to `wandb sync`, e.g. -e ENTITY")
    args = parser.parse_args(argv)
    sync(args.wandb_dir, *args.wandb_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
