"""CoFi (METHODS.md section 5): hard-concrete masks, losses by hand, expected sparsity, ascent on the multipliers,
sparsity control on the tiny BERT, and physical pruning / saving that reproduces the masked model."""

import copy
import math

import pytest
import torch
import transformers
from transformers import BertConfig

from flatray import models
from flatray.methods import cofi
from flatray.data import TASKS

OFFSET = (2 / 3) * math.log(0.1 / 1.1)  # beta * log(-limit_a / limit_b): log_alpha where P(z != 0) = 0.5
BIG = 30.0  # log_alpha with P(z != 0) = 1 up to 1e-13


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tiny model is far faster on one thread, above all on a busy machine (about 50x here).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = models.load_model("tiny-bert", TASKS["toy"]).eval()
    with torch.no_grad():  # logits of order 1, so that "same logits at atol 1e-5" says something
        model.classifier.weight.normal_(0, 1.0)
    return model


def batch(model, seed=0, n=4, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0
    mask[2, length - 2:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def small_config():
    return BertConfig(hidden_size=4, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8)


def set_prob(masks, name, p, index=...):
    """Set log_alpha so that P(z != 0) = p exactly (p in {0, 1} -> +-BIG)."""
    la = BIG if p == 1 else -BIG if p == 0 else OFFSET + math.log(p / (1 - p))
    with torch.no_grad():
        masks.log_alpha[name][index] = la


# ---------------------------------------------------------------- hard concrete


def test_prob_nonzero_matches_monte_carlo():
    masks = cofi.CoFiMasks(small_config(), cofi.CoFiConfig(ramp_steps=1))
    la = torch.tensor([-3.0, -1.6, -0.5, 0.0, 1.0, 3.0])
    masks.log_alpha["hidden"] = torch.nn.Parameter(la)
    torch.manual_seed(0)
    z = torch.stack([masks.sample("hidden") for _ in range(20000)])
    assert z.min() == 0 and z.max() == 1  # hard: exact zeros and ones occur
    empirical = (z != 0).float().mean(0)
    # 20000 Bernoulli draws: std <= 0.0036, so 0.015 is > 4 standard deviations
    torch.testing.assert_close(empirical, masks.prob_nonzero("hidden").detach(), atol=0.015, rtol=0)


def test_init_keeps_the_structures_and_puts_the_units_at_the_droprate():
    # As in CoFi's code: layers, heads and hidden dims start kept (log_alpha at the top of the clamp range), the FFN
    # units at P(z = 0) = droprate_init; the expected sparsity starts at the units' share, near the ramp's 0.
    masks = cofi.CoFiMasks(small_config(), cofi.CoFiConfig(ramp_steps=1, droprate_init=0.5))
    for name in ("attn_layer", "ffn_layer", "heads", "hidden"):
        assert torch.equal(masks.log_alpha[name].detach(), torch.full_like(masks.log_alpha[name], math.log(100)))
    p = masks.prob_nonzero("units").detach()
    assert (p - 0.5).abs().max() < 0.02  # the 0.01 tie-breaking noise on log_alpha moves p by < 0.01
    # attention and FFN are half of the prunable weights each here (128 of 256); everything is at P 0.998 but the
    # units, at 0.5: s = 1 - 0.5 * 0.998^3 (layer, head, hidden) - 0.5 * 0.998^2 * 0.5 (layer, hidden, unit)
    kept = 0.5 * 0.998 ** 3 + 0.5 * 0.998 ** 2 * p.mean().item()
    assert masks.expected_sparsity().item() == pytest.approx(1 - kept, abs=1e-3)
    torch.manual_seed(1)
    masks.train()
    z = torch.cat([masks()["units"].flatten() for _ in range(2000)])
    assert abs((z == 0).float().mean().item() - 0.5) < 0.01


def kept_size(masks, z):
    """Prunable weights the masks z leave: (4 head_dim heads + 2 units) * hidden per layer, as `prune` counts."""
    hidden = int((z["hidden"] != 0).sum())
    per_layer = [4 * masks.head_dim * int((z["heads"][i] != 0).sum()) * bool(z["attn_layer"][i])
                 + 2 * int((z["units"][i] != 0).sum()) * bool(z["ffn_layer"][i]) for i in range(masks.num_layers)]
    return sum(per_layer) * hidden


def test_eval_masks_are_deterministic_keep_the_top_log_alpha_and_the_expected_size():
    torch.manual_seed(0)
    config = BertConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96)
    masks = cofi.CoFiMasks(config, cofi.CoFiConfig(ramp_steps=1))
    total = 3 * (4 * 48 * 48 + 2 * 48 * 96)
    for trial in range(5):
        with torch.no_grad():
            for p in masks.log_alpha.values():
                p.normal_(0, 2)
        masks.eval()
        a, b = masks(), masks()
        n_hidden, n_heads, n_units = masks.counts()
        for name in cofi.MASK_NAMES:
            assert torch.equal(a[name], b[name])
        assert n_hidden == math.floor(masks.prob_nonzero("hidden").sum().item() + 0.5)
        assert int((a["hidden"] != 0).sum()) == n_hidden
        for name, counts in (("heads", n_heads), ("units", n_units), ("hidden", [n_hidden])):
            la = masks.log_alpha[name].detach().reshape(-1, a[name].shape[-1])
            z = a[name].detach().reshape(la.shape)
            for row in range(la.shape[0]):
                kept = z[row] != 0
                assert kept.sum() == counts[row]
                if 0 < counts[row] < la.shape[1]:  # the kept ones are those with the largest log_alpha
                    assert la[row][kept].min() >= la[row][~kept].max()
                torch.testing.assert_close(z[row][kept], torch.sigmoid(0.8 * la[row][kept] / (2 / 3)))
        for i in range(3):  # a layer mask is on exactly while its layer keeps something
            assert bool(a["attn_layer"][i]) == (n_heads[i] > 0) and bool(a["ffn_layer"][i]) == (n_units[i] > 0)
        # the model they leave has the expected size, to within one FFN unit (2 * hidden weights)
        expected = (1 - masks.expected_sparsity().item()) * total
        assert abs(kept_size(masks, a) - expected) <= 2 * n_hidden
        assert masks.deterministic_sparsity() == pytest.approx(1 - kept_size(masks, a) / total)


def test_eval_masks_realize_the_expected_size_when_no_mask_is_decisive():
    # What short runs end with: every mask at the same P = 0.8 (Adam moves them in lockstep). CoFi's own counts
    # (round(sum P) per group, a layer kept iff P >= 0.5) keep every layer, 2 of 2 heads, 102 of 128 units and 51 of
    # 64 hidden dims: sparsity 0.28 where the expected one is 1 - 0.8^3 = 0.488.
    masks = cofi.CoFiMasks(models.load_model("tiny-bert", TASKS["toy"]).config, cofi.CoFiConfig(ramp_steps=1))
    for name in cofi.MASK_NAMES:
        set_prob(masks, name, 0.8)
    masks.eval()
    expected = masks.expected_sparsity().item()
    assert expected == pytest.approx(1 - 0.8 ** 3, abs=1e-5)
    cofi_counts = (2 * (4 * 32 * 2 + 2 * 102)) * 51 / 65536
    assert 1 - cofi_counts == pytest.approx(0.28, abs=0.01)
    n_hidden, n_heads, n_units = masks.counts()
    assert n_hidden == 51 and n_heads == [1, 1]  # round(0.8 * 2 * 0.8) = 1 head per layer
    assert abs(masks.deterministic_sparsity() - expected) < 2 * 51 / 65536
    # where the units cannot take up the rounding (they would all be kept, and more), a head does
    for name in ("attn_layer", "heads"):
        set_prob(masks, name, 0.72)  # 0.72 * 2 * 0.72 = 1.04 heads per layer: 1 each ...
    for name in ("units", "ffn_layer", "hidden"):
        set_prob(masks, name, 1)  # ... and the rest of the expected size would need 261 of the 256 units
    _, n_heads, n_units = masks.counts()
    assert sorted(n_heads) == [1, 2] and sum(n_units) == 197
    assert abs(masks.deterministic_sparsity() - masks.expected_sparsity().item()) < 0.005


# ---------------------------------------------------------------- losses by hand


def test_kd_loss_by_hand():
    s = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    t = torch.tensor([[3.0, 1.0], [0.5, 0.5]])
    T = 2.0

    def softmax2(a, b):
        return math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))

    total = 0.0
    for (s0, s1), (t0, t1) in zip(s.tolist(), t.tolist()):
        p = softmax2(t0 / T, t1 / T)  # teacher
        q = softmax2(s0 / T, s1 / T)  # student
        total += p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1])
    expected = T * T * total / 2  # batch mean over 2 rows
    assert cofi.kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)
    assert cofi.kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)
    # one output (regression): MSE of the raw outputs
    assert cofi.kd_loss(torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]])).item() == pytest.approx(2.5)


def test_layer_loss_by_hand():
    # hidden states: (embeddings, layer 1, layer 2), each [batch 1, 2 tokens, 2 dims]
    student = (torch.zeros(1, 2, 2), torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]))
    teacher = (torch.ones(1, 2, 2), torch.tensor([[[1.0, 0.0], [3.0, 0.0]]]), torch.tensor([[[2.0, 0.0], [1.0, 3.0]]]))
    # layer 1: squared errors 0, 4, 0, 16 -> mean 5; layer 2: 4, 0, 0, 4 -> mean 2; embeddings are not compared
    assert cofi.layer_loss(student, teacher).item() == pytest.approx(5 + 2)
    # only the first token counts: layer 1: (0 + 4) / 2 = 2; layer 2: (4 + 0) / 2 = 2
    assert cofi.layer_loss(student, teacher, attention_mask=torch.tensor([[1, 0]])).item() == pytest.approx(4)
    # a learnable map on the student side: starts as the identity
    lin = cofi.layer_transform(2)
    assert cofi.layer_loss(student, teacher, lin).item() == pytest.approx(7)
    with torch.no_grad():
        lin.weight.mul_(2)  # student doubled: layer 1 errors 1, 16, 9, 64 -> 22.5; layer 2: 4, 0, 1, 1 -> 1.5
    assert cofi.layer_loss(student, teacher, lin).item() == pytest.approx(24)


def test_lagrangian_and_target_by_hand():
    # s = 0.7, t = 0.5: 2 * 0.2 + 3 * 0.2^2 = 0.52
    assert cofi.lagrangian(torch.tensor(0.7), 0.5, torch.tensor(2.0), torch.tensor(3.0)).item() == pytest.approx(0.52)
    assert cofi.lagrangian(torch.tensor(0.3), 0.5, torch.tensor(2.0), torch.tensor(3.0)).item() == pytest.approx(-0.28)
    assert cofi.target_at(0, 100, 0.9) == 0.0
    assert cofi.target_at(25, 100, 0.9) == pytest.approx(0.225)
    assert cofi.target_at(100, 100, 0.9) == cofi.target_at(500, 100, 0.9) == pytest.approx(0.9)
    assert cofi.target_at(3, 0, 0.9) == 0.9


def test_expected_sparsity_by_hand():
    # L = 2, H = 2, head_dim = 2, D = 4, I = 8: total = L * (4 * D * D + 2 * D * I) = 2 * (64 + 64) = 256
    masks = cofi.CoFiMasks(small_config(), cofi.CoFiConfig(ramp_steps=1))
    for name in cofi.MASK_NAMES:
        set_prob(masks, name, 1)
    assert masks.expected_sparsity().item() == pytest.approx(0.0, abs=1e-6)
    set_prob(masks, "hidden", 0.5)  # every weight matrix touches the hidden dim once: half of everything
    assert masks.expected_sparsity().item() == pytest.approx(0.5, abs=1e-6)
    set_prob(masks, "hidden", 1)
    # layer 1's attention off: its 4 * 2 heads * 2 * 4 = 64 go; layer 0's 8 units at P 0.5: 4 units * 2 * 4 = 32 go
    set_prob(masks, "attn_layer", 0, 1)
    set_prob(masks, "units", 0.5, 0)
    assert masks.expected_sparsity().item() == pytest.approx(1 - (256 - 64 - 32) / 256, abs=1e-6)
    # and one head of layer 0 at P 0.5 on top: 0.5 * 4 * 2 * 4 = 16 more
    set_prob(masks, "heads", 0.5, (0, 1))
    assert masks.expected_sparsity().item() == pytest.approx(1 - (256 - 64 - 32 - 16) / 256, abs=1e-6)


@pytest.mark.parametrize("target, lambda_1, la_step", [(0.2, 1.0, +1), (0.6, 1.0, +1), (0.6, -1.0, -1)])
def test_one_step_ascends_the_multipliers_and_descends_the_masks_by_hand(target, lambda_1, la_step):
    """Adam's first step is lr * sign(gradient) (m / sqrt(v) = g / |g|). L = l1 (s - t) + l2 (s - t)^2:
    dL/dl1 = s - t, dL/dl2 = (s - t)^2 >= 0, so the multipliers go up those (ascent); dL/dlog_alpha =
    (l1 + 2 l2 (s - t)) ds/dlog_alpha with ds/dlog_alpha < 0, so the masks go up (s down) while l1 + 2 l2 (s - t) > 0."""
    lr = 0.1
    masks = cofi.CoFiMasks(small_config(), cofi.CoFiConfig(ramp_steps=1, lr_masks=lr, lr_lambdas=lr))
    with torch.no_grad():
        for p in masks.log_alpha.values():
            p.zero_()  # P(z != 0) = sigmoid(1.599) = 0.832 everywhere ...
        masks.log_alpha["hidden"][0] = math.log(100) - 0.05  # ... but one hidden dim, near the top of CoFi's range
        masks.lambda_1.fill_(lambda_1)
        masks.lambda_2.fill_(1.0)
    s = masks.expected_sparsity()
    gap = s.item() - target
    p, top = torch.sigmoid(torch.tensor([1.599, 4.555 + 1.599])).tolist()
    assert s.item() == pytest.approx(1 - p * p * (3 * p + top) / 4, abs=1e-3)  # layer * head (unit) * hidden
    assert (lambda_1 + 2 * gap > 0) == (la_step > 0)  # the case: which way the masks must go
    opt = cofi.mask_optimizer(masks)
    cofi.lagrangian(s, target, masks.lambda_1, masks.lambda_2).backward()
    opt.step()
    assert masks.lambda_1.item() == pytest.approx(lambda_1 + lr * math.copysign(1, gap), abs=1e-6)
    assert masks.lambda_2.item() == pytest.approx(1.0 + lr, abs=1e-6)
    for name, p in masks.log_alpha.items():
        moved = p.detach().flatten()
        if name == "hidden":
            top = math.log(100) if la_step > 0 else math.log(100) - 0.05 - lr
            assert moved[0].item() == pytest.approx(top, abs=1e-5)  # clamped into CoFi's range after the step
            moved = moved[1:]
        torch.testing.assert_close(moved, torch.full_like(moved, la_step * lr), atol=1e-5, rtol=0)
    assert (masks.expected_sparsity().item() < s.item()) == (la_step > 0)


# ---------------------------------------------------------------- masked forward and sparsity control


def test_attach_samples_once_per_forward_and_detaches(teacher):
    student = copy.deepcopy(teacher)
    masks = cofi.CoFiMasks(student.config, cofi.CoFiConfig(ramp_steps=1))
    calls = []
    original = masks.forward
    masks.forward = lambda: calls.append(1) or original()
    b = batch(teacher)
    with torch.no_grad():
        reference = teacher(**b).logits
        detach = cofi.attach(student, masks)
        masked = student(**b).logits
        assert len(calls) == 1 and not torch.allclose(masked, reference, atol=1e-3)
        detach()
        torch.testing.assert_close(student(**b).logits, reference)


def test_masks_at_one_leave_the_model_unchanged(teacher):
    student = copy.deepcopy(teacher)
    masks = cofi.CoFiMasks(student.config, cofi.CoFiConfig(ramp_steps=1)).eval()
    for name in cofi.MASK_NAMES:
        set_prob(masks, name, 1)  # deterministic value sigmoid(0.8 * 30 / (2/3)) = 1 - 2e-16
    b = batch(teacher)
    with torch.no_grad():
        reference = teacher(**b, output_hidden_states=True)
        cofi.attach(student, masks)
        out = student(**b, output_hidden_states=True)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=0)
    for h, r in zip(out.hidden_states, reference.hidden_states):
        torch.testing.assert_close(h, r, atol=1e-5, rtol=1e-5)


def test_lagrangian_with_kd_reaches_the_target_sparsity(teacher):
    torch.manual_seed(0)
    student = copy.deepcopy(teacher).train()
    student.requires_grad_(False)  # masks and lambdas only
    cfg = cofi.CoFiConfig(ramp_steps=100, target_sparsity=0.5, lr_masks=0.1, lr_lambdas=0.1)
    masks = cofi.CoFiMasks(student.config, cfg)
    opt = cofi.mask_optimizer(masks)
    cofi.attach(student, masks)
    for step in range(400):
        b = batch(teacher, seed=step, n=8, length=16)
        with torch.no_grad():
            teacher_logits = teacher(**b).logits
        s = masks.expected_sparsity()
        loss = cfg.alpha_ce * cofi.kd_loss(student(**b).logits, teacher_logits, cfg.temperature) + cofi.lagrangian(
            s, cofi.target_at(step, cfg.ramp_steps, cfg.target_sparsity), masks.lambda_1, masks.lambda_2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(masks.expected_sparsity().item() - 0.5) < 0.02


# ---------------------------------------------------------------- physical pruning


def pruning_masks(model, case):
    masks = cofi.CoFiMasks(model.config, cofi.CoFiConfig(ramp_steps=1)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in masks.log_alpha.values():  # kept values in (0, 1) that differ: folding must be exact
            p.copy_(torch.rand(p.shape, generator=g) * 3 + 1)
        masks.log_alpha["hidden"][[1, 5, 17, 40, 63]] = -BIG
        masks.log_alpha["units"][0, :50] = -BIG
        masks.log_alpha["units"][1, 100:] = -BIG
        masks.log_alpha["heads"][0, 1] = -BIG
        if case == "layers":
            masks.log_alpha["ffn_layer"][1] = -BIG  # whole FFN of layer 1
            masks.log_alpha["attn_layer"][0] = -BIG  # whole attention of layer 0
    return masks


@pytest.mark.parametrize("case", ["units", "layers"])
def test_prune_is_smaller_and_reproduces_the_masked_model(teacher, case):
    student = copy.deepcopy(teacher)
    masks = pruning_masks(student, case)
    b = batch(teacher, seed=7)
    with torch.no_grad():
        detach = cofi.attach(student, masks)
        masked = student(**b, output_hidden_states=True)
        detach()
    pruned = cofi.prune(student, masks)
    with torch.no_grad():
        out = pruned(**b, output_hidden_states=True)
    torch.testing.assert_close(out.logits, masked.logits, atol=1e-5, rtol=0)
    s = pruned.config.flatray_structure
    z = masks()
    keep = z["hidden"].nonzero().squeeze(-1)
    for h_pruned, h_masked in zip(out.hidden_states, masked.hidden_states):  # same residual stream, pruned dims gone
        torch.testing.assert_close(h_pruned, h_masked[..., keep], atol=1e-5, rtol=1e-5)
        assert h_masked[..., z["hidden"] == 0].abs().max() == 0

    # what the deterministic masks keep (rounding of the expected counts may drop a few more than the -BIG ones)
    hidden = len(keep)
    heads = [int((z["heads"][i] != 0).sum()) if z["attn_layer"][i] else 0 for i in range(2)]
    units = [int((z["units"][i] != 0).sum()) if z["ffn_layer"][i] else 0 for i in range(2)]
    assert s["hidden_size"] == hidden <= 59 and [len(h) for h in s["heads"]] == heads
    assert s["intermediate_sizes"] == units and units[0] <= 78 and heads[1] == 2
    assert pruned.bert.embeddings.word_embeddings.weight.shape[1] == hidden
    if case == "units":
        assert heads == [1, 2] and 0 < units[1] <= 100 and s["attention_removed"] == s["ffn_removed"] == []
    else:
        assert heads == [0, 2] and units[1] == 0 and s["attention_removed"] == [0] and s["ffn_removed"] == [1]
        assert isinstance(pruned.bert.encoder.layer[0].attention.self, cofi.NoAttention)
        assert pruned.bert.encoder.layer[1].intermediate.dense.weight.shape == (0, hidden)
    # the real count equals the formula on the kept structures: (4 * head_dim * heads + 2 * units) * hidden per layer
    expected = sum((4 * 32 * n + 2 * m) * hidden for n, m in zip(heads, units))
    assert cofi.count_prunable(pruned) == expected < cofi.count_prunable(student) == 2 * (4 * 64 * 64 + 2 * 64 * 128)
    assert cofi.sparsity_of(pruned, student) == pytest.approx(1 - expected / 65536)
    n_pruned, n_full = (sum(p.numel() for p in m.parameters()) for m in (pruned, student))
    assert n_pruned < n_full
    # the pruned model trains like any model (it is fine-tuned next)
    pruned.train()
    loss = pruned(**b, labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in pruned.parameters() if p.grad is not None)


def test_save_and_load_pruned_round_trip(teacher, tmp_path):
    student = copy.deepcopy(teacher)
    masks = pruning_masks(student, "layers")
    pruned = cofi.prune(student, masks)
    cofi.save_pruned(pruned, tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "bert" and config.flatray_structure == pruned.config.flatray_structure
    loaded = cofi.load_pruned(tmp_path)
    assert type(loaded) is type(pruned)
    b = batch(teacher, seed=11)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, pruned(**b).logits, atol=1e-6, rtol=0)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in pruned.parameters())
    # plain from_pretrained refuses (size mismatch) rather than silently loading random weights
    with pytest.raises(RuntimeError):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
