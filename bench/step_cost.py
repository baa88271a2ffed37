"""What SAM/ASAM cost per optimizer step in flatray's DeepSpeed path, and how flatray's Adam compares with the
Hugging Face Trainer.

One process, one model (BERT with random weights), one synthetic batch, one machine. Four contenders, each built once
from the same initial weights: flatray Adam, flatray SAM, flatray ASAM (DeepSpeed engine + `train_step`) and
`transformers.Trainer`. They take turns round-robin so that a noisy neighbour hits all of them alike; the median
step time of each over all timed steps gives the ratios:

    SAM/Adam step time         target <= 2.1  (SAM does two forward/backward passes: 2.0 is the floor)
    cheaper SAM / Adam         target <= 1.3 for the best variant: SAM every 5th step, and LookSAM with k = 5
                               (flatray.methods.cheap_sam), by mean step time
    flatray / HF Trainer sam/s target >= 1.0

With `--precision bf16` the three flatray contenders run in fp32 *and* in bf16 (fp32 weights, compute under
torch.autocast: flatray.train.engine), all six side by side in the same round-robin, and the HF Trainer runs with bf16=True
(the same autocast-over-fp32-weights scheme). It adds SAM/Adam per precision, bf16/fp32 per optimizer, and bf16 SAM
against fp32 Adam. After the timing, one extra step of each SAM engine measures the realised perturbation
||w' - w|| / rho (1.00 when w + e is exact, as it is with fp32 weights).

    python bench/step_cost.py                       # bert-base, batch 8 (32 on GPU), seq 128
    python bench/step_cost.py --model-size small    # 4-layer BERT, for a quick look
    python bench/step_cost.py --precision bf16      # fp32 and bf16 side by side

It runs unchanged on CPU and on one CUDA GPU, bf16 included. It is a benchmark, not a test: the exit code is 0
whatever the ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time

import torch

# common sets DS_ACCELERATOR before deepspeed is imported (DeepSpeed picks its accelerator at import time)
from common import CUDA, init_distributed, start, synthetic_batch, sync, time_calls  # noqa: E402

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

from flatray.config import RunConfig  # noqa: E402
from flatray.train.engine import build_engine, train_step  # noqa: E402

TARGET_SAM = 2.1
TARGET_HF = 1.0
OPTIMIZERS = {"adam": "Adam", "sam": "SAM", "asam": "ASAM"}
# Cheaper SAM (flatray.methods.cheap_sam), fp32 only, SAM on 1 step in K; compared by mean step time (below)
K = 5
VARIANTS = {"sam_every": ("SAM every 5th", {"name": "sam", "sam_every": K}),
            "looksam": ("LookSAM k=5", {"name": "sam", "sam_every": K, "sam_between": "looksam"})}
TARGET_VARIANT = 1.3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", choices=("base", "small"), default="base",
                   help="base: bert-base (110M); small: 4 layers, hidden 256, 4 heads, intermediate 1024")
    p.add_argument("--batch", type=int, default=32 if CUDA else 8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=30 if CUDA else 5, help="timed steps per contender per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender before the first round")
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2))
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: flatray in fp32 and bf16 side by side, the HF Trainer in bf16 (CPU or GPU)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads (on a shared CPU, 1 gives steadier timings)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    return p.parse_args()


class Flatray:
    """One flatray optimizer (adam, sam, asam or a cheaper SAM variant) in one precision, in its own DeepSpeed engine."""

    def __init__(self, optimizer: str, precision: str, name: str, model: torch.nn.Module, batch: dict, args,
                 total_steps: int):
        self.optimizer, self.precision, self.name = optimizer, precision, name
        self.cfg = RunConfig(
            model="tiny-bert",  # not read by the engine functions: the module is passed in
            task="toy",
            train={"batch_size": args.batch, "epochs": 1, "lr": 2e-5},
            optimizer=VARIANTS[optimizer][1] if optimizer in VARIANTS else {"name": optimizer},
            deepspeed={"zero_stage": args.zero_stage, "precision": precision, "gradient_clipping": 1.0},
            scaling={"num_workers": 1, "use_gpu": CUDA},
        )
        self.engine = build_engine(model, self.cfg, world_size=1, total_steps=total_steps)
        self.batch = {k: v.to(self.engine.device) for k, v in batch.items()}

    def run(self, n: int) -> list[float]:
        return time_calls(lambda: train_step(self.engine, self.batch, self.cfg), n)

    def realised_perturbation(self) -> float:
        """||w' - w|| / rho of one more SAM step: w' is the weights at its second (perturbed) forward."""
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        w = [p.detach().clone() for p in params]
        norms = []

        def loss_fn(model, batch):
            with torch.no_grad(), torch.autocast(self.engine.device.type, enabled=False):
                norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(torch._foreach_sub(params, w)))).item())
            return model(**batch).loss

        train_step(self.engine, self.batch, self.cfg, loss_fn=loss_fn)
        return norms[1] / self.cfg.optimizer.rho  # norms[0] is the first pass, at w


class RepeatedBatch(torch.utils.data.Dataset):
    """The rows of the synthetic batch over and over, so that the Trainer's batches are the same tokens."""

    def __init__(self, batch: dict, length: int):
        self.batch, self.length, self.rows = batch, length, len(batch["labels"])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {k: v[i % self.rows] for k, v in self.batch.items()}


class HFTrainer:
    """`transformers.Trainer` with its defaults (AdamW fused, linear schedule) and flatray's lr and clipping.

    One Trainer for all rounds; each round is one `trainer.train()` call of `n` steps. The optimizer (and its state)
    is kept across calls; the schedule restarts, which does not change the cost of a step. Only the time between
    `on_step_begin` and `on_step_end` is counted: forward, backward, clipping, optimizer and scheduler step, not the
    Trainer's start-up nor the data loading (the batch is fetched before `on_step_begin`).
    """

    def __init__(self, model: torch.nn.Module, batch: dict, args, output_dir: str, name: str):
        from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []

            def on_step_begin(self, *_, **__):
                sync()
                self.t0 = time.perf_counter()

            def on_step_end(self, *_, **__):
                sync()
                self.times.append(time.perf_counter() - self.t0)

        self.name = name
        self.timer = StepTimer()
        targs = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch,
            max_steps=1,  # set per call in run()
            learning_rate=2e-5,
            max_grad_norm=1.0,  # = flatray's deepspeed.gradient_clipping
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            dataloader_num_workers=0,
            disable_tqdm=True,
            use_cpu=not CUDA,
            bf16=args.precision == "bf16",  # autocast over fp32 weights, on CPU too (use_cpu)
        )
        # Enough rows for the longest call, so that no call crosses an epoch boundary.
        data = RepeatedBatch(batch, args.batch * max(args.steps, args.warmup))
        self.trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[self.timer])
        self.trainer.remove_callback(PrinterCallback)  # it prints the end-of-train() metrics, even with logging off
        # A DDP wrapper would add a gradient all-reduce that flatray does not pay (see main() for how it is avoided).
        kind = str(self.trainer.accelerator.distributed_type)
        if "NO" not in kind:
            raise RuntimeError(f"HF Trainer set itself up as distributed ({kind}); the comparison would be unfair")
        mixed = self.trainer.accelerator.mixed_precision
        if mixed != {"fp32": "no", "bf16": "bf16"}[args.precision]:
            raise RuntimeError(f"HF Trainer runs with mixed_precision {mixed!r}, not {args.precision}")

    def run(self, n: int) -> list[float]:
        self.trainer.args.max_steps = n
        self.timer.times = []
        self.trainer.train()
        sync()
        return list(self.timer.times)


def hf_unavailable() -> str | None:
    """The Trainer needs accelerate; without it the HF contender is left out rather than the whole run."""
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        return "accelerate is not installed (the Trainer needs it: pip install 'accelerate>=1.1.0')"
    return None


def build_hf(base, batch, args, output_dir: str, name: str) -> tuple[HFTrainer | None, str | None]:
    """The HF contender, warmed up; with bf16, one that cannot run here is left out (with the reason) instead of
    the run. Its warm-up runs here so that such a failure shows before anything is timed."""
    skipped = hf_unavailable()
    if skipped:
        return None, skipped
    try:
        hf = HFTrainer(copy.deepcopy(base), batch, args, output_dir, name)
        hf.run(args.warmup)
    except Exception as e:  # noqa: BLE001 -- reported and skipped; fp32 keeps failing loudly
        if args.precision == "fp32":
            raise
        return None, f"the HF Trainer with bf16=True does not run here ({type(e).__name__}: {e})"
    return hf, None


def step_ratios(step_time: dict[str, float], names: dict[tuple[str, str], str], hf_name: str | None,
                precision: str) -> dict[str, float]:
    """SAM/Adam and ASAM/Adam per precision (keys suffixed _fp32/_bf16 when both ran), bf16/fp32 per optimizer,
    and flatray Adam / HF Trainer in the chosen precision."""
    precisions = sorted({p for _, p in names}, key=("fp32", "bf16").index)
    t = {key: step_time[name] for key, name in names.items()}
    ratios = {}
    for p in precisions:
        suffix = f"_{p}" if len(precisions) > 1 else ""
        ratios[f"sam_over_adam_step_time{suffix}"] = t["sam", p] / t["adam", p]
        ratios[f"asam_over_adam_step_time{suffix}"] = t["asam", p] / t["adam", p]
    if len(precisions) > 1:
        for o in OPTIMIZERS:
            ratios[f"{o}_bf16_over_fp32_step_time"] = t[o, "bf16"] / t[o, "fp32"]
        ratios["bf16_sam_over_fp32_adam_step_time"] = t["sam", "bf16"] / t["adam", "fp32"]
    if hf_name in step_time:
        ratios["flatray_over_hf_samples_per_s"] = step_time[hf_name] / t["adam", precision]  # the inverse time ratio
    return ratios


def print_fp32_ratios(ratios, ratios_min, hf_skipped) -> None:
    for label, key, target in (("SAM/Adam step time", "sam_over_adam_step_time", f"<= {TARGET_SAM}"),
                               ("ASAM/Adam step time", "asam_over_adam_step_time", f"<= {TARGET_SAM}"),
                               ("flatray Adam / HF Trainer samples/s", "flatray_over_hf_samples_per_s", f">= {TARGET_HF}")):
        if key in ratios:
            print(f"{label}: {ratios[key]:.2f} (target {target}; from the fastest steps: {ratios_min[key]:.2f})")
        else:
            print(f"{label}: n/a, HF Trainer skipped: {hf_skipped}")


def print_bf16_ratios(median, names, ratios, ratios_min, hf_skipped) -> None:
    """Optimizers x precisions: median ms/step, bf16/fp32 per optimizer, SAM/Adam and ASAM/Adam per precision.
    In brackets: the same ratio from each contender's fastest step."""
    print(f"{'median ms/step':<16}{'fp32':>10}{'bf16':>10}    bf16/fp32 (fastest)")
    for o, label in OPTIMIZERS.items():
        r = f"{ratios[f'{o}_bf16_over_fp32_step_time']:.2f} ({ratios_min[f'{o}_bf16_over_fp32_step_time']:.2f})"
        print(f"{label:<16}{1000 * median[names[o, 'fp32']]:>10.1f}{1000 * median[names[o, 'bf16']]:>10.1f}    {r}")
    for label, key in (("SAM/Adam", "sam_over_adam_step_time"), ("ASAM/Adam", "asam_over_adam_step_time")):
        cells = "".join(f"{ratios[f'{key}_{p}']:>10.2f}" for p in ("fp32", "bf16"))
        fastest = ", ".join(f"{ratios_min[f'{key}_{p}']:.2f}" for p in ("fp32", "bf16"))
        print(f"{label:<16}{cells}    target <= {TARGET_SAM} (fastest: {fastest})")
    print()
    key = "bf16_sam_over_fp32_adam_step_time"
    print(f"bf16 SAM / fp32 Adam step time: {ratios[key]:.2f} (from the fastest steps: {ratios_min[key]:.2f})")
    key = "flatray_over_hf_samples_per_s"
    if key in ratios:
        print(f"flatray Adam bf16 / HF Trainer bf16 samples/s: {ratios[key]:.2f} "
              f"(target >= {TARGET_HF}; from the fastest steps: {ratios_min[key]:.2f})")
    else:
        print(f"flatray Adam bf16 / HF Trainer bf16 samples/s: n/a, HF Trainer skipped: {hf_skipped}")


def variant_ratios(times: dict[str, list[float]], names: dict, steps: int) -> dict[str, float]:
    """Mean step time / Adam's (fp32) for SAM and the cheaper variants. The mean, not the median: a variant's steps
    are of two kinds (1 SAM step in K), and its median is its cheap step. Every round's `steps` consecutive steps
    hold the same number of SAM steps when `steps` is a multiple of K."""
    if steps % K:
        print(f"note: --steps {steps} is not a multiple of {K}: the variants' rounds hold unequal numbers of SAM steps")
    adam = statistics.fmean(times[names["adam", "fp32"]])
    return {o: statistics.fmean(times[names[o, "fp32"]]) / adam for o in ("sam", *VARIANTS)}


def print_variant_ratios(ratios: dict[str, float]) -> None:
    best = min(VARIANTS, key=ratios.get)
    print(f"cheaper SAM, mean step time / Adam's (fp32; SAM on 1 step in {K}): SAM {ratios['sam']:.2f}, "
          + ", ".join(f"{VARIANTS[v][0]} {ratios[v]:.2f}" for v in VARIANTS)
          + f"; best {VARIANTS[best][0]} {ratios[best]:.2f} (target <= {TARGET_VARIANT})")


def main() -> None:
    args = parse_args()
    both = args.precision == "bf16"
    precisions = ("fp32", "bf16") if both else ("fp32",)
    names = {(o, p): f"flatray {label}" + (f" {p}" if both else "") for p in precisions for o, label in OPTIMIZERS.items()}
    names.update({(v, "fp32"): f"flatray {label}" + (" fp32" if both else "") for v, (label, _) in VARIANTS.items()})
    hf_name = "HF Trainer" + (" bf16" if both else "")
    base = start(args.threads, args.model_size)
    batch = synthetic_batch(base.config.vocab_size, args.batch, args.seq)
    total_steps = args.warmup + args.rounds * args.steps

    # The HF Trainer is built (and warmed up) first, before the DeepSpeed process group and its LOCAL_RANK/WORLD_SIZE
    # variables exist: Accelerate decides once, from those variables, whether a run is distributed, and with
    # LOCAL_RANK set it goes MULTI_CPU/MULTI_GPU (a DDP wrapper, and on CPU it also resets torch's thread count).
    # Built before, it is a plain single-process Trainer, and stays one in later train() calls.
    # deepcopy = a fresh model per contender with the same initial weights; each engine/Trainer owns its copy.
    tmp = tempfile.TemporaryDirectory(prefix="step_cost_")
    hf, hf_skipped = build_hf(base, batch, args, tmp.name, hf_name)
    backend = init_distributed()
    flatray = [Flatray(o, p, names[o, p], copy.deepcopy(base), batch, args, total_steps) for (o, p) in names]
    contenders = flatray + ([hf] if hf else [])
    del base

    for c in flatray:  # warm-up: first-call allocations, lazy optimizer state, kernel selection (HF's: in build_hf)
        c.run(args.warmup)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(args.rounds):
        for c in contenders:
            times[c.name] += c.run(args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {1000 * statistics.median(v[-args.steps:]):.0f} ms"
                                                           for k, v in times.items()), flush=True)
    tmp.cleanup()
    # Untimed, after the rounds: the realised perturbation of one more step of each SAM engine.
    perturbation = {c.precision: c.realised_perturbation() for c in flatray if c.optimizer == "sam"}
    variants = variant_ratios(times, names, args.steps)

    median = {k: statistics.median(v) for k, v in times.items()}
    ratios = step_ratios(median, names, hf_name, args.precision)
    # The fastest step of each is what the code costs with the machine to itself: on a box shared with other jobs the
    # medians can still carry contention, and the ratios of the minimums tell whether they do.
    ratios_min = step_ratios({k: min(v) for k, v in times.items()}, names, hf_name, args.precision)

    device = torch.cuda.get_device_name(0) if CUDA else f"CPU ({platform.processor() or platform.machine()})"
    versions = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
    width = max(15, max(len(k) for k in times) + 2)
    print()
    print(f"device: {device}, {torch.get_num_threads()} torch threads, backend {backend}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"model: bert-{args.model_size}, batch {args.batch}, seq {args.seq}, "
          f"{'fp32 and bf16 (HF Trainer: bf16)' if both else 'fp32'}, ZeRO {args.zero_stage}; "
          f"{args.rounds} rounds x {args.steps} timed steps after {args.warmup} warm-up")
    print()
    print(f"{'contender':<{width}}{'median ms/step':>16}{'min-max ms':>18}{'samples/s':>12}")
    for k, v in times.items():
        spread = f"{1000 * min(v):.0f}-{1000 * max(v):.0f}"
        print(f"{k:<{width}}{1000 * median[k]:>16.1f}{spread:>18}{args.batch / median[k]:>12.2f}")
    print()
    if both:
        print_bf16_ratios(median, names, ratios, ratios_min, hf_skipped)
    else:
        print_fp32_ratios(ratios, ratios_min, hf_skipped)
    print_variant_ratios(variants)
    rho = next(c.cfg.optimizer.rho for c in flatray if c.optimizer == "sam")
    print(f"realised SAM perturbation ||w'-w|| / rho (rho {rho}, one untimed step after the rounds): "
          + ", ".join(f"{p} {v:.3f}" for p, v in perturbation.items()) + " (target 1.00)")

    if args.json:
        report = {
            "device": device, "threads": torch.get_num_threads(), "versions": versions,
            "settings": {k: getattr(args, k) for k in ("model_size", "batch", "seq", "steps", "rounds", "warmup",
                                                       "zero_stage", "precision")},
            "contenders": {k: {"median_ms": 1000 * median[k], "samples_per_s": args.batch / median[k],
                               "step_ms": [1000 * t for t in v]} for k, v in times.items()},
            "ratios": ratios, "ratios_from_min": ratios_min, "targets": {"sam_over_adam_step_time_max": TARGET_SAM, "flatray_over_hf_samples_per_s_min": TARGET_HF},
            "sam_perturbation_over_rho": perturbation, "cheaper_sam_mean_step_time_over_adam": variants,
            "hf_skipped": hf_skipped,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
