"""Stochastic weight averaging (P1 3.4.7, A.2) through the normal run path: a real Ray Train run (DeepSpeed, tiny
BERT, dropout on) whose model is the equal average of the weights at P1's 3-epoch points (after 2, 2.5 and 3
epochs), and an IMP level of it whose average keeps the pruned weights at zero."""

import json
import shutil
from pathlib import Path

import pytest
import ray.train
import torch
from safetensors.torch import load_file

from flatray import config, train
from flatray.config import ConfigError
from flatray.methods import imp
from flatray.train import swa

STEPS_PER_EPOCH = 4  # 64 examples, batch 16


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


def keep_weights(folder):
    """A Ray Train callback (run in Train's controller, pickled by value) that copies the weights of every reported
    checkpoint, as it is reported, to `folder`/<epoch>.safetensors: the epoch, fractional for a checkpoint inside
    an epoch (its report repeats the last epoch's metrics with the step), or swa.safetensors for the average."""
    class Callback(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            if checkpoint is None:
                return
            at = m["epoch"] + m.get("checkpoint_step", 0) / STEPS_PER_EPOCH
            name = "swa" if "swa_checkpoints" in m else f"{at:g}"
            shutil.copy(Path(checkpoint.path) / "model.safetensors", Path(folder) / f"{name}.safetensors")

    return Callback()


def swa_config(tmp_path, name, **sections):
    raw = {"model": "tiny-bert", "task": "toy", "data": {"max_train_samples": 64, "max_eval_samples": 64},
           # lr 1e-3: the points must differ enough for the average to be no single one of them
           "train": {"epochs": 3, "batch_size": 16, "lr": 1e-3, "seed": 5, "checkpoint_every_steps": 2},
           "swa": {"enabled": True}, "output": {"storage_path": str(tmp_path), "name": name}}
    return config.from_dict({**raw, **sections})


def swa_run(tmp_path, name, **sections):
    cfg = swa_config(tmp_path, name, **sections)
    kept = tmp_path / f"{name}-weights"
    kept.mkdir()
    return cfg, train.make_trainer(cfg, callbacks=[keep_weights(str(kept))]).fit(), kept


@pytest.fixture(scope="module")
def dense(tmp_path_factory, ray_session):
    from flatray.train.driver import init_ray

    init_ray(None, 2, False)
    folder = tmp_path_factory.mktemp("swa")
    return (*swa_run(folder, "dense"), folder)


def test_the_model_is_the_equal_average_of_the_weights_at_the_swa_points(dense):
    cfg, result, kept, _ = dense
    assert cfg.swa.every == 0.5  # the default for a 3-epoch run, as P1's 3-epoch tasks
    (ckpt, metrics), = result.best_checkpoints  # the average is the run's model, not the best epoch
    assert metrics["swa_checkpoints"] == [2.0, 2.5, 3.0] and metrics["swa_models"] == 3
    assert result.metrics["swa_checkpoints"] == [2.0, 2.5, 3.0]  # its report is the run's last word
    points = [load_file(str(kept / f"{p:g}.safetensors")) for p in (2, 2.5, 3)]
    model = load_file(str(Path(ckpt.path) / "model.safetensors"))
    assert load_file(str(kept / "swa.safetensors")).keys() == model.keys()
    moved = 0.0
    for name, value in model.items():
        mean = sum(p[name].double() for p in points) / 3
        assert torch.allclose(value.double(), mean, rtol=0, atol=1e-6), name
        moved = max(moved, (points[2][name] - points[0][name]).abs().max().item())
    assert moved > 1e-4  # the points differ by far more than the tolerance: the check above could fail
    # The averaged model's metrics are its own: the run files in its checkpoint say so.
    assert json.loads((Path(ckpt.path) / "metrics.json").read_text())["score"] == metrics["score"]
    history = json.loads((Path(ckpt.path) / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3] and metrics["epoch"] == 3


def test_an_imp_level_prunes_the_average_and_its_own_average_keeps_the_zeros(dense, tmp_path):
    _, parent, _, _ = dense
    (parent_ckpt, _), = parent.best_checkpoints
    cfg, result, kept = swa_run(tmp_path, "level1", prune={"parent": parent_ckpt.path, "sparsity": 0.3})
    (ckpt, metrics), = result.best_checkpoints
    assert metrics["swa_checkpoints"] == [2.0, 2.5, 3.0]
    masks, _ = imp.load_masks(Path(ckpt.path) / imp.MASK_FILE)
    # The level ranked the parent's averaged weights.
    ranked = {n: w for n, w in load_file(str(Path(parent_ckpt.path) / "model.safetensors")).items() if n in masks}
    assert all(torch.equal(masks[n], m) for n, m in imp.magnitude_masks(ranked, 0.3).items())
    model = load_file(str(Path(ckpt.path) / "model.safetensors"))
    for name, mask in masks.items():
        assert not model[name][~mask].any(), f"{name}: a pruned weight is not zero in the average"
        assert model[name][mask].ne(0).float().mean() > 0.99
    assert metrics["sparsity"] == pytest.approx(0.3, abs=1e-3)


@pytest.mark.slow  # a Ray Train run killed and run again: about 90 s on 2 cores
def test_a_run_killed_between_points_resumes_its_average_bit_identical(dense):
    """Killed after the checkpoint at 2.5 epochs (2 of the 3 points averaged): the retry puts the average back
    from the checkpoint, adds the last point and ends as the unbroken run, the averaged model included."""
    from test_resume import assert_bit_identical, run_killed_then_resumed, step_checkpoint

    _, reference, _, folder = dense
    restarts, resumed, reports = run_killed_then_resumed(swa_config(folder, "killed"), [step_checkpoint(3, 2)])
    assert [(p.epoch, p.step) for p in restarts] == [(3, 2)]
    assert reports == [(3, None, None), (3, None, None)]  # the end of epoch 3, then the average
    assert resumed.metrics["swa_checkpoints"] == [2.0, 2.5, 3.0]
    assert_bit_identical(reference, resumed)


def test_points_are_p1s():
    assert swa.points(10, 0.5, 1.0) == [6, 7, 8, 9, 10]
    assert swa.points(3, 0.5, 0.5) == [2.0, 2.5, 3.0]
    assert swa.points(2, 0.0, 1.0) == [1, 2]
    rte = config.from_dict({"model": "tiny-bert", "task": "rte", "swa": {"enabled": True}})
    assert (rte.train.epochs, rte.swa.every) == (10, 1.0)
    sst2 = config.from_dict({"model": "tiny-bert", "task": "sst2", "swa": {"enabled": True}})
    assert (sst2.train.epochs, sst2.swa.every) == (3, 0.5)


def test_bad_swa_settings_are_named():
    base = {"model": "tiny-bert", "task": "toy", "train": {"epochs": 3}}
    with pytest.raises(ConfigError, match=r"swa\.every.*whole fraction of train\.epochs \(3\)"):
        config.from_dict({**base, "swa": {"enabled": True, "every": 2}})
    with pytest.raises(ConfigError, match=r"swa\.start"):
        config.from_dict({**base, "swa": {"enabled": True, "start": 1.0}})
    with pytest.raises(ConfigError, match=r"swa\.enabled.*false for kind ptq"):
        config.from_dict({**base, "kind": "ptq", "swa": {"enabled": True}})
