"""CoFi's masks (METHODS.md section 5): hard-concrete L0 masks on five structures of a BERT, the masked forward
through hooks (`attach`) and the optimizer of the masks and multipliers. flatray.methods.cofi_prune removes what
the masks zero; flatray.methods.cofi has the losses and the run; docs/cofi.md has every choice.

Masked forward (z = mask values; zh = hidden mask; "LN_kept" = LayerNorm over the dims where zh != 0, as in CoFi):
  embeddings:   e = LN_kept(emb) * zh
  attention:    ctx_h *= z_head[h];  a = z_attn * zh * (W_o ctx + b_o);  x = LN_kept(a + x) * zh
  FFN:          u = act(W_1 x + b_1) * z_unit;  f = z_ffn * zh * (W_2 u + b_2);  x = LN_kept(f + x) * zh
Pruned dims of the residual stream are therefore exactly 0 and can be dropped; every nonzero z is a per-output or
per-input scale of some Linear/LayerNorm and is folded into it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flatray.config.sections import CoFiConfig

MASK_NAMES = ("attn_layer", "ffn_layer", "heads", "units", "hidden")
STRUCTURE_KEY = "flatray_structure"  # the config.json entry that describes a pruned model
# CoFi's range for log_alpha (its L0Module.constrain_parameters, after every mask step): P(z != 0) stays in
# [0.047, 0.998], so a mask the Lagrangian pushed far one way can come back within a few steps (without it the
# masks run away while the multipliers catch up, and the sparsity overshoots).
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)


# ---------------------------------------------------------------------------------------------------------------
# Hard-concrete masks


class CoFiMasks(nn.Module):
    """The log_alpha of every mask for one BERT config, and the two Lagrange multipliers.

    log_alpha shapes: attn_layer [L], ffn_layer [L], heads [L, H], units [L, I], hidden [D].
    `forward()` returns z with the same shapes: a fresh sample in train mode, the deterministic masks in eval mode.
    """

    def __init__(self, bert_config, cfg: CoFiConfig):
        super().__init__()
        self.cfg = cfg
        c = bert_config
        self.num_layers, self.num_heads = c.num_hidden_layers, c.num_attention_heads
        self.hidden_size, self.intermediate_size = c.hidden_size, c.intermediate_size
        self.head_dim = c.hidden_size // c.num_attention_heads
        shapes = dict(attn_layer=(self.num_layers,), ffn_layer=(self.num_layers,),
                      heads=(self.num_layers, self.num_heads), units=(self.num_layers, self.intermediate_size),
                      hidden=(self.hidden_size,))
        # As in CoFi's code: the structures (whole layers, heads, hidden dims) start kept, at the top of the clamp
        # range (P(z != 0) = 0.998), and only the FFN units start at droprate_init. The expected sparsity then starts
        # near 0, where the target's ramp starts; with every mask at P = 0.5 it would start at 0.875, and the
        # multipliers would wind up against that gap before the ramp catches up (the run overshoots).
        # For the units, P(z = 0) = sigmoid(beta log(-a / b) - log_alpha) = p  <=>  log_alpha = beta log(-a / b)
        # + log((1 - p) / p) (CoFi's code puts log_alpha at log((1 - p) / p), which for p = 0.5 gives P(z = 0) =
        # 0.17; that init is droprate_init = 0.168 here). The 0.01 noise breaks ties for the deterministic top-k.
        p = cfg.droprate_init
        mean = cfg.beta * math.log(-cfg.limit_a / cfg.limit_b) + math.log((1 - p) / p)
        start = {k: torch.full(s, LOG_ALPHA_MAX) for k, s in shapes.items()}
        start["units"] = (torch.full(shapes["units"], mean) + 0.01 * torch.randn(shapes["units"])).clamp(
            LOG_ALPHA_MIN, LOG_ALPHA_MAX)
        self.log_alpha = nn.ParameterDict({k: nn.Parameter(v) for k, v in start.items()})
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))

    def prob_nonzero(self, name: str) -> torch.Tensor:
        """1 - Q(0) = sigmoid(log_alpha - beta * log(-limit_a / limit_b)): the probability that z != 0."""
        c = self.cfg
        return torch.sigmoid(self.log_alpha[name] - c.beta * math.log(-c.limit_a / c.limit_b))

    def sample(self, name: str) -> torch.Tensor:
        c, la = self.cfg, self.log_alpha[name]
        u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + la) / c.beta)
        return (s * (c.limit_b - c.limit_a) + c.limit_a).clamp(0.0, 1.0)

    @torch.no_grad()
    def counts(self) -> tuple[int, list[int], list[int]]:
        """How many hidden dims, heads per layer and FFN units per layer the eval masks keep: a model of the expected
        size, 1 - expected_sparsity(), to within one unit where whole structures allow it.

        - hidden dims: round(sum_d P_hidden[d]);
        - heads of layer l: round(P_attn[l] * sum_h P_head[l, h]), the expected number of heads whose head and
          layer masks are both on (the factor expected_sparsity() counts);
        - FFN units: as many in all as make up the rest of the expected size (so they absorb the rounding of the
          coarser heads and hidden dims), shared among the layers in proportion to P_ffn[l] * sum_i P_unit[l, i].
          Where the units cannot (every unit kept, or none), a head more or fewer does (in the layer whose
          expectation is furthest from its count).
        """
        P = {k: self.prob_nonzero(k) for k in MASK_NAMES}
        D, I, L, H = self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads
        n_hidden = _round(P["hidden"].sum())
        if n_hidden == 0:
            return 0, [0] * L, [0] * L
        heads = (P["attn_layer"] * P["heads"].sum(-1)).tolist()
        n_heads = [_round(x) for x in heads]
        remaining = float(1 - self.expected_sparsity()) * L * (4 * D * D + 2 * D * I)

        def units_left() -> float:  # a head is 4 head_dim n_hidden weights, a unit 2 n_hidden
            return (remaining / n_hidden - 4 * self.head_dim * sum(n_heads)) / 2

        while units_left() > L * I and (free := [i for i in range(L) if n_heads[i] < H]):
            n_heads[max(free, key=lambda i: heads[i] - n_heads[i])] += 1
        while units_left() < 0 and (used := [i for i in range(L) if n_heads[i] > 0]):
            n_heads[min(used, key=lambda i: heads[i] - n_heads[i])] -= 1
        n_units = _apportion(P["ffn_layer"] * P["units"].sum(-1), units_left(), I)
        return n_hidden, n_heads, n_units

    def deterministic_sparsity(self) -> float:
        """The sparsity of the model the eval masks leave (what `prune` makes of them), from `counts()`."""
        n_hidden, n_heads, n_units = self.counts()
        D, I = self.hidden_size, self.intermediate_size
        kept = (4 * self.head_dim * sum(n_heads) + 2 * sum(n_units)) * n_hidden
        return 1 - kept / (self.num_layers * (4 * D * D + 2 * D * I))

    @torch.no_grad()
    def deterministic(self) -> dict[str, torch.Tensor]:
        """The eval masks: CoFi's rule, with the counts of `counts()`: in each group (the hidden vector, one layer's
        heads, one layer's units) the entries with the largest log_alpha keep CoFi's value sigmoid(0.8 * log_alpha /
        beta) (always in (0, 1), so a kept entry is never 0), the others are 0; a layer left with no head (unit)
        loses its attention (FFN): its attn_layer (ffn_layer) z is 0, else it keeps CoFi's value too.

        CoFi's own counts (round(sum P) per group, a layer kept iff its P >= 0.5) leave a model of the expected size
        only once every P is near 0 or 1. Before that, masks that all sit at P = 0.8 keep everything (every layer,
        and 2 of 2 heads at 0.8 each): measured on the tiny BERT, 30% sparsity where the expected one was 50%.
        """
        n_hidden, n_heads, n_units = self.counts()
        la = {k: v.detach() for k, v in self.log_alpha.items()}
        value = {k: torch.sigmoid(0.8 * v / self.cfg.beta) for k, v in la.items()}
        z = {k: torch.zeros_like(v) for k, v in la.items()}
        z["hidden"] = _top(la["hidden"], n_hidden, value["hidden"])
        for i in range(self.num_layers):
            z["heads"][i] = _top(la["heads"][i], n_heads[i], value["heads"][i])
            z["units"][i] = _top(la["units"][i], n_units[i], value["units"][i])
            z["attn_layer"][i] = value["attn_layer"][i] if n_heads[i] else 0.0
            z["ffn_layer"][i] = value["ffn_layer"][i] if n_units[i] else 0.0
        return z

    def forward(self) -> dict[str, torch.Tensor]:
        if not self.training:
            return self.deterministic()
        return {k: self.sample(k) for k in MASK_NAMES}

    @torch.no_grad()
    def clamp_(self) -> None:
        """CoFi's constrain_parameters: log_alpha back into [LOG_ALPHA_MIN, LOG_ALPHA_MAX]."""
        for p in self.log_alpha.values():
            p.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def expected_sparsity(self) -> torch.Tensor:
        """s = 1 - remaining / total over the encoder's Q, K, V, O and FFN weight matrices (biases excluded), with

            remaining = sum_l  P_attn[l] * (sum_h P_head[l, h]) * 4 * head_dim * (sum_d P_hidden[d])
                             + P_ffn[l]  * (sum_i P_unit[l, i]) * 2 * (sum_d P_hidden[d])
            total     = L * (4 * D * D + 2 * D * I)

        where every P is a probability of being nonzero (1 - Q(0)); products of expectations, as CoFi does.
        """
        hidden = self.prob_nonzero("hidden").sum()
        heads = self.prob_nonzero("heads").sum(-1) * self.prob_nonzero("attn_layer")
        units = self.prob_nonzero("units").sum(-1) * self.prob_nonzero("ffn_layer")
        remaining = (heads.sum() * 4 * self.head_dim + units.sum() * 2) * hidden
        D, I = self.hidden_size, self.intermediate_size
        return 1 - remaining / (self.num_layers * (4 * D * D + 2 * D * I))


def _round(x) -> int:
    """Half up, as CoFi's counts (a group at sum P = 1.5 keeps 2)."""
    return int(math.floor(float(x) + 0.5))


def _top(log_alpha: torch.Tensor, n: int, value: torch.Tensor) -> torch.Tensor:
    """`value` at the n largest log_alpha, 0 elsewhere."""
    z = torch.zeros_like(log_alpha)
    if n > 0:
        idx = log_alpha.topk(min(n, log_alpha.numel())).indices
        z[idx] = value[idx]
    return z


def _apportion(weights: torch.Tensor, total: float, cap: int) -> list[int]:
    """Integers in [0, cap] that sum to round(total) (clipped to [0, cap * len]), in proportion to `weights`:
    largest remainders first, and what a full entry cannot take goes to the others."""
    total = min(max(_round(total), 0), cap * len(weights))
    w = weights.double().clamp(min=0)
    share = w / w.sum() * total if w.sum() > 0 else torch.full_like(w, total / len(w))
    n = share.clamp(max=cap).floor().long().tolist()
    order = torch.argsort(share - share.floor(), descending=True, stable=True).tolist()
    while sum(n) < total:
        for i in order:
            if sum(n) < total and n[i] < cap:
                n[i] += 1
    return n


def mask_optimizer(masks: CoFiMasks) -> torch.optim.Optimizer:
    """AdamW on log_alpha (descent) and on lambda_1, lambda_2 (ascent: torch's per-group `maximize`, so one
    `loss.backward(); opt.step()` moves the masks down and the multipliers up the same loss). No weight decay.
    Every step ends by clamping log_alpha to [LOG_ALPHA_MIN, LOG_ALPHA_MAX], as CoFi does.

    Adam's beta1 is cfg.mask_beta1 (0 by default; CoFi's code has 0.9). Momentum makes a descent-ascent game
    overshoot and oscillate (Gidel et al. 2019, "Negative Momentum for Improved Game Dynamics"): the multipliers
    wind up while the sparsity lags the ramp, and the masks carry on past the target. Measured on the tiny BERT
    (target 0.5, 62 steps of ramp and 62 after): beta1 0.9 overshoots to 0.89 and ends at 0.52; 0 ends at 0.50."""
    c = masks.cfg
    opt = torch.optim.AdamW([
        {"params": list(masks.log_alpha.values()), "lr": c.lr_masks},
        {"params": [masks.lambda_1, masks.lambda_2], "lr": c.lr_lambdas, "maximize": True},
    ], betas=(c.mask_beta1, 0.999), weight_decay=0.0)
    opt.register_step_post_hook(lambda *_: masks.clamp_())
    return opt


# ---------------------------------------------------------------------------------------------------------------
# The masked forward (the physical pruning is flatray.methods.cofi_prune)


def _layernorm_kept(ln: nn.LayerNorm, x: torch.Tensor, zh: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the kept dims (`kept` = indices where zh != 0; statistics of the kept dims only, as the
    pruned model computes them), times zh; pruned dims are 0."""
    if kept.numel() == 0:
        return torch.zeros_like(x)
    out = F.layer_norm(x.index_select(-1, kept), (kept.numel(),), ln.weight[kept], ln.bias[kept], ln.eps)
    return x.new_zeros(x.shape).index_copy(-1, kept, out) * zh.to(x.dtype)


def attach(model, masks: CoFiMasks) -> Callable[[], None]:
    """Make `model`'s forward use the masks (see the module docstring). z is drawn once per forward of `model` by a
    pre-forward hook, so every sublayer sees the same sample; `masks.training` picks sampled or deterministic z.
    Returns a function that removes every hook."""
    bert = model.bert
    state: dict[str, dict] = {}
    handles = []

    def draw(_module, _args):
        state["z"] = masks()
        state["kept"] = state["z"]["hidden"].detach().nonzero().squeeze(-1)  # one device sync per forward

    def ln_hook(module, args, _output):
        return _layernorm_kept(module, args[0], state["z"]["hidden"], state["kept"])

    def heads_hook(layer):
        def hook(module, _args, output):
            ctx, *rest = output
            scale = state["z"]["heads"][layer].repeat_interleave(module.attention_head_size)
            return (ctx * scale.to(ctx.dtype), *rest)
        return hook

    def scale_hook(layer, which):  # output dense of a block: the whole-layer z and the hidden mask
        def hook(_module, _args, output):
            z = state["z"]
            return output * (z[which][layer] * z["hidden"]).to(output.dtype)
        return hook

    def units_hook(layer):
        def hook(_module, _args, output):
            return output * state["z"]["units"][layer].to(output.dtype)
        return hook

    handles.append(model.register_forward_pre_hook(draw))
    handles.append(bert.embeddings.LayerNorm.register_forward_hook(ln_hook))
    for i, layer in enumerate(bert.encoder.layer):
        handles += [
            layer.attention.self.register_forward_hook(heads_hook(i)),
            layer.attention.output.dense.register_forward_hook(scale_hook(i, "attn_layer")),
            layer.attention.output.LayerNorm.register_forward_hook(ln_hook),
            layer.intermediate.register_forward_hook(units_hook(i)),
            layer.output.dense.register_forward_hook(scale_hook(i, "ffn_layer")),
            layer.output.LayerNorm.register_forward_hook(ln_hook),
        ]

    def detach():
        for h in handles:
            h.remove()
        state.clear()

    return detach
