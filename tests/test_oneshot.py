"""kind: oneshot (P1 A.3, Figure 7): masks against torch.nn.utils.prune, a real child of a real fine-tuning trial in
a real sweep, and its report section from a synthetic sweep folder with numbers worked out by hand."""

import copy
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.utils.prune as torch_prune

from flatray import config, models, storage
from flatray import report as rep
from flatray.config import ConfigError
from flatray.data import TASKS
from flatray.methods import imp, oneshot


def reference_params(model) -> list[tuple[torch.nn.Module, str]]:
    """METHODS.md section 3's prunable set, picked by hand: every Linear of the encoder, and the pooler's dense."""
    encoder = [m for m in model.bert.encoder.modules() if isinstance(m, torch.nn.Linear)]
    return [(m, "weight") for m in [*encoder, model.bert.pooler.dense]]


def torch_pruned(model, sparsity: float):
    """A copy of `model` pruned by torch's global L1 unstructured pruning (made permanent); its masks by module."""
    model = copy.deepcopy(model)
    params = reference_params(model)
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    masks = {}
    for module, name in params:
        masks[module] = module.weight_mask.bool().clone()
        torch_prune.remove(module, name)
    return model, masks


def test_masks_equal_torch_global_unstructured_at_every_sparsity():
    torch.manual_seed(0)
    model = models.load_model("tiny-bert", TASKS["toy"])
    weights = imp.prunable_weights(model)
    assert len(weights) == len(reference_params(model))
    trained = {n: w.detach().clone() for n, w in weights.items()}
    head = model.classifier.weight.detach().clone()
    for sparsity in config.RunConfig(model="tiny-bert", task="toy").oneshot.sparsities:  # P1's 5% ... 60%
        masks = oneshot.prune_to(weights, trained, sparsity)
        ref_model, ref_masks = torch_pruned(model_with(model, trained), sparsity)
        ref_weights = dict(ref_model.named_parameters())
        for name, weight in weights.items():
            ref_module = ref_model.get_submodule(name.removesuffix(".weight"))
            assert torch.equal(masks[name], ref_masks[ref_module]), (sparsity, name)
            assert torch.equal(weight, ref_weights[name]), (sparsity, name)
        assert imp.zero_fraction(weights.values()) == pytest.approx(sparsity, abs=1e-4)
    assert torch.equal(model.classifier.weight, head)  # the task head is never pruned


def model_with(model, trained):
    """`model` with its prunable weights set back to `trained` (each sparsity prunes the trained weights afresh)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in imp.prunable_weights(model).items():
            w.copy_(trained[name])
    return model


def test_sparsities_are_checked():
    base = dict(model="tiny-bert", task="toy", kind="oneshot")
    assert config.from_dict({**base, "oneshot": {"sparsities": [0.6, 0.1]}}).oneshot.sparsities == [0.1, 0.6]
    for bad in ([0.0, 0.5], [0.5, 1.0], [0.2, 0.2], []):
        with pytest.raises(ConfigError, match="oneshot.sparsities"):
            config.from_dict({**base, "oneshot": {"sparsities": bad}})


# --------------------------------------------------------------------------------------------------- a real sweep

SWEEP = """
name: oneshot
storage: {storage}
wandb: {{mode: offline}}
defaults:
  model: tiny-bert
  task: toy
  train: {{epochs: 2, batch_size: 32, seed: 0}}
  data: {{max_eval_samples: 200}}
  scaling: {{num_workers: 1}}
experiments:
  full: {{kind: finetune}}
  pruned:
    kind: oneshot
    parent: full
    config: {{oneshot: {{sparsities: [0.97, 0.3, 0.6]}}}}
"""
SPARSITIES = (0.0, 0.3, 0.6, 0.97)  # the toy task survives 90% pruning


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    import ray

    from flatray import sweep

    folder = tmp_path_factory.mktemp("sweeps")
    path = folder / "oneshot.yaml"
    path.write_text(SWEEP.format(storage=folder))
    code = sweep.main([str(path), "--no-report"])
    ray.shutdown()
    assert code == 0
    return folder / "oneshot"


def trials(root):
    out = {}
    for f in root.glob("*/trial.json"):
        trial = json.loads(f.read_text())
        out[trial["experiment"]] = {"trial": trial, "summary": storage.read_json(str(f.parent / "summary.json"))}
    return out


def evaluate_here(cfg, model) -> dict:
    """The dev metrics of `model` on the trial's dev set, computed in this process (rank 0 of 1, CPU)."""
    from flatray import data
    from flatray.train.context import RunContext

    spec = TASKS[cfg.task]
    tokenizer = models.load_tokenizer(cfg.model)
    raw = data.load_raw(spec, cfg.data.source, cfg.data.path, cfg.data.data_files, seed=cfg.train.seed)
    tokenized = data.tokenize(spec, raw, tokenizer, cfg.data.max_length, cfg.data.doc_stride,
                              cfg.data.max_train_samples, cfg.data.max_eval_samples)
    ctx = RunContext(cfg, 0, 1, torch.device("cpu"), spec, tokenizer, tokenized, data.collator(tokenizer))
    return ctx.evaluate(model.eval())


@pytest.mark.slow
def test_a_oneshot_child_prunes_and_evaluates_its_parents_model(sweep_root):
    found = trials(sweep_root)
    parent, child = found["full"], found["pruned"]
    assert parent["summary"]["status"] == child["summary"]["status"] == "done", child["summary"]
    assert child["trial"]["config"]["model"] == parent["summary"]["outputs"]["model"]
    metrics = child["summary"]["metrics"]
    for s in SPARSITIES:
        assert isinstance(metrics[f"oneshot/{s:g}/score"], float), s
        assert metrics[f"oneshot/{s:g}/sparsity"] == pytest.approx(s, abs=1e-3)
    # 0%: the parent's model as it is, with the parent's own score
    assert metrics["oneshot/0/score"] == parent["summary"]["metrics"]["score"]
    assert metrics["score"] == metrics["oneshot/0.97/score"]  # the trial's score: the most pruned model's
    history = child["summary"]["history"]
    assert [row["target_sparsity"] for row in history] == list(SPARSITIES)
    assert [row["score"] for row in history] == [metrics[f"oneshot/{s:g}/score"] for s in SPARSITIES]

    # 97%, recomputed here: the parent's checkpoint pruned by torch, evaluated without training
    cfg = config.RunConfig.model_validate(child["trial"]["config"])
    dense = models.load_model(parent["summary"]["outputs"]["model"], TASKS["toy"])
    pruned, _ = torch_pruned(dense, 0.97)
    expected = evaluate_here(cfg, pruned)
    assert metrics["oneshot/0.97/score"] == pytest.approx(expected["score"], abs=1e-12)
    assert metrics["oneshot/0.97/validation/accuracy"] == pytest.approx(expected["validation/accuracy"], abs=1e-12)
    # the parent learned the task, and pruning 97% of it without retraining costs accuracy
    assert metrics["oneshot/0/score"] > 0.7 and metrics["oneshot/0.97/score"] < metrics["oneshot/0/score"] - 0.1


@pytest.mark.slow
def test_wandb_gets_one_row_per_sparsity(sweep_root):
    from flatray.tracking import read_offline_runs

    child = trials(sweep_root)["pruned"]
    (run,) = [r for r in read_offline_runs(str(sweep_root / "wandb"))
              if r["config"]["flatray"]["id"] == child["trial"]["id"]]
    rows = [r for r in run["history"] if "target_sparsity" in r]
    assert [r["target_sparsity"] for r in rows] == list(SPARSITIES)
    assert [r["score"] for r in rows] == [row["score"] for row in child["summary"]["history"]]


# --------------------------------------------------------------------------------------------------- the report


def write_trial(root, tid, experiment, kind, cfg, parents=(), metrics=None):
    folder = root / tid
    folder.mkdir(parents=True)
    cfg = config.RunConfig.model_validate({"model": "tiny-bert", **cfg}).model_dump(mode="json")
    (folder / "trial.json").write_text(json.dumps({
        "id": tid, "sweep": "synth", "experiment": experiment, "kind": kind, "parents": list(parents),
        "level": None, "point": {}, "config": cfg, "dir": str(folder)}))
    (folder / "summary.json").write_text(json.dumps({
        "id": tid, "experiment": experiment, "kind": kind, "status": "done", "metrics": metrics or {},
        "history": [], "checkpoint": None, "outputs": {}, "attempts": 1, "wall_s": 1.0, "error": None}))


# (task, optimizer) -> per seed: the score at 0%, 30% and 60%
SCORES = {("rte", "adam"): [(0.66, 0.60, 0.50), (0.68, 0.62, 0.54), (0.70, 0.64, 0.52)],
          ("rte", "sam"): [(0.67, 0.65, 0.60), (0.69, 0.67, 0.62), (0.71, 0.66, 0.64)],
          ("mrpc", "sam"): [(0.84, 0.80, 0.70)]}


def test_report_figure_and_table_from_a_synthetic_sweep(tmp_path):
    root = tmp_path / "synth"
    for (task, opt), seeds in SCORES.items():
        for seed, scores in enumerate(seeds):
            # the parent's optimizer labels the line, whatever the child's own config says
            parent = f"full-{task}-{opt}-{seed}"
            write_trial(root, parent, "full", "finetune", {"task": task, "optimizer": {"name": opt},
                                                           "train": {"seed": seed}}, metrics={"score": scores[0]})
            metrics = {f"oneshot/{s:g}/score": v for s, v in zip((0, 0.3, 0.6), scores)}
            write_trial(root, f"oneshot-{task}-{opt}-{seed}", "oneshot", "oneshot",
                        {"kind": "oneshot", "task": task, "train": {"seed": seed}}, parents=[parent],
                        metrics={**metrics, "score": scores[-1]})
    out = rep.report(root)
    assert (out / "oneshot_sparsity.png").stat().st_size > 0
    readme = (out / "README.md").read_text()
    assert "One-shot magnitude pruning without retraining (P1 Figure 7)" in readme
    assert "![oneshot_sparsity.png](oneshot_sparsity.png)" in readme
    table = pd.read_csv(out / "oneshot_sparsity.csv")
    cell = {(r.task, r.optimizer, r.sparsity_pct): r for r in table.itertuples()}
    assert len(cell) == 9
    # rte / adam at 60%: 0.50, 0.54, 0.52 -> mean 0.52, deviations -0.02, 0.02, 0: std sqrt(0.0008 / 2) = 0.02
    assert cell["rte", "adam", 60].mean == pytest.approx(0.52) and cell["rte", "adam", 60].std == pytest.approx(0.02)
    # rte / sam at 30%: 0.65, 0.67, 0.66 -> mean 0.66, std 0.01; at 0%: 0.67, 0.69, 0.71 -> 0.69, std 0.02
    assert cell["rte", "sam", 30].mean == pytest.approx(0.66) and cell["rte", "sam", 30].std == pytest.approx(0.01)
    assert cell["rte", "sam", 0].mean == pytest.approx(0.69) and cell["rte", "sam", 0].std == pytest.approx(0.02)
    assert all(cell["rte", o, s].n == 3 for o in ("adam", "sam") for s in (0, 30, 60))
    one = cell["mrpc", "sam", 60]  # one seed: no std
    assert one.mean == pytest.approx(0.70) and one.n == 1 and math.isnan(one.std)
    assert "| rte | adam | 0.6800 ± 0.0200 (3) | 0.6200 ± 0.0200 (3) | 0.5200 ± 0.0200 (3) |" in readme
    assert "oneshot: mrpc / adam" not in readme  # no mrpc / adam line at all: nothing listed missing for it
