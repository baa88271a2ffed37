"""Every accelerator path of flatray, checked in one run on one GPU (about 8 minutes at most on an H100/H200).

    python bench/gpu_check.py [--device cuda|cpu] [--quick] [--json PATH] [--peak-tflops T] [--only NAME,...]

Checks, each isolated (a failure prints FAIL with its reason and the others still run):
- SAM/ASAM steps in bf16 and fp16 (ZeRO 0) and bf16 at ZeRO 2: the realised perturbation at SAM's second pass has
  norm rho within 1% (ASAM: ||T^-1 (w' - w)|| = rho), and after 3 steps the weights are close to an fp32 run of the
  same steps: ||w_lowp - w_fp32|| / ||w_fp32 - w_0|| < 0.10, losses within 2% (as tests/test_precision.py);
- an IMP level (global magnitude mask + MaskedModel, bf16, ZeRO 2) and a ticket transfer (the mask file applied by
  prune.setup to a fresh model with a QA head, bf16, ZeRO 0): pruned weights exactly zero after SAM and Adam steps;
- a CoFi pruning step (cofi.distill_step, bf16) against fp32; a SQuAT step (squat.squat_step on an LSQ model, bf16)
  with the frozen group bit-identical in each phase, then lsq.export / lsq.load_exported giving the same logits;
- sharpness (flatray.methods.sharpness.sharpness on one eval batch): finite, >= 0, weights bit-identical afterwards;
  SKIP when scipy is not installed;
- bert-base bf16 step throughput (samples/s) and MFU of flatray Adam, flatray SAM and the HF Trainer.

No ray, no `datasets`, no hub: synthetic token batches and BERTs with random weights from BertConfig, a
single-process torch.distributed group (NCCL on CUDA, gloo on CPU). `--device cpu --quick` runs the same code with
small models on a CPU in a few minutes (fp16 and bf16 as torch.autocast on the CPU). Exit code 1 if any check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from functools import partial

import torch

RHO = {"sam": 0.05, "asam": 0.5}  # the config's defaults, written out: the norm check compares against them
GAP_TOLERANCE = 0.10  # ||w_lowp - w_fp32|| / ||w_fp32 - w_0|| after 3 steps (tests/test_precision.py: 0.10)
LOSS_TOLERANCE = 0.02  # relative, per step
COFI_TOLERANCE = 0.25  # the masks' parameters after 3 CoFi steps (tests/test_precision.py: 0.25, measured 16%)
NORM_TOLERANCE = 0.01  # realised perturbation norm / rho
STEPS = 3
# Dense bf16 peak FLOP/s by GPU name (NVIDIA data sheets, no sparsity); the first matching entry wins.
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12))

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gpu_check +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="small models (checks: 2-layer BERT; throughput: 4-layer BERT instead of bert-base)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s for MFU (default: from the GPU name)")
    p.add_argument("--batch", type=int, help="throughput batch (default 32 on cuda, 8 on cpu); seq is 128 (64 quick)")
    p.add_argument("--steps", type=int, help="timed throughput steps per contender (default 50 on cuda, 3 on cpu)")
    p.add_argument("--only", help="comma-separated substrings: run only the checks whose name contains one")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA GPU (use --device cpu)")
    return args


ARGS = parse_args()
# DeepSpeed picks its accelerator when it is first imported (flatray.train.engine imports it): say which, before that.
os.environ["DS_ACCELERATOR"] = ARGS.device
DEVICE = torch.device("cuda", 0) if ARGS.device == "cuda" else torch.device("cpu")
CUDA = DEVICE.type == "cuda"
torch.set_float32_matmul_precision("highest")  # the fp32 references must be fp32, not TF32 (torch's default too)

# The flatray modules the GPU machine installs from the wheel folder (bench/README.md); none of them imports ray or
# datasets (checked below). flatray.methods.sharpness needs scipy and is imported by its check.
import flatray.config  # noqa: E402, F401
import flatray.methods.cofi as cofi  # noqa: E402
import flatray.train.engine  # noqa: E402, F401
import flatray.methods.lsq as lsq  # noqa: E402
import flatray.methods.sam  # noqa: E402, F401
import flatray.methods.imp as prune  # noqa: E402
import flatray.methods.squat as squat_lib  # noqa: E402
import flatray.data.tasks  # noqa: E402, F401

IMPORTED = {name: name in sys.modules for name in ("ray", "datasets")}

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification  # noqa: E402

from flatray.config import PruneConfig, RunConfig  # noqa: E402
from flatray.train.engine import build_engine, grad_scaler, model_loss, train_step  # noqa: E402
from flatray.methods.sam import scale_tensor  # noqa: E402


# ------------------------------------------------------------------------------------------------- results


class Skip(Exception):
    """A check that cannot run here (a missing optional package): SKIP, not FAIL."""


@dataclass
class Result:
    name: str
    status: str = "PASS"  # PASS | FAIL | SKIP
    figures: str = ""
    reason: str = ""
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


class Checker:
    """Collects figures and failed conditions of one check; `expect` records, it does not raise, so a check reports
    every condition that failed, not only the first."""

    def __init__(self):
        self.failures: list[str] = []
        self.figures: list[str] = []
        self.data: dict = {}

    def expect(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
        return ok

    def figure(self, text: str, **data) -> None:
        self.figures.append(text)
        self.data.update(data)


def selected(name: str) -> bool:
    return not ARGS.only or any(s.strip() in name for s in ARGS.only.split(","))


def run_check(name: str, fn, results: list[Result]) -> None:
    if not selected(name):
        return
    log(f"{name} ...")
    r, c, start = Result(name), Checker(), time.perf_counter()
    try:
        fn(c)
        if c.failures:
            r.status, r.reason = "FAIL", "; ".join(c.failures)
    except Skip as e:
        r.status, r.reason = "SKIP", str(e)
    except Exception as e:  # isolation: one broken path must not hide the others
        traceback.print_exc()
        r.status, r.reason = "FAIL", f"{type(e).__name__}: {e}"
    r.seconds, r.figures, r.data = time.perf_counter() - start, "; ".join(c.figures), c.data
    log(f"{name}: {r.status} ({r.seconds:.1f} s) {r.figures}{' -- ' + r.reason if r.reason else ''}")
    results.append(r)
    gc.collect()  # engines hold a model and optimizer state each: free them before the next check
    if CUDA:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- set-up


def bert_config(size: str, dropout: bool = True) -> BertConfig:
    if size == "tiny":
        cfg = BertConfig(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=512, max_position_embeddings=128, num_labels=2)
    elif size == "small":
        cfg = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, num_labels=2)
    else:
        cfg = BertConfig(num_labels=2)  # bert-base: 110M parameters
    if not dropout:
        # Low-precision vs fp32 comparisons need the same dropout masks in both runs; on CUDA fp32 and bf16 need not
        # draw the same ones (flash and math attention draw differently), so those runs train without dropout.
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    return cfg


CHECK_SIZE = "tiny" if ARGS.quick else "base"
CHECK_BATCH, CHECK_SEQ = (8, 32) if ARGS.quick else (16, 128)
CHECK_LR = 1e-3 if ARGS.quick else 1e-4


def make_model(cls=BertForSequenceClassification, seed: int = 0, size: str = CHECK_SIZE, dropout: bool = False):
    torch.manual_seed(seed)  # the same initial weights for every run that compares
    return cls(bert_config(size, dropout))


def make_batches(n: int, vocab: int, batch: int = CHECK_BATCH, seq: int = CHECK_SEQ, seed: int = 3, qa: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {"input_ids": torch.randint(5, vocab, (batch, seq), generator=g),
             "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
        if qa:
            b["start_positions"] = torch.randint(0, seq, (batch,), generator=g)
            b["end_positions"] = torch.randint(0, seq, (batch,), generator=g)
        else:
            b["labels"] = torch.randint(0, 2, (batch,), generator=g)
        out.append({k: v.to(DEVICE) for k, v in b.items()})
    return out


def run_config(opt: str, precision: str, stage: int = 0, kind: str = "finetune", lr: float = CHECK_LR,
               clip: float = 0.0, batch: int = CHECK_BATCH, **extra) -> RunConfig:
    return RunConfig(kind=kind, model="tiny-bert", task="toy",  # model/task are not read: modules are passed in
                     train={"batch_size": batch, "epochs": 1, "lr": lr, "schedule": "constant"},
                     optimizer={"name": opt, "rho": RHO.get(opt)},
                     deepspeed={"zero_stage": stage, "precision": precision, "gradient_clipping": clip},
                     scaling={"num_workers": 1, "use_gpu": CUDA}, **extra)


def init_distributed() -> str:
    """A world of one, as DeepSpeed needs a process group even for a single process (bench/common.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if CUDA else "gloo"
    if CUDA:
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(backend, rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend)
    return backend


def snapshot(module) -> dict[str, torch.Tensor]:
    """fp32 copies on DEVICE: a model is snapshotted on the CPU before its engine moves it, and after on the GPU."""
    return {n: p.detach().to(DEVICE, torch.float32, copy=True) for n, p in module.named_parameters()}


def relative_gap(a: dict, b: dict, start: dict) -> float:
    """||a - b|| / ||b - start||: how far the low-precision run lands from the fp32 run, per unit of its movement."""
    gap = math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in b))
    moved = math.sqrt(sum(float(((b[k] - start[k]) ** 2).sum()) for k in b))
    return gap / moved if moved > 0 else float("inf")


def step_applied(engine, run) -> bool:
    """Run one optimizer step; False when fp16 loss scaling skipped it (the scale fell, as flatray.train.engine reads it)."""
    scaler = grad_scaler(engine)
    before = scaler.get_scale() if scaler is not None else None
    run()
    return scaler is None or scaler.get_scale() >= before


class PerturbationProbe:
    """A loss_fn for train_step that measures the realised perturbation ||T^-1 (w' - w)|| at SAM's second pass
    (T = 1 for SAM; ASAM's T = |w| + eta on weight matrices, so its constraint is the same norm = rho)."""

    def __init__(self, params, adaptive: bool, eta: float):
        self.params, self.adaptive, self.eta, self.norms = params, adaptive, eta, []

    def arm(self) -> None:
        """Before each step: remember w (and T) and count this step's forward passes from zero."""
        self.w = [p.detach().float().clone() for p in self.params]
        self.t = [scale_tensor(w, self.adaptive, self.eta) for w in self.w]
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == 2:  # the pass at w + e
            parts = [((p.detach().float() - w) / (1 if t is None else t)).norm() for p, w, t in zip(self.params, self.w, self.t)]
            self.norms.append(torch.linalg.vector_norm(torch.stack(parts)).item())
        return model(**batch).loss


def train_run(opt: str, precision: str, stage: int, batches: list, want_applied: int | None = None) -> dict:
    """Fresh model (seed 0), engine, steps on `batches` (stopping after `want_applied` applied steps if given)."""
    model = make_model()
    start = snapshot(model)
    cfg = run_config(opt, precision, stage)
    engine = build_engine(model, cfg, 1, total_steps=len(batches))
    params = [p for p in engine.module.parameters() if p.requires_grad]
    probe = PerturbationProbe(params, opt == "asam", cfg.optimizer.eta)
    losses, applied, norms = [], [], []
    for b in batches:
        probe.arm()
        loss = []
        applied.append(step_applied(engine, lambda: loss.append(train_step(engine, b, cfg, loss_fn=probe))))
        losses.append(loss[0])
        norms.append(probe.norms[-1] if len(probe.norms) == len(losses) else float("nan"))
        if want_applied and sum(applied) == want_applied:
            break
    return {"start": start, "end": snapshot(engine.module), "losses": losses, "applied": applied, "norms": norms}


# ------------------------------------------------------------------------------------------------- checks


def check_imports(c: Checker) -> None:
    """The modules the GPU machine runs import no ray (its wheel alone exceeds the folder) and no datasets."""
    c.figure(f"ray imported: {IMPORTED['ray']}; datasets imported: {IMPORTED['datasets']}", **IMPORTED)
    c.expect(not IMPORTED["ray"], "flatray.train.engine/prune/lsq/squat/cofi/config imported ray")
    c.expect(not IMPORTED["datasets"], "flatray.train.engine/prune/lsq/squat/cofi/config imported datasets")


def check_sam(c: Checker, opt: str, precision: str, stage: int) -> None:
    """Low precision first; the fp32 reference then takes the same applied steps (an fp16 step skipped on overflow
    moves nothing, Adam's step count included, and without dropout no RNG is consumed: skipping its batch is exact)."""
    vocab = bert_config(CHECK_SIZE).vocab_size
    batches = make_batches(2 * STEPS, vocab)
    low = train_run(opt, precision, stage, batches, want_applied=STEPS)
    used = [b for b, a in zip(batches, low["applied"]) if a]
    ref = train_run(opt, "fp32", stage, used)
    rho = RHO[opt]
    norms = [n for n, a in zip(low["norms"], low["applied"]) if a]
    worst = max((abs(n / rho - 1) for n in norms), default=float("inf"))
    c.figure(f"||e||/rho {', '.join(f'{n / rho:.4f}' for n in norms)}", norms=norms, rho=rho)
    c.expect(len(used) == STEPS, f"only {len(used)} of {len(low['applied'])} steps applied (fp16 overflow)")
    c.expect(worst <= NORM_TOLERANCE, f"perturbation norm off rho by {worst:.2%} (> {NORM_TOLERANCE:.0%})")
    if not used:
        return
    gap = relative_gap(low["end"], ref["end"], ref["start"])
    lows = [x for x, a in zip(low["losses"], low["applied"]) if a]
    loss_gap = max(abs(x - y) / abs(y) for x, y in zip(lows, ref["losses"]))
    skipped = len(low["applied"]) - len(used)
    c.figure(f"gap vs fp32 {gap:.4f} (< {GAP_TOLERANCE})", gap=gap)
    c.figure(f"loss gap {loss_gap:.2%}" + (f"; {skipped} fp16 step(s) skipped" if skipped else ""),
             loss_gap=loss_gap, skipped=skipped, losses=lows, losses_fp32=ref["losses"])
    c.expect(gap < GAP_TOLERANCE, f"weights {gap:.3f} of the fp32 movement away from fp32 (>= {GAP_TOLERANCE})")
    c.expect(loss_gap < LOSS_TOLERANCE, f"losses differ from fp32 by {loss_gap:.2%} (>= {LOSS_TOLERANCE:.0%})")


def masked_steps(c: Checker, engine, cfg, masks: dict, batches: list, label: str) -> None:
    """SAM steps, then Adam steps (train_step's sam override), on a masked engine: the pruned entries must stay
    exactly 0 (no enforce() in between) and the kept ones must move."""
    params = dict(engine.module.named_parameters())
    before = {n: params[n].detach().clone() for n in masks}
    half = len(batches) // 2
    losses = [train_step(engine, b, cfg, sam=i < half) for i, b in enumerate(batches)]
    nonzero = sum(int((params[n].detach()[~m.to(DEVICE)] != 0).sum()) for n, m in masks.items())
    moved = sum(int((params[n].detach() != before[n])[m.to(DEVICE)].sum()) for n, m in masks.items())
    kept = sum(int(m.sum()) for m in masks.values())
    c.figure(f"{label}: sparsity {prune.sparsity(masks):.2f}, pruned nonzero {nonzero}, kept moved {moved / kept:.0%}",
             **{f"{label}_pruned_nonzero": nonzero, f"{label}_kept_moved": moved / kept, f"{label}_losses": losses})
    c.expect(nonzero == 0, f"{label}: {nonzero} pruned weights are not 0 after SAM + Adam steps")
    c.expect(moved > 0.5 * kept, f"{label}: only {moved} of {kept} kept weights moved")
    c.expect(all(math.isfinite(x) for x in losses), f"{label}: non-finite loss {losses}")


def check_imp(c: Checker) -> None:
    """One IMP level: global magnitude ranking to 50%, MaskedModel before the engine, bf16 at ZeRO 2 (the engine's
    fp32 master partition must stay masked too: its copy back into the module is what is checked)."""
    model = make_model()
    masks = prune.magnitude_masks(prune.prunable_weights(model), 0.5)
    prune.MaskedModel(model, masks)
    cfg = run_config("sam", "bf16", stage=2)
    engine = build_engine(model, cfg, 1, total_steps=2 * STEPS)
    masked_steps(c, engine, cfg, masks, make_batches(2 * STEPS, model.config.vocab_size), "imp")


def check_transfer(c: Checker) -> None:
    """Ticket transfer: a mask found on a classifier, saved as a mask file, applied by prune.setup to a freshly
    built model with a different head (QA, which has no pooler: its mask entry is dropped), bf16 at ZeRO 0."""
    source = make_model(seed=0)
    masks = prune.magnitude_masks(prune.prunable_weights(source), 0.5)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        path = os.path.join(tmp, prune.MASK_FILE)
        prune.save_masks(path, masks, level=1, method="magnitude", source_task="toy")
        target = make_model(BertForQuestionAnswering, seed=1)
        masked, applied, meta = prune.setup(target, PruneConfig(mask=path), seed=1)
    same = all(torch.equal(applied[n], masks[n]) for n in applied)
    c.expect(masked is not None and same, "the transferred mask differs from the source's")
    c.expect(not any("pooler" in n for n in applied), "the pooler's mask entry was applied to a QA model")
    cfg = run_config("sam", "bf16", stage=0)
    engine = build_engine(target, cfg, 1, total_steps=2 * STEPS)
    masked_steps(c, engine, cfg, applied, make_batches(2 * STEPS, target.config.vocab_size, qa=True), "transfer")


def cofi_run(precision: str, batches: list) -> tuple[dict, dict, list]:
    cfg = run_config("adam", precision, kind="cofi", cofi={"target_sparsity": 0.5, "lr_masks": 0.1})
    teacher = make_model().to(DEVICE).eval().requires_grad_(False)
    student = make_model()  # CoFi's student starts as a copy of the teacher
    torch.manual_seed(1)  # the masks' init noise
    masks = cofi.CoFiMasks(student.config, cofi.CoFiConfig(ramp_steps=4, target_sparsity=0.5, lr_masks=0.1)).to(DEVICE)
    mask_opt = cofi.mask_optimizer(masks)
    cofi.attach(student, masks)
    engine = build_engine(student, cfg, 1, total_steps=4)
    start = {k: v.detach().clone() for k, v in masks.state_dict().items()}
    torch.manual_seed(9)  # the masks' samples: the same draws in both precisions (the masks stay fp32)
    losses = [cofi.distill_step(engine, masks, mask_opt, teacher, b, cfg, cofi.target_at(i, 4, 0.5))
              for i, b in enumerate(batches)]
    return start, {k: v.detach().clone() for k, v in masks.state_dict().items()}, losses


def check_cofi(c: Checker) -> None:
    batches = make_batches(STEPS, bert_config(CHECK_SIZE).vocab_size)
    start, low, losses = cofi_run("bf16", batches)
    _, ref, ref_losses = cofi_run("fp32", batches)
    gap = relative_gap(low, ref, start)
    c.figure(f"losses {', '.join(f'{x:.4f}' for x in losses)}; mask gap vs fp32 {gap:.3f} (< {COFI_TOLERANCE})",
             losses=losses, losses_fp32=ref_losses, gap=gap)
    c.expect(all(math.isfinite(x) for x in losses), f"non-finite loss {losses}")
    c.expect(all(bool(torch.isfinite(v).all()) for v in low.values()), "non-finite mask parameters")
    c.expect(gap < COFI_TOLERANCE, f"mask parameters {gap:.3f} of the fp32 movement away from fp32")


def check_squat(c: Checker) -> None:
    """4-bit LSQ (8-bit activations), SAM on the latent weights, alternating: phase A must leave the step sizes
    bit-identical and phase B the latent weights; then the export must predict exactly as the trained model."""
    cfg = run_config("sam", "bf16", kind="squat", squat={"weight_bits": 4, "task_loss": 1.0, "kd_logits": 0.0})
    model = make_model()
    lsq.quantize_model(model, lsq.QuantSpec(weight_bits=4, act_bits=8))
    batches = make_batches(4, model.config.vocab_size)
    lsq.calibrate(model.to(DEVICE), batches[0])  # activation step sizes: before the engine copies the weights
    engine = squat_lib.build_engine(model, cfg, 1, total_steps=4)
    latent, steps = lsq.latent_params(engine.module), lsq.step_size_params(engine.module)
    phases, losses = [], []
    for b in batches:
        ph = squat_lib.phase(squat_lib.steps_taken(engine), cfg)
        w0, s0 = [p.detach().clone() for p in latent], [p.detach().clone() for p in steps]
        losses.append(squat_lib.squat_step(engine, b, cfg, model_loss, latent))
        w_same = all(torch.equal(x, p) for x, p in zip(w0, latent))
        s_same = all(torch.equal(x, p) for x, p in zip(s0, steps))
        phases.append(ph)
        c.expect(s_same == (ph == "A") and w_same == (ph == "B"),
                 f"phase {ph}: latent weights {'unchanged' if w_same else 'moved'}, step sizes {'unchanged' if s_same else 'moved'}")
    c.expect(phases == ["A", "B", "A", "B"], f"phases {phases}")
    c.expect(all(math.isfinite(x) for x in losses), f"non-finite loss {losses}")
    b = {k: v for k, v in batches[0].items() if k != "labels"}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        path = os.path.join(tmp, lsq.EXPORT_FILE)
        lsq.export(engine.module, path)
        reloaded = lsq.load_exported(path).to(DEVICE)
    engine.module.eval()
    same = {}
    for label, ctx in (("fp32", torch.autocast(DEVICE.type, enabled=False)),
                       ("bf16", torch.autocast(DEVICE.type, dtype=torch.bfloat16))):
        with torch.no_grad(), ctx:
            a, r = engine.module(**b).logits, reloaded(**b).logits
        same[label] = torch.equal(a, r)
        c.expect(same[label], f"exported model's {label} logits differ by up to {float((a - r).abs().max()):.3g}")
    c.figure(f"phases {''.join(phases)}, frozen groups bit-identical; export logits equal: "
             + ", ".join(f"{k} {v}" for k, v in same.items()), losses=losses, export_equal=same)


def check_sharpness(c: Checker) -> None:
    try:
        from flatray.methods.sharpness import eval_subset_loss, sharpness
    except ImportError as e:
        if getattr(e, "name", "") and e.name.split(".")[0] == "scipy":
            raise Skip("scipy is not installed (flatray.methods.sharpness needs it)") from e
        raise
    model = make_model().to(DEVICE).train()
    batch = make_batches(1, model.config.vocab_size, seed=5)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = sharpness(model, partial(eval_subset_loss, batches=batch), eps=1e-3, dim=100, max_iter=5)
    same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    c.figure(f"phi {res.phi:.4g} (loss {res.loss:.4f}, max {res.max_loss:.4f}, {res.evaluations} evaluations)",
             phi=res.phi, loss=res.loss, max_loss=res.max_loss, evaluations=res.evaluations)
    c.expect(math.isfinite(res.phi) and res.phi >= 0, f"phi {res.phi} is not finite and >= 0")
    c.expect(same, "weights changed by the measurement")
    c.expect(model.training, "the model's mode was not restored (train)")


# ------------------------------------------------------------------------------------------------- throughput


TP_SIZE = "small" if ARGS.quick else "base"
TP_BATCH = ARGS.batch or (32 if CUDA else 8)
TP_SEQ = 64 if ARGS.quick else 128
TP_STEPS = ARGS.steps or (50 if CUDA else 3)
TP_WARMUP = 3 if CUDA else 1
HF_CHECK = f"throughput bert-{TP_SIZE} HF Trainer"


def peak_flops() -> tuple[float | None, str]:
    if ARGS.peak_tflops:
        return ARGS.peak_tflops * 1e12, "--peak-tflops"
    if not CUDA:
        return None, "unknown for a CPU"
    name = torch.cuda.get_device_name(DEVICE)
    for key, peak in PEAK_BF16:
        if key in name:
            return peak, f"{name} ({key})"
    return None, f"unknown GPU {name!r}"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def tp_model():
    torch.manual_seed(0)
    return BertForSequenceClassification(bert_config(TP_SIZE, dropout=True))  # a real training step: dropout on


def tp_batch(vocab: int) -> dict:
    return make_batches(1, vocab, batch=TP_BATCH, seq=TP_SEQ, seed=0)[0]


def report_throughput(c: Checker, contender: str, times: list[float], params: int, passes: int) -> None:
    """samples/s and MFU = 6 * params * tokens * passes / (step time * peak), passes = forward+backward per step."""
    c.data["contender"] = contender
    median = statistics.median(times)
    flops = 6 * passes * params * TP_BATCH * TP_SEQ / median
    peak, source = peak_flops()
    mfu = f"{flops / peak:.1%}" if peak else "n/a"
    c.figure(f"{1000 * median:.1f} ms/step (min {1000 * min(times):.1f}), {TP_BATCH / median:.1f} samples/s, "
             f"{flops / 1e12:.3g} TFLOP/s, MFU {mfu}",
             median_ms=1000 * median, step_ms=[1000 * t for t in times], samples_per_s=TP_BATCH / median,
             tflops=flops / 1e12, mfu=flops / peak if peak else None, peak_source=source, params=params)
    c.expect(all(math.isfinite(t) and t > 0 for t in times), f"bad step times {times}")


def check_flatray_throughput(c: Checker, opt: str) -> None:
    model = tp_model()
    params = sum(p.numel() for p in model.parameters())
    cfg = run_config(opt, "bf16", lr=2e-5, clip=1.0, batch=TP_BATCH)  # as a run: clipping on (HF: max_grad_norm)
    engine = build_engine(model, cfg, 1, total_steps=TP_WARMUP + TP_STEPS)
    batch = tp_batch(model.config.vocab_size)
    for _ in range(TP_WARMUP):  # first-call allocations, lazy optimizer state, kernel selection
        train_step(engine, batch, cfg)
    times = []
    for _ in range(TP_STEPS):
        sync()
        t0 = time.perf_counter()
        loss = train_step(engine, batch, cfg)
        sync()
        times.append(time.perf_counter() - t0)
    c.expect(math.isfinite(loss), f"non-finite loss {loss}")
    report_throughput(c, opt.upper() if opt != "adam" else "Adam", times, params, passes=2 if opt != "adam" else 1)


class RepeatedBatch(torch.utils.data.Dataset):
    """The rows of the synthetic batch over and over (on the CPU: the Trainer's loader moves them)."""

    def __init__(self, batch: dict, length: int):
        self.batch, self.length = {k: v.cpu() for k, v in batch.items()}, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {k: v[i % TP_BATCH] for k, v in self.batch.items()}


def build_hf_trainer(tmp: str):
    """transformers.Trainer with bf16=True, flatray's lr and clipping, timed per step by a callback (as
    bench/step_cost.py). Built BEFORE the process group exists: Accelerate decides once, from LOCAL_RANK/WORLD_SIZE,
    whether a run is distributed, and would otherwise wrap the model in DDP."""
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

    model = tp_model()
    targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=TP_BATCH, max_steps=TP_WARMUP + TP_STEPS,
                              learning_rate=2e-5, max_grad_norm=1.0, report_to=[], save_strategy="no",
                              logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True, use_cpu=not CUDA,
                              bf16=True)
    timer = StepTimer()
    data = RepeatedBatch(tp_batch(model.config.vocab_size), TP_BATCH * (TP_WARMUP + TP_STEPS))
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    kind = str(trainer.accelerator.distributed_type)
    if "NO" not in kind:
        raise RuntimeError(f"HF Trainer set itself up as distributed ({kind}); the comparison would be unfair")
    return trainer, timer, sum(p.numel() for p in model.parameters())


def check_hf_throughput(c: Checker, hf) -> None:
    if isinstance(hf, Exception):
        raise RuntimeError(f"building the HF Trainer failed: {type(hf).__name__}: {hf}")
    trainer, timer, params = hf
    trainer.train()
    sync()
    times = timer.times[TP_WARMUP:]
    c.expect(len(times) == TP_STEPS, f"{len(timer.times)} steps timed, expected {TP_WARMUP + TP_STEPS}")
    report_throughput(c, "HF", times, params, passes=1)


# ------------------------------------------------------------------------------------------------- main


def print_table(results: list[Result]) -> None:
    width = max((len(r.name) for r in results), default=5)
    print(f"\n{'check':<{width}}  {'status':<6}  {'s':>6}  figures / reason")
    print(f"{'-' * width}  {'-' * 6}  {'-' * 6}  {'-' * 40}")
    for r in results:
        text = r.figures + (f"  [{r.reason}]" if r.reason else "")
        print(f"{r.name:<{width}}  {r.status:<6}  {r.seconds:>6.1f}  {text}")


def main() -> int:
    logging_quiet()
    device = torch.cuda.get_device_name(DEVICE) if CUDA else f"CPU ({platform.processor() or platform.machine()})"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                "transformers": transformers.__version__}
    log(f"device {device}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    log(f"checks: bert-{CHECK_SIZE}, batch {CHECK_BATCH}, seq {CHECK_SEQ}, lr {CHECK_LR}; throughput: bert-{TP_SIZE}, "
        f"batch {TP_BATCH}, seq {TP_SEQ}, {TP_WARMUP} warm-up + {TP_STEPS} timed steps, bf16")
    results: list[Result] = []
    run_check("imports: no ray, no datasets", check_imports, results)

    tmp = tempfile.TemporaryDirectory(prefix="gpu_check_hf_")
    hf = RuntimeError("not built (--only)")
    if selected(HF_CHECK):
        try:
            hf = build_hf_trainer(tmp.name)  # before init_distributed: see build_hf_trainer
        except Exception as e:  # reported by its check
            traceback.print_exc()
            hf = e
    backend = init_distributed()
    log(f"process group: {backend}, world size 1")

    for opt, precision, stage in (("sam", "bf16", 0), ("asam", "bf16", 0), ("sam", "fp16", 0), ("asam", "fp16", 0),
                                  ("sam", "bf16", 2)):
        run_check(f"{opt} {precision} zero{stage}", partial(check_sam, opt=opt, precision=precision, stage=stage), results)
    run_check("imp level bf16 zero2", check_imp, results)
    run_check("ticket transfer bf16 zero0", check_transfer, results)
    run_check("cofi step bf16", check_cofi, results)
    run_check("squat step bf16 + export", check_squat, results)
    run_check("sharpness", check_sharpness, results)
    run_check(f"throughput bert-{TP_SIZE} flatray Adam", partial(check_flatray_throughput, opt="adam"), results)
    run_check(f"throughput bert-{TP_SIZE} flatray SAM", partial(check_flatray_throughput, opt="sam"), results)
    run_check(HF_CHECK, partial(check_hf_throughput, hf=hf), results)
    tmp.cleanup()

    print_table(results)
    tp = {r.data["contender"]: r.data.get("median_ms") for r in results if "contender" in r.data}
    if tp.get("Adam") and tp.get("SAM"):
        print(f"\nSAM/Adam step time: {tp['SAM'] / tp['Adam']:.2f} (2.0 is the floor: two forward+backward passes)")
    if tp.get("Adam") and tp.get("HF"):
        print(f"flatray Adam / HF Trainer samples/s: {tp['HF'] / tp['Adam']:.2f}")
    peak, source = peak_flops()
    print(f"MFU peak: {f'{peak / 1e12:.0f} TFLOP/s dense bf16' if peak else 'n/a'} ({source}); "
          "FLOPs per step = 6 x params x tokens (Adam, HF Trainer), 12 x params x tokens (SAM)")
    failed = [r.name for r in results if r.status == "FAIL"]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks did not fail"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; {time.perf_counter() - T0:.0f} s in all")

    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump({"device": device, "versions": versions, "backend": backend,
                       "settings": {"quick": ARGS.quick, "check_model": CHECK_SIZE, "check_batch": CHECK_BATCH,
                                    "check_seq": CHECK_SEQ, "throughput_model": TP_SIZE, "throughput_batch": TP_BATCH,
                                    "throughput_seq": TP_SEQ, "throughput_steps": TP_STEPS,
                                    "peak_flops": peak, "peak_source": source},
                       "tolerances": {"norm": NORM_TOLERANCE, "gap": GAP_TOLERANCE, "loss": LOSS_TOLERANCE,
                                      "cofi_gap": COFI_TOLERANCE},
                       "checks": [r.__dict__ for r in results]}, f, indent=2, default=str)
        log(f"wrote {ARGS.json}")
    dist.destroy_process_group()
    return 1 if failed else 0


def logging_quiet() -> None:
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # engine set-up chatter would bury the progress lines
    transformers.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
