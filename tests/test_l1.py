"""The l1 control (P1 A.7): loss + lambda * sum |w| over the prunable weights, for Adam and SAM.

In a real DeepSpeed engine (CPU, gloo, ZeRO 0 and 2, dropout on, an IMP mask on half the prunable weights), the
gradient one training step takes with the penalty, minus the one it takes without it on the same batch and dropout
masks, is lambda * sign(w) on the kept prunable weights and zero everywhere else (pruned weights, embeddings,
biases, LayerNorm, the head); for SAM at both passes (rho = 0, so both passes are at w). Then a masked fine-tuning
run through Ray Train with the penalty shrinks sum |w| and keeps its sparsity."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from flatray import config
from flatray.config import ConfigError, RunConfig
from flatray.data import TASKS

LAM = 1e-2
STAGES = (0, 2)
OPTIMIZERS = ("adam", "sam")  # sam with rho = 0: both passes at w


def new_model():
    from flatray import models

    torch.manual_seed(0)
    return models.load_model("tiny-bert", TASKS["toy"])


def batch(vocab):
    g = torch.Generator().manual_seed(7)
    return {"input_ids": torch.randint(5, vocab, (8, 12), generator=g),
            "attention_mask": torch.ones(8, 12, dtype=torch.long),
            "labels": torch.randint(0, 2, (8,), generator=g)}


def one_step(opt, stage, lam):
    """One train_step of a masked tiny BERT; every gradient each parameter received (one per pass), its weights
    before the step and the mask."""
    from flatray.methods import imp
    from flatray.train.engine import build_engine, model_loss, train_step, with_l1

    cfg = RunConfig(model="tiny-bert", task="toy", train={"batch_size": 8, "epochs": 1, "lr": 1e-3},
                    optimizer={"name": opt, "rho": 0.0 if opt == "sam" else None},
                    deepspeed={"zero_stage": stage, "gradient_clipping": 0.0})
    model = new_model()
    prunable = imp.prunable_weights(model)
    masks = imp.magnitude_masks(prunable, 0.5)
    imp.MaskedModel(model, masks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = build_engine(model, cfg, 1, total_steps=1)
    seen = {n: [] for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():  # after the mask's hook: sees the gradient the optimizer gets
        p.register_hook(lambda g, n=n: seen[n].append(g.detach().clone()))
    loss_fn = with_l1(model_loss, list(prunable.values()), lam) if lam else model_loss
    torch.manual_seed(1000)  # the same dropout masks with and without the penalty
    train_step(engine, batch(model.config.vocab_size), cfg, loss_fn)
    return {"grads": seen, "before": before, "masks": masks}


def worker(rank, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import logging

    import deepspeed
    import torch.distributed as dist

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    dist.init_process_group("gloo", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    out = {(opt, stage, lam): one_step(opt, stage, lam) for opt in OPTIMIZERS for stage in STAGES for lam in (0.0, LAM)}
    torch.save(out, out_path)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("l1") / "steps.pt")
    new_model()  # build the tiny-bert cache before the worker
    mp.spawn(worker, args=(free_port(), path), nprocs=1, join=True)
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_the_step_adds_lambda_sign_w_on_the_kept_prunable_weights_only(steps, opt, stage):
    plain, penalised = steps[(opt, stage, 0.0)], steps[(opt, stage, LAM)]
    masks, before = penalised["masks"], penalised["before"]
    passes = 2 if opt == "sam" else 1
    for name, grads in penalised["grads"].items():
        assert len(grads) == len(plain["grads"][name]) == passes, name
        expected = torch.zeros_like(before[name])
        if name in masks:
            expected = LAM * torch.sign(before[name]) * masks[name]
        for with_l1, without in zip(grads, plain["grads"][name]):
            torch.testing.assert_close(with_l1 - without, expected, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert sum(int(masks[n].sum()) for n in masks) > 0 and any(before[n][masks[n]].ne(0).any() for n in masks)


def test_bad_l1_settings_are_named():
    base = {"model": "tiny-bert", "task": "toy"}
    with pytest.raises(ConfigError, match=r"train\.l1"):
        config.from_dict({**base, "train": {"l1": -1e-5}})
    with pytest.raises(ConfigError, match=r"train\.l1.*0 for kind ptq"):
        config.from_dict({**base, "kind": "ptq", "train": {"l1": 1e-5}})


@pytest.mark.slow  # a Ray Train run, about 40 s on 2 cores; the gradient test above is the fast check
def test_a_masked_run_with_the_penalty_shrinks_the_prunable_weights(tmp_path):
    """Through the normal run path (Ray Train, DeepSpeed): an IMP-masked fine-tuning run with the penalty."""
    import ray

    from flatray import train
    from flatray.methods import imp

    cfg = config.from_dict({"model": "tiny-bert", "task": "toy", "data": {"max_train_samples": 64, "max_eval_samples": 64},
                            "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "l1": LAM, "seed": 1},
                            "prune": {"sparsity": 0.5}, "output": {"storage_path": str(tmp_path), "name": "l1"}})
    try:
        result = train.fit(cfg)
    finally:
        ray.shutdown()
    (_, metrics), = result.best_checkpoints
    pretrained = imp.prunable_weights(new_model())
    masks = imp.magnitude_masks(pretrained, 0.5)  # what the run kept (no parent: the pre-trained magnitudes)
    start = sum(float((w.detach() * masks[n]).abs().sum()) for n, w in pretrained.items())
    print(f"l1_norm {metrics['l1_norm']:.1f} of {start:.1f} at the start")
    # every kept weight is pulled towards zero by about lr per step (4 steps, lr decaying linearly to 0)
    assert metrics["l1_norm"] < 0.97 * start
    assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
