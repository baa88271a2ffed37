"""One-shot magnitude pruning without retraining (P1 A.3, Figure 7).

A finished model (`model`: the parent's best checkpoint) is pruned by one global L1 magnitude ranking over the
prunable set, the set and ranking IMP uses (METHODS.md section 3, flatray.methods.imp), to each sparsity of
`oneshot.sparsities`, and evaluated on the dev set as it is: no retraining, no rewinding. Each sparsity prunes the
trained weights afresh, not the previous sparsity's survivors. The dense model (0%) is evaluated first, so the curve
starts from the parent's own score.
"""

from __future__ import annotations

import torch

from flatray.methods import imp


def key(sparsity: float, metric: str) -> str:
    """The run metric of one sparsity, e.g. "oneshot/0.05/score" ("oneshot/0/score": the dense model)."""
    return f"oneshot/{sparsity:g}/{metric}"


@torch.no_grad()
def prune_to(weights: dict[str, torch.nn.Parameter], trained: dict[str, torch.Tensor], target: float) -> imp.Masks:
    """Set the prunable `weights` to the `trained` values pruned to `target` by global magnitude; the masks."""
    masks = imp.magnitude_masks(trained, target)
    for name, weight in weights.items():
        weight.copy_(trained[name] * masks[name])
    return masks


def run(ctx) -> None:
    """kind: oneshot: the parent's model at 0% and at each of `oneshot.sparsities`, one dev evaluation each. One
    report per sparsity (W&B's history: `target_sparsity`, the measured `sparsity` and the dev metrics); the last
    also carries every sparsity's metrics as `oneshot/<sparsity>/<metric>` and the checkpoint (the numbers, no
    weights: history.json holds one row per sparsity). `score` is the last, most pruned model's."""
    from flatray import models
    from flatray.train.checkpoint import write_run_files

    model = models.load_model(ctx.cfg.model, ctx.spec).to(ctx.device).eval()
    weights = imp.prunable_weights(model, imp.include_pooler(ctx.cfg.prune, ctx.cfg.model))
    trained = {name: w.detach().clone() for name, w in weights.items()}
    targets = [0.0, *ctx.cfg.oneshot.sparsities]
    rows: list[dict] = []
    for i, target in enumerate(targets):
        if target:
            prune_to(weights, trained, target)
        row = {"target_sparsity": target, "sparsity": imp.zero_fraction(weights.values()), **ctx.evaluate(model)}
        rows.append(row)
        ctx.log(f"one-shot {100 * target:g}%: measured sparsity {row['sparsity']:.4f}, score {row['score']:.4f}")
        if i < len(targets) - 1:
            ctx.report(row)
    every = {key(r["target_sparsity"], k): v for r in rows for k, v in r.items() if k != "target_sparsity"}
    metrics = {**rows[-1], **every}
    ctx.report(metrics, lambda folder: write_run_files(folder, ctx.cfg, metrics, history=rows))
