"""SAM/ASAM/Adam inside a real DeepSpeed engine (CPU, gloo, ZeRO 0/1/2, world size 1 and 2) against a plain
PyTorch reference on the same batches, for both perturbation scopes (METHODS.md section 2).

Dropout stays on (the tiny BERT's 0.1, as loaded by `models.load_model`). Each worker seeds its RNG; the reference
replays each worker's RNG stream, and gives both passes of a SAM step the same dropout masks by restoring that
worker's RNG state before the second pass (what flatray.train.engine.train_step promises)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from flatray.config import RunConfig
from flatray.data import TASKS

STEPS, GLOBAL_BATCH, SEQ, LR = 3, 8, 12, 1e-3
CASES = [  # (optimizer, scope, gradient clipping)
    ("adam", "worker", 0.0),
    ("sam0", "worker", 0.0),  # SAM with rho = 0: Adam bit for bit, dropout on
    ("sam0", "global", 0.0),
    ("sam", "worker", 0.0),
    ("sam", "global", 0.0),
    ("asam", "worker", 0.0),
    ("asam", "global", 0.0),
    ("sam", "worker", 0.5),
    # cheaper SAM (flatray.methods.cheap_sam): steps 0 and 2 are SAM steps, step 1 is not
    ("every2", "worker", 0.5),  # SAM every 2nd step, Adam in between
    ("looksam", "worker", 0.0),  # LookSAM: in between, g + alpha ||g|| / ||g_v|| g_v
    ("looksam", "global", 0.5),
]
STAGES = (0, 1, 2)
RHO = {"adam": 0.0, "sam0": 0.0, "sam": 0.05, "asam": 0.5, "every2": 0.05, "looksam": 0.05}
OPTIMIZER = {"every2": {"name": "sam", "sam_every": 2},
             "looksam": {"name": "sam", "sam_every": 2, "sam_between": "looksam", "looksam_alpha": 0.7}}
DROPOUT_SEED = 1000  # + rank: each worker's own dropout stream


def run_config(opt, scope, clip, stage, world):
    return RunConfig(
        model="tiny-bert", task="toy",
        train={"batch_size": GLOBAL_BATCH, "epochs": 1, "lr": LR, "schedule": "linear"},
        optimizer={"name": opt.removesuffix("0"), **OPTIMIZER.get(opt, {}), "sam_scope": scope, "rho": RHO[opt]},
        deepspeed={"zero_stage": stage, "gradient_clipping": clip},
        scaling={"num_workers": world},
    )


def new_model():
    from flatray import models

    torch.manual_seed(0)
    model = models.load_model("tiny-bert", TASKS["toy"])
    assert model.config.hidden_dropout_prob == 0.1 and model.config.attention_probs_dropout_prob == 0.1
    return model


def batches(vocab):
    g = torch.Generator().manual_seed(123)
    return [
        {
            "input_ids": torch.randint(5, vocab, (GLOBAL_BATCH, SEQ), generator=g),
            "attention_mask": torch.ones(GLOBAL_BATCH, SEQ, dtype=torch.long),
            "labels": torch.randint(0, 2, (GLOBAL_BATCH,), generator=g),
        }
        for _ in range(STEPS)
    ]


def shard(batch, rank, world):
    n = GLOBAL_BATCH // world
    return {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}


def worker(rank, world, port, out_dir, job="reference"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from flatray.train.engine import build_engine, train_step

    dist.init_process_group("gloo", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    if job == "masked":
        masked_runs(rank, world, out_dir)
        dist.destroy_process_group()
        return
    for stage in STAGES:
        for opt, scope, clip in CASES:
            cfg = run_config(opt, scope, clip, stage, world)
            model = new_model()
            engine = build_engine(model, cfg, world, total_steps=STEPS)
            torch.manual_seed(DROPOUT_SEED + rank)
            for b in batches(model.config.vocab_size):
                train_step(engine, shard(b, rank, world), cfg)
            if rank == 0:
                state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
                torch.save(state, os.path.join(out_dir, f"{world}-{stage}-{opt}-{scope}-{clip}.pt"))
            dist.barrier()
    dist.destroy_process_group()


MASKED = [(stage, opt) for stage in STAGES for opt in ("sam", "asam")]


def masked_runs(rank, world, out_dir):
    """IMP-style masked training: pruned weights must stay exactly zero through the perturbation, the restore and
    the (weight-decayed) AdamW step, on every rank. No `enforce()` here: the gradient masking alone must do it."""
    import torch.distributed as dist

    from flatray.methods import imp as prune
    from flatray.train.engine import build_engine, train_step

    for stage, opt in MASKED:
        cfg = run_config(opt, "worker", 1.0, stage, world)
        cfg.train.weight_decay = 0.01
        model = new_model()
        masks = prune.magnitude_masks(prune.prunable_weights(model), 0.5)
        prune.MaskedModel(model, masks)
        engine = build_engine(model, cfg, world, total_steps=STEPS)
        for b in batches(model.config.vocab_size):
            train_step(engine, shard(b, rank, world), cfg)
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items() if k in masks}
        torch.save({"state": state, "masks": masks}, os.path.join(out_dir, f"masked-{stage}-{opt}-rank{rank}.pt"))
        dist.barrier()


def grads(model, batch, rng_state):
    """The gradient on `batch` with dropout drawn from `rng_state`; returns it and the RNG state after the pass."""
    torch.set_rng_state(rng_state)
    model.zero_grad()
    model(**batch).loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()], torch.get_rng_state()


def reference(opt, scope, clip, world):
    """Plain PyTorch, one process: each worker's sub-batch is simulated one after the other, each with its worker's
    RNG stream; both passes of a SAM step start from the same RNG state (the same dropout masks)."""
    model = new_model().train()
    params = list(model.parameters())
    adam = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(adam, lambda s: (STEPS - s) / STEPS)
    rho = RHO[opt]
    streams = []
    for r in range(world):
        torch.manual_seed(DROPOUT_SEED + r)
        streams.append(torch.get_rng_state())
    g_v = [None] * world  # LookSAM: each worker's orthogonal part of its last SAM gradient

    def dot(a, b):
        return sum((x * y).sum() for x, y in zip(a, b))

    for step, b in enumerate(batches(model.config.vocab_size)):
        shards = [shard(b, r, world) for r in range(world)]
        w = [p.detach().clone() for p in params]
        passes = [grads(model, s, streams[r]) for r, s in enumerate(shards)]
        first = [g for g, _ in passes]
        sam_step = opt not in OPTIMIZER or step % 2 == 0
        if opt == "looksam" and not sam_step:  # g + 0.7 ||g|| / ||g_v|| g_v, each worker its own
            second = [[gi + 0.7 * dot(g, g).sqrt() / dot(v, v).sqrt() * vi for gi, vi in zip(g, v)]
                      for g, v in zip(first, g_v)]
            streams = [state for _, state in passes]
            first = []
        if scope == "global" and sam_step:
            mean = [sum(gs) / world for gs in zip(*first)]
            first = [mean] * world
        if first:
            second = []
        for r, (s, g) in enumerate(zip(shards, first)):
            start_state, streams[r] = streams[r], passes[r][1]
            if opt == "adam" or not sam_step:
                second.append(g)
                continue
            t = [(wi.abs() + 0.01) if (opt == "asam" and wi.dim() >= 2) else torch.ones_like(wi) for wi in w]
            norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
            with torch.no_grad():
                for p, wi, ti, gi in zip(params, w, t, g):
                    p.copy_(wi + rho * ti * ti * gi / (norm + 1e-12))
            second.append(grads(model, s, start_state)[0])  # same masks as the first pass
            if opt == "looksam":  # g_v = g_s - <g, g_s> / ||g||^2 g
                g_v[r] = [si - dot(g, second[-1]) / dot(g, g) * gi for si, gi in zip(second[-1], g)]
            with torch.no_grad():
                for p, wi in zip(params, w):
                    p.copy_(wi)
        for p, gs in zip(params, zip(*second)):
            p.grad = sum(gs) / world
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        adam.step()
        sched.step()
    return model.state_dict()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[1, 2], ids=["world1", "world2"])
def deepspeed_results(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"ds{world}")
    new_model()  # build the tiny-bert cache once, before the workers race for it
    mp.spawn(worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    return world, out


@pytest.mark.parametrize("scope", ["worker", "global"])
def test_rho_zero_sam_is_adam_bit_for_bit_with_dropout_on(deepspeed_results, scope):
    world, out = deepspeed_results
    for stage in STAGES:
        adam = torch.load(os.path.join(out, f"{world}-{stage}-adam-worker-0.0.pt"))
        sam0 = torch.load(os.path.join(out, f"{world}-{stage}-sam0-{scope}-0.0.pt"))
        for k in adam:
            assert torch.equal(sam0[k], adam[k]), f"ZeRO {stage}, {k}"


@pytest.mark.parametrize("opt,scope,clip", CASES)
def test_deepspeed_matches_plain_pytorch(deepspeed_results, opt, scope, clip):
    world, out = deepspeed_results
    ref = reference(opt, scope, clip, world)
    start = new_model().state_dict()
    for stage in STAGES:
        got = torch.load(os.path.join(out, f"{world}-{stage}-{opt}-{scope}-{clip}.pt"))
        moved = max((got[k] - start[k]).abs().max().item() for k in ref)
        assert moved > 1e-4, "training did not move the weights"
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5, msg=lambda m: f"ZeRO {stage}, {k}: {m}")


@pytest.fixture(scope="module")
def masked_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("masked")
    new_model()
    mp.spawn(worker, args=(2, free_port(), str(out), "masked"), nprocs=2, join=True)
    return 2, out


@pytest.mark.parametrize("stage,opt", MASKED)
def test_pruned_weights_stay_exactly_zero(masked_results, stage, opt):
    world, out = masked_results
    start = new_model().state_dict()
    for rank in range(world):
        saved = torch.load(os.path.join(out, f"masked-{stage}-{opt}-rank{rank}.pt"))
        for name, mask in saved["masks"].items():
            w = saved["state"][name]
            assert (w[~mask] == 0).all(), f"rank {rank}: {name} has nonzero pruned weights"
            assert not torch.equal(w[mask], start[name][mask]), f"{name}: kept weights did not train"
