"""finetune, imp and transfer: Adam/SAM/ASAM epochs in a DeepSpeed engine, masked for IMP levels and ticket transfers.

An IMP level ranks its parent's trained weights and rewinds the survivors to theta_0; a transfer re-trains theta_0
under a given mask (flatray.methods.imp.setup reads both from the run's `prune` section). A checkpoint every epoch
(the best one is the run's model); the best model's sharpness at the end when `sharpness.enabled`.

`train.l1` adds lambda * sum |w| over the prunable weights to the loss (P1 A.7). With `swa.enabled` the run's model
is the average of the weights at SWA's points instead of the best epoch (flatray.train.swa): evaluated, measured
(sharpness), checkpointed and handed to a next IMP level; the epoch checkpoints are then never the run's model.
"""

from __future__ import annotations

from flatray import models
from flatray.methods import imp
from flatray.train import checkpoint, loop, swa
from flatray.train.context import RunContext, seed_everything
from flatray.train.engine import build_engine, model_loss, train_step, with_l1


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    loader = ctx.train_loader()
    seed_everything(cfg.train.seed)  # same head init on every worker (DeepSpeed also broadcasts rank 0's weights)
    model = models.load_model(cfg.model, ctx.spec)
    with_pooler = imp.include_pooler(cfg.prune, cfg.model) if cfg.prune.active or cfg.train.l1 else True
    masked, masks, mask_meta = imp.setup(model, cfg.prune, cfg.train.seed, with_pooler)  # before the engine copies
    prunable = list(imp.prunable_weights(model, with_pooler).values())
    if masks is not None:
        mask_meta["include_pooler"] = with_pooler  # recorded in the mask file
    history = ctx.resumed.history if ctx.resumed else []  # the engine's state comes back in loop.run_phase
    engine = build_engine(model, cfg, ctx.world, total_steps=cfg.train.epochs * len(loader))
    loss_fn = with_l1(model_loss, prunable, cfg.train.l1) if cfg.train.l1 else model_loss
    averager = swa.Averager(engine.module, cfg, len(loader)) if cfg.swa.enabled else None  # copies the weights
    seed_everything(cfg.train.seed + ctx.rank)  # dropout masks differ across workers, reproducibly

    def step(batch: dict, done: int) -> float:
        loss = train_step(engine, batch, cfg, loss_fn)
        if averager:
            averager.update(engine.module, done + 1)
        return loss

    def epoch_metrics() -> dict:
        if masked:
            masked.enforce()  # a guard: the masked gradients already keep pruned weights at exactly zero
        metrics = {"sparsity": imp.zero_fraction(prunable)}
        if cfg.train.l1:
            metrics["l1_norm"] = float(sum(w.detach().abs().sum() for w in prunable))  # sum |w|, prunable set
        return metrics

    phase = loop.Phase(
        engine, loader, range(1, cfg.train.epochs + 1), step=step,
        save=lambda folder, metrics, hist: checkpoint.save_model(folder, engine.module, ctx.tokenizer, cfg, metrics,
                                                                 hist, masks, mask_meta),
        metrics=epoch_metrics, output=averager is None, keep_best=cfg.sharpness.enabled and averager is None,
        state=averager.state_dict if averager else None, load_state=averager.load_state_dict if averager else None)
    loop.run_phase(ctx, phase, history)
    if averager:
        loop.report_average(ctx, phase, history, averager)
    elif cfg.sharpness.enabled:
        loop.report_best_with_sharpness(ctx, phase, history)
