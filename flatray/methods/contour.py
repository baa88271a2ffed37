"""Loss contours (P1 A.2, Figure 6; the plane of Garipov et al. 2018 and Li et al. 2018): the loss on the plane
through w_init (the pretrained weights), w_adam and w_sam.

The plane. With d1 = w_adam - w_init and d2 = w_sam - w_init, Gram-Schmidt gives the orthonormal basis
u = d1 / |d1|, v = (d2 - (d2.u) u) / |d2 - (d2.u) u|, and the point (x, y) is w_init + x u + y v: w_init is (0, 0),
w_adam (|d1|, 0) and w_sam (d2.u, |d2 - (d2.u) u|), so lengths in the figure are distances in weight space. The
grid has `grid` points per axis over the three points' extent, widened by `margin` times it on each side.

The head. The plane holds every weight the pretrained checkpoint has (embeddings, encoder, pooler). The task head
(what it lacks, which from_pretrained reports as newly initialized: BERT's classifier) has no w_init: each
fine-tuning run trained its own, so the head is not on the plane. P1 evaluates "each model with its own head";
flatray reads that as one surface per fine-tuned model: the whole grid is evaluated with w_adam's head, and again
with w_sam's, so that each model's basin is measured with the head it was trained with (the figure shows both).

The loss is the model's own (cross-entropy; MSE for STS-B; the span loss for SQuAD), the mean over the first
`samples` examples of the training set (or of the first dev split), in eval mode (no dropout) and fp32; the accuracy
too for classification tasks. It takes 2 x (grid^2 + 3) passes over the subset, on rank 0 (run it on one worker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flatray import storage
from flatray.methods import CONTOUR_FILE


@dataclass
class Plane:
    origin: list[torch.Tensor]  # w_init, one tensor per parameter on the plane
    u: list[torch.Tensor]
    v: list[torch.Tensor]
    points: dict[str, tuple[float, float]]  # "init" and each model's label -> its (x, y)


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(float(torch.sum(x.double() * y.double())) for x, y in zip(a, b))


def plane(w_init: list[torch.Tensor], w_first: list[torch.Tensor], w_second: list[torch.Tensor],
          labels: tuple[str, str] = ("adam", "sam")) -> Plane:
    """The plane through three points of weight space (lists of tensors of the same shapes), by Gram-Schmidt."""
    d1 = [a - o for a, o in zip(w_first, w_init)]
    d2 = [b - o for b, o in zip(w_second, w_init)]
    n1 = math.sqrt(_dot(d1, d1))
    if n1 == 0:
        raise ValueError(f"w_{labels[0]} equals w_init on the plane's weights: no plane through the three models")
    u = [d / n1 for d in d1]
    along = _dot(d2, u)
    rest = [d - along * e for d, e in zip(d2, u)]
    n2 = math.sqrt(_dot(rest, rest))
    if n2 <= 1e-6 * math.hypot(along, n2):
        raise ValueError(f"w_init, w_{labels[0]} and w_{labels[1]} lie on one line: no plane through them")
    v = [r / n2 for r in rest]
    return Plane(list(w_init), u, v, {"init": (0.0, 0.0), labels[0]: (n1, 0.0), labels[1]: (along, n2)})


def axes(points: dict[str, tuple[float, float]], grid: int, margin: float) -> tuple[list[float], list[float]]:
    """The grid's x and y values: the points' extent on each axis, widened by `margin` times it on each side."""
    def spread(values):
        low, high = min(values), max(values)
        pad = margin * (high - low)
        return torch.linspace(low - pad, high + pad, grid, dtype=torch.float64).tolist()

    return spread([p[0] for p in points.values()]), spread([p[1] for p in points.values()])


@torch.no_grad()
def _move_to(params: list[torch.nn.Parameter], plane_: Plane, x: float, y: float) -> None:
    for p, o, a, b in zip(params, plane_.origin, plane_.u, plane_.v):
        p.copy_(o).add_(a, alpha=x).add_(b, alpha=y)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict], classify: bool) -> tuple[float, float | None]:
    """The mean loss over the examples of `batches` (and the accuracy when `classify`), in eval mode."""
    total, correct, n = 0.0, 0, 0
    for batch in batches:
        out = model(**batch)
        size = len(batch["input_ids"])
        total += float(out.loss) * size  # out.loss is the batch's mean
        n += size
        if classify:
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    return total / n, correct / n if classify else None


def loss_surface(base: str, checkpoints: list[str], labels: list[str], spec, batches: list[dict], grid: int,
                 margin: float, device) -> dict:
    """The loss on the plane through `base` (w_init) and the two fine-tuned `checkpoints`, at every grid point
    with each checkpoint's head: what contour.json holds. loss[label][j][i] is at (x[i], y[j]) with label's head."""
    from flatray import models

    probe, info = models.load_model(base, spec, output_loading_info=True)  # its own new head is never used
    head = set(info["missing_keys"]) | {m[0] if isinstance(m, (tuple, list)) else m for m in info["mismatched_keys"]}
    probe = probe.to(device, torch.float32).eval()
    params = dict(probe.named_parameters())
    on_plane = [n for n in params if n not in head]
    head_names = [n for n in params if n in head]
    trained = []
    for path in checkpoints:
        weights = {n: p.detach().to(device, torch.float32) for n, p in models.load_model(path, spec).named_parameters()}
        if {n: tuple(w.shape) for n, w in weights.items()} != {n: tuple(p.shape) for n, p in params.items()}:
            raise ValueError(f"{path}: its parameters differ from those of {base} with a {spec.name} head; expected a "
                             f"model fine-tuned from {base}")
        trained.append(weights)
    origin = [params[n].detach().clone() for n in on_plane]
    basis = plane(origin, [trained[0][n] for n in on_plane], [trained[1][n] for n in on_plane], tuple(labels))
    heads = {label: [weights[n] for n in head_names] for label, weights in zip(labels, trained)}
    del trained
    xs, ys = axes(basis.points, grid, margin)
    classify = spec.kind == "classification"
    moving, head_params = [params[n] for n in on_plane], [params[n] for n in head_names]

    def measure(x: float, y: float) -> dict[str, tuple[float, float | None]]:
        _move_to(moving, basis, x, y)
        out = {}
        for label, weights in heads.items():
            with torch.no_grad():
                for p, w in zip(head_params, weights):
                    p.copy_(w)
            out[label] = evaluate(probe, batches, classify)
        return out

    loss = {label: [[math.nan] * len(xs) for _ in ys] for label in labels}
    accuracy = {label: [[math.nan] * len(xs) for _ in ys] for label in labels} if classify else None
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            for label, (value, acc) in measure(x, y).items():
                loss[label][j][i] = value
                if classify:
                    accuracy[label][j][i] = acc
    at_points = {name: measure(*xy) for name, xy in basis.points.items()}
    return {"labels": list(labels), "head": head_names, "samples": sum(len(b["input_ids"]) for b in batches),
            "x": xs, "y": ys, "points": {name: list(xy) for name, xy in basis.points.items()},
            "loss": loss, "accuracy": accuracy,
            "point_loss": {label: {name: at[label][0] for name, at in at_points.items()} for label in labels},
            "point_accuracy": {label: {name: at[label][1] for name, at in at_points.items()} for label in labels}
            if classify else None}


def summary_metrics(surface: dict) -> dict[str, float]:
    """The run's metrics: the models' coordinates and distances, and the loss at each of the three points with each
    head (the grid itself is in contour.json)."""
    first, second = surface["labels"]
    (x1, _), (x2, y2) = surface["points"][first], surface["points"][second]
    # Tune wants a score in every result; a contour measures a plane, not one model: it has none (null in summary.json)
    metrics = {"score": math.nan, "contour/grid": len(surface["x"]), "contour/samples": surface["samples"],
               f"contour/x/{first}": x1, f"contour/x/{second}": x2, f"contour/y/{second}": y2,
               f"contour/distance/{first}": x1, f"contour/distance/{second}": math.hypot(x2, y2),
               "contour/cosine": x2 / math.hypot(x2, y2)}
    for head, losses in surface["point_loss"].items():
        metrics.update({f"contour/loss/{head}_head/{name}": value for name, value in losses.items()})
    return metrics


def _dev_features(ctx, n: int):
    """The first n examples of the first dev split, with their labels (dev features are encoded without them)."""
    eval_set = next(iter(ctx.tokenized.evals.values()))
    n = min(n, len(eval_set.features))
    return eval_set.features.select(range(n)).add_column("labels", eval_set.labels[:n].tolist())


def run(ctx) -> None:
    """kind: contour: the loss surface of `model` (w_init) and contour.models (a sweep: its group's parent trials),
    computed on rank 0 (the other workers wait); contour.json in the checkpoint, the three points in the metrics."""
    from flatray.train.checkpoint import write_run_files

    c = ctx.cfg.contour
    surface, metrics = None, {"score": math.nan}
    if ctx.rank == 0:
        features = ctx.tokenized.train if c.split == "train" else _dev_features(ctx, c.samples)
        surface = loss_surface(ctx.cfg.model, [storage.local_copy(m) for m in c.models], c.labels, ctx.spec,
                               ctx.batches(features, c.samples), c.grid, c.margin, ctx.device)
        metrics = summary_metrics(surface)
        ctx.log("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def save(folder) -> None:
        (folder / CONTOUR_FILE).write_text(storage.strict_json(surface))
        write_run_files(folder, ctx.cfg, metrics)

    ctx.report(metrics, save)
