"""SQuAT (METHODS.md section 9) inside real DeepSpeed engines on CPU: the alternation freezes exactly what it says,
rho = 0 reduces to alternating LSQ-QAT, and ZeRO 0/1/2 at world size 2 match a single-process run."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from flatray.config import RunConfig
from flatray.data import TASKS

STEPS, GLOBAL_BATCH, SEQ = 4, 8, 12


def run_config(opt="sam", rho=0.05, alternate=True, stage=0, world=1, scope="global", act_bits=8):
    return RunConfig(
        kind="squat", model="tiny-bert", task="toy",
        train={"batch_size": GLOBAL_BATCH, "epochs": 1, "lr": 1e-3, "schedule": "constant"},
        optimizer={"name": opt, "rho": rho, "sam_scope": scope},
        deepspeed={"zero_stage": stage, "gradient_clipping": 0.0},
        scaling={"num_workers": world},
        squat={"weight_bits": 4, "act_bits": act_bits, "alternate": alternate, "lr_steps": 1e-2, "task_loss": 1.0,
               "kd_logits": 0.0},
    )


def batches(vocab):
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": torch.randint(5, vocab, (GLOBAL_BATCH, SEQ), generator=g),
             "attention_mask": torch.ones(GLOBAL_BATCH, SEQ, dtype=torch.long),
             "labels": torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)} for _ in range(STEPS)]


def quantized_model(cfg=None, dropout=True):
    """The tiny BERT at 4 bits. Dropout stays on (0.1) except where a whole-batch run is compared with two workers,
    whose masks one process cannot draw."""
    from flatray import models
    from flatray.methods import lsq

    torch.manual_seed(0)
    off = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = models.load_model("tiny-bert", TASKS["toy"], **off)
    lsq.quantize_model(model, lsq.QuantSpec(weight_bits=4, act_bits=cfg.squat.act_bits if cfg else 8))
    with torch.no_grad():  # activation step sizes from the same first batch everywhere
        model(**batches(model.config.vocab_size)[0])
    return model


def snapshot(model):
    from flatray.methods import lsq

    return ([p.detach().clone() for p in lsq.latent_params(model)],
            [p.detach().clone() for p in lsq.step_size_params(model)])


def worker(rank, world, port, out_dir, cases):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from flatray.methods import lsq
    from flatray.methods import squat
    from flatray.train.engine import model_loss

    dist.init_process_group("gloo", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    for name, kwargs in cases:
        cfg = run_config(world=world, **{k: v for k, v in kwargs.items() if k != "dropout"})
        model = quantized_model(cfg, kwargs.get("dropout", True))
        engine = squat.build_engine(model, cfg, world, total_steps=STEPS)
        latent = lsq.latent_params(engine.module)
        trace = []
        n = GLOBAL_BATCH // world
        for step, b in enumerate(batches(model.config.vocab_size)):
            before = snapshot(engine.module)
            shard = {k: v[rank * n:(rank + 1) * n] for k, v in b.items()}
            squat.squat_step(engine, shard, cfg, model_loss, latent)
            after = snapshot(engine.module)
            trace.append({"phase": squat.phase(step, cfg),
                          "weights_same": all(torch.equal(x, y) for x, y in zip(before[0], after[0])),
                          "steps_same": all(torch.equal(x, y) for x, y in zip(before[1], after[1]))})
        if rank == 0:
            torch.save({"state": engine.module.state_dict(), "trace": trace}, os.path.join(out_dir, f"{name}.pt"))
        dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SINGLE = [  # one process, whole batches
    ("squat-z0", {"stage": 0}),
    ("squat-z2", {"stage": 2}),
    ("squat-rho0", {"rho": 0.0}),
    ("lsq-alternating", {"opt": "adam", "rho": 0.0}),
    ("lsq-joint", {"opt": "adam", "rho": 0.0, "alternate": False}),
    ("squat-weights-only", {"act_bits": None, "dropout": False}),
]
# Weights-only quantization here: with 8-bit activations, the different summation order of one process and of two
# (all-reduce) can flip an activation code at a rounding boundary, which moves a few weights by ~4e-5 in 4 steps.
WORLD2 = [(f"squat-w2-z{stage}", {"stage": stage, "act_bits": None, "dropout": False}) for stage in (0, 1, 2)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("squat")
    quantized_model()  # build the tiny-bert cache before the workers race for it
    mp.spawn(worker, args=(1, free_port(), str(out), SINGLE), nprocs=1, join=True)
    mp.spawn(worker, args=(2, free_port(), str(out), WORLD2), nprocs=2, join=True)
    return lambda name: torch.load(os.path.join(out, f"{name}.pt"), weights_only=False)


@pytest.mark.parametrize("name", ["squat-z0", "squat-z2"])
def test_phase_a_freezes_step_sizes_and_phase_b_freezes_weights(results, name):
    trace = results(name)["trace"]
    assert [t["phase"] for t in trace] == ["A", "B", "A", "B"]
    for t in trace:
        if t["phase"] == "A":
            assert t["steps_same"] and not t["weights_same"]
        else:
            assert t["weights_same"] and not t["steps_same"]


def test_rho_zero_is_alternating_lsq_qat(results):
    a, b = results("squat-rho0")["state"], results("lsq-alternating")["state"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    joint = results("lsq-joint")
    assert all(not (t["weights_same"] or t["steps_same"]) for t in joint["trace"])
    assert any(not torch.equal(a[k], joint["state"][k]) for k in a)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_world_size_two_matches_single_process(results, stage):
    single, multi = results("squat-weights-only")["state"], results(f"squat-w2-z{stage}")["state"]
    for k in single:
        torch.testing.assert_close(multi[k], single[k], rtol=0, atol=1e-5, msg=k)


def test_four_bit_model_learns_the_builtin_task_from_scratch():
    """LSQ at 4-bit weights and 8-bit activations, trained from the tiny BERT's random "pre-trained" weights (no
    teacher), learns the toy task far above chance (0.5)."""
    from flatray import models
    from flatray.methods import lsq
    from flatray.data import collator, compute_metrics, load_raw, tokenize

    torch.manual_seed(0)
    spec = TASKS["toy"]
    tok = models.load_tokenizer("tiny-bert")
    data = tokenize(spec, load_raw(spec, "builtin"), tok, max_length=32)
    collate = collator(tok)
    model = models.load_model("tiny-bert", spec)
    lsq.quantize_model(model, lsq.QuantSpec(weight_bits=4, act_bits=8))
    lsq.calibrate(model, collate([data.train[i] for i in range(32)]))
    opt = torch.optim.AdamW([{"params": lsq.latent_params(model), "lr": 1e-3},
                             {"params": lsq.step_size_params(model), "lr": 1e-3}])
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0)).tolist()
    model.train()
    for epoch in range(2):
        for i in range(0, len(order) - 31, 32):
            loss = model(**collate([data.train[j] for j in order[i:i + 32]])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    dev = data.evals["validation"]
    with torch.no_grad():
        logits = torch.cat([model(**collate([dev.features[j] for j in range(i, min(i + 100, len(dev.features)))])).logits
                            for i in range(0, len(dev.features), 100)])
    assert compute_metrics(spec, dev, logits.numpy())["accuracy"] > 0.8
    for m in model.modules():  # and the weights really are 4-bit
        if isinstance(m, lsq.QuantLinear):
            assert m.weight_quantizer.integers(m.weight).unique().numel() <= 16
