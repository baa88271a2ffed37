"""Matplotlib helpers of the report: figures drawn off-screen (Agg, no pyplot) and saved as PNG into the report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

COLORS = {"adam": "tab:blue", "sam": "tab:orange", "asam": "tab:green"}


def _figure(n_panels: int, width: float = 5.0, height: float = 3.8, ncols: int = 3):
    """An Agg-rendered figure (no pyplot, no display) with one axes per panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(n_panels, ncols))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _log_x(ax) -> None:
    """A log x axis labelled at 1, 2, 5 x 10^k in plain numbers (learning rates span a decade or two)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _save(fig, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=110)
    return name


def _yerr(std: pd.Series) -> np.ndarray:
    """Error bars of a std column: none (0) where the std is undefined (one trial)."""
    return np.nan_to_num(std.to_numpy(dtype=float), nan=0.0)
