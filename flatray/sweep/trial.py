"""One sweep trial as a Tune trainable: a Ray Train run of the trial's config, retried from its last checkpoint,
and the trial's `summary.json` (written atomically at the end: its presence means finished)."""

from __future__ import annotations

import re
import time

from flatray import methods, storage
from flatray.config import RunConfig
from flatray.provenance import provenance
from flatray.train.loop import DIVERGED


def stopped_by_tune() -> bool:
    """Whether Tune has ended this trial (Ctrl-C, ASHA): its Ray Train run then fails as a consequence, which is
    neither a reason to retry nor a failure to record. The flag is Ray's private session state: Tune has no public
    way for a function trainable to ask."""
    try:
        from ray.train._internal.session import get_session

        session = get_session()  # None once Tune has cleaned the trial up
        return session is None or session.stop_event.is_set()
    except (ImportError, AttributeError):
        return False


def root_cause(text: str) -> str:
    """The first worker's exception in Ray Train's failure text ("ValueError (rank 0): ..."), whose own first line
    only says "Training failed due to worker errors:"; the text itself when it holds no worker traceback."""
    rank = re.search(r"\[Rank (\d+) Error Snippet\]", text)
    block = text[rank.end():] if rank else text
    found = None
    for line in block.splitlines():
        if line.startswith("[Rank "):
            break  # the next worker's snippet
        exc = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Diverged|Exit)): (.*)", line)
        if exc:
            found = exc
    if not found:
        return text.strip().splitlines()[0] if text.strip() else text
    where = f" (rank {rank.group(1)})" if rank else ""
    return f"{found.group(1).rsplit('.', 1)[-1]}{where}: {found.group(2)}"


def describe(error: BaseException) -> str:
    """`root_cause` of a raised error. Ray Train's own text cuts each worker's snippet in the middle when it is long
    (a long message loses its exception line), so a WorkerGroupError is read from its `worker_failures` (rank ->
    the worker's error, whose text is the whole traceback)."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        rank = min(failures)
        found = root_cause(f"[Rank {rank} Error Snippet]:\n{failures[rank]}")  # a traceback's text ...
        if not found.startswith("[Rank "):
            return found
        lines = str(failures[rank]).strip().splitlines()  # ... or the exception itself
        return f"{type(failures[rank]).__name__} (rank {rank}): {lines[0] if lines else ''}"
    return root_cause(f"{type(error).__name__}: {error}")


def worker_log(text: str) -> str | None:
    """The log file of the failed worker, from the note flatray.train.context puts under its exception."""
    found = re.search(r"^worker log: (\S+)", text, re.MULTILINE)
    return found.group(1) if found else None


def _cause(error: Exception) -> str:
    """The error as summary.json keeps it: the root cause first (the console and the results table show the first
    line), then Ray's whole text with the worker's traceback."""
    return f"{describe(error)}\n{type(error).__name__}: {error}"


def run_trial(tune_config: dict) -> None:
    """A Tune trial: one Ray Train run of the trial's config, retried from its last checkpoint on failure."""
    record, retries = tune_config["flatray"], tune_config["retries"]
    made_by = provenance()  # of this process: the code and libraries the trial really runs with
    record = {**record, "started": time.time(), "provenance": made_by}
    folder = record["dir"]
    start, attempt, error = time.time(), 0, None
    try:
        storage.write_json(storage.join(folder, "trial.json"), record)
        result, attempt, error = _fit_with_retries(record, retries)
        if error is None:  # a summary for complete outputs only: written whole, or not at all
            storage.write_json(storage.join(folder, "summary.json"),
                               {**summarize(record, result, attempt, time.time() - start), "provenance": made_by})
            return
    except storage.StorageError as err:  # a full disk fails this trial only; a re-run with space finishes it
        error = err
        print(f"[flatray] trial {record['id']} ({record['experiment']}) failed: {err}", flush=True)
    if "No space left" in str(error) and not isinstance(error, storage.StorageError):  # a worker's write
        error = storage.StorageError(f"No space left on device ({storage.free_space(folder)}) for {folder}: "
                                     f"{describe(error)}")
    try:
        storage.write_json(storage.join(folder, "summary.json"), {
            "id": record["id"], "experiment": record["experiment"], "kind": record["kind"], "status": "failed",
            "metrics": {}, "history": [], "checkpoint": None, "outputs": {}, "attempts": attempt,
            "wall_s": time.time() - start, "ended": time.time(), "error": _cause(error)[:4000],
            "log": worker_log(f"{error}"),
            "provenance": made_by})
    except storage.StorageError:
        pass  # the sweep's driver records the failure from the error raised here
    raise error


def _fit_with_retries(record: dict, retries: int):
    """(Ray's Result, attempts, None), or (None, attempts, the last error) when every attempt failed."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from flatray import train

    cfg = RunConfig.model_validate(record["config"])
    error = None
    # Retries are this loop rather than Ray Train's FailureConfig: each attempt is recorded (attempts.jsonl) and the
    # last error reaches summary.json; both restore the run's latest checkpoint the same way.
    attempts_file = storage.join(record["dir"], "attempts.jsonl")
    before = len(storage.read_lines(attempts_file))  # attempts of earlier runs of the sweep (it continues them)
    for attempt in range(1, retries + 2):
        storage.append_line(attempts_file, {"attempt": before + attempt, "start": time.time()})
        try:
            # Same name and storage as before: Ray Train restores the run's latest checkpoint, and the workers
            # continue from it (flatray.methods.finetune).
            return train.make_trainer(cfg, callbacks=[TuneReportCallback()]).fit(), attempt, None
        except Exception as err:  # ray.train.TrainingFailedError: a worker raised
            if stopped_by_tune():
                raise  # not a failure: the next run of the sweep continues this trial from its checkpoint
            error = err
            text = f"{type(err).__name__}: {err}"
            log = worker_log(text)
            print(f"[flatray] trial {record['id']} ({record['experiment']}) attempt {attempt}/{retries + 1} "
                  f"failed: {describe(err)[:300]}{f' (worker log {log})' if log else ''}", flush=True)
            if DIVERGED in str(err):  # a retry from the last checkpoint would diverge again
                break
    return None, attempt, error


def summarize(record: dict, result, attempts: int, wall_s: float) -> dict:
    """The trial's summary.json: the best checkpoint Ray kept (its report marked it as the best model so far) with
    its metrics, and the history of every epoch (from the latest checkpoint, which may be a later epoch)."""
    from flatray.train.checkpoint import BEST, HISTORY_FILE

    scheme = record["dir"].split("://")[0] + "://" if "://" in record["dir"] else ""

    def where(ckpt) -> str | None:
        if ckpt is None:
            return None
        return ckpt.path if "://" in ckpt.path or not scheme else scheme + ckpt.path

    ckpt, best = result.best_checkpoints[-1] if result.best_checkpoints else (None, None)
    if best is None or not best.get(BEST):  # no epoch ever scored (e.g. a NaN score): no model to hand on
        ckpt, best = None, result.metrics
    path, latest = where(ckpt), where(result.checkpoint)
    history = storage.read_json(storage.join(latest, HISTORY_FILE)) if latest else None
    outputs = dict.fromkeys(methods.ARTIFACT_TYPES)
    if path:
        files = set(storage.list_files(path))
        for what, name in methods.get(record["kind"]).files.items():  # what the method leaves, if it is there
            if name in files:
                outputs[what] = path if what == "model" else storage.join(path, name)
    scalar = (int, float, str, bool)  # and lists of numbers (SWA's swa_checkpoints)
    metrics = {k: v for k, v in (best or {}).items() if k != BEST and (isinstance(v, scalar) or (
        isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)))}
    return {"id": record["id"], "experiment": record["experiment"], "kind": record["kind"], "status": "done",
            "metrics": metrics, "history": history or [], "checkpoint": path, "outputs": outputs,
            "attempts": attempts, "wall_s": wall_s, "ended": time.time(), "error": None}
