"""What a Ray Train worker does for each kind of run (flatray.train is the driver that starts the workers).

`train_worker` sets up what every kind needs (its rank, the task's data, the tokenizer) and hands over to the run's
kind: finetune (Adam/SAM/ASAM; IMP levels and ticket transfers are fine-tuning with a mask), structured (CoFi),
squat (low-bit QAT), ptq, sharpness. Each reports through `ray.train.report`; rank 0 attaches a checkpoint only
when the dev score improves, so the latest checkpoint Ray keeps is the best one.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from flatray.config import RunConfig

PROGRESS_EVERY_S = 30


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shard(n: int, rank: int, world: int) -> range:
    """Contiguous, non-overlapping shard of n items (evaluation must not count any example twice)."""
    bounds = np.linspace(0, n, world + 1).astype(int)
    return range(bounds[rank], bounds[rank + 1])


def predict(module, features, collate, batch_size: int, device, rank: int, world: int, pad_to: int):
    """Model outputs on `features` from all workers, in order: logits [n, C] or (start, end) [n, pad_to]."""
    import torch
    import torch.distributed as dist

    part = features.select(shard(len(features), rank, world))
    outs = []
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for i in range(0, len(part), batch_size):
            batch = {k: v.to(device) for k, v in collate([part[j] for j in range(i, min(i + batch_size, len(part)))]).items()}
            out = module(**batch)
            if hasattr(out, "start_logits"):  # QA: pad the sequence axis so all batches stack
                se = torch.stack([out.start_logits, out.end_logits]).float()
                se = torch.nn.functional.pad(se, (0, pad_to - se.shape[-1]), value=float("-inf"))
                outs.append(se.cpu().numpy())
            else:
                outs.append(out.logits.float().cpu().numpy())
    module.train(was_training)
    local = np.concatenate(outs, axis=-2) if outs else None
    gathered = [local]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    parts = [g for g in gathered if g is not None]
    full = np.concatenate(parts, axis=-2)
    return (full[0], full[1]) if full.ndim == 3 else full


def evaluate(module, tokenized, spec, collate, cfg: RunConfig, device, rank: int, world: int) -> dict[str, float]:
    from flatray.data import compute_metrics
    from flatray.train.engine import autocast

    metrics = {}
    for split, eval_set in tokenized.evals.items():
        with autocast(cfg, device):  # the run's compute precision (logits are read back as float32)
            outputs = predict(module, eval_set.features, collate, cfg.train.eval_batch_size, device, rank, world,
                              pad_to=cfg.data.max_length)
        for key, value in compute_metrics(spec, eval_set, outputs).items():
            metrics[f"{split}/{key}"] = float(value)
    # The score that picks the best checkpoint: the main metric on the first dev split (MNLI: matched).
    metrics["score"] = metrics[f"{spec.eval_splits[0]}/{spec.main_metric}"]
    return metrics


def zero_fraction(weights) -> float:
    """Measured sparsity: the fraction of exactly-zero entries of the prunable weights."""
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total


def write_run_files(folder: Path, cfg: RunConfig, metrics: dict, history: list[dict] | None = None) -> None:
    """What every checkpoint carries besides weights: the resolved run config, its metrics (and every epoch's)."""
    (folder / "flatray_run.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if history is not None:
        (folder / "history.json").write_text(json.dumps(history, indent=2))


def save_checkpoint(folder: Path, module, tokenizer, cfg: RunConfig, history: list[dict], masks=None,
                    mask_meta: dict | None = None, metrics: dict | None = None) -> None:
    """HF model folder + the run config + metrics of this epoch and of every epoch so far (+ the mask)."""
    from flatray.methods import imp as prune

    module.save_pretrained(folder, safe_serialization=True)
    if masks is not None:
        prune.save_masks(folder / prune.MASK_FILE, masks, **(mask_meta or {}))
    tokenizer.save_pretrained(folder)
    write_run_files(folder, cfg, metrics or history[-1], history)


def quiet_libraries() -> None:
    """Keep worker logs to flatray's own lines: library progress bars and load reports add nothing there."""
    import warnings

    import datasets
    import transformers


    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


@dataclass
class Worker:
    """What every kind of run needs in a worker: its place in the group, the task's data, the tokenizer."""

    cfg: RunConfig
    rank: int
    world: int
    device: object
    spec: object
    tokenizer: object
    tokenized: object
    collate: object

    def evaluate(self, module) -> dict[str, float]:
        return evaluate(module, self.tokenized, self.spec, self.collate, self.cfg, self.device, self.rank, self.world)

    def report(self, metrics: dict, save=None) -> None:
        """ray.train.report from every worker; rank 0 attaches a checkpoint written by `save(folder)`."""
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0 and save is not None:
                save(Path(tmp))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    def log(self, text: str) -> None:
        if self.rank == 0:
            print(f"[flatray] {text}", flush=True)


def train_worker(run_config: dict) -> None:
    """Ray Train's train_loop_per_worker: set up, then the run's kind."""
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch

    from flatray import data as data_lib
    from flatray import models

    quiet_libraries()
    cfg = RunConfig.model_validate(run_config)
    ctx = ray.train.get_context()
    device = torch.device("cpu") if cfg.kind == "ptq" else ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")

    spec = data_lib.TASKS[cfg.task]
    tokenizer = models.load_tokenizer(cfg.model)
    raw = data_lib.load_raw(spec, cfg.data.source, cfg.data.path, cfg.data.data_files, seed=cfg.train.seed)
    tokenized = data_lib.tokenize(spec, raw, tokenizer, cfg.data.max_length, cfg.data.doc_stride,
                                  cfg.data.max_train_samples, cfg.data.max_eval_samples)
    worker = Worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), device, spec, tokenizer, tokenized,
                    data_lib.collator(tokenizer))
    kinds = {"finetune": finetune, "ptq": post_training_quantization, "sharpness": measure_only,
             "structured": structured, "squat": squat}
    kinds[cfg.kind](worker)


def finetune(w: Worker) -> None:
    """Epochs of Adam/SAM/ASAM steps in a DeepSpeed engine (masked for IMP levels and transfers), evaluation after
    each, a checkpoint when the dev score improves; sharpness of the best model at the end when asked."""
    from flatray import models
    from flatray.methods import imp as prune
    from flatray.train.engine import build_engine, train_step

    cfg = w.cfg
    sampler, loader = train_loader(w)

    seed_everything(cfg.train.seed)  # same head init on every worker (DeepSpeed also broadcasts rank 0's weights)
    model = models.load_model(cfg.model, w.spec)
    masked, masks, mask_meta = prune.setup(model, cfg.prune, cfg.train.seed)  # before the engine copies weights
    prunable = list(prune.prunable_weights(model).values())
    history = resume_from_checkpoint(model)
    engine = build_engine(model, cfg, w.world, total_steps=cfg.train.epochs * len(loader))
    for _ in range(len(history) and history[-1]["epoch"] * len(loader)):
        engine.lr_scheduler.step()  # the schedule continues where the checkpoint left it
    seed_everything(cfg.train.seed + w.rank)  # dropout masks differ across workers, reproducibly

    best = max((h["score"] for h in history), default=-float("inf"))
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if history else None
    if history:
        w.log(f"resumed from the checkpoint of epoch {history[-1]['epoch']} (best score {best:.4f})")
    for epoch in range(history[-1]["epoch"] + 1 if history else 1, cfg.train.epochs + 1):
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        losses, last_note = [], start
        for step, batch in enumerate(loader, 1):
            losses.append(train_step(engine, {k: v.to(w.device) for k, v in batch.items()}, cfg))
            if time.perf_counter() - last_note > PROGRESS_EVERY_S:
                # Progress as plain lines: they read well in Ray's forwarded logs, files and CI alike.
                last_note = time.perf_counter()
                w.log(f"epoch {epoch}/{cfg.train.epochs} step {step}/{len(loader)} "
                      f"loss {np.mean(losses[-50:]):.4f} ({step / (last_note - start):.2f} steps/s)")
        if masked:
            masked.enforce()  # a guard: the masked gradients already keep pruned weights at exactly zero
        metrics = w.evaluate(engine.module)
        metrics.update(epoch=epoch, train_loss=float(np.mean(losses)), lr=engine.get_lr()[0],
                       epoch_seconds=time.perf_counter() - start, sparsity=zero_fraction(prunable))
        improved = metrics["score"] > best
        best = max(best, metrics["score"])
        metrics["best_score"] = best
        history.append(metrics)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" in k)
        w.log(f"epoch {epoch}/{cfg.train.epochs}  train_loss {metrics['train_loss']:.4f}  {shown}  "
              f"({metrics['epoch_seconds']:.1f} s){'  *best*' if improved else ''}")
        if improved and cfg.sharpness.enabled:
            best_state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        save = (lambda folder: save_checkpoint(folder, engine.module, w.tokenizer, cfg, history, masks, mask_meta))
        w.report(metrics, save if improved else None)

    if cfg.sharpness.enabled:
        # Measured on the best dev model, which is then reported once more, with its sharpness, as the last word.
        engine.module.load_state_dict(best_state)
        final = {**max(history, key=lambda m: m["score"]), **sharpness_metrics(w, engine.module)}
        w.report(final, lambda folder: save_checkpoint(folder, engine.module, w.tokenizer, cfg, history, masks,
                                                       mask_meta, metrics=final))


def resume_from_checkpoint(model) -> list[dict]:
    """A retried or resumed run continues from the latest checkpoint Ray Train restored: its weights (masked ones
    stay zero) and its epochs. The optimizer's moments start afresh: checkpoints are plain HF model folders."""
    import ray.train
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as folder:
        state = load_file(str(Path(folder) / "model.safetensors"))
        history = json.loads((Path(folder) / "history.json").read_text())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return history


def train_loader(w: Worker):
    from torch.utils.data import DataLoader, DistributedSampler

    cfg = w.cfg
    sampler = DistributedSampler(w.tokenized.train, num_replicas=w.world, rank=w.rank, shuffle=True,
                                 seed=cfg.train.seed)
    loader = DataLoader(w.tokenized.train, batch_size=cfg.train.batch_size // w.world, sampler=sampler,
                        collate_fn=w.collate, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"train set of {len(w.tokenized.train)} examples gives no full batch of {cfg.train.batch_size}")
    return sampler, loader


def structured(w: Worker) -> None:
    """kind: structured (CoFi): distil the teacher (model: a checkpoint) into a student with hard-concrete masks and
    a Lagrangian pulling the expected sparsity to a ramping target; remove what the masks prune; fine-tune the
    smaller model. Both phases run in DeepSpeed engines; the masks live outside the engine (cofi.distill_step)."""
    from flatray import models
    from flatray.methods import cofi
    from flatray.train.engine import build_engine, train_step

    cfg, sc = w.cfg, w.cfg.structured
    sampler, loader = train_loader(w)
    seed_everything(cfg.train.seed)
    teacher = models.load_model(cfg.model, w.spec).to(w.device).eval().requires_grad_(False)
    student = models.load_model(cfg.model, w.spec)
    ramp = max(1, int(sc.ramp_fraction * sc.prune_epochs * len(loader)))
    ccfg = cofi.CoFiConfig(ramp_steps=ramp, target_sparsity=sc.target_sparsity, alpha_ce=sc.alpha_ce,
                           alpha_layer=sc.alpha_layer, temperature=sc.temperature, droprate_init=sc.droprate_init,
                           lr_masks=sc.lr_masks, lr_lambdas=sc.lr_lambdas)
    masks = cofi.CoFiMasks(student.config, ccfg).to(w.device)
    mask_opt = cofi.mask_optimizer(masks)
    detach = cofi.attach(student, masks)
    engine = build_engine(student, cfg, w.world, total_steps=sc.prune_epochs * len(loader))
    seed_everything(cfg.train.seed + w.rank)
    prunable_before = cofi.count_prunable(teacher)

    step, epoch = 0, 0
    for _ in range(sc.prune_epochs):
        epoch += 1
        sampler.set_epoch(epoch)
        losses = []
        for batch in loader:
            batch = {k: v.to(w.device) for k, v in batch.items()}
            target = cofi.target_at(step, ramp, sc.target_sparsity)
            losses.append(cofi.distill_step(engine, masks, mask_opt, teacher, batch, cfg, target))
            step += 1
        masks.eval()
        metrics = w.evaluate(engine.module)
        masks.train()
        metrics.update(epoch=epoch, phase=1, train_loss=float(np.mean(losses)), target_sparsity=target,
                       expected_sparsity=float(masks.expected_sparsity()), lambda_1=float(masks.lambda_1))
        w.log(f"prune epoch {epoch}/{sc.prune_epochs}  expected sparsity {metrics['expected_sparsity']:.4f} "
              f"(target {target:.4f})  score {metrics['score']:.4f}")
        w.report(metrics)

    detach()
    masks.eval()
    small = cofi.prune(engine.module, masks).train()
    real = {"params": sum(p.numel() for p in small.parameters()), "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "sparsity": 1 - cofi.count_prunable(small) / prunable_before}
    w.log(f"pruned: {real['params']:,} parameters (teacher {real['teacher_params']:,}), "
          f"sparsity {real['sparsity']:.4f} over the encoder's Q/K/V/O/FFN weights")
    del engine
    engine = build_engine(small, cfg, w.world, total_steps=max(1, sc.finetune_epochs * len(loader)))
    best, history = -float("inf"), []
    for _ in range(max(1, sc.finetune_epochs)):  # 0 fine-tuning epochs: evaluate and save the pruned model as is
        epoch += 1
        losses = []
        if sc.finetune_epochs:
            sampler.set_epoch(epoch)
            for batch in loader:
                losses.append(train_step(engine, {k: v.to(w.device) for k, v in batch.items()}, cfg))
        metrics = {**w.evaluate(engine.module), **real, "epoch": epoch, "phase": 2,
                   "train_loss": float(np.mean(losses)) if losses else float("nan")}
        improved = metrics["score"] > best
        best = max(best, metrics["score"])
        history.append(metrics)
        w.log(f"fine-tune epoch {epoch}  score {metrics['score']:.4f}{'  *best*' if improved else ''}")

        def save(folder: Path) -> None:
            cofi.save_pruned(engine.module, folder)
            w.tokenizer.save_pretrained(folder)
            write_run_files(folder, cfg, metrics, history)

        w.report(metrics, save if improved else None)


def squat(w: Worker) -> None:
    """kind: squat: low-bit LSQ quantization-aware training of a copy of the teacher (model: a checkpoint), with
    SAM/ASAM on the latent weights alternating with steps on the step sizes (flatray.methods.squat), distilled from the
    teacher. A checkpoint holds the exported model (integer codes packed at b bits + step sizes)."""
    from functools import partial

    import torch

    from flatray import models
    from flatray.methods import lsq
    from flatray.methods import squat as squat_lib
    from flatray.train.engine import autocast

    cfg, sq = w.cfg, w.cfg.squat
    sampler, loader = train_loader(w)
    seed_everything(cfg.train.seed)
    extra = {"attn_implementation": "eager"} if sq.kd_attention else {}  # attention probabilities need eager
    teacher = models.load_model(cfg.model, w.spec, **extra).to(w.device).eval().requires_grad_(False)
    student = models.load_model(cfg.model, w.spec, **extra)
    lsq.quantize_model(student, lsq.QuantSpec(
        weight_bits=sq.weight_bits, act_bits=sq.act_bits, symmetric=sq.symmetric, embedding_bits=sq.embedding_bits,
        init_scale=sq.init_scale, layers=sq.layers))
    student.to(w.device)
    with torch.no_grad():  # activation step sizes start from one batch, the same on every worker
        calibration = w.collate([w.tokenized.train[i] for i in range(min(cfg.train.batch_size, len(w.tokenized.train)))])
        student(**{k: v.to(w.device) for k, v in calibration.items()})
    latent = lsq.latent_params(student)
    engine = squat_lib.build_engine(student, cfg, w.world, total_steps=cfg.train.epochs * len(loader))
    seed_everything(cfg.train.seed + w.rank)

    best, history, best_state = -float("inf"), [], None
    for epoch in range(1, cfg.train.epochs + 1):
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        losses = []
        for batch in loader:
            batch = {k: v.to(w.device) for k, v in batch.items()}
            with torch.no_grad(), autocast(cfg, w.device):
                target = teacher(**batch, output_hidden_states=bool(sq.kd_hidden), output_attentions=bool(sq.kd_attention))
            loss_fn = partial(distillation_loss, teacher_out=target, cfg=cfg)
            losses.append(squat_lib.squat_step(engine, batch, cfg, loss_fn, latent))
        metrics = {**w.evaluate(engine.module), **lsq.level_fractions(engine.module), **lsq.mean_step_sizes(engine.module),
                   "epoch": epoch, "train_loss": float(np.mean(losses)), "epoch_seconds": time.perf_counter() - start}
        improved = metrics["score"] > best
        best = max(best, metrics["score"])
        history.append(metrics)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(w.spec.eval_splits))
        w.log(f"epoch {epoch}/{cfg.train.epochs}  train_loss {metrics['train_loss']:.4f}  {shown}"
              f"{'  *best*' if improved else ''}")
        if improved and cfg.sharpness.enabled:
            best_state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}

        def save(folder: Path, metrics=metrics) -> None:
            lsq.export(engine.module, folder / lsq.EXPORT_FILE)
            metrics["export_bytes"] = (folder / lsq.EXPORT_FILE).stat().st_size
            w.tokenizer.save_pretrained(folder)
            write_run_files(folder, cfg, metrics, history)

        w.report(metrics, save if improved else None)

    if cfg.sharpness.enabled:
        # As in finetune: the best dev model's sharpness, reported with its checkpoint (and export size) as the
        # last word, so summary.json and W&B have them whichever epoch was best.
        engine.module.load_state_dict(best_state)
        final = {k: v for k, v in max(history, key=lambda m: m["score"]).items() if k != "export_bytes"}
        final.update(sharpness_metrics(w, engine.module))
        w.report(final, lambda folder: save(folder, final))


def distillation_loss(model, batch: dict, teacher_out, cfg: RunConfig):
    """SQuAT's objective: weighted task loss + logit KD (+ hidden-state and attention MSE) to the teacher."""
    import torch.nn.functional as F

    from flatray.methods.cofi import kd_loss

    sq = cfg.squat
    out = model(**batch, output_hidden_states=bool(sq.kd_hidden), output_attentions=bool(sq.kd_attention))
    loss = sq.task_loss * out.loss if sq.task_loss else 0.0
    if sq.kd_logits:
        pairs = ([(out.start_logits, teacher_out.start_logits), (out.end_logits, teacher_out.end_logits)]
                 if hasattr(out, "start_logits") else [(out.logits, teacher_out.logits)])
        loss = loss + sq.kd_logits * sum(kd_loss(s, t, sq.kd_temperature) for s, t in pairs) / len(pairs)
    if sq.kd_hidden:
        loss = loss + sq.kd_hidden * sum(F.mse_loss(s, t) for s, t in zip(out.hidden_states, teacher_out.hidden_states))
    if sq.kd_attention:
        loss = loss + sq.kd_attention * sum(F.mse_loss(s, t) for s, t in zip(out.attentions, teacher_out.attentions))
    return loss


def sharpness_metrics(w: Worker, module) -> dict[str, float]:
    """epsilon-sharpness on the first `samples` training examples, computed on rank 0 (the others wait)."""
    from functools import partial

    from flatray.methods.sharpness import eval_subset_loss, sharpness_many

    if w.rank != 0:
        return {}
    s = w.cfg.sharpness
    subset = w.tokenized.train.select(range(min(s.samples, len(w.tokenized.train))))
    size = w.cfg.train.eval_batch_size
    batches = [w.collate([subset[j] for j in range(i, min(i + size, len(subset)))]) for i in range(0, len(subset), size)]
    batches = [{k: v.to(w.device) for k, v in b.items()} for b in batches]
    values = sharpness_many(module, partial(eval_subset_loss, batches=batches), eps_values=tuple(s.eps), dim=s.dim,
                            max_iter=s.max_iter, seed=w.cfg.train.seed)
    w.log("  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return values


def measure_only(w: Worker) -> None:
    """kind: sharpness: the dev metrics and the sharpness of a finished model (model: its checkpoint)."""
    from flatray import models

    model = models.load_model(w.cfg.model, w.spec).to(w.device)
    metrics = {**w.evaluate(model), **sharpness_metrics(w, model)}

    def save(folder: Path) -> None:  # Ray keeps a run's results with its checkpoints: the numbers, no weights
        write_run_files(folder, w.cfg, metrics)

    w.report(metrics, save)


def post_training_quantization(w: Worker) -> None:
    """kind: ptq: dynamic int8 quantization of a finished model (model: its checkpoint), on the CPU: dev metric,
    serialized size and latency per dev batch, before and after. The checkpoint holds the int8 state_dict."""
    from flatray import models
    from flatray.methods import ptq as quantize

    float_model = models.load_model(w.cfg.model, w.spec).eval()
    int8_model = quantize.quantize_dynamic_int8(float_model, embeddings=w.cfg.ptq.embeddings)
    metrics = {}
    for name, model in (("float", float_model), ("int8", int8_model)):
        metrics.update({f"{name}/{k}": v for k, v in w.evaluate(model).items()})
    metrics["score"] = metrics["int8/score"]
    if w.rank == 0:
        first = next(iter(w.tokenized.evals.values())).features
        size = w.cfg.train.eval_batch_size
        n = min(len(first), size * w.cfg.ptq.latency_batches)
        batches = [w.collate([first[j] for j in range(i, min(i + size, n))]) for i in range(0, n, size)]
        for name, model in (("float", float_model), ("int8", int8_model)):
            metrics[f"{name}/size_mb"] = quantize.serialized_bytes(model) / 2**20
            metrics[f"{name}/latency_ms"] = 1000 * quantize.cpu_latency(model, batches)
        metrics["size_ratio"] = metrics["float/size_mb"] / metrics["int8/size_mb"]
        metrics["speedup"] = metrics["float/latency_ms"] / metrics["int8/latency_ms"]
        w.log("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def save(folder: Path) -> None:
        import torch

        torch.save(int8_model.state_dict(), folder / quantize.INT8_FILE)
        float_model.config.save_pretrained(folder)
        w.tokenizer.save_pretrained(folder)
        write_run_files(folder, w.cfg, metrics)

    w.report(metrics, save)
