"""CoFi's structural pruning (METHODS.md section 5): remove what the eval masks of flatray.methods.cofi_masks zero
and fold every kept mask value into the weights (`prune`), so the smaller model computes what the masked one did;
save and reload such a model (`save_pruned`, `load_pruned`: its config.json holds the kept structure), and count
the prunable weights it has left."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from flatray.methods.cofi_masks import STRUCTURE_KEY, CoFiMasks, attach

# ---------------------------------------------------------------------------------------------------------------
# Physical pruning, saving and loading


class NoAttention(nn.Module):
    """Stands in for BertSelfAttention when a layer keeps no head (BertSelfAttention cannot reshape an empty
    projection with view(..., -1, head_size)): the context has 0 features, so BertSelfOutput computes
    LayerNorm(bias + x) with its Linear(0, hidden)."""

    num_attention_heads = 0

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def _task_heads(model):
    """The task head(s) reading the encoder's hidden states: pooler (sequence classification) or qa_outputs."""
    if getattr(model, "qa_outputs", None) is not None:
        return ["qa_outputs"]
    if model.bert.pooler is not None:
        return ["bert.pooler.dense"]
    raise NotImplementedError("cofi supports BertForSequenceClassification (with pooler) and BertForQuestionAnswering")


def _structure(masks: CoFiMasks) -> tuple[dict, dict]:
    """Deterministic z and the kept indices per structure."""
    was = masks.training
    masks.eval()
    with torch.no_grad():
        z = {k: v.detach().float() for k, v in masks().items()}
    masks.train(was)
    L, hd = masks.num_layers, masks.head_dim
    heads, units = [], []
    for i in range(L):
        heads.append(z["heads"][i].nonzero().squeeze(-1).tolist() if z["attn_layer"][i] != 0 else [])
        units.append(int((z["units"][i] != 0).sum()) if z["ffn_layer"][i] != 0 else 0)
    structure = {
        "hidden_size": int((z["hidden"] != 0).sum()),
        "heads": heads,  # kept head indices (original numbering) per layer
        "intermediate_sizes": units,
        "attention_removed": [i for i in range(L) if not heads[i]],
        "ffn_removed": [i for i in range(L) if units[i] == 0],
        "head_dim": hd,
    }
    return z, structure


def _folded_state(model, masks: CoFiMasks) -> tuple[dict, dict]:
    """The pruned model's state dict: rows/columns of the zeroed structures dropped, kept z folded in."""
    z, structure = _structure(masks)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hd = masks.head_dim
    zh = z["hidden"]
    hk = zh.nonzero().squeeze(-1)
    zk = zh[hk]
    out = dict(sd)

    def cols(key):  # drop pruned hidden dims on the input side
        out[key] = sd[key][:, hk]

    def ln(prefix):  # LN over kept dims, then * zh: fold zh into the affine
        out[prefix + ".weight"] = sd[prefix + ".weight"][hk] * zk
        out[prefix + ".bias"] = sd[prefix + ".bias"][hk] * zk

    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        cols(f"bert.embeddings.{name}.weight")
    ln("bert.embeddings.LayerNorm")
    for i in range(masks.num_layers):
        p = f"bert.encoder.layer.{i}."
        kept = structure["heads"][i]
        rows = torch.tensor([h * hd + j for h in kept for j in range(hd)], dtype=torch.long)
        for proj in ("query", "key", "value"):
            w, b = p + f"attention.self.{proj}.weight", p + f"attention.self.{proj}.bias"
            if kept:
                out[w], out[b] = sd[w][rows][:, hk], sd[b][rows]
            else:  # NoAttention has no parameters
                del out[w], out[b]
        head_scale = z["heads"][i].repeat_interleave(hd)[rows]
        out_scale = z["attn_layer"][i] * zk
        w = sd[p + "attention.output.dense.weight"][hk][:, rows]
        out[p + "attention.output.dense.weight"] = w * out_scale[:, None] * head_scale[None, :]
        out[p + "attention.output.dense.bias"] = sd[p + "attention.output.dense.bias"][hk] * out_scale
        ln(p + "attention.output.LayerNorm")

        units = z["units"][i].nonzero().squeeze(-1)
        if not structure["intermediate_sizes"][i]:  # the whole FFN is off
            units = units[:0]
        out[p + "intermediate.dense.weight"] = sd[p + "intermediate.dense.weight"][units][:, hk]
        out[p + "intermediate.dense.bias"] = sd[p + "intermediate.dense.bias"][units]
        out_scale = z["ffn_layer"][i] * zk
        w = sd[p + "output.dense.weight"][hk][:, units]
        out[p + "output.dense.weight"] = w * out_scale[:, None] * z["units"][i][units][None, :]
        out[p + "output.dense.bias"] = sd[p + "output.dense.bias"][hk] * out_scale
        ln(p + "output.LayerNorm")
    for head in _task_heads(model):
        cols(head + ".weight")
    return {k: v.to(sd[k].dtype).contiguous() for k, v in out.items()}, structure  # z is fp32


def _meta_linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, device="meta")


def _resize(model, structure: dict) -> None:
    """Replace the modules of a full-size plain BERT with empty (meta) ones of the pruned shapes, in place; the
    state dict is then loaded with assign=True. BertSelfAttention reads num_attention_heads / all_head_size only
    to build its Linears and reshapes with view(..., -1, attention_head_size), so fewer heads need only these
    attributes and smaller query/key/value."""
    bert, c = model.bert, model.config
    D, hd = structure["hidden_size"], structure["head_dim"]
    emb = bert.embeddings
    emb.word_embeddings = nn.Embedding(c.vocab_size, D, padding_idx=c.pad_token_id, device="meta")
    emb.position_embeddings = nn.Embedding(c.max_position_embeddings, D, device="meta")
    emb.token_type_embeddings = nn.Embedding(c.type_vocab_size, D, device="meta")
    emb.LayerNorm = nn.LayerNorm(D, eps=c.layer_norm_eps, device="meta")
    for i, layer in enumerate(bert.encoder.layer):
        n = len(structure["heads"][i])
        if n == 0:
            layer.attention.self = NoAttention()
        else:
            sa = layer.attention.self
            sa.num_attention_heads, sa.all_head_size = n, n * hd
            sa.query, sa.key, sa.value = (_meta_linear(D, n * hd) for _ in range(3))
        layer.attention.output.dense = _meta_linear(n * hd, D)
        layer.attention.output.LayerNorm = nn.LayerNorm(D, eps=c.layer_norm_eps, device="meta")
        m = structure["intermediate_sizes"][i]
        layer.intermediate.dense = _meta_linear(D, m)
        layer.output.dense = _meta_linear(m, D)
        layer.output.LayerNorm = nn.LayerNorm(D, eps=c.layer_norm_eps, device="meta")
    for head in _task_heads(model):
        parent, _, name = head.rpartition(".")
        mod = model.get_submodule(parent) if parent else model
        setattr(mod, name, _meta_linear(D, getattr(mod, name).out_features))


def _build(model_cls, config, structure: dict, state: dict):
    model = model_cls(config)
    with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op" for removed layers
        warnings.simplefilter("ignore", UserWarning)
        _resize(model, structure)
    model.load_state_dict(state, strict=True, assign=True)
    for p in model.parameters():  # the [0, D] / [D, 0] weights of removed layers: nothing to train, keep them
        if p.numel() == 0:        # out of optimizers (and DeepSpeed's flat buffers)
            p.requires_grad_(False)
    setattr(model.config, STRUCTURE_KEY, structure)  # an extra config attribute: written to config.json
    return model.eval()


def prune(model, masks: CoFiMasks) -> nn.Module:
    """A new, physically smaller model (same class as `model`, eval mode) computing what `model` with `attach`ed
    deterministic masks computes: zero heads, units, hidden dims and layers are removed and the kept z values are
    folded into the weights. `model` and `masks` are left unchanged; no hooks are needed on the result."""
    state, structure = _folded_state(model, masks)
    config = copy.deepcopy(model.config)
    pruned = _build(type(model), config, structure, state)
    return pruned.to(next(model.parameters()).device)


def save_pruned(model, folder) -> None:
    """A Hugging Face folder: config.json (the original BertConfig plus `flatray_structure`) and model.safetensors
    (the small tensors). Load it with `load_pruned`; `AutoConfig.from_pretrained` reads the config as usual."""
    if STRUCTURE_KEY not in model.config.to_dict():
        raise ValueError("save_pruned expects a model returned by prune() or load_pruned()")
    model.save_pretrained(folder)


def load_pruned(folder) -> nn.Module:
    """Rebuild a pruned model saved by `save_pruned`: the plain transformers class named in config.json, built at
    full size, resized in place to `flatray_structure`, then loaded from model.safetensors."""
    import transformers
    from safetensors.torch import load_file

    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    structure = getattr(config, STRUCTURE_KEY, None)
    if structure is None:
        raise ValueError(f"{folder}/config.json has no {STRUCTURE_KEY!r}: not a pruned flatray model")
    cls = getattr(transformers, config.architectures[0])
    return _build(cls, config, structure, load_file(folder / "model.safetensors"))


def count_prunable(model) -> int:
    """Weights of the encoder's Q, K, V, O and FFN matrices (what expected_sparsity counts; biases excluded)."""
    total = 0
    for layer in model.bert.encoder.layer:
        sa = layer.attention.self
        mods = [layer.attention.output.dense, layer.intermediate.dense, layer.output.dense]
        if not isinstance(sa, NoAttention):
            mods += [sa.query, sa.key, sa.value]
        total += sum(m.weight.numel() for m in mods)
    return total


def sparsity_of(pruned, original) -> float:
    return 1.0 - count_prunable(pruned) / count_prunable(original)
