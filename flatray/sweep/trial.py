"""One sweep trial as a Tune trainable: a Ray Train run of the trial's config, retried from its last checkpoint,
and the trial's `summary.json` (written atomically at the end: its presence means finished)."""

from __future__ import annotations

import re
import time

from flatray import methods, storage
from flatray.config import RunConfig
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


def _cause(error: Exception) -> str:
    """The error as summary.json keeps it: the root cause first (the console and the results table show the first
    line), then Ray's whole text with the worker's traceback."""
    text = f"{type(error).__name__}: {error}"
    return f"{root_cause(text)}\n{text}"


def run_trial(tune_config: dict) -> None:
    """A Tune trial: one Ray Train run of the trial's config, retried from its last checkpoint on failure."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from flatray import train

    record, retries = tune_config["flatray"], tune_config["retries"]
    record = {**record, "started": time.time()}
    folder = record["dir"]
    storage.write_json(storage.join(folder, "trial.json"), record)
    cfg = RunConfig.model_validate(record["config"])
    start, error = time.time(), None
    # Retries are this loop rather than Ray Train's FailureConfig: each attempt is recorded (attempts.jsonl) and the
    # last error reaches summary.json; both restore the run's latest checkpoint the same way.
    for attempt in range(1, retries + 2):
        error = None
        storage.append_line(storage.join(folder, "attempts.jsonl"), {"attempt": attempt, "start": time.time()})
        try:
            # Same name and storage as before: Ray Train restores the run's latest checkpoint, and the workers
            # continue from it (flatray.methods.finetune).
            result = train.make_trainer(cfg, callbacks=[TuneReportCallback()]).fit()
            break
        except Exception as err:  # ray.train.TrainingFailedError: a worker raised
            if stopped_by_tune():
                raise  # not a failure: the next run of the sweep continues this trial from its checkpoint
            error = err
            print(f"[flatray] trial {record['id']} ({record['experiment']}) attempt {attempt}/{retries + 1} "
                  f"failed: {root_cause(f'{type(err).__name__}: {err}')[:300]}", flush=True)
            if DIVERGED in str(err):  # a retry from the last checkpoint would diverge again
                break
    if error is not None:
        storage.write_json(storage.join(folder, "summary.json"), {
            "id": record["id"], "experiment": record["experiment"], "kind": record["kind"], "status": "failed",
            "metrics": {}, "history": [], "checkpoint": None, "outputs": {}, "attempts": attempt,
            "wall_s": time.time() - start, "ended": time.time(), "error": _cause(error)[:4000]})
        raise error
    storage.write_json(storage.join(folder, "summary.json"), summarize(record, result, attempt, time.time() - start))


def summarize(record: dict, result, attempts: int, wall_s: float) -> dict:
    ckpt = result.checkpoint
    path = None
    if ckpt is not None:
        scheme = record["dir"].split("://")[0] + "://" if "://" in record["dir"] else ""
        path = ckpt.path if "://" in ckpt.path or not scheme else scheme + ckpt.path
    history = storage.read_json(storage.join(path, "history.json")) if path else None
    outputs = dict.fromkeys(methods.ARTIFACT_TYPES)
    if path:
        files = set(storage.list_files(path))
        for what, name in methods.get(record["kind"]).files.items():  # what the method leaves, if it is there
            if name in files:
                outputs[what] = path if what == "model" else storage.join(path, name)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str, bool))}
    return {"id": record["id"], "experiment": record["experiment"], "kind": record["kind"], "status": "done",
            "metrics": metrics, "history": history or [], "checkpoint": path, "outputs": outputs,
            "attempts": attempts, "wall_s": wall_s, "ended": time.time(), "error": None}
