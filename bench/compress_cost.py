"""What flatray's compression tools cost: masked training, int8 PTQ and one sharpness measurement.

One process, one model (by default the offline pretrained MiniLM with an SST-2 head), synthetic token batches. Three
parts, each a ratio measured side by side in this one run:

    masked / dense step time     target <= 1.05   (70% magnitude mask: gradient hooks, as in the training loop)
    PTQ CPU latency speedup      target >= 1.5    (float ms/batch / int8 ms/batch, same batches)
    PTQ size ratio               target >= 2.5    (float / int8 serialized state_dict bytes)
    sharpness cost               reported only    (forward-backward passes and wall time of one measurement,
                                                   in units of one dense training step)

    python bench/compress_cost.py                       # minilm-offline, SAM, batch 16, seq 128
    python bench/compress_cost.py --model tiny-bert     # 2-layer random BERT, for a quick look

Masked and dense training take turns round-robin (as in step_cost.py) so that machine noise hits both alike; float
and int8 latency alternate the same way. It is a benchmark, not a test: the exit code is 0 whatever the ratios.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import platform
import statistics
import time

import torch

# common sets DS_ACCELERATOR before deepspeed is imported (DeepSpeed picks its accelerator at import time)
from common import CUDA, init_distributed, sync, time_calls  # noqa: E402

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

from flatray.config import RunConfig  # noqa: E402
from flatray.data import TASKS  # noqa: E402
from flatray.train.engine import build_engine, train_step  # noqa: E402
from flatray.models import load_model  # noqa: E402
from flatray.methods.imp import MaskedModel, magnitude_masks, prunable_weights, sparsity  # noqa: E402
from flatray.methods.ptq import cpu_latency, quantize_dynamic_int8, serialized_bytes  # noqa: E402
from flatray.methods.sharpness import EPS_VALUES, eval_subset_loss, sharpness  # noqa: E402

TARGET_MASKED = 1.05
TARGET_SPEEDUP = 1.5
TARGET_SIZE = 2.5
TASK = "sst2"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("minilm-offline", "tiny-bert"), default="minilm-offline")
    p.add_argument("--optimizer", choices=("adam", "sam", "asam"), default="sam", help="for both training engines")
    p.add_argument("--sparsity", type=float, default=0.7, help="global magnitude sparsity of the masked engine")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per engine per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per engine before the first round")
    p.add_argument("--latency-batches", type=int, default=4, help="batches per cpu_latency pass (PTQ)")
    p.add_argument("--latency-rounds", type=int, default=3, help="float/int8 alternations (PTQ)")
    p.add_argument("--sharp-batches", type=int, default=4, help="batches in the fixed sharpness subset")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads (on a shared CPU, 1 gives steadier timings)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    return p.parse_args()



def synthetic_batches(vocab_size: int, n: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """Fixed-seed token ids from 1000 up: clear of [PAD]/[CLS]/[SEP]/[UNK] and the other low special ids
    (tiny-bert's vocabulary has fewer than 1000 entries: its upper half there, still past its 5 special tokens)."""
    low = min(1000, vocab_size // 2)
    g = torch.Generator().manual_seed(0)
    return [{
        "input_ids": torch.randint(low, vocab_size, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    } for _ in range(n)]



class Trainee:
    """One DeepSpeed engine (dense, or masked by MaskedModel) doing flatray's train_step on a fixed batch."""

    def __init__(self, name: str, model: torch.nn.Module, batch: dict, args, total_steps: int, masked: bool):
        self.name = name
        self.cfg = RunConfig(
            model=args.model,  # not read by the engine functions: the module is passed in
            task=TASK,
            train={"batch_size": args.batch, "epochs": 1, "lr": 2e-5},
            optimizer={"name": args.optimizer},
            deepspeed={"zero_stage": 0, "gradient_clipping": 1.0},
            scaling={"num_workers": 1, "use_gpu": CUDA},
        )
        self.masker = None
        if masked:
            # As in the real run: the mask goes on BEFORE the engine is built, so its master weights start masked.
            masks = magnitude_masks(prunable_weights(model), args.sparsity)
            self.masker = MaskedModel(model, masks)
            self.sparsity = sparsity(masks)
        self.engine = build_engine(model, self.cfg, world_size=1, total_steps=total_steps)
        self.batch = {k: v.to(self.engine.device) for k, v in batch.items()}

    def run(self, n: int) -> list[float]:
        return time_calls(lambda: train_step(self.engine, self.batch, self.cfg), n)  # masked: the hooks are the cost


def bench_training(base, batch, args) -> dict:
    total_steps = args.warmup + args.rounds * args.steps
    # deepcopy = the same pretrained weights and head for both engines; each engine owns its copy.
    trainees = [Trainee("dense", copy.deepcopy(base), batch, args, total_steps, masked=False),
                Trainee("masked", copy.deepcopy(base), batch, args, total_steps, masked=True)]
    for t in trainees:  # warm-up: first-call allocations, lazy optimizer state
        t.run(args.warmup)
    times: dict[str, list[float]] = {t.name: [] for t in trainees}
    for r in range(args.rounds):
        # Alternate who goes first, so that neither always runs right after the other's cache/allocator state.
        for t in trainees if r % 2 == 0 else trainees[::-1]:
            times[t.name] += t.run(args.steps)
        print(f"train round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {1000 * statistics.median(v[-args.steps:]):.0f} ms" for k, v in times.items()), flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    out = {"step_ms": {k: [1000 * t for t in v] for k, v in times.items()},
           "median_ms": {k: 1000 * v for k, v in median.items()},
           "masked_over_dense": median["masked"] / median["dense"],
           "masked_over_dense_from_min": min(times["masked"]) / min(times["dense"]),
           "sparsity": trainees[1].sparsity}
    del trainees  # the engines' Adam state is not needed for the rest: free it before PTQ and sharpness
    return out


def bench_ptq(base, batches, args) -> dict:
    float_model = copy.deepcopy(base).cpu().eval()
    int8_model = quantize_dynamic_int8(float_model)
    lat: dict[str, list[float]] = {"float": [], "int8": []}
    for r in range(args.latency_rounds):
        # cpu_latency = median of 2 passes over the batches after one warm-up; alternating float/int8 calls
        # spreads machine noise over both, and the median over calls takes it out.
        for name, m in (("float", float_model), ("int8", int8_model)) if r % 2 == 0 else \
                (("int8", int8_model), ("float", float_model)):
            lat[name].append(cpu_latency(m, batches, repeats=2))
        print(f"ptq round {r + 1}/{args.latency_rounds}: " + ", ".join(
            f"{k} {1000 * v[-1]:.0f} ms/batch" for k, v in lat.items()), flush=True)
    with torch.no_grad():  # metric-free sanity check: int8 should move the logits a little, not scramble them
        b = {k: v for k, v in batches[0].items() if k != "labels"}
        f_logits, q_logits = float_model(**b).logits, int8_model(**b).logits
    median = {k: statistics.median(v) for k, v in lat.items()}
    size = {"float": serialized_bytes(float_model), "int8": serialized_bytes(int8_model)}
    # `ptq: {embeddings: true}`: the embedding tables in int8 too (beyond P1, which quantizes Linear layers only)
    size_with_embeddings = serialized_bytes(quantize_dynamic_int8(float_model, embeddings=True))
    return {"size_ratio_with_embeddings": size["float"] / size_with_embeddings,"latency_ms": {k: [1000 * t for t in v] for k, v in lat.items()},
            "median_ms": {k: 1000 * v for k, v in median.items()},
            "speedup": median["float"] / median["int8"],
            "speedup_from_min": min(lat["float"]) / min(lat["int8"]),
            "bytes": size, "size_ratio": size["float"] / size["int8"],
            "max_abs_logit_diff": (f_logits - q_logits).abs().max().item(),
            "max_abs_logit": f_logits.abs().max().item(),
            "argmax_agreement": (f_logits.argmax(-1) == q_logits.argmax(-1)).float().mean().item()}


def bench_sharpness(base, batches, dense_step_s: float, args) -> dict:
    model = copy.deepcopy(base)
    loss_fn = functools.partial(eval_subset_loss, batches=batches)
    passes_per_step = 1 if args.optimizer == "adam" else 2  # SAM/ASAM: two forward-backward passes per step
    rows = []
    for eps in EPS_VALUES:
        sync()
        t0 = time.perf_counter()
        res = sharpness(model, loss_fn, eps, dim=100, max_iter=10, seed=0)
        sync()
        wall = time.perf_counter() - t0
        # res.forward_backward counts evaluations of loss_fn; each is one forward-backward over the whole subset,
        # i.e. len(batches) passes at training batch size.
        batch_passes = res.forward_backward * len(batches)
        rows.append({"eps": eps, "phi": res.phi, "evaluations": res.evaluations,
                     "forward_backward": res.forward_backward, "batch_passes": batch_passes, "wall_s": wall,
                     "in_dense_steps": wall / dense_step_s, "in_dense_steps_by_passes": batch_passes / passes_per_step})
        print(f"sharpness eps={eps:g}: {res.forward_backward} forward-backward, {wall:.1f} s", flush=True)
    return {"rows": rows, "subset_batches": len(batches), "passes_per_dense_step": passes_per_step}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)  # once, the same for every part
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # engine set-up chatter would bury the table
    transformers.logging.set_verbosity_error()  # "newly initialized classifier" warning: expected, the head is new
    transformers.logging.disable_progress_bar()  # the weight-loading bar

    torch.manual_seed(0)  # the new SST-2 head's weights come from torch's RNG
    base = load_model(args.model, TASKS[TASK])
    n_batches = max(args.latency_batches, args.sharp_batches)
    batches = synthetic_batches(base.config.vocab_size, n_batches, args.batch, args.seq)

    backend = init_distributed()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    train = bench_training(base, batches[0], args)
    ptq = bench_ptq(base, batches[:args.latency_batches], args)
    sharp = bench_sharpness(base, batches[:args.sharp_batches], train["median_ms"]["dense"] / 1000, args)
    total_s = time.perf_counter() - t_start
    # Other jobs on the machine show up here: a 1-minute load well above the core count means shared cores and
    # noisy times (the "fastest" ratios then say more than the medians).
    load = [load_before, os.getloadavg()[0]] if load_before is not None else None

    device = torch.cuda.get_device_name(0) if CUDA else f"CPU ({platform.processor() or platform.machine()})"
    versions = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
    n_params = sum(p.numel() for p in base.parameters())
    opt = args.optimizer.upper() if args.optimizer != "adam" else "Adam"
    print()
    print(f"device: {device}, {torch.get_num_threads()} torch threads, backend {backend} (PTQ always on the CPU)"
          + (f"; load average {load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} cores" if load else ""))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"model: {args.model} ({n_params / 1e6:.1f}M params, {TASK} head), batch {args.batch}, seq {args.seq}, fp32, "
          f"ZeRO 0, {opt}; {args.rounds} rounds x {args.steps} timed steps after {args.warmup} warm-up; "
          f"total {total_s:.0f} s")
    print()
    print(f"{'training (' + opt + ')':<26}{'median ms/step':>16}{'min-max ms':>18}")
    for k, v in train["step_ms"].items():
        label = k if k == "dense" else f"masked ({100 * train['sparsity']:.0f}% sparse)"
        print(f"{label:<26}{train['median_ms'][k]:>16.1f}{f'{min(v):.0f}-{max(v):.0f}':>18}")
    print()
    print(f"{'PTQ (CPU)':<26}{'median ms/batch':>16}{'size MB':>18}")
    for k in ("float", "int8"):
        print(f"{k:<26}{ptq['median_ms'][k]:>16.1f}{ptq['bytes'][k] / 1e6:>18.1f}")
    print(f"max |logits float - int8| on one batch: {ptq['max_abs_logit_diff']:.4f} "
          f"(max |logit| {ptq['max_abs_logit']:.3f}; argmax agreement {100 * ptq['argmax_agreement']:.0f}%)")
    print()
    print(f"sharpness (dim 100, max_iter 10, subset {sharp['subset_batches']} x {args.batch} examples; "
          f"1 dense {opt} step = {sharp['passes_per_dense_step']} forward-backward on 1 batch)")
    print(f"{'eps':<8}{'phi':>9}{'fwd-bwd (subset)':>18}{'fwd-bwd (batches)':>19}{'wall s':>9}"
          f"{'= dense steps':>15}{'by passes':>11}")
    for r in sharp["rows"]:
        print(f"{r['eps']:<8g}{r['phi']:>9.4f}{r['forward_backward']:>18}{r['batch_passes']:>19}{r['wall_s']:>9.1f}"
              f"{r['in_dense_steps']:>15.1f}{r['in_dense_steps_by_passes']:>11.1f}")
    print()
    ratio_min = train["masked_over_dense_from_min"]
    print(f"masked/dense step time: {train['masked_over_dense']:.3f} (target <= {TARGET_MASKED}; "
          f"from the fastest steps: {ratio_min:.3f})")
    print(f"PTQ CPU latency speedup: {ptq['speedup']:.2f}x (target >= {TARGET_SPEEDUP}; "
          f"from the fastest calls: {ptq['speedup_from_min']:.2f}x)")
    print(f"PTQ size ratio: {ptq['size_ratio']:.2f}x smaller (target >= {TARGET_SIZE}; Linear layers only, as P1); "
          f"{ptq['size_ratio_with_embeddings']:.2f}x with ptq.embeddings: true")
    fb = [r["forward_backward"] for r in sharp["rows"]]
    steps = [r["in_dense_steps"] for r in sharp["rows"]]
    print(f"sharpness: {min(fb)}-{max(fb)} forward-backward passes over the subset per measurement "
          f"= {min(steps):.1f}-{max(steps):.1f} dense {opt} steps of wall time")

    if args.json:
        report = {
            "device": device, "threads": torch.get_num_threads(), "backend": backend, "versions": versions,
            "settings": {k: getattr(args, k) for k in ("model", "optimizer", "sparsity", "batch", "seq", "steps",
                                                       "rounds", "warmup", "latency_batches", "latency_rounds",
                                                       "sharp_batches")},
            "training": train, "ptq": ptq, "sharpness": sharp, "total_s": total_s,
            "load_average": load,
            "ratios": {"masked_over_dense_step_time": train["masked_over_dense"], "ptq_speedup": ptq["speedup"],
                       "ptq_size_ratio": ptq["size_ratio"],
                       "ptq_size_ratio_with_embeddings": ptq["size_ratio_with_embeddings"]},
            "targets": {"masked_over_dense_step_time_max": TARGET_MASKED, "ptq_speedup_min": TARGET_SPEEDUP,
                        "ptq_size_ratio_min": TARGET_SIZE},
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
