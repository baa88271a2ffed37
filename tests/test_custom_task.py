"""Tasks defined in a run file (task: as a mapping): the schema, label ids, the carved dev split, the checks before
Ray starts, and one real fine-tuning run (Ray Train, DeepSpeed, tiny-bert) on a 3-class local CSV."""
import csv
import json
from collections import Counter

import numpy as np
import pytest
import yaml
from sklearn import metrics as skm

from flatray import config, data, train
from flatray.config import ConfigError
from flatray.data import custom
from flatray.data import metrics as M
from flatray.sweep import graph, preflight
from flatray.toy_text import NEGATIVE, POSITIVE, SUBJECTS

NEUTRAL = "large new green young big brown quick full".split()  # words tiny-bert's tokenizer knows
CLASSES = {"neg": NEGATIVE, "neu": NEUTRAL, "pos": POSITIVE}


def sentences(n, seed):
    """n short sentences whose adjective's list decides the label (neg, neu, pos), in a shuffled order."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation([list(CLASSES)[i % 3] for i in range(n)])
    rows = []
    for label in labels:
        subj, adj = SUBJECTS[rng.integers(len(SUBJECTS))], CLASSES[label][rng.integers(len(CLASSES[label]))]
        rows.append({"text": f"{subj} was {adj} today .", "label": label, "source": "synthetic"})
    return rows


def write_csv(path, rows, columns=("text", "label", "source")):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return str(path)


@pytest.fixture
def files(tmp_path):
    return {"train": write_csv(tmp_path / "train.csv", sentences(300, 0)),
            "validation": write_csv(tmp_path / "dev.csv", sentences(60, 1))}


def task(data_files, **keys):
    return {"name": "three-way", "data": {"data_files": data_files}, "text": "text", "metric": "macro_f1", **keys}


def load(task_mapping, **run):
    cfg = config.from_dict({"model": "tiny-bert", "task": task_mapping, **run})
    return data.load_task(cfg.task_spec, cfg.data.source, cfg.data.path, cfg.data.data_files)


# ------------------------------------------------------------------------------------------------ schema, labels

def test_a_mapping_defines_the_task_and_the_run_is_named_by_it(files):
    cfg = config.from_dict({"model": "tiny-bert", "task": task(files, defaults={"epochs": 2})})
    assert cfg.task == "three-way" and cfg.run_name.startswith("three-way-adam-") and cfg.data.source == "files"
    assert (cfg.train.epochs, cfg.train.lr, cfg.data.max_length) == (2, 2e-5, 128)
    dumped = cfg.model_dump(mode="json")
    assert dumped["task"] == "three-way" and dumped["task_definition"]["text"] == ["text"]
    assert config.from_dict(dumped).run_hash() == cfg.run_hash()  # the workers' copy is the same run
    assert config.from_dict({"model": "tiny-bert", "task": task(files, label="source")}).run_hash() != cfg.run_hash()


def test_schema_errors_name_the_task_key(files):
    with pytest.raises(ConfigError) as err:
        config.from_dict({"model": "m", "task": {"data": {"data_files": files}, "text": ["a", "b", "c"],
                                                 "lable": "y", "type": "regression", "metric": "macro_f1",
                                                 "dev": {"carve": 1.5}}})
    msg = str(err.value)
    for line in ("task.name: missing", "task.text: got ['a', 'b', 'c']; expected one or two text column",
                 "task.lable: got 'y'; expected no such key; allowed here: name, data, text, label",
                 "(did you mean 'label'?)", "task.metric: got 'macro_f1'; expected one of pearson for type regression",
                 "task.dev: got {'carve': 1.5}; expected {carve: a fraction in (0, 1)"):
        assert line in msg, msg
    with pytest.raises(ConfigError, match="task.name: got 'sst2'; expected a name other than the built-in"):
        config.from_dict({"model": "m", "task": {**task(files), "name": "sst2"}})
    with pytest.raises(ConfigError, match=r"task.data.data_files: got \['train'\]; expected the splits "
                                          r"\['train', 'validation'\].*carve"):
        config.from_dict({"model": "m", "task": task({"train": files["train"]})})
    with pytest.raises(ConfigError, match="data.source: got 'builtin'; expected files: task three-way is defined"):
        config.from_dict({"model": "m", "task": task(files), "data": {"source": "builtin"}})


def test_string_labels_become_sorted_ids_and_num_labels_is_inferred(files):
    spec, raw = load(task(files))
    assert spec.num_labels == 3 and spec.label_names == ("neg", "neu", "pos")
    assert raw["train"].features["label"].names == ["neg", "neu", "pos"]
    written = [r["label"] for r in csv.DictReader(open(files["validation"]))]
    assert [spec.label_names[i] for i in raw["validation"]["label"]] == written
    assert raw["train"].column_names == ["text", "label", "source"]


def test_a_label_column_of_another_name_and_integer_labels(tmp_path):
    rows = [{"text": r["text"], "stars": 2 * list(CLASSES).index(r["label"]) + 1} for r in sentences(30, 2)]
    f = write_csv(tmp_path / "stars.csv", rows, ("text", "stars"))
    spec, raw = load(task({"train": f}, label="stars", dev={"carve": 0.2}))
    assert spec.label_names == ("1", "3", "5") and set(raw["train"]["label"]) == {0, 1, 2}  # by value, not 0..5


def test_a_classlabel_keeps_its_own_ids_and_names(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["World", "Sports", "Business"])})
    folder = tmp_path / "news"
    folder.mkdir()
    for split, n in (("train", 30), ("test", 9)):  # a dataset folder: load_dataset reads it like a hub dataset
        datasets.Dataset.from_dict({"text": [f"story {i}" for i in range(n)], "label": [i % 3 for i in range(n)]},
                                   features=features).to_parquet(str(folder / f"{split}.parquet"))
    mapping = {"name": "news", "data": {"path": str(folder)}, "text": "text", "dev": "test"}
    cfg = config.from_dict({"model": "tiny-bert", "task": mapping, "output": {"storage_path": str(tmp_path)}})
    assert cfg.data.source == "hub"
    preflight.check_run(cfg)  # a local dataset folder: nothing to ask the hub, its columns and labels checked
    spec, raw = load(mapping)
    assert spec.label_names == ("World", "Sports", "Business") and raw["test"]["label"] == [i % 3 for i in range(9)]


def test_regression_labels_stay_numbers(tmp_path):
    f = write_csv(tmp_path / "r.csv", [{"text": f"s {i}", "score": i / 10} for i in range(40)], ("text", "score"))
    spec, raw = load(task({"train": f}, label="score", type="regression", metric=None, dev={"carve": 0.25}))
    assert spec.num_labels == 1 and spec.main_metric == "pearson" and len(raw["validation"]) == 10
    assert raw["train"].features["label"].dtype == "float32"


# ------------------------------------------------------------------------------------------------------ carving

def test_carve_is_stratified_and_seeded(tmp_path):
    rows = sentences(200, 3)[:170]  # unequal classes
    f = write_csv(tmp_path / "all.csv", rows)
    mapping = task({"train": f}, dev={"carve": 0.2, "seed": 5})
    _, first = load(mapping)
    _, again = load(mapping)
    assert first["validation"]["text"] == again["validation"]["text"] and first["train"]["text"] == again["train"]["text"]
    whole = Counter(r["label"] for r in rows)
    dev = Counter(first["validation"]["label"])
    assert dev == {i: round(0.2 * whole[name]) for i, name in enumerate(sorted(whole))}  # each class's share kept
    assert len(first["train"]) + len(first["validation"]) == 170
    _, other = load({**mapping, "dev": {"carve": 0.2, "seed": 6}})
    assert other["validation"]["text"] != first["validation"]["text"]


def test_carve_indices_on_a_small_table():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    train_rows, dev = custom.carve_indices(labels, 0.1, seed=0, stratify=True)
    assert Counter(labels[dev]) == {0: 5, 1: 3, 2: 2} and list(dev) == sorted(dev)
    assert sorted([*train_rows, *dev]) == list(range(100))
    assert list(custom.carve_indices(labels, 0.1, seed=0, stratify=True)[1]) == list(dev)
    scores = np.linspace(0, 1, 40)
    rows, dev = custom.carve_indices(scores, 0.25, seed=1, stratify=False)  # regression: no classes to keep
    assert len(dev) == 10 and not set(rows) & set(dev)


# ------------------------------------------------------------------------------------- bad input, before Ray

def preflight_error(tmp_path, mapping) -> str:
    cfg = config.from_dict({"model": "tiny-bert", "task": mapping, "output": {"storage_path": str(tmp_path / "out")}})
    with pytest.raises(ConfigError) as err:
        preflight.check_run(cfg)
    return str(err.value)


def test_bad_columns_and_labels_fail_before_ray_naming_the_file(tmp_path, files):
    good = sentences(30, 4)
    with_unseen = good + [{"text": "the park was odd today .", "label": "weird"}]
    one_class = [{**r, "label": "pos"} for r in good]
    empty_label = good[:5] + [{"text": "the room was big today .", "label": ""}] + good[5:]
    f = {name: write_csv(tmp_path / f"{name}.csv", rows)
         for name, rows in (("unseen", with_unseen), ("one", one_class), ("empty", empty_label))}
    cases = [
        (task(files, label="lable"), f"task.label: column 'lable' not in {files['train']}; found text, label, source"),
        (task(files, text="sentence"), f"task.text: column 'sentence' not in {files['train']}; found text, label"),
        (task({**files, "validation": f["unseen"]}),
         f"task.label: {f['unseen']} has labels not in train: 'weird' (train, {files['train']}, has neg, neu, pos)"),
        (task(files, type="regression", metric=None),
         f"task.label: column 'label' of {files['train']} is not numeric (large_string values, e.g. "),
        (task({"train": f["one"]}, dev={"carve": 0.1}),
         f"task.label: column 'label' of {f['one']} has 1 class(es) (pos); a classification task needs at least 2"),
        (task(files, num_labels=2), "task.num_labels: got 2, but column 'label' of"),
        (task({"train": f["empty"]}, dev={"carve": 0.1}),
         f"task.label: column 'label' of {f['empty']} is empty in 1 row(s) (the first: data row 6)"),
    ]
    for mapping, expected in cases:
        assert expected in preflight_error(tmp_path, mapping)
    cfg = config.from_dict({"model": "tiny-bert", "task": task(files), "output": {"storage_path": str(tmp_path)}})
    preflight.check_run(cfg)  # the good files pass


def test_a_sweep_names_the_experiment_whose_task_data_is_wrong(tmp_path, files):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "defined", "storage": str(tmp_path / "results"),
        "defaults": {"model": "tiny-bert", "task": task(files)},
        "experiments": {"full": {"kind": "finetune", "config": {"task": {"label": "lable"}}}}}))
    sweep = graph.load(sweep_file)
    with pytest.raises(ConfigError) as err:
        preflight.check(sweep, dry_run=True)
    assert f"experiment 'full': task.label: column 'lable' not in {files['train']}" in str(err.value)


def test_macro_f1_is_sklearns():
    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        y, p = rng.integers(0, k, 300), rng.integers(0, k, 300)
        p[:100] = y[:100]
        assert M.macro_f1(p, y) == pytest.approx(skm.f1_score(y, p, average="macro"))
    assert M.macro_f1([0, 0, 0, 0], [0, 1, 2, 2]) == pytest.approx(skm.f1_score([0, 1, 2, 2], [0] * 4,
                                                                               average="macro", zero_division=0))


# ------------------------------------------------------------------------------------------ a real short run

@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


def test_fine_tuning_a_defined_task_reports_macro_f1(tmp_path, ray_session):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    f = write_csv(tmp_path / "train.csv", sentences(600, 7))
    mapping = task({"train": f}, dev={"carve": 0.2, "seed": 0},
                   defaults={"max_length": 16, "batch_size": 16, "lr": 1e-3, "epochs": 4})
    cfg = config.from_dict({"model": "tiny-bert", "task": mapping, "output": {"storage_path": str(tmp_path / "runs"),
                                                                               "name": "three"}})
    preflight.check_run(cfg)
    (best, metrics), = train.fit(cfg).best_checkpoints
    assert set(metrics) >= {"validation/macro_f1", "validation/accuracy", "score"}
    assert metrics["score"] == metrics["validation/macro_f1"] > 0.6  # chance is 1/3: it learned the rule

    model = AutoModelForSequenceClassification.from_pretrained(best.path).eval()
    assert model.config.num_labels == 3 and model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert json.load(open(f"{best.path}/config.json"))["label2id"] == {"neg": 0, "neu": 1, "pos": 2}
    spec, raw = load(mapping)  # the same carved dev split the run scored
    tok = AutoTokenizer.from_pretrained(best.path)
    dev = data.tokenize(spec, raw, tok, max_length=16).evals["validation"]
    collate = data.collator(tok)
    with torch.no_grad():
        logits = model(**collate([dev.features[i] for i in range(len(dev.features))])).logits.numpy()
    preds = logits.argmax(-1)
    assert metrics["validation/macro_f1"] == pytest.approx(skm.f1_score(dev.labels, preds, average="macro"), abs=1e-9)
    assert data.compute_metrics(spec, dev, logits)["macro_f1"] == pytest.approx(metrics["validation/macro_f1"])
