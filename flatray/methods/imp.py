"""Unstructured pruning: the prunable set, global magnitude (IMP) and random masks, masked training, mask files.

METHODS.md section 3 (Chen et al. 2020, as in P1): the prunable set of a BERT-family model is every Linear weight
inside the encoder (per layer: Q, K, V, attention output, intermediate, output) plus the pooler's dense weight.
Embeddings, biases, LayerNorm and the task head are never pruned. Sparsity is counted over the prunable set.

A mask maps a parameter name of the task model (e.g. "bert.encoder.layer.0.attention.self.query.weight") to a
bool tensor, True = kept. Names are the same for every task head on the same encoder, so a mask found on one task
applies to another (ticket transfer).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from flatray.methods import MASK_FILE

Masks = dict[str, torch.Tensor]


def prunable_weights(model: torch.nn.Module, include_pooler: bool = True) -> dict[str, torch.nn.Parameter]:
    """The prunable weights, found from the model's structure: Linear layers under the encoder, and the pooler
    (unless include_pooler is False; a RoBERTa or QA model has none)."""
    base = model.base_model
    encoder = getattr(base, "encoder", None)
    if encoder is None:
        raise ValueError(f"{type(model).__name__} has no .base_model.encoder: not a BERT-family encoder")
    pooler = getattr(base, "pooler", None) if include_pooler else None
    owned = [encoder] + ([pooler] if pooler is not None else [])
    wanted = {id(m.weight) for part in owned for m in part.modules() if isinstance(m, torch.nn.Linear)}
    weights = {name: p for name, p in model.named_parameters() if id(p) in wanted}
    if not weights:
        raise ValueError(f"{type(model).__name__}: no Linear weights found in the encoder")
    return weights


def include_pooler(prune_cfg, model_name: str) -> bool:
    """prune.include_pooler, or when unset: True, except for a model whose pooler was never trained (models.py:
    UNTRAINED_POOLER), which is left out with one line saying why."""
    if prune_cfg is not None and prune_cfg.include_pooler is not None:
        return prune_cfg.include_pooler
    from flatray import models

    why = models.untrained_pooler(model_name)
    if why:
        print(f"[flatray] prune: the pooler is left out of the prunable set ({why}; prune.include_pooler: true "
              "keeps it in)", flush=True)
    return why is None


def zero_fraction(weights) -> float:
    """Measured sparsity: the fraction of exactly-zero entries of the prunable weights."""
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total


def sparsity(masks: Masks) -> float:
    """Fraction of pruned entries over all masked tensors."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total


def dense_masks(weights: dict[str, torch.Tensor]) -> Masks:
    return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}


def magnitude_masks(weights: dict[str, torch.Tensor], target: float, start: Masks | None = None) -> Masks:
    """One global L1 ranking over all prunable weights: of the survivors of `start`, keep the largest |w| so that
    a fraction `target` of ALL prunable entries ends up pruned (IMP: 10%, 20%, ... of the original count)."""
    start = start or dense_masks(weights)
    names = list(weights)
    scores = torch.cat([weights[n].detach().abs().float().flatten() for n in names])
    alive = torch.cat([start[n].flatten() for n in names])
    keep = scores.numel() - round(target * scores.numel())
    if keep > int(alive.sum()):
        raise ValueError(f"target sparsity {target} is below the start mask's {sparsity(start):.4f}")
    scores[~alive] = -1.0  # below any |w|: already pruned entries are never revived
    kept = torch.zeros_like(alive)
    kept[torch.topk(scores, keep, sorted=False).indices] = True
    return _unflatten(kept, weights, names)


def random_masks(weights: dict[str, torch.Tensor], target: float, seed: int, start: Masks | None = None) -> Masks:
    """Control: survivors of `start` chosen uniformly at random, to the same global sparsity."""
    start = start or dense_masks(weights)
    names = list(weights)
    alive = torch.cat([start[n].flatten() for n in names])
    keep = alive.numel() - round(target * alive.numel())
    if keep > int(alive.sum()):  # topk would have to pick pruned entries: it would revive them
        raise ValueError(f"target sparsity {target} is below the start mask's {sparsity(start):.4f}")
    scores = torch.rand(alive.numel(), generator=torch.Generator().manual_seed(seed))
    scores[~alive] = -1.0
    kept = torch.zeros_like(alive)
    kept[torch.topk(scores, keep, sorted=False).indices] = True
    return _unflatten(kept, weights, names)


def _unflatten(flat: torch.Tensor, weights: dict[str, torch.Tensor], names: list[str]) -> Masks:
    out, offset = {}, 0
    for n in names:
        numel = weights[n].numel()
        out[n] = flat[offset : offset + numel].view(weights[n].shape).clone()
        offset += numel
    return out


class MaskedModel:
    """Keeps the pruned weights of `model` at exactly zero during training.

    The weights are zeroed once, and a hook on each masked parameter zeroes its gradient whenever one is computed
    (by `backward` or `torch.autograd.grad`, so also SAM's first gradient: the perturbation is then zero there, and
    the norm only counts kept weights). With a zero gradient from the start, Adam's moments stay zero and so does
    the update, in the engine's fp32 master copy too (tests check this without `enforce`, which re-zeroes as a
    cheap guard once per epoch).
    Apply it before building the DeepSpeed engine, so that the engine's master weights start masked.
    """

    def __init__(self, model: torch.nn.Module, masks: Masks):
        params = dict(model.named_parameters())
        missing = sorted(set(masks) - set(params))
        if missing:
            raise ValueError(f"mask names not in the model: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        self.params, self.masks = [], []
        for name, mask in masks.items():
            p = params[name]
            if p.shape != mask.shape:
                raise ValueError(f"mask {name}: shape {tuple(mask.shape)} != weight {tuple(p.shape)}")
            self.params.append(p)
            self.masks.append(mask.to(device=p.device, dtype=p.dtype))
        self.handles = [p.register_hook(lambda g, i=i: g * self._mask(i, g)) for i, p in enumerate(self.params)]
        self.enforce()

    def _mask(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """Mask i on `like`'s device and in its dtype. DeepSpeed moves and casts the module after the masks are
        made (and a hook must return its gradient's dtype), so they follow on first use and are kept there."""
        m = self.masks[i]
        if m.device != like.device or m.dtype != like.dtype:
            m = self.masks[i] = m.to(device=like.device, dtype=like.dtype)
        return m

    @torch.no_grad()
    def enforce(self) -> None:
        for i, p in enumerate(self.params):
            p.mul_(self._mask(i, p))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def save_masks(path: str | Path, masks: Masks, **metadata) -> None:
    """safetensors, keyed by parameter name, uint8 (1 = kept); metadata values are stored as JSON strings."""
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    meta["sparsity"] = json.dumps(round(sparsity(masks), 6))
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.to(torch.uint8).contiguous() for k, v in masks.items()}, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a reader never sees half a mask


def load_masks(path: str | Path) -> tuple[Masks, dict]:
    """(masks as bool tensors, metadata) from `save_masks`' format; also accepts bool tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw_meta = f.metadata() or {}
    masks = {k: v.bool() for k, v in load_file(str(path)).items()}
    return masks, {k: json.loads(v) for k, v in raw_meta.items()}


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The trained weights of a checkpoint folder (HF safetensors), by parameter name."""
    files = sorted(Path(folder).glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in checkpoint {folder}")
    weights = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def _provenance(parent: str | None) -> dict:
    """Who made the weights a mask was ranked on: the parent run's task, optimizer, rho and seed."""
    if parent is None:
        return {"source_task": None, "optimizer": None, "rho": None, "seed": None, "computed_from": "pretrained"}
    import yaml

    run = yaml.safe_load((Path(parent) / "flatray_run.yaml").read_text())
    return {"source_task": run["task"], "optimizer": run["optimizer"]["name"], "rho": run["optimizer"]["rho"],
            "seed": run["train"]["seed"], "computed_from": str(Path(parent).resolve())}


def setup(model: torch.nn.Module, prune_cfg, seed: int,
          with_pooler: bool = True) -> tuple[MaskedModel | None, Masks | None, dict]:
    """Prepare `model` (freshly loaded pre-trained encoder + new head) for one pruning run, as its config says:

    - start mask: `mask` file, else the parent checkpoint's mask file, else dense;
    - prune the survivors to `sparsity` (if set) by global magnitude of the parent's trained weights (or of the
      pre-trained weights without a parent), or at random;
    - weights: rewind "pretrained" keeps the freshly loaded model (theta_0; the head re-initialised from the seed,
      i.e. the parent's initial head when the seeds match); rewind "none" continues from the parent's weights.
    Returns (masked model, masks, metadata for the mask file), or (None, None, {}) when nothing is pruned.
    """
    if prune_cfg is None or not prune_cfg.active:
        return None, None, {}
    weights = prunable_weights(model, with_pooler)
    parent = load_weights(prune_cfg.parent) if prune_cfg.parent else None
    mask_file = prune_cfg.mask or (
        str(Path(prune_cfg.parent) / MASK_FILE) if prune_cfg.parent and (Path(prune_cfg.parent) / MASK_FILE).exists() else None
    )
    start, meta = load_masks(mask_file) if mask_file else (None, {"level": 0})
    if start is not None:
        uncovered = sorted(set(weights) - set(start))
        if uncovered:
            raise ValueError(f"mask {mask_file} does not cover this model's prunable weights {uncovered[:3]}")
        start = {n: start[n] for n in weights}  # e.g. a classifier's pooler mask, applied to a QA model (no pooler)
    masks = start
    if prune_cfg.sparsity is not None:
        if prune_cfg.method == "magnitude":
            ranked = {n: (parent[n] if parent is not None else w) for n, w in weights.items()}
            masks = magnitude_masks(ranked, prune_cfg.sparsity, start)
        else:
            masks = random_masks(weights, prune_cfg.sparsity, seed, start)
        meta = {"level": int(meta.get("level", 0)) + 1, "method": prune_cfg.method, **_provenance(prune_cfg.parent)}
    if prune_cfg.rewind == "none":
        missing, unexpected = model.load_state_dict(parent, strict=False)
        if missing:
            raise ValueError(f"parent checkpoint {prune_cfg.parent} lacks weights: {missing[:3]}")
    return MaskedModel(model, masks), masks, meta
