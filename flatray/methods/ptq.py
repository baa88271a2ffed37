"""Post-training dynamic int8 quantization (METHODS.md section 6).

`torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`: Linear weights are stored as int8
with a per-tensor scale, activations are quantized on the fly per batch; embeddings and LayerNorm stay float.
It runs on the CPU only. (torch.ao.quantization is deprecated in favour of torchao; it still works in torch 2.13.)
"""

from __future__ import annotations

import copy
import io
import statistics
import time
import warnings

import torch
from flatray.methods import INT8_FILE


class Int8Embedding(torch.ao.nn.quantized.Embedding):
    """torch.ao's weight-only int8 embedding (one scale per row); its kernel needs contiguous indices, and BERT
    passes a slice of its position_ids buffer."""

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return super().forward(indices.contiguous())

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant=False):
        quantized = super().from_float(mod, use_precomputed_fake_quant)
        quantized.__class__ = cls  # the parent builds its own class by name
        return quantized


def quantize_dynamic_int8(model: torch.nn.Module, embeddings: bool = False) -> torch.nn.Module:
    """A quantized copy of `model` on the CPU (the float model is left as it was). `embeddings=True` also stores
    the embedding tables as int8 (weight-only, per row): beyond P1, which quantizes the Linear layers only."""
    from torch.ao.quantization import default_dynamic_qconfig, float_qparams_weight_only_qconfig
    from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings

    float_copy = copy.deepcopy(model).cpu().eval()
    spec = {torch.nn.Linear: default_dynamic_qconfig}
    mapping = get_default_dynamic_quant_module_mappings()
    if embeddings:
        spec[torch.nn.Embedding] = float_qparams_weight_only_qconfig
        mapping = {**mapping, torch.nn.Embedding: Int8Embedding}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        return torch.ao.quantization.quantize_dynamic(float_copy, spec, dtype=torch.qint8, mapping=mapping)


def serialized_bytes(model: torch.nn.Module) -> int:
    """Size of the model's state_dict as torch.save writes it (the int8 model's packed weights included)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


@torch.no_grad()
def cpu_latency(model: torch.nn.Module, batches: list[dict], repeats: int = 3) -> float:
    """Seconds per batch on the CPU: the median over `repeats` passes of the mean over `batches` (one warm-up)."""
    model = model.cpu().eval()
    batches = [{k: v.cpu() for k, v in b.items()} for b in batches]
    model(**batches[0])
    per_pass = []
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            model(**b)
        per_pass.append((time.perf_counter() - start) / len(batches))
    return statistics.median(per_pass)


def load_int8(folder, spec) -> torch.nn.Module:
    """The int8 model of a `kind: ptq` checkpoint: the float architecture from config.json, quantized as the run
    did (its flatray_run.yaml), then the saved int8 weights and scales loaded into it."""
    import yaml
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(folder)
    run = yaml.safe_load(open(f"{folder}/flatray_run.yaml"))
    cls = AutoModelForQuestionAnswering if spec.kind == "qa" else AutoModelForSequenceClassification
    model = quantize_dynamic_int8(cls.from_config(config), embeddings=run["ptq"]["embeddings"])
    model.load_state_dict(torch.load(f"{folder}/{INT8_FILE}", weights_only=False))
    return model.eval()


# ------------------------------------------------------------------------------------------------ in a run


def run(ctx) -> None:
    """kind: ptq: dynamic int8 quantization of a finished model (model: its checkpoint), on the CPU: dev metric,
    serialized size and latency per dev batch, before and after. The checkpoint holds the int8 state_dict."""
    from flatray import models
    from flatray.train.checkpoint import write_run_files

    float_model = models.load_model(ctx.cfg.model, ctx.spec).eval()
    int8_model = quantize_dynamic_int8(float_model, embeddings=ctx.cfg.ptq.embeddings)
    metrics = {}
    for name, model in (("float", float_model), ("int8", int8_model)):
        metrics.update({f"{name}/{k}": v for k, v in ctx.evaluate(model).items()})
    metrics["score"] = metrics["int8/score"]
    if ctx.rank == 0:
        first = next(iter(ctx.tokenized.evals.values())).features
        batches = ctx.batches(first, ctx.cfg.train.eval_batch_size * ctx.cfg.ptq.latency_batches)
        for name, model in (("float", float_model), ("int8", int8_model)):
            metrics[f"{name}/size_mb"] = serialized_bytes(model) / 2**20
            metrics[f"{name}/latency_ms"] = 1000 * cpu_latency(model, batches)
        metrics["size_ratio"] = metrics["float/size_mb"] / metrics["int8/size_mb"]
        metrics["speedup"] = metrics["float/latency_ms"] / metrics["int8/latency_ms"]
        ctx.log("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def save(folder) -> None:
        torch.save(int8_model.state_dict(), folder / INT8_FILE)
        float_model.config.save_pretrained(folder)
        ctx.tokenizer.save_pretrained(folder)
        write_run_files(folder, ctx.cfg, metrics)

    ctx.report(metrics, save)
