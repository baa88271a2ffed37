"""Tasks, loading, tokenization and evaluation for GLUE, SQuAD v1.1, two offline toy tasks, two real tasks fetched
from a package registry, and tasks defined in a run file.

    tasks         the task registry (TASKS, TaskSpec) and the schema of a defined task (TaskDefinition)
    errors        DataError
    sources       load_raw (hub, files, registry, builtin), check_hub
    custom        load_task (any task; a defined task's data checked, its labels mapped to ids, its dev carved)
    pypi          data sets fetched from PyPI wheels (source "registry")
    toy           the built-in toy tasks (their words: flatray.toy_text)
    tokenization  tokenize, train_subset, collator, EvalSet, TokenizedData
    squad         SQuAD features and answer post-processing
    metrics       compute_metrics and the metric functions

The names below stay importable as flatray.data.<name>."""
import importlib

from flatray.data.errors import DataError
from flatray.data.tasks import TASKS, TaskSpec

# Lazy (PEP 562): flatray.config imports flatray.data.tasks, which runs this file; it must not pull in datasets/torch.
_LAZY = {
    "load_raw": "sources", "check_hub": "sources", "load_task": "custom",
    "toy_dataset": "toy",
    "tokenize": "tokenization", "train_subset": "tokenization", "collator": "tokenization",
    "EvalSet": "tokenization", "TokenizedData": "tokenization", "SUBSET_SEED": "tokenization",
    "postprocess_qa": "squad",
    "compute_metrics": "metrics",
}
_TOY_TEXT = {"toy_corpus": "toy_corpus", "_POSITIVE": "POSITIVE", "_NEGATIVE": "NEGATIVE", "_SUBJECTS": "SUBJECTS"}
_SUBMODULES = ("custom", "errors", "fingerprints", "metrics", "pypi", "sources", "squad", "tasks", "tokenization",
               "toy")

__all__ = ["DataError", "TASKS", "TaskSpec", *_LAZY, "toy_corpus"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    elif name in _TOY_TEXT:  # the old private word lists keep their names (tests/test_data.py reads them)
        value = getattr(importlib.import_module("flatray.toy_text"), _TOY_TEXT[name])
    elif name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_TOY_TEXT) | set(_SUBMODULES))
