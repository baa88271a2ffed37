"""Faults injected into real local sweeps (issue 12, started): a diverging run."""

import json
import math

import pytest

from flatray import config, sweep
from flatray.sweep import graph

DIVERGE = """
name: diverge
storage: {storage}
wandb: {{mode: disabled}}
defaults:
  model: tiny-bert
  task: toy
  data: {{max_train_samples: 64, max_eval_samples: 32}}
  train: {{epochs: 2, batch_size: 32, seed: 0}}
  scaling: {{num_workers: 1}}
experiments:
  full:
    kind: finetune
    config: {{train: {{lr: 1.0e+30}}}}
  imp:
    kind: imp
    parent: full
    levels: 1
    sparsity_step: 0.5
"""


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    import ray

    tmp = tmp_path_factory.mktemp("faults")
    path = tmp / "diverge.yaml"
    path.write_text(DIVERGE.format(storage=tmp))
    try:
        outcomes = sweep.run(graph.load(path), path.read_text(), status_every_s=3600)
        yield tmp / "diverge", outcomes
    finally:
        ray.shutdown()


def test_a_diverged_run_fails_at_once_and_feeds_no_child(diverged):
    root, outcomes = diverged
    (record, summary), = outcomes.values()  # the IMP child never started
    assert record["experiment"] == "full" and summary["status"] == "failed"
    assert "the run diverged" in summary["error"] and "train.lr 1e+30" in summary["error"]
    assert summary["attempts"] == 1  # not retried: it would diverge again
    on_disk = _strict((root / record["id"] / "summary.json").read_text())
    assert on_disk["status"] == "failed"
    assert [p.name for p in root.iterdir() if (p / "trial.json").exists()] == [record["id"]]


@pytest.mark.parametrize("value", ["inf", ".nan", "-.inf"])
def test_non_finite_hyperparameters_are_rejected_before_anything_runs(value):
    with pytest.raises(config.ConfigError, match="train.lr.*finite"):
        config.from_dict({"model": "tiny-bert", "task": "toy"}, overrides=[f"train.lr={value}"])


def test_result_files_are_strict_json():
    from flatray import storage

    text = storage.strict_json({"train_loss": float("nan"), "history": [{"x": math.inf}], "ok": 1.5})
    assert _strict(text) == {"train_loss": None, "history": [{"x": None}], "ok": 1.5}


# Ray Train's text for a failed run, as a real sweep wrote it (paths shortened): its first line names no cause.
RAY_FAILURE = """WorkerGroupError: Training failed due to worker errors:
[Rank 1 Error Snippet]:
Traceback (most recent call last):
  File "flatray/train/context.py", line 167, in train_worker
    method.load_run()(ctx)
  File "flatray/train/context.py", line 131, in train_loader
    raise ValueError(f"train set of {len(train)} examples gives no full batch of {self.cfg.train.batch_size}")
ValueError: train set of 8 examples gives no full batch of 16
"""


def test_the_root_cause_of_a_failure_comes_first():
    from flatray.sweep.trial import root_cause

    assert root_cause(RAY_FAILURE) == "ValueError (rank 1): train set of 8 examples gives no full batch of 16"
    assert root_cause("OSError: disk full") == "OSError: disk full"


def test_a_long_message_cut_out_of_rays_snippet_is_read_from_the_workers_error():
    """Ray Train cuts a long worker snippet in the middle (a CoFi run's SparsityMissedError lost its exception
    line that way, and the results table showed "WorkerGroupError: Training failed..."); the WorkerGroupError's
    worker_failures hold each worker's whole traceback."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from flatray.sweep.trial import describe, root_cause

    tail = "x" * 3000
    whole = ('Traceback (most recent call last):\n  File "flatray/methods/cofi.py", line 144, in check_sparsity\n'
             f"flatray.methods.cofi.SparsityMissedError: CoFi ended at 70.6% sparsity, target 50.0% {tail}\n")
    cut = "[Rank 0 Error Snippet]:\n" + whole[:90] + "\n...\n... (Output truncated) ...\n" + whole[-60:]
    error = WorkerGroupError(cut, {0: UserExceptionWithTraceback(ValueError("CoFi ended"), whole)})
    assert not root_cause(f"WorkerGroupError: {error}").startswith("SparsityMissedError")  # what the text allows
    assert describe(error) == f"SparsityMissedError (rank 0): CoFi ended at 70.6% sparsity, target 50.0% {tail}"
    assert describe(ValueError("plain")) == "ValueError: plain"
    assert describe(WorkerGroupError(cut, {1: KeyError("k")})) == "KeyError (rank 1): 'k'"  # the exception itself


def test_the_diverged_trial_shows_its_cause_first(diverged):
    _, outcomes = diverged
    (_, summary), = outcomes.values()
    assert summary["error"].splitlines()[0].startswith("Diverged (rank 0): the run diverged at epoch 1 step")


def test_a_failure_names_the_workers_log_in_its_summary_and_in_the_results_table(diverged):
    from flatray.sweep.status import results_table

    _, outcomes = diverged
    (record, summary), = outcomes.values()
    log = summary["log"]
    assert log and log.endswith(".err") and "/logs/worker-" in log
    assert "Diverged: the run diverged" in open(log).read()  # the worker's traceback
    table = results_table(outcomes, ["full", "imp"])
    assert f"  full {record['id']}: Diverged (rank 0): the run diverged at epoch 1 step" in table
    assert f"    worker log: {log}" in table
