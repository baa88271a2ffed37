"""The decisive checks behind any "SAM does not learn" result, on the study's real model and real text.

Before a study concludes that SAM is worse than Adam, three things must hold on the very model, data and engine
config it used (issue 13; docs/RESULTS.md prints this script's output):

1. rho = 0 reproduces Adam: flatray's SAM step with rho = 0 gives Adam's per-step losses (and weights) exactly,
   dropout on, over `--steps` steps of real batches.
2. One flatray SAM step equals a plain PyTorch two-pass SAM step (torch.optim.AdamW, clip_grad_norm_, the SAM
   formula of METHODS.md section 2 written out here, the same dropout masks in both passes).
3. (The rho sweep is a sweep: sweeps/offline_rho.yaml.)

    .venv/bin/python bench/sam_checks.py                       # minilm-offline on rotten-tomatoes, 64 tokens
    .venv/bin/python bench/sam_checks.py --model tiny-bert --task toy --steps 3

A check, not a test: it prints each comparison and exits 1 if one fails.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from common import init_distributed  # noqa: E402  (sets DS_ACCELERATOR before deepspeed is imported)

from flatray import data, models
from flatray.config import RunConfig
from flatray.train.engine import build_engine, train_step


def real_batches(args, tokenizer, spec) -> list[dict]:
    """The first `steps` shuffled training batches of the task, padded per batch as the training loader does."""
    raw = data.load_raw(spec, "registry" if spec.registry else ("builtin" if spec.hub_path is None else "hub"))
    tokenized = data.tokenize(spec, raw, tokenizer, args.max_length, max_train_samples=args.batch_size * args.steps * 4)
    collate = data.collator(tokenizer)
    order = torch.randperm(len(tokenized.train), generator=torch.Generator().manual_seed(0)).tolist()
    feats = tokenized.train.select(order)
    return [collate([feats[i] for i in range(s * args.batch_size, (s + 1) * args.batch_size)])
            for s in range(args.steps)]


def run_config(args, name: str, rho: float) -> RunConfig:
    # The study's engine settings: lr schedule, no weight decay, DeepSpeed's clipping at 1.0, fp32.
    return RunConfig(model=args.model, task=args.task,
                     train={"batch_size": args.batch_size, "epochs": 1, "lr": args.lr},
                     optimizer={"name": name, "rho": rho}, deepspeed={"gradient_clipping": args.clip})


def flatray_run(args, init: torch.nn.Module, name: str, rho: float, batches: list[dict]):
    """Per-step losses and final weights of flatray's engine + train_step from `init`, dropout seeded."""
    cfg = run_config(args, name, rho)
    engine = build_engine(copy.deepcopy(init), cfg, world_size=1, total_steps=args.total_steps)
    torch.manual_seed(args.dropout_seed)
    losses = [train_step(engine, b, cfg) for b in batches]
    return losses, {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def plain_sam_step(args, init: torch.nn.Module, batch: dict, rho: float) -> dict:
    """One SAM step written out in plain PyTorch: g at w; e = rho g / ||g||; g' at w + e with the same dropout
    masks; w restored; clip g' to `clip`; AdamW step at the schedule's first lr."""
    model = copy.deepcopy(init).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    torch.manual_seed(args.dropout_seed)
    state = torch.get_rng_state()
    grads = torch.autograd.grad(model(**batch).loss, params)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(g * (rho / (norm.float() + 1e-12)))
    torch.set_rng_state(state)  # the second pass draws the first pass's dropout masks
    model(**batch).loss.backward()
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)
    torch.nn.utils.clip_grad_norm_(params, args.clip)
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def update_diff(w0: dict, a: dict, b: dict) -> tuple[float, float]:
    """||(a - w0) - (b - w0)|| / ||b - w0|| over all float tensors (the two steps' updates compared norm-wise, in
    float64: element-wise, fp32 rounding of |w| ~ 8 is ~1e-6, the size of one Adam step), and max |a - b|."""
    keys = [k for k in b if b[k].is_floating_point()]
    diff = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys).sqrt().item()
    step = sum(((b[k].double() - w0[k].double()) ** 2).sum() for k in keys).sqrt().item()
    return diff / step, max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm-offline")
    p.add_argument("--task", default="rotten-tomatoes")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=10, help="steps of the rho = 0 comparison")
    p.add_argument("--total-steps", type=int, default=310, help="the schedule's length (sets the lr per step)")
    p.add_argument("--dropout-seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    init_distributed()

    spec = data.TASKS[args.task]
    tokenizer = models.load_tokenizer(args.model)
    batches = real_batches(args, tokenizer, spec)
    torch.manual_seed(0)
    init = models.load_model(args.model, spec)
    dropout = init.config.hidden_dropout_prob
    print(f"model {args.model} ({sum(p.numel() for p in init.parameters()) / 1e6:.1f}M parameters, dropout "
          f"{dropout}), task {args.task}, {args.steps} real batches of {args.batch_size} x <= {args.max_length} "
          f"tokens, lr {args.lr}, clipping {args.clip}")
    ok, results = True, {}

    adam_losses, adam_w = flatray_run(args, init, "adam", 0.0, batches)
    sam0_losses, sam0_w = flatray_run(args, init, "sam", 0.0, batches)
    same = adam_losses == sam0_losses and all(torch.equal(adam_w[k], sam0_w[k]) for k in adam_w)
    ok &= same
    print(f"\n1. rho = 0 against Adam, {args.steps} steps, dropout {dropout}:")
    print("   step  Adam loss         SAM rho=0 loss")
    for i, (a, s) in enumerate(zip(adam_losses, sam0_losses), 1):
        print(f"   {i:>4}  {a:.15f}  {s:.15f}")
    print(f"   losses identical: {adam_losses == sam0_losses}; final weights bit-identical: {same}")
    results["rho0"] = {"adam": adam_losses, "sam_rho0": sam0_losses, "identical": same}

    _, flat_w = flatray_run(args, init, "sam", args.rho, batches[:1])
    plain_w = plain_sam_step(args, init, batches[0], args.rho)
    rel, biggest = update_diff(init.state_dict(), flat_w, plain_w)
    agree = rel <= 1e-3
    ok &= agree
    print(f"\n2. one SAM step (rho {args.rho}) on a real batch, flatray (DeepSpeed engine) against plain PyTorch:")
    print(f"   ||update_flatray - update_plain|| / ||update_plain|| = {rel:.3g} (max |w_flatray - w_plain| = "
          f"{biggest:.3g}, fp32 rounding of the largest weights): {'agree' if agree else 'DISAGREE'}")
    results["sam_step"] = {"relative_update_diff": rel, "max_abs_diff": biggest, "agree": agree}

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("\nall checks passed" if ok else "\nA CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
