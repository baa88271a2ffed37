"""finetune, imp and transfer: Adam/SAM/ASAM epochs in a DeepSpeed engine, masked for IMP levels and ticket transfers.

An IMP level ranks its parent's trained weights and rewinds the survivors to theta_0; a transfer re-trains theta_0
under a given mask (flatray.methods.imp.setup reads both from the run's `prune` section). A checkpoint every epoch
(the best one is the run's model); the best model's sharpness at the end when `sharpness.enabled`.
"""

from __future__ import annotations

from flatray import models
from flatray.methods import imp
from flatray.train import checkpoint, loop
from flatray.train.context import RunContext, seed_everything
from flatray.train.engine import build_engine, train_step


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    loader = ctx.train_loader()
    seed_everything(cfg.train.seed)  # same head init on every worker (DeepSpeed also broadcasts rank 0's weights)
    model = models.load_model(cfg.model, ctx.spec)
    masked, masks, mask_meta = imp.setup(model, cfg.prune, cfg.train.seed)  # before the engine copies weights
    prunable = list(imp.prunable_weights(model).values())
    history = ctx.resumed.history if ctx.resumed else []  # the engine's state comes back in loop.run_phase
    engine = build_engine(model, cfg, ctx.world, total_steps=cfg.train.epochs * len(loader))
    seed_everything(cfg.train.seed + ctx.rank)  # dropout masks differ across workers, reproducibly

    def epoch_metrics() -> dict:
        if masked:
            masked.enforce()  # a guard: the masked gradients already keep pruned weights at exactly zero
        return {"sparsity": imp.zero_fraction(prunable)}

    phase = loop.Phase(
        engine, loader, range(1, cfg.train.epochs + 1),
        step=lambda batch, _: train_step(engine, batch, cfg),
        save=lambda folder, metrics, hist: checkpoint.save_model(folder, engine.module, ctx.tokenizer, cfg, metrics,
                                                                 hist, masks, mask_meta),
        metrics=epoch_metrics, keep_best=cfg.sharpness.enabled)
    loop.run_phase(ctx, phase, history)
    if cfg.sharpness.enabled:
        loop.report_best_with_sharpness(ctx, phase, history)
