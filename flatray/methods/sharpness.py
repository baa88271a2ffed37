"""Sharpness of a minimum (METHODS.md section 7; Keskar et al. 2017, as in Mehta et al. 2021 and P1).

    phi = 100 * (max_{z in C} L(w + A z) - L(w)) / (1 + L(w)),   C = { z : |z_j| <= eps * (|(A^+ w)_j| + 1) }

The max is found by L-BFGS-B (scipy, `maxiter` iterations, bounds C) minimising -L from z = 0, on the loss of a fixed
evaluation subset (`loss_fn`, e.g. `functools.partial(eval_subset_loss, batches=...)`), in eval mode.

Projection. Keskar et al. draw A as a dense random n x p matrix. For BERT n is 22M-110M, so a dense A (and its
pseudo-inverse) would take n * p floats (44 GB for BERT-base at p = 100) and does not fit. We use a random *hashing*
projection instead: element i of the flattened parameters gets one direction h(i) in [0, p) and a sign s(i) in
{-1, +1}, both drawn from a seeded torch.Generator, and A[i, h(i)] = s(i), 0 elsewhere. Its columns have disjoint
supports, so A^T A = diag(c) with c_j = #{i : h(i) = j}, and the pseudo-inverse is exact and cheap:
A^+ = diag(1/c) A^T. Then A z = s * z[h], A^T g = scatter-add of s * g into p bins, and A^+ w = (A^T w) / c, all
O(n) time and memory (h stored as int16 when p fits, s as int8). `dim=None` is the full-space variant (A = identity,
z has n entries): exact, but only practical for small models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.optimize
import torch

EPS_VALUES = (5e-3, 1e-3, 5e-4)  # what P1 reports


@dataclass(frozen=True)
class SharpnessResult:
    phi: float  # 100 * (max_loss - loss) / (1 + loss)
    loss: float  # L(w)
    max_loss: float  # the largest L(w + A z) found in C
    eps: float
    dim: int | None  # p; None = full space
    evaluations: int  # function evaluations of L-BFGS-B
    forward_backward: int  # forward + backward passes: the cost of the measurement


class HashProjection:
    """A in R^{n x dim} with one signed +-1 per row (see the module docstring), over the tensors `params`.

    Vectors in R^n are lists of tensors shaped like `params`; vectors in R^dim are 1-D float64 tensors.
    """

    def __init__(self, params, dim: int, seed: int = 0):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same A on every device
        small = torch.int16 if dim <= torch.iinfo(torch.int16).max else torch.int32
        self.h, self.s = [], []
        for p in params:
            self.h.append(torch.randint(0, dim, p.shape, generator=gen, dtype=small).to(p.device))
            self.s.append((torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8) * 2 - 1).to(p.device))
        device = self.h[0].device if self.h else torch.device("cpu")
        self.counts = torch.zeros(dim, dtype=torch.float64, device=device)
        for h in self.h:
            self.counts += torch.bincount(self._index(h), minlength=dim).to(device, torch.float64)

    @staticmethod
    def _index(h):
        return h.flatten().int()  # indexing and bincount take int32/int64, not int16

    def project(self, z: torch.Tensor) -> list[torch.Tensor]:
        """A z."""
        return [s * z.to(s.device)[self._index(h)].view(s.shape) for h, s in zip(self.h, self.s)]

    def transpose(self, vs) -> torch.Tensor:
        """A^T v: the signed entries of v summed per direction."""
        out = torch.zeros(self.dim, dtype=torch.float64, device=self.counts.device)
        for h, s, v in zip(self.h, self.s, vs):
            weights = (s * v.to(torch.float64)).flatten()
            out += torch.bincount(self._index(h), weights=weights, minlength=self.dim).to(out.device)
        return out

    def pinv(self, vs) -> torch.Tensor:
        """A^+ v = diag(1/c) A^T v; a direction no element hashed to is a zero column of A, so a zero row of A^+."""
        return self.transpose(vs) / self.counts.clamp(min=1)


class IdentityProjection:
    """A = identity (the full-space variant), with the same interface as HashProjection."""

    def __init__(self, params):
        self.shapes = [p.shape for p in params]
        self.dim = sum(p.numel() for p in params)

    def project(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [part.view(shape) for part, shape in zip(z.split([s.numel() for s in self.shapes]), self.shapes)]

    def transpose(self, vs) -> torch.Tensor:
        return torch.cat([v.detach().to(torch.float64).cpu().flatten() for v in vs])

    pinv = transpose


def eval_subset_loss(model: torch.nn.Module, batches: list[dict]) -> torch.Tensor:
    """Mean of `model(**batch).loss` over already-collated batches (moved to the model's device), with its graph."""
    device = next(model.parameters()).device
    losses = [model(**{k: v.to(device) for k, v in batch.items()}).loss for batch in batches]
    return torch.stack(losses).mean()


def weight_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What phi perturbs by default: the trainable parameters that are weights, not LSQ step sizes."""
    from flatray.methods.lsq import latent_params

    return latent_params(model)


def sharpness(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor], eps: float,
              dim: int | None = 100, max_iter: int = 10, seed: int = 0,
              params: list[torch.nn.Parameter] | None = None) -> SharpnessResult:
    """phi of `model` at its current weights; the weights come back bit-identical and each module's mode restored.

    `params` defaults to the model's weights: every trainable parameter except LSQ step sizes. A step size (~0.01)
    is a setting of the quantizer, not a weight, and its box eps * (|.| + 1) is ~100x its own size, so it would
    dominate phi; for an LSQ model phi is measured over the latent weights (the quantizer is applied to w + A z)."""
    params = weight_params(model) if params is None else list(params)
    proj = IdentityProjection(params) if dim is None else HashProjection(params, dim, seed)
    original = [p.detach().clone() for p in params]
    device = original[0].device
    modes = {m: m.training for m in model.modules()}
    losses = []  # L at every point L-BFGS-B evaluated (all inside C: it projects onto the bounds)

    def neg_loss_and_grad(z: np.ndarray):
        with torch.no_grad():
            for p, w, d in zip(params, original, proj.project(torch.from_numpy(z).to(device))):
                p.copy_(w + d.to(w.device))  # from the saved w every time: no drift from repeated add/subtract
        loss = loss_fn(model)
        # autograd.grad leaves p.grad (and any optimizer state in it) alone; unused parameters get no gradient.
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        losses.append(loss.item())
        return -losses[-1], -proj.transpose(grads).cpu().numpy()

    try:
        model.eval()  # no dropout: L must be a deterministic function of z
        radius = eps * (proj.pinv(original).abs() + 1).cpu().numpy()
        z0 = np.zeros(proj.dim)
        # L-BFGS-B evaluates z0 = 0 first, so losses[0] is L(w) and costs no extra pass.
        scipy.optimize.minimize(neg_loss_and_grad, z0, jac=True, method="L-BFGS-B",
                                bounds=np.stack([-radius, radius], axis=1), options={"maxiter": max_iter})
    finally:
        with torch.no_grad():
            for p, w in zip(params, original):
                p.copy_(w)
        for m, training in modes.items():
            m.training = training
    loss, max_loss = losses[0], max(losses)
    return SharpnessResult(phi=100 * (max_loss - loss) / (1 + loss), loss=loss, max_loss=max_loss, eps=eps, dim=dim,
                           evaluations=len(losses), forward_backward=len(losses))


def sharpness_many(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor],
                   eps_values=EPS_VALUES, **kw) -> dict[str, float]:
    """phi for each eps, as run metrics named `sharpness/eps=<eps>`."""
    return {f"sharpness/eps={eps:g}": sharpness(model, loss_fn, eps, **kw).phi for eps in eps_values}


# ------------------------------------------------------------------------------------------------ in a run


def sharpness_metrics(ctx, module) -> dict[str, float]:
    """epsilon-sharpness on the first `sharpness.samples` training examples, computed on rank 0 (the others wait)."""
    from functools import partial

    if ctx.rank != 0:
        return {}
    s = ctx.cfg.sharpness
    batches = ctx.batches(ctx.tokenized.train, s.samples)
    values = sharpness_many(module, partial(eval_subset_loss, batches=batches), eps_values=tuple(s.eps), dim=s.dim,
                            max_iter=s.max_iter, seed=ctx.cfg.train.seed)
    ctx.log("  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return values


def run(ctx) -> None:
    """kind: sharpness: the dev metrics and the sharpness of a finished model (model: its checkpoint). Its
    checkpoint holds the numbers and no weights: Ray keeps a run's results with its checkpoints."""
    from flatray import models
    from flatray.train.checkpoint import write_run_files

    model = models.load_model(ctx.cfg.model, ctx.spec).to(ctx.device)
    metrics = {**ctx.evaluate(model), **sharpness_metrics(ctx, model)}
    ctx.report(metrics, lambda folder: write_run_files(folder, ctx.cfg, metrics))
