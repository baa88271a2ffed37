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


def quantize_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A quantized copy of `model` on the CPU (the float model is left as it was)."""
    float_copy = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(float_copy, {torch.nn.Linear}, dtype=torch.qint8)


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


INT8_FILE = "model_int8.pt"


def load_int8(folder, spec) -> torch.nn.Module:
    """The int8 model of a `kind: ptq` checkpoint: the float architecture from config.json, quantized, then the
    saved int8 weights and scales loaded into it."""
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(folder)
    cls = AutoModelForQuestionAnswering if spec.kind == "qa" else AutoModelForSequenceClassification
    model = quantize_dynamic_int8(cls.from_config(config))
    model.load_state_dict(torch.load(f"{folder}/{INT8_FILE}", weights_only=False))
    return model.eval()
