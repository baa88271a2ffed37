"""The data of a task defined in a run file (flatray.data.tasks.TaskDefinition): read from the hub or local files,
checked (columns, labels, splits), labels turned into ids, and the dev split carved from train when asked.

Labels: a ClassLabel column (hub datasets often have one) keeps its ids and names. Any other label column (strings,
integers, booleans) becomes a ClassLabel whose names are its distinct values in train, sorted (numbers by value,
strings by code point: "neg" < "neu" < "pos"), with ids 0, 1, ... in that order; flatray.models writes the names
into the model config's id2label. Regression labels must be numbers and stay numbers.

Every problem is a DataError that starts with the task key it concerns (task.text, task.label, task.dev, ...) and
names the file or hub split and what was found. flatray.sweep.preflight calls check() before Ray starts; the
workers call load_task(), which loads a built-in task as flatray.data.sources does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import datasets
import numpy as np

from flatray.data import sources
from flatray.data.errors import DataError
from flatray.data.pypi import stratified_split
from flatray.data.tasks import TaskSpec

_TEXT = ("string", "large_string")
_CLASS_VALUES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                 "float32", "float64", "string", "large_string")
_NUMBERS = _CLASS_VALUES[1:-2]


class HubUnavailable(DataError):
    """The hub dataset could not be loaded at all (offline, unknown id): the preflight hub check reports that."""


def load_task(spec: TaskSpec, source: str, path: str | None = None,
              data_files: dict[str, str | list[str]] | None = None, seed: int = 0) -> tuple[TaskSpec, datasets.DatasetDict]:
    """Any task's raw splits ("train" + spec.eval_splits) and its spec; a defined task's spec gets num_labels and
    label_names from its data."""
    if not spec.defined:
        return spec, sources.load_raw(spec, source, path, data_files, seed=seed)
    splits, where = _read(spec, source, path, data_files)
    splits = {name: _with_label_column(spec, ds, where[name]) for name, ds in splits.items()}
    if spec.kind == "regression":
        splits = {name: _numeric_labels(ds, where[name], spec.label_column) for name, ds in splits.items()}
    else:
        names, splits = _class_ids(spec, splits, where)
        spec = dataclasses.replace(spec, num_labels=len(names), label_names=tuple(names))
    if spec.dev_carve:
        splits = _carve(spec, splits["train"], where["train"])
    return spec, datasets.DatasetDict(splits)


def check(spec: TaskSpec, source: str, path: str | None = None,
          data_files: dict[str, str | list[str]] | None = None) -> TaskSpec:
    """Load a defined task's data as a run would (DataError on any problem); its spec with the classes found."""
    return load_task(spec, source, path, data_files)[0]


# ------------------------------------------------------------------------------------------------------ reading

def _read(spec, source, path, data_files) -> tuple[dict[str, datasets.Dataset], dict[str, str]]:
    """The needed splits as they are, and for each the words that name it in a message (a file, a hub split)."""
    needed = spec.needed_splits
    if source == "files":
        files = data_files or spec.data_files
        key = "data.data_files" if data_files else "task.data.data_files"
        have = sorted(files or {})
    elif source == "hub":
        hub_path = path or spec.hub_path
        try:
            raw = datasets.load_dataset(hub_path, spec.hub_config)
        except Exception as e:  # offline, unknown name, auth, ...
            raise HubUnavailable(str(sources._hub_error(spec, hub_path, e))) from e
        key, have = f"hub dataset {hub_path!r}", sorted(raw)
    else:
        raise DataError(f"data.source: got {source!r}; task {spec.name!r} is defined in the run file: its data is "
                        f"task.data (hub or files)")
    missing = [s for s in needed if s not in have]
    if missing:
        dev = [s for s in missing if s != "train"]
        raise DataError(f"{'task.dev' if dev else 'task.data'}: split(s) {', '.join(map(repr, missing))} not in "
                        f"{key} (it has {', '.join(have) or 'none'})"
                        + ("; name the dev split(s) it has, or carve one from train: dev: {carve: 0.1, seed: 0}"
                           if dev else ""))
    if source == "hub":
        return {s: raw[s] for s in needed}, {s: f"split {s!r} of {key}" for s in needed}
    where = {s: _files_text(files[s]) for s in needed}
    return {s: sources._load_split(spec, s, files[s]) for s in needed}, where


def _files_text(files) -> str:
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    return ", ".join(map(os.fspath, files))


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0]) + 1  # a data row, counted from 1 (a csv header not counted)


def _with_label_column(spec, ds, where) -> datasets.Dataset:
    """`ds` with its text columns checked and its label column named "label"."""
    found = ", ".join(ds.column_names)
    for col in (c for c in spec.text_keys if c):
        if col not in ds.column_names:
            raise DataError(f"task.text: column {col!r} not in {where}; found {found}")
        feature = ds.features[col]
        if not (isinstance(feature, datasets.Value) and feature.dtype in _TEXT):
            raise DataError(f"task.text: column {col!r} of {where} holds {_kind(feature)}, not text")
        nulls = ds.data.column(col).is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            raise DataError(f"task.text: column {col!r} of {where} is empty in {int(nulls.sum())} row(s) (the first: "
                            f"data row {_first(nulls)})")
    if spec.label_column not in ds.column_names:
        raise DataError(f"task.label: column {spec.label_column!r} not in {where}; found {found}")
    if len(ds) == 0:
        raise DataError(f"task.data: {where} has no rows")
    if spec.label_column != "label":
        if "label" in ds.column_names:  # another column of that name: not the label, and in the way
            ds = ds.remove_columns("label")
        ds = ds.rename_column(spec.label_column, "label")
    return ds


def _kind(feature) -> str:
    return f"{feature.dtype} values" if isinstance(feature, datasets.Value) else type(feature).__name__


def _missing_labels(ds, where, spec_label) -> None:
    values = ds.data.column("label")
    missing = values.is_null().to_numpy(zero_copy_only=False)
    if ds.features["label"].dtype in _TEXT:
        missing |= np.asarray(values.to_pylist(), dtype=object) == ""
    if missing.any():
        raise DataError(f"task.label: column {spec_label!r} of {where} is empty in {int(missing.sum())} row(s) (the "
                        f"first: data row {_first(missing)})")


# ------------------------------------------------------------------------------------------------------- labels

def _class_ids(spec, splits, where) -> tuple[list[str], dict[str, datasets.Dataset]]:
    """The class names, and every split with its labels as ids of one ClassLabel."""
    train = splits["train"]
    feature = train.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        for name, ds in splits.items():
            if not (isinstance(ds.features["label"], datasets.ClassLabel) and ds.features["label"].names == names):
                raise DataError(f"task.label: {where[name]} has labels {ds.features['label']}, not the classes of "
                                f"train ({', '.join(names)})")
            unlabelled = ds.data.column("label").to_numpy() < 0
            if unlabelled.any():  # e.g. a GLUE test split: -1 everywhere
                raise DataError(f"task.label: {where[name]} has {int(unlabelled.sum())} row(s) without a label (-1, "
                                f"the first: data row {_first(unlabelled)}); use a labelled split as dev")
        _enough_classes(spec, names, where["train"])
        return names, splits
    for name, ds in splits.items():
        f = ds.features["label"]
        if not (isinstance(f, datasets.Value) and f.dtype in _CLASS_VALUES):
            raise DataError(f"task.label: column {spec.label_column!r} of {where[name]} holds {_kind(f)}; expected "
                            f"class names or numbers")
        _missing_labels(ds, where[name], spec.label_column)
    classes = sorted(set(train.data.column("label").to_pylist()))
    names = [str(c) for c in classes]
    _enough_classes(spec, names, where["train"])
    ids = {c: i for i, c in enumerate(classes)}
    for name, ds in splits.items():
        if name == "train":
            continue
        unseen = sorted(set(ds.data.column("label").to_pylist()) - set(classes), key=str)
        if unseen:
            raise DataError(f"task.label: {where[name]} has labels not in train: "
                            f"{', '.join(map(repr, unseen[:5]))}{' ...' if len(unseen) > 5 else ''} (train, "
                            f"{where['train']}, has {_shown(names)})")
    return names, {name: _to_ids(ds, ids, names) for name, ds in splits.items()}


def _shown(names) -> str:
    return ", ".join(names) if len(names) <= 20 else ", ".join(names[:20]) + f" ... ({len(names)} in all)"


def _enough_classes(spec, names, where) -> None:
    if len(names) < 2:
        raise DataError(f"task.label: column {spec.label_column!r} of {where} has {len(names)} class(es) "
                        f"({_shown(names)}); a classification task needs at least 2")
    if spec.num_labels is not None and spec.num_labels != len(names):
        raise DataError(f"task.num_labels: got {spec.num_labels}, but column {spec.label_column!r} of {where} has "
                        f"{len(names)} classes ({_shown(names)}); set num_labels: null to take them from the data")


def _to_ids(ds, ids, names) -> datasets.Dataset:
    features = ds.features.copy()
    features["label"] = datasets.ClassLabel(names=names)
    key = repr([ds._fingerprint, "class ids", names])  # named here: datasets would hash the mapping with dill
    return ds.map(_ids_of, batched=True, fn_kwargs={"ids": ids}, features=features, desc="label ids",
                  new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16])


def _ids_of(batch, ids):
    return {"label": [ids[v] for v in batch["label"]]}


def _is_number(value) -> bool:
    try:
        return not isinstance(value, bool) and np.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _numeric_labels(ds, where, column) -> datasets.Dataset:
    feature = ds.features["label"]
    if not (isinstance(feature, datasets.Value) and feature.dtype in _NUMBERS):
        values = ds.data.column("label").to_pylist()
        bad = next((i for i, v in enumerate(values) if not _is_number(v)), 0)
        raise DataError(f"task.label: column {column!r} of {where} is not numeric ({_kind(feature)}, e.g. "
                        f"{values[bad]!r} at data row {bad + 1}); a regression task needs a number in every row")
    missing = ds.data.column("label").is_null().to_numpy(zero_copy_only=False)
    if missing.any():
        raise DataError(f"task.label: column {column!r} of {where} is empty in {int(missing.sum())} row(s) (the "
                        f"first: data row {_first(missing)}); a regression task needs a number in every row")
    return ds.cast_column("label", datasets.Value("float32"))


# -------------------------------------------------------------------------------------------------------- carve

def carve_indices(labels, fraction: float, seed: int, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """(train, dev) row indices, each ascending: round(fraction * n_c) rows of each class c go to dev (stratify),
    else round(fraction * n) rows, drawn with numpy.random.default_rng(seed)."""
    if stratify:
        return stratified_split(labels, fraction, seed)
    n = len(labels)
    dev = np.sort(np.random.default_rng(seed).permutation(n)[:round(fraction * n)])
    return np.setdiff1d(np.arange(n), dev), dev


def _carve(spec, train, where) -> dict[str, datasets.Dataset]:
    fraction, seed = spec.dev_carve
    labels = train.data.column("label").to_numpy()  # train is a fresh table here (no indices mapping)
    rows, dev = carve_indices(labels, fraction, seed, stratify=spec.kind == "classification")
    if len(dev) == 0 or len(rows) == 0:
        raise DataError(f"task.dev: carving {fraction} of the {len(train)} rows of {where} leaves an empty "
                        f"{'dev' if len(dev) == 0 else 'train'} split; use a larger train set or another fraction")
    return {"train": train.select(rows), "validation": train.select(dev)}
