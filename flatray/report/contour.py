"""Report section of loss contours (P1 A.2, Figure 6): each contour trial's loss on the plane through w_init, w_adam
and w_sam, one panel per head (flatray.methods.contour), the three models marked. The grids are read from each
trial's contour.json, which its summary.json names (`outputs.contour`, a local path or an s3:// / gs:// URI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from flatray import storage
from flatray.methods import CONTOUR_FILE
from flatray.report.figures import COLORS, _figure, _save
from flatray.report.tables import Section, _done, _markdown, _task_key

MARKERS = ("o", "s", "^")  # w_init, then the two fine-tuned models


def read_surface(root: Path, tid: str) -> dict | None:
    """A contour trial's contour.json, or None. A sweep folder copied elsewhere still finds it: the checkpoint's
    path below the trial folder, under this root."""
    summary = storage.read_json(str(root / tid / "summary.json")) or {}
    path = (summary.get("outputs") or {}).get("contour")
    if not path:
        return None
    surface = storage.read_json(path)
    if surface is None and f"/{tid}/" in path:
        surface = storage.read_json(str(root / tid / path.split(f"/{tid}/", 1)[1]))
    return surface


def _panel(fig, ax, surface: dict, head: str, title: str) -> None:
    from matplotlib.colors import LogNorm

    x, y = np.asarray(surface["x"]), np.asarray(surface["y"])
    loss = np.ma.masked_invalid(np.array(surface["loss"][head], dtype=float))
    low, high = float(loss.min()), float(loss.max())
    if 0 < low < high:  # losses span decades away from the minima: log-spaced levels
        filled = ax.contourf(x, y, loss, levels=np.geomspace(low, high, 16), norm=LogNorm(low, high), cmap="viridis")
    else:
        filled = ax.contourf(x, y, loss, levels=15, cmap="viridis")
    ax.contour(x, y, loss, levels=filled.levels, colors="k", linewidths=0.3, alpha=0.5)
    fig.colorbar(filled, ax=ax, label="loss", format="%.3g")
    for (name, (px, py)), marker in zip(surface["points"].items(), MARKERS):
        ax.plot(px, py, marker=marker, markersize=10, linestyle="none", markeredgecolor="k",
                color=COLORS.get(name, "white"), label=f"w_{name}")
    first, second = surface["labels"]
    ax.set(title=title, xlabel=f"u: toward w_{first} (distance in weight space)",
           ylabel=f"v: toward w_{second}, orthogonal to u")
    ax.set_aspect("equal", adjustable="box")  # lengths are distances: one scale on both axes
    ax.legend(fontsize="small", loc="best")


def contour_figure(df: pd.DataFrame, out: Path) -> Section:
    """P1 Figure 6: the loss surface of every finished contour trial, with each fine-tuned model's head."""
    sec = Section("Loss contours (P1 Figure 6)",
                  "The loss on the plane through the pretrained weights w_init and the two fine-tuned models, in "
                  "weight-space distances (orthonormal basis by Gram-Schmidt: u toward the first model, v toward "
                  "the second, orthogonal to u). The head is not on the plane (w_init has none): each panel "
                  "evaluates the whole plane with one model's own head. Mean loss over the trial's fixed subset "
                  "(contour.samples examples of contour.split).")
    done = _done(df, "contour")
    if done.empty:
        sec.missing.append("no finished contour trial: no loss contours")
        return sec
    done = done.assign(_order=[_task_key(t) for t in done["task"]]).sort_values(["_order", "seed", "id"])
    surfaces, rows = [], []
    for trial in done.itertuples():
        surface = read_surface(out.parent, trial.id)
        if surface is None:
            sec.missing.append(f"contour trial {trial.id} ({trial.task}): its {CONTOUR_FILE} cannot be read")
            continue
        surfaces.append((trial, surface))
        first, second = surface["labels"]
        (x1, _), (x2, y2) = surface["points"][first], surface["points"][second]
        for head in surface["labels"]:
            losses = surface["point_loss"][head]
            rows.append({"task": trial.task, "seed": trial.seed, "head": head, "id": trial.id,
                         "loss at w_init": losses["init"], f"loss at w_{first}": losses[first],
                         f"loss at w_{second}": losses[second], f"|w_{first} - w_init|": x1,
                         f"|w_{second} - w_init|": float(np.hypot(x2, y2)), "samples": surface["samples"]})
    if not surfaces:
        return sec
    table = pd.DataFrame(rows)
    sec.tables["contours"] = table
    sec.markdown["contours"] = _markdown(table.map(lambda v: f"{v:.4g}" if isinstance(v, float) else v))
    fig, axes = _figure(2 * len(surfaces), width=6.0, height=5.0, ncols=2)
    for k, (trial, surface) in enumerate(surfaces):
        for ax, head in zip(axes[2 * k:2 * k + 2], surface["labels"]):
            _panel(fig, ax, surface, head, f"{trial.task}, seed {trial.seed}: loss with w_{head}'s head")
    fig.suptitle("Loss on the plane through w_init and the two fine-tuned models")
    sec.figures.append(_save(fig, out, "contours.png"))
    return sec
