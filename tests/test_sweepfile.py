"""Sweep files: each class of mistake is reported before anything starts, naming the experiment, key and value."""

import textwrap

import pytest

from flatray.sweep import graph as sweepfile
from flatray.config import ConfigError

HEAD = """
name: t
defaults: {model: tiny-bert, task: toy}
experiments:
"""


def load(tmp_path, experiments):
    path = tmp_path / "sweep.yaml"
    path.write_text(HEAD + textwrap.indent(textwrap.dedent(experiments), "  "))
    return sweepfile.load(path)


def test_smoke_sweep_loads_in_dependency_order():
    sweep = sweepfile.load("sweeps/smoke.yaml")
    names = sweepfile.order(sweep.experiments)
    assert names.index("full") < names.index("imp") < names.index("transfer")
    assert sweep.experiments["squat"].feed == "best"


BAD = [
    ("full: {kind: finetune, serch: {}}", ["experiments.full.serch", "unknown key", "did you mean 'search'"]),
    ("full: {kind: tune}", ["experiments.full.kind", "'tune'", "'finetune'"]),
    ("imp: {kind: imp}", ["experiments.imp", "needs a parent"]),
    ("imp: {kind: imp, parent: nope}", ["experiments.imp.parent", "'nope'", "expected one of imp"]),
    ("a: {kind: imp, parent: b}\nb: {kind: imp, parent: a}", ["cyclic parents", "a -> b -> a"]),
    ("full: {kind: finetune, search: {space: {optimizer.rhoo: {grid: [0.1]}}}}",
     ["experiments.full.search.space", "'optimizer.rhoo'", "not a run-config key"]),
    ("full: {kind: finetune, search: {space: {optimizer.rho: {between: [0, 1]}}}}",
     ["experiments.full.search.space", "optimizer.rho", "grid, choice, uniform, loguniform, randint"]),
    ("full: {kind: finetune, search: {space: {train.lr: {loguniform: [0, 1.0e-3]}}}}", ["loguniform needs low > 0"]),
    ("full: {kind: finetune, search: {space: {optimizer.name: {grid: [sam, sgd]}}}}",
     ["experiment 'full'", "optimizer.name", "'sgd'", "'adam', 'sam' or 'asam'"]),
    ("full: {kind: finetune, config: {deepspeed: {zero_stage: 3}}}", ["experiment 'full'", "deepspeed.zero_stage"]),
    ("full: {kind: finetune, search: {num_samples: 0}}", ["experiments.full.search.num_samples", "0"]),
    ("full: {kind: finetune}\nimp: {kind: imp, parent: full, levels: 10, sparsity_step: 0.2}",
     ["experiments.imp", "levels x sparsity_step"]),
    ("full: {kind: finetune, search: {space: {optimizer.name: {grid: [sam]}}}}\n"
     "best: {kind: ptq, parent: full, feed: best, group_by: [optimizer.nam]}",
     ["experiments.best.group_by", "'optimizer.nam'"]),
]


@pytest.mark.parametrize("experiments,expected", BAD, ids=[b[0][:40] for b in BAD])
def test_bad_sweep_files(tmp_path, experiments, expected):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, experiments)
    for part in expected:
        assert part in str(err.value), f"{part!r} not in:\n{err.value}"


def test_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="name.*missing"):
        (tmp_path / "s.yaml").write_text("experiments: {full: {kind: finetune}}\n")
        sweepfile.load(tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match="experiments.*at least 1"):
        (tmp_path / "s.yaml").write_text("name: x\nexperiments: {}\n")
        sweepfile.load(tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match="not found"):
        sweepfile.load(tmp_path / "missing.yaml")


def test_trial_ids_are_stable_and_change_with_config_and_parents(tmp_path):
    sweep = load(tmp_path, "full: {kind: finetune, config: {optimizer: {name: sam}}}")
    cfg = sweepfile.validate_run(sweep, "full", {})
    same = sweepfile.validate_run(sweep, "full", {})
    assert sweepfile.trial_id(cfg) == sweepfile.trial_id(same)
    assert sweepfile.trial_id(cfg, ["p1"]) == sweepfile.trial_id(same, ["p1"])
    assert sweepfile.trial_id(cfg, ["p1"]) != sweepfile.trial_id(cfg, ["p2"]) != sweepfile.trial_id(cfg)
    other = sweepfile.validate_run(sweep, "full", {"optimizer.rho": 0.1})
    assert sweepfile.trial_id(other) != sweepfile.trial_id(cfg)
    moved = sweepfile.validate_run(sweep, "full", {"output.storage_path": "/elsewhere"})
    assert sweepfile.trial_id(moved) == sweepfile.trial_id(cfg)  # where it is written is not what it is
