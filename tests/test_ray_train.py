"""A real Ray Train run: 2 workers, each a DeepSpeed engine (ZeRO 2, SAM), the tiny BERT on the built-in task."""

import json
import os

import pytest
import ray.train
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


def reload_and_evaluate(folder, model=None):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = (model or AutoModelForSequenceClassification.from_pretrained(folder)).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    spec = TASKS["toy"]
    dev = tokenize(spec, load_raw(spec, "builtin"), tok, max_length=32).evals["validation"]
    collate = collator(tok)
    with torch.no_grad():
        logits = [model(**collate([dev.features[j] for j in range(i, min(i + 64, len(dev.features)))])).logits
                  for i in range(0, len(dev.features), 64)]
    return compute_metrics(spec, dev, torch.cat(logits).numpy())


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("runs")
    return folder, *run(folder, "a")


def test_two_workers_learn_and_checkpoint_reloads(dense_run):
    tmp_path, cfg, result = dense_run
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


def test_imp_level_from_the_parent_checkpoint(dense_run):
    """One IMP level on Ray Train: prune the parent's trained weights to 20%, rewind, train with the mask."""
    from flatray.methods import imp as prune

    tmp_path, _, parent = dense_run
    (parent_ckpt, _), = parent.best_checkpoints
    _, level = run(tmp_path, "level1", **{"prune.parent": parent_ckpt.path, "prune.sparsity": 0.2,
                                          "sharpness.enabled": "true", "sharpness.dim": 20, "sharpness.samples": 64,
                                          "sharpness.eps": "[0.005]"})
    (ckpt, metrics), = level.best_checkpoints
    # sharpness of the best model comes last, with that model's metrics
    assert level.metrics["sharpness/eps=0.005"] > 0 and level.metrics["score"] == metrics["score"]
    assert metrics["sparsity"] == pytest.approx(0.2, abs=0.001)  # measured on the trained weights
    assert metrics["validation/accuracy"] > 0.9
    masks, meta = prune.load_masks(f"{ckpt.path}/{prune.MASK_FILE}")
    assert meta["level"] == 1 and meta["source_task"] == "toy" and meta["optimizer"] == "sam"
    assert meta["computed_from"].endswith(parent_ckpt.path.rstrip("/").split("/")[-1])
    assert prune.sparsity(masks) == pytest.approx(0.2, abs=0.001)


def test_ptq_and_sharpness_of_a_finished_run(dense_run):
    from flatray.methods import ptq as quantize

    tmp_path, _, parent = dense_run
    (parent_ckpt, parent_metrics), = parent.best_checkpoints
    common = {"model": parent_ckpt.path, "task": "toy", "output": {"storage_path": str(tmp_path)}}
    ptq = train.fit(config.from_dict({**common, "kind": "ptq", "ptq": {"latency_batches": 3}}))
    m = ptq.metrics
    assert m["float/validation/accuracy"] == pytest.approx(parent_metrics["validation/accuracy"], abs=1e-9)
    assert abs(m["int8/validation/accuracy"] - m["float/validation/accuracy"]) <= 0.02  # stated tolerance
    assert m["int8/size_mb"] < m["float/size_mb"] and m["float/latency_ms"] > 0 and m["int8/latency_ms"] > 0
    (ckpt, _), = ptq.best_checkpoints
    reloaded = quantize.load_int8(ckpt.path, TASKS["toy"])
    assert isinstance(reloaded.bert.encoder.layer[0].attention.self.query, torch.ao.nn.quantized.dynamic.Linear)

    sharp = train.fit(config.from_dict({**common, "kind": "sharpness",
                                        "sharpness": {"dim": 20, "samples": 64, "eps": [0.005, 0.0005]}}))
    assert sharp.metrics["sharpness/eps=0.005"] > sharp.metrics["sharpness/eps=0.0005"] > 0
    assert sharp.metrics["validation/accuracy"] == parent_metrics["validation/accuracy"]


def cofi_run_config(dense_run):
    """CoFi from the dense run as teacher (a test runs it; a later test restarts it)."""
    tmp_path, _, teacher_run = dense_run
    (teacher_ckpt, _), = teacher_run.best_checkpoints
    return config.from_dict({
        "kind": "structured", "model": teacher_ckpt.path, "task": "toy",
        "train": {"batch_size": 32, "lr": 1e-3, "seed": 0}, "scaling": {"num_workers": 2},
        "structured": {"target_sparsity": 0.5, "prune_epochs": 2, "finetune_epochs": 1, "lr_masks": 0.1,
                       "lr_lambdas": 0.1},
        "output": {"storage_path": str(tmp_path)},
    })


def squat_sharpness_config(dense_run):
    """SQuAT at lr ~ 0 with sharpness at the end (a test runs it; a later test restarts it)."""
    tmp_path, _, teacher_run = dense_run
    (teacher_ckpt, _), = teacher_run.best_checkpoints
    return config.from_dict({
        "kind": "squat", "model": teacher_ckpt.path, "task": "toy",
        "data": {"max_train_samples": 64, "max_eval_samples": 64},
        "train": {"batch_size": 32, "lr": 1e-12, "epochs": 2, "seed": 0},
        "optimizer": {"name": "sam", "rho": 0.05}, "scaling": {"num_workers": 1},
        "squat": {"weight_bits": 4, "act_bits": 8, "lr_steps": 1e-12},
        "sharpness": {"enabled": True, "dim": 5, "samples": 16, "max_iter": 2, "eps": [0.005]},
        "output": {"storage_path": str(tmp_path)},
    })


def test_structured_pruning_with_distillation_from_the_teacher(dense_run):
    """CoFi on Ray Train: the fine-tuned run is the teacher; the saved student is physically smaller."""
    from flatray.methods import cofi

    (teacher_ckpt, _), = dense_run[2].best_checkpoints
    result = train.fit(cofi_run_config(dense_run))
    (ckpt, metrics), = result.best_checkpoints
    student = cofi.load_pruned(ckpt.path)
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_ckpt.path)
    assert metrics["params"] == sum(p.numel() for p in student.parameters()) < metrics["teacher_params"]
    assert metrics["sparsity"] == pytest.approx(cofi.sparsity_of(student, teacher), abs=1e-9)
    assert metrics["sparsity"] > 0.2
    assert metrics["validation/accuracy"] > 0.7 and metrics["phase"] == 2


def test_squat_from_the_full_precision_teacher(dense_run):
    """SQuAT at 4 bits on Ray Train (2 workers, ZeRO 2), distilled from the fine-tuned run; the exported file
    reloads into a model that gives the reported dev metric."""
    from flatray.methods import lsq

    tmp_path, _, teacher_run = dense_run
    (teacher_ckpt, _), = teacher_run.best_checkpoints
    result = train.fit(config.from_dict({
        "kind": "squat", "model": teacher_ckpt.path, "task": "toy",
        "train": {"batch_size": 32, "lr": 1e-4, "epochs": 1, "seed": 0},
        "optimizer": {"name": "sam", "rho": 0.05}, "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "squat": {"weight_bits": 4, "act_bits": 8, "lr_steps": 1e-3},
        "output": {"storage_path": str(tmp_path)},
    }))
    (ckpt, metrics), = result.best_checkpoints
    assert metrics["validation/accuracy"] > 0.8  # chance is 0.5
    assert abs(sum(v for k, v in metrics.items() if k.startswith("quant/level=")) - 1) < 1e-6
    assert metrics["quant/step/query"] > 0
    model = lsq.load_exported(f"{ckpt.path}/{lsq.EXPORT_FILE}")
    assert reload_and_evaluate(ckpt.path, model)["accuracy"] == pytest.approx(metrics["validation/accuracy"], abs=1e-9)
    quantized = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, lsq.QuantLinear)}
    state = model.state_dict()
    payload = (sum(state[k].numel() for k in quantized) * 4 // 8  # 4-bit codes
               + sum(v.numel() * v.element_size() for k, v in state.items() if k not in quantized))
    assert payload < metrics["export_bytes"] < 1.1 * payload  # the header is the rest
    assert metrics["export_bytes"] < os.path.getsize(f"{teacher_ckpt.path}/model.safetensors")


def test_squat_sharpness_and_export_size_reach_the_summary_when_an_earlier_epoch_was_best(dense_run):
    """Epoch 2 of this run cannot beat epoch 1 (lr ~ 0: the same 4-bit codes, the same score), so its checkpoint is
    not the best one; the sharpness and export size must still reach what Ray keeps and summary.json (W&B's summary
    is summary.json's metrics)."""
    from flatray import sweep

    tmp_path = dense_run[0]
    result = train.fit(squat_sharpness_config(dense_run))
    history = json.load(open(f"{result.checkpoint.path}/history.json"))
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["score"] == history[0]["score"]
    record = {"id": "t", "experiment": "squat", "kind": "squat", "dir": str(tmp_path / "t")}
    summary = sweep.summarize(record, result, attempts=1, wall_s=0.0)
    for metrics in (result.metrics, summary["metrics"], json.load(open(f"{result.checkpoint.path}/metrics.json"))):
        assert metrics["epoch"] == 1 and metrics["sharpness/eps=0.005"] >= 0 and metrics["export_bytes"] > 0


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


def test_a_run_restarted_under_its_name_continues_from_its_checkpoint(tmp_path, ray_session):
    """What a retried or resumed sweep trial does: Ray Train restores the run's latest checkpoint and the workers
    continue after its epoch, with its weights, optimizer moments, lr schedule step, RNG and history
    (tests/test_resume.py kills runs for real and checks that they end bit-identical)."""
    small = {"scaling.num_workers": 1, "deepspeed.zero_stage": 0, "data.max_train_samples": 256}
    _, first = run(tmp_path, "r", **{"train.epochs": 1, **small})
    first_history = json.load(open(f"{first.checkpoint.path}/history.json"))  # read now: Ray deletes it later
    _, again = run(tmp_path, "r", **{"train.epochs": 2, **small})
    history = json.load(open(f"{again.checkpoint.path}/history.json"))
    assert [h["epoch"] for h in history] == [1, 2]  # epoch 1 restored, only epoch 2 run
    assert history[0] == first_history[0]  # the first run's own record, not a re-run
    # The engine continued: its step counter and Adam's moments count both epochs' steps (256 rows / 32 per step).
    state = torch.load(f"{again.checkpoint.path}/resume/engine/state/mp_rank_00_model_states.pt", weights_only=False)
    assert state["global_steps"] == 2 * 8 == state["lr_scheduler"]["last_epoch"]
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2 * 8}


def ReportedEpochs(path):
    """A Ray Train callback (it runs in Train's controller) that writes each report's (epoch, phase) to a file.
    Defined in a function: the controller unpickles it by value, as it cannot import this test module."""
    class Callback(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps([metrics[0].get("epoch"), metrics[0].get("phase")]) + "\n")

    return Callback()


def _restart(first_cfg, **changes):
    """Run `first_cfg` again under its name with `changes`, as a retried trial does: Ray Train restores the first
    run's latest checkpoint. The first run is the one an earlier test of this module made (made here when this test
    runs alone). Returns the first run's history and what the second run reported, as (epoch, phase) pairs."""
    from pathlib import Path

    folder = Path(first_cfg.storage_uri) / first_cfg.run_name
    if not folder.exists():
        train.fit(first_cfg)
    latest = ray.train.Result.from_path(str(folder)).checkpoint  # where the second run continues
    first_history = json.load(open(Path(latest.path) / "history.json"))
    again_cfg = config.from_dict(first_cfg.model_dump(mode="json"), overrides=[
        f"output.name={first_cfg.run_name}", *(f"{k}={v}" for k, v in changes.items())])
    log = folder.parent / f"{first_cfg.run_name}-reported.jsonl"
    again = train.make_trainer(again_cfg, callbacks=[ReportedEpochs(str(log))]).fit()
    return first_history, [tuple(json.loads(line)) for line in log.read_text().splitlines()], again


def test_a_restarted_cofi_run_continues_its_fine_tuning_phase(dense_run):
    """CoFi through the one epoch loop: the run of test_structured_pruning_with_distillation_from_the_teacher,
    restarted under its name with one more fine-tuning epoch, continues after its last checkpoint (the pruned model
    of phase 2), without pruning again."""
    from flatray.methods import cofi

    first, reported, again = _restart(cofi_run_config(dense_run), **{"cofi.finetune_epochs": 2})
    assert [(h["epoch"], h["phase"]) for h in first] == [(1, 1), (2, 1), (3, 2)]
    assert reported == [(4, 2)]  # only the new fine-tuning epoch ran
    assert again.metrics["params"] == first[-1]["params"]  # the same pruned model, restored
    student = cofi.load_pruned(again.checkpoint.path)
    assert sum(p.numel() for p in student.parameters()) == first[-1]["params"]


def test_a_restarted_squat_run_continues_from_its_latent_weights(dense_run):
    """SQuAT through the one epoch loop: the run of test_squat_sharpness_and_export_size_reach_the_summary...,
    restarted under its name with a third epoch, trains that epoch only, then reports the best model with its
    sharpness and the whole history."""
    first, reported, again = _restart(squat_sharpness_config(dense_run), **{"train.epochs": 3})
    assert [h["epoch"] for h in first] == [1, 2]
    assert reported[0] == (3, None) and len(reported) == 2  # epoch 3, then the best model with its sharpness
    history = json.load(open(f"{again.checkpoint.path}/history.json"))
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[:2] == first  # restored, not re-run
    assert "sharpness/eps=0.005" in again.metrics
