"""LSQ quantizers against the formulas of METHODS.md section 8, quantized BERT layers, packed export."""

import math

import pytest
import torch
from torch import nn

from flatray import models
from flatray.methods import lsq
from flatray.data import TASKS

torch.set_num_threads(1)

V = [-3.0, -0.7, 0.2, 0.55, 2.6]
UPSTREAM = [1.0, 2.0, 3.0, 4.0, 5.0]  # not all ones, so each element's d v_q / d s counts with its own weight


def lsq_grads(quantizer, v, upstream):
    v = torch.tensor(v, requires_grad=True)
    out = quantizer(v)
    out.backward(torch.tensor(upstream).expand_as(out))
    return out.detach(), v.grad, quantizer.step_size.grad.item()


# v/s = [-6, -1.4, 0.4, 1.1, 5.2] at s = 0.5, b = 2. Per element d v_q / d s: -Q_N below the range, Q_P above,
# round(v/s) - v/s inside; the sum is weighted by UPSTREAM and scaled by g = 1 / sqrt(N * Q_P), N = 5.
HAND = {
    # Q_N = 2, Q_P = 1: codes [-2, -1, 0, 1, 1]; inside: -1.4 and 0.4 (1.1 > Q_P is above)
    "signed": dict(signed=True, symmetric=False, q=(2, 1), vq=[-1.0, -0.5, 0.0, 0.5, 0.5], gv=[0, 2, 3, 0, 0],
                   gs=(-2 * 1 + 0.4 * 2 - 0.4 * 3 + 1 * 4 + 1 * 5) / math.sqrt(5 * 1)),
    # ternary, Q_N = Q_P = 1: codes [-1, -1, 0, 1, 1]; inside: 0.4 only
    "symmetric": dict(signed=True, symmetric=True, q=(1, 1), vq=[-0.5, -0.5, 0.0, 0.5, 0.5], gv=[0, 0, 3, 0, 0],
                      gs=(-1 * 1 - 1 * 2 - 0.4 * 3 + 1 * 4 + 1 * 5) / math.sqrt(5 * 1)),
    # Q_N = 0, Q_P = 3: codes [0, 0, 0, 1, 3]; inside: 0.4 and 1.1; below contributes -Q_N = 0
    "unsigned": dict(signed=False, symmetric=False, q=(0, 3), vq=[0.0, 0.0, 0.0, 0.5, 1.5], gv=[0, 0, 3, 4, 0],
                     gs=(0 * 1 + 0 * 2 - 0.4 * 3 - 0.1 * 4 + 3 * 5) / math.sqrt(5 * 3)),
}


@pytest.mark.parametrize("case", list(HAND))
def test_forward_and_gradients_match_the_formulas(case):
    h = HAND[case]
    assert lsq.q_range(2, h["signed"], h["symmetric"]) == h["q"]
    q = lsq.LSQQuantizer(2, signed=h["signed"], symmetric=h["symmetric"])
    q.init_from(torch.tensor(V))  # marks it initialised; then s is set by hand
    with torch.no_grad():
        q.step_size.fill_(0.5)
    out, grad_v, grad_s = lsq_grads(q, V, UPSTREAM)
    assert out.tolist() == h["vq"]
    assert grad_v.tolist() == h["gv"]
    assert grad_s == pytest.approx(h["gs"], rel=1e-6)
    assert q.integers(torch.tensor(V)).tolist() == [round(x / 0.5) for x in h["vq"]]


def test_q_range():
    assert lsq.q_range(3, True, False) == (4, 3)
    assert lsq.q_range(4, True, True) == (7, 7)
    assert lsq.q_range(8, False, False) == (0, 255)
    assert lsq.q_range(8, True, False) == (128, 127)


def test_activation_gradient_scale_counts_features_not_elements():
    """Two rows of V: weights scale by 1/sqrt(10 Q_P) (all elements), activations by 1/sqrt(5 Q_P) (features)."""
    rows = [V, V]
    raw = 2 * HAND["signed"]["gs"] * math.sqrt(5)  # unscaled sum over both rows
    for kind, n in (("weight", 10), ("activation", 5)):
        q = lsq.LSQQuantizer(2, kind=kind)
        q.init_from(torch.tensor(rows))
        with torch.no_grad():
            q.step_size.fill_(0.5)
        _, grad_v, grad_s = lsq_grads(q, rows, UPSTREAM)
        assert grad_s == pytest.approx(raw / math.sqrt(n * 1), rel=1e-6)
        assert grad_v.tolist() == [HAND["signed"]["gv"]] * 2


def test_agrees_with_the_reference_lsq_trick():
    """Esser et al.'s reference code: grad_scale and round_pass through autograd."""
    torch.manual_seed(0)
    v = torch.randn(7, 9) * 0.3
    for bits, signed, symmetric in ((3, True, False), (2, True, True), (4, False, False)):
        q = lsq.LSQQuantizer(bits, signed, symmetric, kind="activation")
        q_n, q_p = lsq.q_range(bits, signed, symmetric)
        v1 = v.clone().requires_grad_()
        out = q(v1)
        (out * torch.arange(63.0).view(7, 9)).sum().backward()

        s = q.step_size.detach().clone().requires_grad_()
        v2 = v.clone().requires_grad_()
        g = 1 / math.sqrt(9 * q_p)
        s_scaled = (s - s * g).detach() + s * g
        x = (v2 / s_scaled).clamp(-q_n, q_p)
        ref = ((x.round() - x).detach() + x) * s_scaled
        (ref * torch.arange(63.0).view(7, 9)).sum().backward()
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(v1.grad, v2.grad)
        torch.testing.assert_close(q.step_size.grad, s.grad, rtol=1e-5, atol=1e-6)


def test_keeps_the_input_dtype():
    q = lsq.LSQQuantizer(4)
    v = torch.randn(32, dtype=torch.bfloat16, requires_grad=True)
    out = q(v)
    out.sum().backward()
    assert out.dtype == v.grad.dtype == torch.bfloat16 and q.step_size.grad.dtype == torch.float32
    assert torch.equal(out, (q.integers(v) * q.step_size.to(torch.bfloat16)).to(torch.bfloat16))


def test_init_from_the_weight_and_lazily_from_the_first_batch():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    ql = lsq.QuantLinear(linear, bits=3, act_bits=8, init_scale=0.5)
    expected = 0.5 * 2 * linear.weight.abs().mean() / math.sqrt(3)
    assert ql.weight_quantizer.step_size.item() == pytest.approx(expected.item(), rel=1e-6)
    assert bool(ql.weight_quantizer.initialized)

    act = ql.input_quantizer
    assert not bool(act.initialized)
    x1, x2 = torch.randn(4, 16), 10 * torch.randn(4, 16)
    ql(x1)
    s1 = act.step_size.item()
    assert s1 == pytest.approx((0.5 * 2 * x1.abs().mean() / math.sqrt(127)).item(), rel=1e-6)
    ql(x2)
    assert act.step_size.item() == s1  # initialised once, from the first batch only

    fresh = lsq.QuantLinear(nn.Linear(16, 8), bits=3, act_bits=8)
    fresh.load_state_dict(ql.state_dict())
    assert bool(fresh.input_quantizer.initialized)
    fresh(x2)
    assert fresh.input_quantizer.step_size.item() == s1

    # loading an uninitialised state makes the next batch initialise again
    fresh.load_state_dict(lsq.QuantLinear(nn.Linear(16, 8), bits=3, act_bits=8).state_dict())
    fresh(x2)
    assert fresh.input_quantizer.step_size.item() == pytest.approx((2 * x2.abs().mean() / math.sqrt(127)).item())


def tiny(seed=0):
    torch.manual_seed(seed)
    return models.load_model("tiny-bert", TASKS["toy"])


def batch(model, seed=0, size=4, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (size,),
                                                                                               generator=g)}


def test_quantize_model_keeps_names_and_the_head():
    m = tiny()
    before = set(dict(m.named_parameters()))
    lsq.quantize_model(m, lsq.QuantSpec(weight_bits=4))
    after = dict(m.named_parameters())
    assert before <= set(after)
    assert set(after) - before == {n for n in after if n.endswith("_quantizer.step_size")}

    layers = lsq.quantized_layers(m)
    assert len(layers) == 2 * 6 and all(isinstance(q, lsq.QuantLinear) for q in layers.values())
    assert all(".encoder." in n for n in layers)
    assert all(q.input_quantizer is not None for q in layers.values())
    assert type(m.classifier) is nn.Linear and type(m.bert.pooler.dense) is nn.Linear
    emb = m.bert.embeddings
    assert all(type(e) is nn.Embedding for e in (emb.word_embeddings, emb.position_embeddings,
                                                 emb.token_type_embeddings))

    steps, latent = lsq.step_size_params(m), lsq.latent_params(m)
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert len(steps) == 2 * 12
    assert {id(p) for p in steps} | {id(p) for p in latent} == trainable
    assert not {id(p) for p in steps} & {id(p) for p in latent}

    out = m(**batch(m))
    out.loss.backward()
    assert all(p.grad is not None for p in steps)


@pytest.mark.parametrize("bits,symmetric,levels", [(2, False, 4), (3, False, 8), (4, False, 16), (2, True, 3)])
def test_quantized_weights_take_at_most_2_to_the_b_values(bits, symmetric, levels):
    m = lsq.quantize_model(tiny(), lsq.QuantSpec(weight_bits=bits, symmetric=symmetric))
    for name, layer in lsq.quantized_layers(m).items():
        wq = layer.weight_quantizer(layer.weight)
        assert 2 <= wq.unique().numel() <= levels, name
    fractions = lsq.level_fractions(m)
    q_n, q_p = lsq.q_range(bits, True, symmetric)
    assert list(fractions) == [f"quant/level={k}" for k in range(-q_n, q_p + 1)]
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert set(lsq.mean_step_sizes(m)) == {f"quant/step/{k}" for k in
                                           ("query", "key", "value", "attention_output", "intermediate", "output")}


def test_embeddings_and_pooler_when_asked():
    m = lsq.quantize_model(tiny(), lsq.QuantSpec(weight_bits=4, embedding_bits=8, layers="encoder+pooler"))
    emb = m.bert.embeddings
    assert all(isinstance(e, lsq.QuantEmbedding) for e in
               (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings))
    assert isinstance(m.bert.pooler.dense, lsq.QuantLinear) and type(m.classifier) is nn.Linear
    assert {"quant/step/embeddings", "quant/step/pooler"} <= set(lsq.mean_step_sizes(m))
    assert emb.word_embeddings.weight_quantizer(emb.word_embeddings.weight).unique().numel() <= 256


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("numel", [1, 7, 13, 64, 1001])
def test_pack_unpack_round_trip(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(numel))
    packed = lsq.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel * bits / 8)
    assert torch.equal(lsq.unpack_bits(packed, bits, numel), codes)


def test_pack_layout_and_range_check():
    assert lsq.pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]  # first code in the low bits
    assert lsq.pack_bits(torch.tensor([5, 6, 7]), 3).tolist() == [0b11110101, 0b1]  # 5 | 6 << 3 | 7 << 6: 9 bits
    with pytest.raises(ValueError):
        lsq.pack_bits(torch.tensor([4]), 2)


def test_codes_times_step_size_requantize_exactly():
    """After loading, weight = codes * s and the quantizer recomputes round(clip(weight / s)) * s."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        s = torch.rand(1, generator=g) * 10.0 ** torch.randint(-6, 2, (1,), generator=g)
        codes = torch.arange(-128, 128, dtype=torch.float32)
        w = codes * s
        assert torch.equal((w / s).clamp(-128, 127).round(), codes)


@pytest.mark.parametrize("spec", [
    lsq.QuantSpec(weight_bits=2, symmetric=True),
    lsq.QuantSpec(weight_bits=3),
    lsq.QuantSpec(weight_bits=4, embedding_bits=8, layers="encoder+pooler", act_signed=False),
], ids=["2bit-ternary", "3bit", "4bit-emb8-pooler"])
def test_export_round_trip(spec, tmp_path):
    m = lsq.quantize_model(tiny(), spec)
    lsq.calibrate(m, batch(m, seed=0))
    steps = lsq.step_size_params(m)
    initial = [p.item() for p in steps]
    opt = torch.optim.AdamW([{"params": lsq.latent_params(m), "lr": 1e-3},
                             {"params": steps, "lr": 1e-2, "weight_decay": 0.0}])
    m.train()
    for i in range(3):
        m(**batch(m, seed=i)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.item() != s0 for p, s0 in zip(steps, initial))  # every step size was trained

    path = tmp_path / "model.safetensors"
    lsq.export(m, path)
    loaded = lsq.load_exported(path)
    assert type(loaded) is type(m)

    # size: packed codes at b bits + full-precision rest; the only overhead is the safetensors JSON header
    layers = lsq.quantized_layers(m)
    q_bytes = sum(math.ceil(q.weight.numel() * q.weight_quantizer.bits / 8) for q in layers.values())
    fp_bytes = sum(v.numel() * v.element_size() for k, v in m.state_dict().items()
                   if k.removesuffix(".weight") not in layers or not k.endswith(".weight"))
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert len(raw) == 8 + header + q_bytes + fp_bytes  # every byte accounted for: no padding, no float weights
    # The header (tensor index ~125 B per tensor, config + spec + shapes ~2.5 KB) is a fixed cost: 4.4% of the
    # tiny model's file at 2/3 bits, 14% with 8-bit embeddings (109 KB payload), < 0.1% for BERT-base.
    n_tensors = len(m.state_dict())
    assert header <= 200 * n_tensors + 4096
    if spec.embedding_bits is None:
        assert len(raw) <= 1.05 * (q_bytes + fp_bytes)

    m.eval()
    b = batch(m, seed=99)
    b.pop("labels")
    with torch.no_grad():
        for name, q in layers.items():
            mine = loaded.get_submodule(name)
            assert torch.equal(mine.weight_quantizer(mine.weight), q.weight_quantizer(q.weight)), name
        torch.testing.assert_close(loaded(**b).logits, m(**b).logits, atol=1e-6, rtol=0)


def test_export_round_trip_in_bf16(tmp_path):
    """A bf16 engine's module: reloaded in bf16, same quantized weights and logits."""
    m = lsq.quantize_model(tiny(), lsq.QuantSpec(weight_bits=3)).to(torch.bfloat16).eval()
    b = batch(m, seed=5)
    b.pop("labels")
    with torch.no_grad():
        expected = m(**b).logits
    lsq.export(m, tmp_path / lsq.EXPORT_FILE)
    loaded = lsq.load_exported(tmp_path / lsq.EXPORT_FILE)
    assert loaded.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, expected, atol=0, rtol=0)
