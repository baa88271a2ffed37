"""Stochastic weight averaging (Izmailov et al. 2018; P1 3.4.7, A.2): the run's model is the equal average of the
weights at fixed points of the last part of fine-tuning.

The points are every `swa.every` epochs after the first `swa.start` fraction of training, the end included: P1's
10-epoch tasks average the weights after epochs 6, 7, ..., 10, its 3-epoch tasks those after 2, 2.5 and 3 epochs. A
point at a fraction of an epoch is the step that ends at or just before it. The average is torch's
`swa_utils.AveragedModel` (a running equal average, one copy of the model) of the engine's module right after the
optimizer step of each point: the module holds the fp32 weights at every ZeRO stage (at ZeRO 1/2 the engine copies
its master weights back after each step). With an IMP mask the pruned weights are exactly zero at every point, so
their average is exactly zero too.

BERT has no BatchNorm (LayerNorm keeps no running statistics), so the averaged model needs no recomputation of
normalisation statistics (`swa_utils.update_bn`): it is evaluated as it is.
"""

from __future__ import annotations

import math

import torch
from torch.optim.swa_utils import AveragedModel


def points(epochs: int, start: float, every: float) -> list[float]:
    """The epochs (fractional ones too) after which the weights join the average: multiples of `every` past
    `start` x `epochs`, up to `epochs`."""
    count = round(epochs / every)
    return [round(k * every, 6) for k in range(1, count + 1) if k * every > start * epochs + 1e-9]


class Averager:
    """The running equal average of a module's weights at the SWA points of a run (`update` after each step)."""

    def __init__(self, module: torch.nn.Module, cfg, steps_per_epoch: int):
        s = cfg.swa
        self.points = points(cfg.train.epochs, s.start, s.every)
        self.at_step = {math.floor(p * steps_per_epoch + 1e-9): p for p in self.points}
        if len(self.at_step) < len(self.points) or min(self.at_step) < 1:
            raise ValueError(f"swa.every {s.every} epochs is less than one optimizer step ({steps_per_epoch} steps "
                             f"per epoch): use a larger swa.every or more training data")
        self.model = AveragedModel(module)  # a copy of the module: its parameters become the average
        self.model.requires_grad_(False)
        self.averaged: list[float] = []  # the points in the average so far

    def update(self, module: torch.nn.Module, steps_done: int) -> None:
        """Add the module's weights to the average when `steps_done` (of the run) ends at a point."""
        point = self.at_step.get(steps_done)
        if point is not None:
            self.model.update_parameters(module)
            self.averaged.append(point)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Put the average into `module`'s parameters (in place: the engine keeps training the same tensors)."""
        if self.averaged != self.points:
            raise RuntimeError(f"SWA averaged the points {self.averaged} of {self.points}: the run ended early")
        torch._foreach_copy_(list(module.parameters()), list(self.model.module.parameters()))

    def metrics(self) -> dict:
        return {"swa_checkpoints": list(self.averaged), "swa_models": len(self.averaged)}

    def state_dict(self) -> dict:
        """What a resumed run needs: the average so far and its points (checkpointed with the engine)."""
        return {"averaged": list(self.averaged), "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.averaged = list(state["averaged"])
        self.model.load_state_dict(state["model"])
