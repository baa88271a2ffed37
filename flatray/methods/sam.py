"""SAM and ASAM (METHODS.md section 2).

SAM (Foret et al. 2021) minimises max_{||e|| <= rho} L(w + e) with one ascent step:
    e = rho * g / (||g||_2 + 1e-12)
ASAM (Kwon et al. 2021) makes the ball adaptive to the weight scale, with T = |w| + eta on weight matrices
(T = 1 on biases and LayerNorm, i.e. every tensor with fewer than 2 dimensions):
    e = rho * T^2 g / (||T g||_2 + 1e-12)

`perturbation` is the one formula; `SAM` is the torch optimizer built on it, and the DeepSpeed path in
`flatray.train.engine` uses the same function on the engine's module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

EPS = 1e-12


def scale_tensor(param: torch.Tensor, adaptive: bool, eta: float) -> torch.Tensor | None:
    """ASAM's T for one tensor, or None where T = 1 (plain SAM, biases, LayerNorm)."""
    if not adaptive or param.dim() < 2:
        return None
    return param.abs() + eta


@torch.no_grad()
def perturbation(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    rho: float,
    adaptive: bool = False,
    eta: float = 0.0,
) -> list[torch.Tensor | None]:
    """The SAM/ASAM ascent step e for each parameter (None where there is no gradient).

    The norm runs over every parameter that has a gradient, in float32 so that bf16/fp16 weights get the same
    direction as their fp32 master copy would. The grads are left untouched.
    """
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return [None] * len(params)
    scales = [scale_tensor(params[i], adaptive, eta) for i in present]  # T, computed once per tensor
    tg = [grads[i].detach().float() if t is None else t.float() * grads[i].float() for i, t in zip(present, scales)]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tg)))
    factor = rho / (norm + EPS)
    out: list[torch.Tensor | None] = [None] * len(params)
    for i, t, v in zip(present, scales, tg):
        e = v * factor if t is None else v.mul_(t).mul_(factor)  # T^2 g = T (T g); v is ours only when T exists
        out[i] = e.to(params[i].dtype)
    return out


@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], rho: float,
             adaptive: bool = False, eta: float = 0.0) -> None:
    """w <- w + e(w) in place; the same e as `perturbation`, without materialising it for plain SAM."""
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    if not pairs:
        return
    if adaptive or any(p.dtype != torch.float32 or g.dtype != torch.float32 for p, g in pairs):
        es = perturbation([p for p, _ in pairs], [g for _, g in pairs], rho, adaptive, eta)
        torch._foreach_add_([p for p, _ in pairs], es)
        return
    ps, gs = [p for p, _ in pairs], [g for _, g in pairs]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs)))
    torch._foreach_add_(ps, torch._foreach_mul(gs, rho / (norm + EPS)))


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around any torch optimizer.

    >>> opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=2e-5)
    >>> loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
    >>> loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)

    `adaptive=True` gives ASAM. The weights are restored by copying the saved values back, never by subtracting
    e, so that w is bit-identical to its value before the ascent step.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        **base_kwargs,
    ):
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        super().__init__(params, defaults)
        # The base optimizer shares our param groups, so lr schedulers attached to SAM drive it too.
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """w <- w + e(w), remembering w. One norm over all groups: groups only carry other hyperparameters."""
        settings = {(g["rho"], g["adaptive"], g["eta"]) for g in self.param_groups}
        if len(settings) != 1:
            raise ValueError("SAM needs the same rho, adaptive and eta in every param group")
        rho, adaptive, eta = settings.pop()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p, e in zip(params, perturbation(params, [p.grad for p in params], rho, adaptive, eta)):
            self.state[p]["old_p"] = p.detach().clone()
            p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w by copy, then let the base optimizer step with the gradient taken at w + e."""
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.copy_(self.state[p].pop("old_p"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Full SAM step. `closure` must zero nothing, run forward + backward and return the loss; the gradient of
        the first pass must already be in .grad (as after `loss.backward()`)."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and its gradient")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups
