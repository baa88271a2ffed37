"""A real Ray Train run: 2 workers, each a DeepSpeed engine (ZeRO 2, SAM), the tiny BERT on the built-in task."""

import json

import pytest
import torch

from flatray import config, train
from flatray.data import TASKS, collator, compute_metrics, load_raw, tokenize


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


def run(tmp_path, name, **overrides):
    sets = [f"output.storage_path={tmp_path}", f"output.name={name}"] + [f"{k}={v}" for k, v in overrides.items()]
    cfg = config.from_dict({
        "model": "tiny-bert", "task": "toy",
        "train": {"epochs": 2, "batch_size": 32, "seed": 7},
        "optimizer": {"name": "sam", "rho": 0.05},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
    }, overrides=sets)
    return cfg, train.fit(cfg)


def reload_and_evaluate(folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    spec = TASKS["toy"]
    dev = tokenize(spec, load_raw(spec, "builtin"), tok, max_length=32).evals["validation"]
    collate = collator(tok)
    with torch.no_grad():
        logits = [model(**collate([dev.features[j] for j in range(i, min(i + 64, len(dev.features)))])).logits
                  for i in range(0, len(dev.features), 64)]
    return compute_metrics(spec, dev, torch.cat(logits).numpy())


def test_two_workers_learn_and_checkpoint_reloads(tmp_path, ray_session):
    cfg, result = run(tmp_path, "a")
    (best_ckpt, best_metrics), = result.best_checkpoints  # Ray keeps only the best dev checkpoint
    assert best_metrics["validation/accuracy"] > 0.9  # chance is 0.5
    folder = best_ckpt.path
    assert json.load(open(f"{folder}/metrics.json"))["score"] == best_metrics["score"]
    history = json.load(open(f"{folder}/history.json"))
    assert [h["epoch"] for h in history] == list(range(1, best_metrics["epoch"] + 1))
    assert best_metrics["score"] == max(h["score"] for h in history)
    assert config.load(f"{folder}/flatray_run.yaml").run_hash() == cfg.run_hash()
    # A plain transformers model, evaluated here in one process, gives the metric the workers reported.
    assert reload_and_evaluate(folder)["accuracy"] == pytest.approx(best_metrics["validation/accuracy"], abs=1e-9)

    # Same seed, same config: the same run, step for step.
    _, again = run(tmp_path, "b")
    (_, again_metrics), = again.best_checkpoints
    assert again_metrics["epoch"] == best_metrics["epoch"]
    assert again_metrics["train_loss"] == pytest.approx(best_metrics["train_loss"], rel=0, abs=1e-7)
    assert again_metrics["validation/accuracy"] == best_metrics["validation/accuracy"]


def write_squad_files(folder):
    """A SQuAD-layout task from local files: the answer is the city after 'capital is', at varying offsets in
    contexts longer than one window, so doc stride and the offset mapping decide the answer."""
    import random

    rng = random.Random(0)
    cities = ["paris", "london", "rome", "berlin", "madrid"]
    rows = []
    for i in range(200):
        city = rng.choice(cities)
        filler = " ".join(rng.choice(["the", "city", "is", "old", "and", "big", "river"]) for _ in range(rng.randint(3, 30)))
        context = f"{filler} the capital is {city} . {filler}"
        start = context.index(f"capital is {city}") + len("capital is ")
        rows.append({"id": str(i), "title": "t", "context": context, "question": "what is the capital ?",
                     "answers": {"text": [city], "answer_start": [start]}})
    for name, part in (("train", rows[:160]), ("dev", rows[160:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return {"train": str(folder / "train.jsonl"), "validation": str(folder / "dev.jsonl")}


def test_squad_from_local_files_through_ray_train(tmp_path, ray_session):
    files = write_squad_files(tmp_path)
    cfg = config.from_dict({
        "model": "tiny-bert", "task": "squad",
        "data": {"source": "files", "data_files": files, "max_length": 32, "doc_stride": 8},
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "seed": 0},
        "optimizer": {"name": "asam", "sam_scope": "global"},
        "deepspeed": {"zero_stage": 1},
        "scaling": {"num_workers": 2},
        "output": {"storage_path": str(tmp_path / "out")},
    })
    (_, metrics), = train.fit(cfg).best_checkpoints
    assert metrics["validation/f1"] > 80 and metrics["validation/exact_match"] > 50  # SQuAD scale 0..100
