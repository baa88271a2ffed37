"""What a sweep or a run needs from outside its file, checked before Ray starts: a storage root it can write, models
that load, hub datasets that exist, and the data of tasks defined in the file (columns, labels, splits).

The file itself is checked by flatray.sweep.graph (sweeps) and flatray.config (runs). Here, each problem is one
line naming the key or experiment, the value and what is expected, and all of them make one ConfigError (exit 2).

The Hugging Face hub is asked with one short request per model and dataset (no retries), after one HEAD request that
tells whether it answers at all. Offline (HF_HUB_OFFLINE=1) only the local cache is asked. What cannot be verified
is one line: a warning in a dry run, an error in a real run, since the run could not load it either. With
HF_HUB_OFFLINE=1 a model or dataset in the local cache passes; with an unreachable hub and no HF_HUB_OFFLINE, every
load in every worker would retry the hub for minutes before falling back to the cache, so the line says to set it.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from flatray.config import ConfigError, RunConfig
from flatray.config.errors import short_repr
from flatray.config.sweep import SweepFile
from flatray.data.tasks import TaskSpec
from flatray.sweep.graph import first_point, order, validate_run

HUB_TIMEOUT_S = 5.0  # per request; a hub that answers at all answers in well under a second
BUCKETS = {  # bucket names as S3 and GCS allow them (syntax only: nothing is asked of the cloud here)
    "s3": (re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"), "3 to 63 lowercase letters, digits, '.' or '-'"),
    "gs": (re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]"), "3 to 222 lowercase letters, digits, '.', '_' or '-'"),
}


def check(sweep: SweepFile, dry_run: bool = False) -> list[str]:
    """Check what the sweep's trials need (its storage root, every model and hub dataset its experiments name);
    raise a ConfigError listing what stops it, return the warnings of a dry run."""
    problems = storage_problems(sweep.storage, "storage", create=not dry_run)
    models_needed: dict[str, list[str]] = {}
    data_needed: dict[tuple[str, str | None], tuple[TaskSpec, str | None, list[str]]] = {}
    defined_needed: dict[str, tuple[RunConfig, list[str]]] = {}
    for name in order(sweep.experiments):
        needs_model = "model" not in sweep.experiments[name].method.needs  # the others load their parent's model
        for cfg in _configs(sweep, name):
            if needs_model:
                models_needed.setdefault(cfg.model, []).append(name)
            if cfg.data.source == "hub":
                spec = cfg.task_spec
                data_needed.setdefault((cfg.data.path or spec.hub_path, spec.hub_config),
                                       (spec, cfg.data.path, []))[2].append(name)
            if cfg.task_definition:
                defined_needed.setdefault(_task_data_key(cfg), (cfg, []))[1].append(name)
    return _finish(problems + _hub_problems(models_needed, data_needed) + _task_data_problems(defined_needed),
                   dry_run)


def check_run(cfg: RunConfig) -> None:
    """The same for one run (`python -m flatray.train`): its storage, model and hub dataset; raises ConfigError."""
    problems = storage_problems(cfg.output.storage_path, "output.storage_path", create=True)
    data_needed = {}
    if cfg.data.source == "hub":
        spec = cfg.task_spec
        data_needed[(cfg.data.path or spec.hub_path, spec.hub_config)] = (spec, cfg.data.path, [])
    defined_needed = {_task_data_key(cfg): (cfg, [])} if cfg.task_definition else {}
    _finish(problems + _hub_problems({cfg.model: []}, data_needed) + _task_data_problems(defined_needed),
            dry_run=False)


def _finish(problems: list[tuple[str, bool]], dry_run: bool) -> list[str]:
    """Raise the errors as one ConfigError; return the warnings (dry run only)."""
    errors = [text for text, fatal in problems if fatal or not dry_run]
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} problems:\n  " + "\n  ".join(errors))
    return [f"{text}; a real run would stop here" for text, _ in problems]


def _configs(sweep: SweepFile, name: str):
    """The run configs of an experiment at its first search point and at each other listed value of a key that
    changes what it loads (model, task, data.*): every model and dataset its trials use, in a few validations."""
    exp = sweep.experiments[name]
    space = exp.search.space if exp.search else {}
    first = first_point(space)
    yield validate_run(sweep, name, first)
    for key, domain in space.items():
        if key in ("model", "task") or key.startswith("data."):
            for value in domain.get("grid", domain.get("choice", []))[1:]:
                yield validate_run(sweep, name, {**first, key: value})


# ------------------------------------------------------------------------------------------------------ storage

def storage_problems(value: str, key: str, create: bool) -> list[tuple[str, bool]]:
    """A storage root's problems, (line, fatal): a cloud URI's syntax (no network), or whether a local folder can be
    created and written: a probe file is written and removed in it (with `create`, after creating it) or in the
    nearest folder that exists."""
    def problem(why: str) -> list[tuple[str, bool]]:
        return [(f"{key}: got {short_repr(value)}{why}", True)]

    local = "a local folder or an s3:// / gs:// URI"
    if not value.strip() or any(c in value for c in "\0\n\r"):
        return problem(f"; expected {local}")
    if "://" in value:
        scheme, rest = value.split("://", 1)
        bucket, _, prefix = rest.partition("/")
        if scheme not in BUCKETS:
            return problem(f"; expected {local}, not a {scheme}:// URI")
        pattern, rule = BUCKETS[scheme]
        if not pattern.fullmatch(bucket) or ".." in bucket:
            return problem(f"; expected {scheme}://BUCKET/PREFIX with a bucket name of {rule}, e.g. "
                           f"{scheme}://my-bucket/flatray")
        if prefix and ("" in prefix.rstrip("/").split("/") or any(c.isspace() for c in prefix)):
            return problem(f"; expected {scheme}://BUCKET/PREFIX with a prefix of non-empty parts without spaces")
        return []
    expected = "; expected a folder this user can create and write in, or an s3:// / gs:// URI"
    try:
        folder = Path(value).expanduser().absolute()
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        existing = next(p for p in [folder, *folder.parents] if p.exists())  # a dry run creates no folder
    except RuntimeError as err:  # ~user/... of an unknown user
        return problem(f", but {err}{expected}")
    except OSError as err:
        return problem(f", but it cannot be created ({err.strerror or type(err).__name__}: {err.filename}){expected}")
    if not existing.is_dir():
        return problem(f", but {existing} is a file{expected}")
    probe = existing / f".flatray-write-probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return problem(f", but {existing} is not writable ({err.strerror or type(err).__name__}){expected}")
    return []


# -------------------------------------------------------------------------------------------- models and data

def hub_unreachable(timeout: float = HUB_TIMEOUT_S, endpoint: str | None = None) -> str | None:
    """Why the Hugging Face hub (HF_ENDPOINT) cannot be asked, or None when it answers: one HEAD request, no
    retries, given `timeout` s in all (a thread bounds the name lookup too, which socket timeouts do not)."""
    from huggingface_hub import constants

    endpoint = endpoint or constants.ENDPOINT
    hint = "set HF_HUB_OFFLINE=1 to use the local cache"
    answer: list[str | None] = []

    def ask() -> None:
        try:
            # the socket's own timeout is longer: the join below decides, whatever is slow (lookup, connect, answer)
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout + 1).close()
            answer.append(None)
        except urllib.error.HTTPError:
            answer.append(None)  # it answered
        except (OSError, ValueError) as err:
            answer.append(f"{endpoint} unreachable: {getattr(err, 'reason', None) or err}; {hint}")

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(timeout)
    return answer[0] if answer else f"{endpoint} did not answer within {timeout:g} s; {hint}"


def _hub_problems(models_needed: dict[str, list[str]], data_needed: dict) -> list[tuple[str, bool]]:
    """(line, fatal) per model or dataset that surely cannot load, and one line for those that cannot be verified
    (fatal only in a real run)."""
    from huggingface_hub import constants

    from flatray import data, models

    hub_models = [m for m in models_needed if models.is_hub_id(m)]
    offline = "HF_HUB_OFFLINE=1" if constants.is_offline_mode() else None
    unreachable = None if offline or not (hub_models or data_needed) else hub_unreachable()
    problems: list[tuple[str, bool]] = []
    unverified: dict[str, dict[str, list[str]]] = {}  # why -> {"model"|"data": what}
    for name, names in models_needed.items():
        try:
            why = unreachable if name in hub_models and unreachable else models.check(name, HUB_TIMEOUT_S)
        except models.ModelNotFound as err:
            problems.append((_experiments(names) + str(err), True))
            continue
        if why:
            unverified.setdefault(why, {}).setdefault("model", []).append(repr(name))
    configs: dict[tuple[str, str], list[str]] = {}  # (why, dataset) -> its configs
    for (hub_path, hub_config), (spec, path, names) in data_needed.items():
        try:
            why = unreachable or data.check_hub(spec, path, HUB_TIMEOUT_S)
        except data.DataError as err:
            problems.append((_experiments(names) + str(err), True))
            continue
        if why:
            configs.setdefault((why, hub_path), []).extend([hub_config] if hub_config else [])
    for (why, hub_path), names in configs.items():
        unverified.setdefault(why, {}).setdefault("data", []).append(
            repr(hub_path) + (f" ({', '.join(names)})" if names else ""))
    hints = {"model": "model: a local folder (hf download ID --local-dir DIR)",
             "data": "data source='files' with data_files"}
    for why, what in unverified.items():
        problems.append((f"{'; '.join(kind + ' ' + ', '.join(what[kind]) for kind in what)}: cannot be verified"
                         f"{' offline' if offline or unreachable else ''} ({why}); without the hub, use "
                         f"{' and '.join(hints[kind] for kind in what)} (README: Data and models offline)", False))
    return problems


def _experiments(names: list[str]) -> str:
    """The experiments a problem line concerns, as its prefix."""
    names = list(dict.fromkeys(names))
    return f"experiment {names[0]!r}: " if len(names) == 1 else \
        f"experiments {', '.join(map(repr, names))}: " if names else ""


# ---------------------------------------------------------------------------------------- tasks defined in a file

def _task_data_key(cfg: RunConfig) -> str:
    return json.dumps([cfg.task_definition.model_dump(mode="json"), cfg.data.source, cfg.data.path,
                       cfg.data.data_files], sort_keys=True)


def _task_data_problems(needed: dict[str, tuple[RunConfig, list[str]]]) -> list[tuple[str, bool]]:
    """(line, fatal) per task defined in a file whose data a run could not use: a column not there, labels that are
    missing, unseen in train, not numbers or of one class, a missing split. The data is read as a run reads it
    (flatray.data.custom); a hub dataset that cannot be loaded at all is the hub check's line."""
    from flatray.data import DataError, custom

    problems = []
    for cfg, names in needed.values():
        try:
            custom.check(cfg.task_spec, cfg.data.source, cfg.data.path, cfg.data.data_files)
        except custom.HubUnavailable:
            continue
        except DataError as err:
            problems.append((_experiments(names) + str(err), True))
    return problems
