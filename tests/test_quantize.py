"""Dynamic int8 PTQ against torch.ao's own module types, on the tiny BERT."""

import torch

from flatray import models
from flatray.methods import ptq as quantize
from flatray.data import TASKS


def test_linear_layers_become_dynamic_int8_and_embeddings_stay_float():
    model = models.load_model("tiny-bert", TASKS["toy"]).eval()
    q = quantize.quantize_dynamic_int8(model)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    qmods = dict(q.named_modules())
    assert linears and all(isinstance(qmods[n], dynamic) for n in linears)
    assert qmods["bert.encoder.layer.0.attention.self.query"].weight().dtype == torch.qint8
    assert isinstance(qmods["bert.embeddings.word_embeddings"], torch.nn.Embedding)
    assert qmods["bert.embeddings.word_embeddings"].weight.dtype == torch.float32
    assert isinstance(next(model.modules()).bert.encoder.layer[0].attention.self.query, torch.nn.Linear)  # untouched
    assert quantize.serialized_bytes(q) < quantize.serialized_bytes(model)
    batch = {"input_ids": torch.randint(5, model.config.vocab_size, (4, 12))}
    with torch.no_grad():
        # int8 weights: close to the float logits, not identical
        diff = (q(**batch).logits - model(**batch).logits).abs().max().item()
    assert 0 < diff < 0.05
    assert quantize.cpu_latency(q, [batch], repeats=2) > 0


def test_int8_embeddings_option_shrinks_the_tables():
    model = models.load_model("tiny-bert", TASKS["toy"]).eval()
    linear_only = quantize.quantize_dynamic_int8(model)
    both = quantize.quantize_dynamic_int8(model, embeddings=True)
    assert isinstance(both.bert.embeddings.word_embeddings, torch.ao.nn.quantized.Embedding)
    assert isinstance(linear_only.bert.embeddings.word_embeddings, torch.nn.Embedding)
    # the embedding tables are most of the tiny model: int8 rows take about a quarter of their float size
    assert quantize.serialized_bytes(both) < 0.5 * quantize.serialized_bytes(linear_only)
    batch = {"input_ids": torch.randint(5, model.config.vocab_size, (4, 12))}
    with torch.no_grad():
        assert (both(**batch).logits - model(**batch).logits).abs().max().item() < 0.05
