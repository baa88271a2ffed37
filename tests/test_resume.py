"""Exact resume (issue 12 item 11): a Ray Train run whose worker is SIGKILLed, run again under its name as a retried
sweep trial is, ends bit-identical (fp32, CPU) to a run that was never stopped: every weight tensor, the optimizer
state, the RNG streams and the metrics history. For fine-tuning, an IMP level, a ticket transfer, CoFi (killed once
in each phase) and SQuAT, dropout on."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray.train
import torch

from flatray import config, train
from flatray.train import checkpoint

WALL_CLOCK = ("epoch_seconds",)  # the only metrics a resumed run may not repeat


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


def run_config(tmp_path, name, **sections):
    base = {"model": "tiny-bert", "task": "toy", "data": {"max_train_samples": 96, "max_eval_samples": 64},
            "train": {"epochs": 3, "batch_size": 16, "seed": 3}, "output": {"storage_path": str(tmp_path)}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    base["output"] = {**base["output"], "name": name}
    return config.from_dict(base)


def Reports(path):
    """A Ray Train callback (run in Train's controller, pickled by value) that writes each report's epoch, phase,
    step and whether it came with a checkpoint to a file."""
    class Callback(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            with open(path, "a") as f:
                f.write(json.dumps([m.get("epoch"), m.get("phase"), m.get("checkpoint_step")]) + "\n")

    return Callback()


def latest_registered(folder: Path) -> dict | None:
    """The latest checkpoint Ray Train has registered for the run in `folder` (its controller's snapshot)."""
    try:
        state = json.loads((folder / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not there yet, or being written
        return None
    return state.get("latest_checkpoint_result")


def train_worker_pids(world: int) -> list[int]:
    """The processes of this run's Ray Train workers, once all `world` of them are up."""
    import ray
    from ray.util.state import list_actors

    alive = list_actors(address=ray.get_runtime_context().gcs_address,  # this test's Ray, not another one here
                        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in alive] if len(alive) == world else []


def run_killed_then_resumed(cfg, kill_after) -> tuple[list[dict], dict, list[tuple]]:
    """fit(cfg), SIGKILLing one of its Ray Train worker processes as soon as Ray has registered a checkpoint
    whose metrics satisfy `kill_after`, once per predicate; after each kill fit(cfg) again under the same name, as
    a retried sweep trial does (flatray.sweep.trial). Returns the position each retry restarted from, the last
    run's Result and what it reported ((epoch, phase, checkpoint_step) per report)."""
    folder = Path(cfg.storage_uri) / cfg.run_name
    restarts = []
    for when in kill_after:
        killed = {}

        def watch(when=when, killed=killed):
            pids = []
            while not pids:
                pids = train_worker_pids(cfg.scaling.num_workers)
                time.sleep(0.2)
            while True:
                latest = latest_registered(folder)
                if latest and when(latest["metrics"]):
                    os.kill(pids[-1], signal.SIGKILL)
                    killed["at"] = latest["checkpoint_dir_name"]
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with pytest.raises(ray.train.TrainingFailedError):
            train.make_trainer(cfg).fit()
        watcher.join(timeout=60)
        assert "at" in killed, "the run failed before the watcher killed a worker"
        restored = latest_registered(folder)["checkpoint_dir_name"]  # what the retry restores
        restarts.append(checkpoint.read(folder / restored).position)
    log = folder.parent / f"{cfg.run_name}-reports.jsonl"
    result = train.make_trainer(cfg, callbacks=[Reports(str(log))]).fit()
    return restarts, result, [tuple(json.loads(line)) for line in log.read_text().splitlines()]


def assert_same(a, b, where=""):
    """Equal, tensors bit for bit (torch.equal), recursing into dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "dtype") and hasattr(a, "shape"):  # numpy's RNG state holds an array
        assert (a == b).all(), where
    elif type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):  # e.g. DeepSpeed's loss scaler
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where


def tensors(folder: Path) -> dict:
    """Every tensor file of a checkpoint folder (safetensors and torch files), by relative path."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".safetensors":
            out[str(path.relative_to(folder))] = load_file(str(path))
        elif path.suffix == ".pt":
            out[str(path.relative_to(folder))] = torch.load(path, weights_only=False)
    return out


def history(result_checkpoint) -> list[dict]:
    rows = json.loads((Path(result_checkpoint.path) / checkpoint.HISTORY_FILE).read_text())
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]


def assert_bit_identical(reference, resumed):
    """The latest checkpoints (weights, optimizer moments, lr schedule, RNG states: all of resume/) and the best
    ones (the method's output) hold the same tensors; the histories and the best metrics are the same."""
    assert history(resumed.checkpoint) == history(reference.checkpoint)
    for a, b in ((reference.checkpoint, resumed.checkpoint), (reference.best_checkpoints[-1][0],
                                                             resumed.best_checkpoints[-1][0])):
        ta, tb = tensors(Path(a.path)), tensors(Path(b.path))
        assert ta and ta.keys() == tb.keys()
        assert_same(ta, tb, Path(a.path).name)
    (_, best_ref), (_, best_res) = reference.best_checkpoints[-1], resumed.best_checkpoints[-1]
    drop = lambda m: {k: v for k, v in m.items() if k not in WALL_CLOCK}  # noqa: E731
    assert drop(best_res) == drop(best_ref)


def epoch_end(epoch, phase=None):
    return lambda m: m.get("epoch") == epoch and m.get("phase") == phase and "checkpoint_step" not in m


def step_checkpoint(epoch, step, phase=None):
    """The checkpoint after `step` batches of epoch `epoch` (its report repeats the previous epoch's metrics)."""
    return lambda m: m.get("epoch") == epoch - 1 and m.get("phase") == phase and m.get("checkpoint_step") == step


@pytest.mark.slow  # three Ray Train runs: about 100 s on 2 cores
def test_finetune_with_sam_and_dropout_resumes_bit_identical(tmp_path, ray_session):
    """Killed in epoch 2, after the checkpoint of epoch 1: the retry restores weights, Adam's moments, the lr
    schedule and the worker's RNG (dropout), runs epoch 1 no more, and ends as the unbroken run."""
    sections = {"optimizer": {"name": "sam", "rho": 0.05}, "train": {"lr": 1e-3, "epochs": 2}}
    reference = train.fit(run_config(tmp_path, "ref", **sections))
    restarts, resumed, reports = run_killed_then_resumed(run_config(tmp_path, "killed", **sections), [epoch_end(1)])
    assert [(p.epoch, p.step) for p in restarts] == [(2, 0)]
    assert reports == [(2, None, None)]  # epoch 1 was not run again
    assert_bit_identical(reference, resumed)
    # The best dev checkpoint stays a plain Hugging Face folder.
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(resumed.best_checkpoints[-1][0].path) is not None


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory, ray_session):
    """A finished fine-tuning run: the parent of the IMP level."""
    folder = tmp_path_factory.mktemp("parent")
    result = train.fit(run_config(folder, "parent", train={"epochs": 1, "lr": 1e-3}))
    return result.best_checkpoints[-1][0].path


@pytest.mark.slow
def test_an_imp_level_resumes_mid_epoch_bit_identical(tmp_path, parent_run):
    """An IMP level (the parent's weights ranked, rewound, masked training) on 2 workers at ZeRO 2, checkpointed
    every 2 steps and killed after the one of epoch 2 step 4: the retry skips the epoch's first 4 batches and puts
    back both workers' RNG streams and optimizer partitions."""
    sections = {"prune": {"parent": parent_run, "sparsity": 0.3}, "optimizer": {"name": "sam", "rho": 0.05},
                "train": {"lr": 1e-3, "checkpoint_every_steps": 2}, "scaling": {"num_workers": 2},
                "deepspeed": {"zero_stage": 2}}
    reference = train.fit(run_config(tmp_path, "ref", **sections))
    restarts, resumed, reports = run_killed_then_resumed(run_config(tmp_path, "killed", **sections),
                                                         [step_checkpoint(2, 4)])
    assert [(p.epoch, p.step) for p in restarts] == [(2, 4)]
    assert reports[0] == (2, None, None)  # the end of epoch 2 (its 6th step ends the epoch: no step checkpoint)
    assert_bit_identical(reference, resumed)


@pytest.mark.slow
def test_a_ticket_transfer_resumes_bit_identical(tmp_path, ray_session):
    """A transfer (theta_0 re-trained under a given mask) with Adam on 2 workers at ZeRO 1, killed after epoch 1."""
    from flatray import data, models
    from flatray.methods import imp

    model = models.load_model("tiny-bert", data.TASKS["toy"])
    weights = {n: p.detach() for n, p in imp.prunable_weights(model).items()}
    imp.save_masks(tmp_path / "mask.safetensors", imp.random_masks(weights, 0.4, seed=1), level=1)
    sections = {"prune": {"mask": str(tmp_path / "mask.safetensors")}, "train": {"lr": 1e-3},
                "scaling": {"num_workers": 2}, "deepspeed": {"zero_stage": 1}}
    reference = train.fit(run_config(tmp_path, "ref", **sections))
    restarts, resumed, _ = run_killed_then_resumed(run_config(tmp_path, "killed", **sections), [epoch_end(1)])
    assert [(p.epoch, p.step) for p in restarts] == [(2, 0)]
    assert_bit_identical(reference, resumed)


@pytest.mark.slow
def test_cofi_resumes_bit_identical_after_a_kill_in_each_phase(tmp_path, ray_session):
    """CoFi, killed in its pruning phase (after prune epoch 1: the masks, their multipliers and their optimizer
    come back with the engine) and again in its fine-tuning phase (after 3 steps of fine-tune epoch 4: the pruned
    model is rebuilt from the checkpoint); the run's model is the best fine-tuning checkpoint."""
    sections = {"kind": "cofi", "train": {"lr": 1e-3, "checkpoint_every_steps": 3},
                "cofi": {"target_sparsity": 0.5, "prune_epochs": 2, "finetune_epochs": 2, "lr_masks": 0.1,
                         "lr_lambdas": 0.1, "sparsity_tolerance": 0.5}}  # 6 pruning steps cannot reach the target
    reference = train.fit(run_config(tmp_path, "ref", **sections))
    restarts, resumed, reports = run_killed_then_resumed(run_config(tmp_path, "killed", **sections),
                                                         [epoch_end(1, phase=1), step_checkpoint(4, 3, phase=2)])
    assert [(p.phase, p.epoch, p.step) for p in restarts] == [(1, 2, 0), (2, 4, 3)]
    assert reports[-1][:2] == (4, 2)
    assert resumed.best_checkpoints[-1][1]["phase"] == 2  # the pruned model, not the masked student
    assert_bit_identical(reference, resumed)


@pytest.mark.slow
def test_squat_resumes_bit_identical_across_its_alternation(tmp_path, ray_session):
    """SQuAT with SAM, alternating weights/step sizes every 2 steps, checkpointed every 3 steps (a checkpoint in
    the middle of an A/B period) and killed after epoch 2 step 3; the best model's sharpness is measured at the end
    from the best weights the checkpoint carried."""
    sections = {"kind": "squat", "optimizer": {"name": "sam", "rho": 0.05},
                "train": {"lr": 1e-4, "checkpoint_every_steps": 3},
                "squat": {"weight_bits": 4, "act_bits": 8, "lr_steps": 1e-3, "period": 2},
                "sharpness": {"enabled": True, "dim": 5, "samples": 16, "max_iter": 2, "eps": [0.005]}}
    reference = train.fit(run_config(tmp_path, "ref", **sections))
    restarts, resumed, _ = run_killed_then_resumed(run_config(tmp_path, "killed", **sections), [step_checkpoint(2, 3)])
    assert [(p.epoch, p.step) for p in restarts] == [(2, 3)]
    assert "sharpness/eps=0.005" in resumed.metrics
    assert_bit_identical(reference, resumed)
