"""Cheaper SAM: a SAM/ASAM step on a part of the steps only (issue 14; docs/TRAINING.md, "Cheaper SAM").

Which steps are SAM steps (`optimizer.sam_every`, `optimizer.sam_fraction`):
  - scheduled: every k-th step, steps 0, k, 2k, ... (k = 1 is plain SAM);
  - stochastic (SS-SAM, Zhao et al. 2022, arXiv 2203.09962): each step with probability p, drawn from the run seed
    and the step number, so every worker takes the same decision and a resumed run draws what it would have drawn.

What the other steps do (`optimizer.sam_between`):
  - adam: the plain gradient g = grad L(w);
  - looksam (Liu et al. 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR, Algorithm 1):
    at a SAM step, with g and the SAM gradient g_s = grad L(w + e), keep the part of g_s orthogonal to g,
        g_v = g_s - <g, g_s> / ||g||^2 * g         (= g_s - ||g_s|| cos(theta) g / ||g||)
    and at the steps in between step along
        g + alpha * ||g|| / ||g_v|| * g_v.
Norms and inner products run over every parameter that has a gradient, in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EPS = 1e-12
Grads = Sequence[torch.Tensor | None]


def sam_step_due(every: int, fraction: float, seed: int, step: int) -> bool:
    """Is optimizer step `step` (0-based, steps applied so far) a SAM step?"""
    if every > 1:
        return step % every == 0
    if fraction >= 1:
        return True
    draw = torch.Generator().manual_seed(seed * 1_000_003 + step)  # not torch's global RNG: dropout keeps its draws
    return torch.rand((), generator=draw).item() < fraction


def _dot(a: Grads, b: Grads) -> torch.Tensor:
    pairs = [(x.float().reshape(-1), y.float().reshape(-1)) for x, y in zip(a, b) if x is not None and y is not None]
    return torch.stack([x @ y for x, y in pairs]).sum() if pairs else torch.zeros(())


@torch.no_grad()
def orthogonal(g: Grads, g_sam: Grads) -> list[torch.Tensor | None]:
    """LookSAM's g_v: the part of the SAM gradient orthogonal to the plain gradient (float32)."""
    coef = _dot(g, g_sam) / (_dot(g, g) + EPS)
    return [None if s is None else s.float() - coef * (x.float() if x is not None else 0) for x, s in zip(g, g_sam)]


@torch.no_grad()
def reconstruct(g: Grads, g_v: Grads, alpha: float) -> list[torch.Tensor | None]:
    """LookSAM's direction between SAM steps: g + alpha ||g|| / ||g_v|| g_v (in g's dtypes)."""
    factor = alpha * _dot(g, g).sqrt() / (_dot(g_v, g_v).sqrt() + EPS)
    return [None if x is None else (x.float() + factor * v if v is not None else x.float()).to(x.dtype)
            for x, v in zip(g, g_v)]
