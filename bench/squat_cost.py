"""What low-bit quantization-aware training costs per optimizer step in flatray's DeepSpeed path: SQuAT against
full-precision SAM, and LSQ-QAT against full-precision Adam.

One process, one model (BERT with random weights), one synthetic batch, one machine. Four contenders, each built once
from the same initial weights, each in its own DeepSpeed engine:

    FP Adam   kind finetune, adam   (flatray.train.engine.build_engine + train_step)
    FP SAM    kind finetune, sam    (idem)
    LSQ-QAT   kind squat, adam, alternate false, 4-bit weights / 8-bit activations  (flatray.methods.squat.build_engine +
              squat_step: one joint step on the latent weights and the step sizes)
    SQuAT     kind squat, sam, alternate true (period 1), 4-bit / 8-bit: phase A (SAM on the latent weights, two
              forward/backward passes) and phase B (one plain step on the step sizes) take turns step by step

They take turns round-robin so that a noisy neighbour hits all of them alike. The loss is the task loss (no teacher);
`--kd` times SQuAT and LSQ-QAT as the real loop runs them, with a teacher forward and logit distillation per step.
SQuAT's step time is the mean of an A step and the B step after it, the median over all such pairs; the others'
is the median over all timed steps. The ratios:

    SQuAT / FP SAM step time        target <= 1.3 (cheaper than SAM is possible: half of SQuAT's steps are one pass)
    SQuAT phase A / FP SAM          the like-for-like cost of the fake quantizers on a SAM step
    LSQ-QAT / FP Adam step time     the same on an Adam step

    python bench/squat_cost.py                       # bert-base, batch 8 (32 on GPU), seq 128
    python bench/squat_cost.py --model-size small    # 4-layer BERT, for a quick look

It runs unchanged on CPU and on one CUDA GPU. It is a benchmark, not a test: the exit code is 0 whatever the ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from functools import partial

import torch

# common sets DS_ACCELERATOR before deepspeed is imported (DeepSpeed picks its accelerator at import time)
from common import CUDA, init_distributed, start, synthetic_batch, sync  # noqa: E402

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

from flatray.methods import lsq, squat  # noqa: E402
from flatray.config import RunConfig  # noqa: E402
from flatray.train.engine import build_engine, model_loss, train_step  # noqa: E402
from flatray.methods.squat import distillation_loss  # noqa: E402

TARGET_SQUAT = 1.3
WEIGHT_BITS, ACT_BITS = 4, 8


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", choices=("base", "small"), default="base",
                   help="base: bert-base (110M); small: 4 layers, hidden 256, 4 heads, intermediate 1024")
    p.add_argument("--batch", type=int, default=32 if CUDA else 8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=30 if CUDA else 6,
                   help="timed steps per contender per round; even, so that SQuAT's are whole A+B pairs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender before the first round; even")
    p.add_argument("--kd", action="store_true",
                   help="SQuAT and LSQ-QAT with a teacher forward + logit KD per step, as flatray.methods.squat.run runs them")
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2))
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads (default: all cores); on a CPU shared with other jobs, fewer threads than "
                        "cores keeps OpenMP from stalling on a busy core")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    args = p.parse_args()
    if args.steps < 2 or args.steps % 2 or args.warmup % 2:
        p.error("--steps (>= 2) and --warmup must be even: SQuAT's timed steps must be whole A+B pairs")
    if args.precision == "bf16" and not CUDA:
        p.error("--precision bf16 needs a CUDA GPU (flatray allows bf16 only with use_gpu)")
    return args






def run_config(args, optimizer: str, quantized: bool, alternate: bool = False) -> RunConfig:
    """The run config of one contender. `model` and `task` are not read by the engine functions (the module is
    passed in); for the quantized ones only the `squat` section and the optimizer matter."""
    extra = {}
    if quantized:
        extra = {"kind": "squat", "squat": {
            "weight_bits": WEIGHT_BITS, "act_bits": ACT_BITS, "alternate": alternate,
            # the task loss unless --kd: then the real loop's objective (METHODS.md defaults), logit KD only
            "task_loss": 0.0 if args.kd else 1.0, "kd_logits": 1.0 if args.kd else 0.0}}
    return RunConfig(
        model="tiny-bert", task="sst2",
        train={"batch_size": args.batch, "epochs": 1, "lr": 2e-5},
        optimizer={"name": optimizer},  # rho: flatray's default (0.05 for sam)
        deepspeed={"zero_stage": args.zero_stage, "precision": args.precision, "gradient_clipping": 1.0},
        scaling={"num_workers": 1, "use_gpu": CUDA},
        **extra,
    )


class Contender:
    """One configuration in its own engine. `run(n)` does n optimizer steps and returns, for each, its wall time
    and its SQuAT phase ('A', 'B', 'joint'; '-' for the full-precision ones)."""

    def __init__(self, name: str, model: torch.nn.Module, batch: dict, cfg: RunConfig, total_steps: int,
                 teacher: torch.nn.Module | None = None):
        self.name, self.cfg, self.teacher = name, cfg, teacher
        self.quantized = cfg.kind == "squat"
        self.step = 0  # the optimizer step counter: SQuAT's phase follows it across rounds
        if self.quantized:
            lsq.quantize_model(model, lsq.QuantSpec(weight_bits=WEIGHT_BITS, act_bits=ACT_BITS))
            model.to(batch["input_ids"].device)
            lsq.calibrate(model, batch)  # activation step sizes; before the engine, as flatray.methods.squat.run does
            self.latent = lsq.latent_params(model)
            self.engine = squat.build_engine(model, cfg, world_size=1, total_steps=total_steps)
        else:
            self.engine = build_engine(model, cfg, world_size=1, total_steps=total_steps)
        self.batch = {k: v.to(self.engine.device) for k, v in batch.items()}

    def one_step(self) -> None:
        if not self.quantized:
            train_step(self.engine, self.batch, self.cfg)
            return
        loss_fn = model_loss
        if self.teacher is not None:  # as in flatray.methods.squat.run: the teacher's forward is part of every step
            with torch.no_grad():
                target = self.teacher(**self.batch)
            loss_fn = partial(distillation_loss, teacher_out=target, cfg=self.cfg)
        squat.squat_step(self.engine, self.batch, self.cfg, loss_fn, self.latent)

    def run(self, n: int) -> list[tuple[float, str]]:
        out = []
        for _ in range(n):
            tag = squat.phase(self.step, self.cfg) if self.quantized else "-"
            sync()
            t0 = time.perf_counter()
            self.one_step()
            sync()
            out.append((time.perf_counter() - t0, tag))
            self.step += 1
        return out


def summarize(steps: list[tuple[float, str]]) -> dict:
    """Median (and fastest) seconds per step; for SQuAT the per-step value is the mean of an A step and the B step
    after it, so that its step time is that of the alternation as a whole, plus the medians of each phase."""
    times = [t for t, _ in steps]
    phases = [p for _, p in steps]
    if "A" in phases:
        pairs = [(a + b) / 2 for (a, pa), (b, pb) in zip(steps[::2], steps[1::2]) if (pa, pb) == ("A", "B")]
        if len(pairs) != len(steps) // 2:
            raise RuntimeError(f"SQuAT's timed steps are not A+B pairs: {phases}")
        out = {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs), "pairs": pairs}
        for p in "AB":
            phase_times = [t for t, q in steps if q == p]
            out[f"median_{p}"], out[f"min_{p}"] = statistics.median(phase_times), min(phase_times)
        return out
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def ratios(s: dict[str, dict], key: str) -> dict[str, float]:
    """key 'median' or 'min': the ratios of the medians, or of the fastest steps."""
    sq = "" if key == "median" else "min_"
    return {
        "squat_over_fp_sam_step_time": s["SQuAT"][key] / s["FP SAM"][key],
        "squat_phase_a_over_fp_sam": s["SQuAT"][f"{sq or 'median_'}A"] / s["FP SAM"][key],
        "squat_phase_b_over_fp_adam": s["SQuAT"][f"{sq or 'median_'}B"] / s["FP Adam"][key],
        "lsq_qat_over_fp_adam_step_time": s["LSQ-QAT"][key] / s["FP Adam"][key],
    }


def main() -> None:
    args = parse_args()
    base = start(args.threads, args.model_size)
    device = torch.device("cuda", 0) if CUDA else torch.device("cpu")
    batch = {k: v.to(device) for k, v in synthetic_batch(base.config.vocab_size, args.batch, args.seq).items()}
    total_steps = args.warmup + args.rounds * args.steps
    backend = init_distributed()

    teacher = None
    if args.kd:  # the full-precision model the students start from, frozen, as in flatray.methods.squat.run
        teacher = copy.deepcopy(base).to(device).eval().requires_grad_(False)
    # deepcopy = a fresh model per contender with the same initial weights; each engine owns its copy.
    contenders = [
        Contender("FP Adam", copy.deepcopy(base).to(device), batch, run_config(args, "adam", False), total_steps),
        Contender("FP SAM", copy.deepcopy(base).to(device), batch, run_config(args, "sam", False), total_steps),
        Contender("LSQ-QAT", copy.deepcopy(base).to(device), batch, run_config(args, "adam", True, alternate=False),
                  total_steps, teacher),
        Contender("SQuAT", copy.deepcopy(base).to(device), batch, run_config(args, "sam", True, alternate=True),
                  total_steps, teacher),
    ]
    del base

    for c in contenders:  # warm-up: first-call allocations, lazy optimizer state, kernel selection
        c.run(args.warmup)
    steps: dict[str, list[tuple[float, str]]] = {c.name: [] for c in contenders}
    for r in range(args.rounds):
        for c in contenders:
            steps[c.name] += c.run(args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {1000 * statistics.median(t for t, _ in v[-args.steps:]):.0f} ms" for k, v in steps.items()), flush=True)

    s = {k: summarize(v) for k, v in steps.items()}
    rat, rat_min = ratios(s, "median"), ratios(s, "min")

    dev = torch.cuda.get_device_name(0) if CUDA else f"CPU ({platform.processor() or platform.machine()})"
    versions = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
    allreduce = {c.name: bool(c.engine.enable_backward_allreduce) for c in contenders}
    print()
    print(f"device: {dev}, {torch.get_num_threads()} torch threads, backend {backend}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"model: bert-{args.model_size}, batch {args.batch}, seq {args.seq}, {args.precision}, ZeRO {args.zero_stage}; "
          f"{args.rounds} rounds x {args.steps} timed steps after {args.warmup} warm-up; "
          f"LSQ W{WEIGHT_BITS}A{ACT_BITS}; loss: {'teacher forward + logit KD' if args.kd else 'task loss, no teacher'}")
    print("DeepSpeed backward all-reduce at world size 1: " + ", ".join(f"{k} {'on' if v else 'off'}"
                                                                        for k, v in allreduce.items()))
    if hasattr(os, "getloadavg"):  # other jobs on the machine: the medians may carry their contention
        print("load average (1/5/15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print()
    print(f"{'contender':<20}{'median ms/step':>16}{'min-max ms':>18}{'samples/s':>12}")
    rows = [(k, v["median"], v["min"], v["max"]) for k, v in s.items()]
    sq = s["SQuAT"]
    for phase_name in "AB":
        times = [t for t, p in steps["SQuAT"] if p == phase_name]
        rows.append((f"  SQuAT phase {phase_name}", sq[f"median_{phase_name}"], min(times), max(times)))
    for name, med, lo, hi in rows:
        spread = f"{1000 * lo:.0f}-{1000 * hi:.0f}"
        print(f"{name:<20}{1000 * med:>16.1f}{spread:>18}{args.batch / med:>12.2f}")
    print("(SQuAT: mean of an A step and the next B step, median over the pairs; phase A = SAM on the latent weights,"
          " two passes; phase B = one pass on the step sizes)")
    if not CUDA and any(hi > 2 * lo for _, _, lo, hi in rows):
        print(f"note: some step times vary more than 2x: other jobs were in the way; on a shared CPU, "
              f"--threads {max(1, torch.get_num_threads() // 2)} is usually steadier")
    print()
    print(f"SQuAT / FP SAM step time: {rat['squat_over_fp_sam_step_time']:.2f} (target <= {TARGET_SQUAT}; "
          f"from the fastest steps: {rat_min['squat_over_fp_sam_step_time']:.2f})")
    print("  SQuAT's average step is (A + B) / 2: half of its steps (phase B) are single-pass, which is why it can be "
          "cheaper than a SAM step though each of its passes costs more.")
    print(f"SQuAT phase A / FP SAM: {rat['squat_phase_a_over_fp_sam']:.2f} (like for like: the fake quantizers' "
          f"overhead on a SAM step; from the fastest steps: {rat_min['squat_phase_a_over_fp_sam']:.2f})")
    print(f"SQuAT phase B / FP Adam: {rat['squat_phase_b_over_fp_adam']:.2f} "
          f"(from the fastest steps: {rat_min['squat_phase_b_over_fp_adam']:.2f})")
    print(f"LSQ-QAT / FP Adam step time: {rat['lsq_qat_over_fp_adam_step_time']:.2f} "
          f"(from the fastest steps: {rat_min['lsq_qat_over_fp_adam_step_time']:.2f})")
    if args.kd:
        print("  (--kd: the quantized contenders also pay a teacher forward per step; the FP ones have no teacher)")

    if args.json:
        report = {
            "device": dev, "threads": torch.get_num_threads(), "versions": versions,
            "settings": {k: getattr(args, k) for k in ("model_size", "batch", "seq", "steps", "rounds", "warmup", "kd",
                                                       "zero_stage", "precision")}
                        | {"weight_bits": WEIGHT_BITS, "act_bits": ACT_BITS},
            "backward_allreduce": allreduce,
            "contenders": {k: {**{f"{m}_ms": 1000 * x for m, x in s[k].items() if m != "pairs"},
                               "samples_per_s": args.batch / s[k]["median"],
                               "step_ms": [1000 * t for t, _ in v], "phase": [p for _, p in v]}
                           for k, v in steps.items()},
            "ratios": rat, "ratios_from_min": rat_min,
            "targets": {"squat_over_fp_sam_step_time_max": TARGET_SQUAT},
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
