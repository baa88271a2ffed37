"""Sharpness (METHODS.md section 7) against closed forms on a quadratic, plus a run on the tiny BERT."""

from functools import partial

import numpy as np
import pytest
import torch

from flatray.methods.sharpness import HashProjection, SharpnessResult, eval_subset_loss, sharpness, sharpness_many

N = 40
CONST = 1.0


class Quadratic(torch.nn.Module):
    """L(w) = 0.5 * sum_i h_i w_i^2 + CONST. float64, so the checks see the optimiser's math, not float32 rounding."""

    def __init__(self, scale=1.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (N,), generator=g) * 2 - 1
        self.w = torch.nn.Parameter((signs * (0.5 + 1.5 * torch.rand(N, generator=g))).double())
        self.register_buffer("h", scale * (0.5 + 2.5 * torch.rand(N, generator=g)).double())

    def loss(self, w=None):
        w = self.w if w is None else w
        return 0.5 * (self.h * w**2).sum() + CONST


def quad_loss(model):
    return model.loss()


def phi_of(loss, max_loss):
    return 100 * (max_loss - loss) / (1 + loss)


def full_space_phi(model, eps):
    """The box max is at z_i = sign(w_i) * eps * (|w_i| + 1): each coordinate maximises |w_i + z_i| on its own."""
    w = model.w.detach()
    z = torch.sign(w) * eps * (w.abs() + 1)
    return phi_of(model.loss(w).item(), model.loss(w + z).item())


def dense(proj):
    """The n x p matrix A, column by column from project(e_j) (flattened over all tensors)."""
    cols = [torch.cat([t.flatten() for t in proj.project(e)]) for e in torch.eye(proj.dim, dtype=torch.float64)]
    return torch.stack(cols, dim=1)


def hashed_phi(model, eps, dim, seed):
    """Columns of A have disjoint supports, so L(w + A z) is a sum of 1-D convex quadratics in z_j: each is
    maximised at one end of [-b_j, b_j]."""
    w, h = model.w.detach(), model.h
    a = dense(HashProjection([model.w], dim, seed))
    b = eps * (torch.linalg.pinv(a) @ w).abs() + eps
    gain = 0.0
    for j in range(dim):
        gains = [0.5 * (h * ((w + a[:, j] * end) ** 2 - w**2)).sum().item() for end in (-b[j], b[j])]
        gain += max(gains)
    loss = model.loss().item()
    return phi_of(loss, loss + gain)


@pytest.mark.parametrize("eps", [5e-3, 1e-3, 5e-4, 0.1])
def test_full_space_matches_closed_form(eps):
    model = Quadratic()
    res = sharpness(model, quad_loss, eps, dim=None)
    assert isinstance(res, SharpnessResult) and res.dim is None and res.eps == eps
    assert res.loss == pytest.approx(model.loss().item(), rel=1e-12)
    assert res.phi == pytest.approx(full_space_phi(model, eps), rel=1e-6)


@pytest.mark.parametrize("dim,seed", [(8, 0), (8, 1), (25, 3)])
@pytest.mark.parametrize("eps", [5e-3, 0.05])
def test_hashed_matches_closed_form(dim, seed, eps):
    model = Quadratic()
    res = sharpness(model, quad_loss, eps, dim=dim, seed=seed)
    assert res.dim == dim
    assert res.phi == pytest.approx(hashed_phi(model, eps, dim, seed), rel=1e-6)


@pytest.mark.parametrize("dim", [None, 8])
def test_phi_positive_grows_with_eps_and_curvature(dim):
    phis = [sharpness(Quadratic(), quad_loss, eps, dim=dim).phi for eps in (5e-4, 1e-3, 5e-3)]
    assert 0 < phis[0] < phis[1] < phis[2]
    sharp = sharpness(Quadratic(scale=10.0), quad_loss, 5e-3, dim=dim).phi
    assert sharp > phis[2]


def test_hash_projection_pinv_and_adjoint():
    g = torch.Generator().manual_seed(5)
    params = [torch.zeros(7, 3), torch.zeros(11), torch.zeros(2, 2, 5)]  # 52 elements, every bin hit
    proj = HashProjection(params, 6, seed=2)
    assert proj.counts.sum().item() == 52 and (proj.counts > 0).all()
    z = torch.randn(6, dtype=torch.float64, generator=g)
    torch.testing.assert_close(proj.pinv(proj.project(z)), z)  # A^+ A = I on R^p
    v = [torch.randn(p.shape, dtype=torch.float64, generator=g) for p in params]
    az = proj.project(z)
    lhs = sum((a * b).sum() for a, b in zip(az, v))
    torch.testing.assert_close(lhs, (z * proj.transpose(v)).sum())  # <A z, v> == <z, A^T v>
    # A^+ is exactly the Moore-Penrose pseudo-inverse of the dense A.
    a = dense(proj)
    flat_v = torch.cat([t.flatten() for t in v])
    torch.testing.assert_close(proj.pinv(v), torch.linalg.pinv(a) @ flat_v)
    # Each element belongs to exactly one direction with sign +-1; the same seed gives the same A.
    assert ((a != 0).sum(1) == 1).all() and set(a[a != 0].abs().tolist()) == {1.0}
    torch.testing.assert_close(dense(HashProjection(params, 6, seed=2)), a)
    assert not torch.equal(dense(HashProjection(params, 6, seed=3)), a)


@pytest.mark.parametrize("dim", [None, 8])
@pytest.mark.parametrize("training", [True, False])
def test_weights_bit_identical_and_mode_restored(dim, training):
    model = Quadratic()
    model.train(training)
    before = model.w.detach().clone()
    sharpness(model, quad_loss, 0.05, dim=dim)
    assert torch.equal(model.w, before)
    assert model.training == training
    assert model.w.grad is None  # gradients are taken with autograd.grad, .grad is left alone


def test_eval_mode_during_measurement():
    model = Quadratic()
    seen = []

    def loss_fn(m):
        seen.append(m.training)
        return m.loss()

    sharpness(model, loss_fn, 5e-3, dim=None)
    assert seen and not any(seen) and model.training


@pytest.fixture(scope="module")
def tiny_bert():
    from flatray import models
    from flatray.data import TASKS

    torch.manual_seed(0)
    model = models.load_model("tiny-bert", TASKS["toy"])
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [dict(input_ids=torch.randint(5, vocab, (2, 8), generator=g),
                    attention_mask=torch.ones(2, 8, dtype=torch.long),
                    labels=torch.randint(0, 2, (2,), generator=g)) for _ in range(2)]
    return model, partial(eval_subset_loss, batches=batches)


def test_tiny_bert(tiny_bert):
    model, loss_fn = tiny_bert
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = sharpness(model, loss_fn, eps=5e-3, dim=20, max_iter=10)
    assert res.phi >= 0 and res.max_loss >= res.loss > 0
    assert res.evaluations > 0 and res.forward_backward > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
    with torch.no_grad():
        model.eval()
        assert loss_fn(model).item() == pytest.approx(res.loss, rel=1e-6)
        model.train()


def test_tiny_bert_sharpness_many(tiny_bert):
    model, loss_fn = tiny_bert
    metrics = sharpness_many(model, loss_fn, dim=20, max_iter=3)
    assert set(metrics) == {"sharpness/eps=0.005", "sharpness/eps=0.001", "sharpness/eps=0.0005"}
    assert all(np.isfinite(v) and v >= 0 for v in metrics.values())


def test_lsq_model_sharpness_is_over_the_weights_not_the_step_sizes():
    """A quantized model's phi perturbs its latent weights (the quantizer re-applied to w + A z), never the LSQ
    step sizes: the default equals phi with the step sizes left out by hand, and differs from phi with them in."""
    from flatray import models
    from flatray.methods import lsq
    from flatray.data import TASKS

    torch.manual_seed(0)
    model = models.load_model("tiny-bert", TASKS["toy"])
    lsq.quantize_model(model, lsq.QuantSpec(weight_bits=4, act_bits=8))
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(5, model.config.vocab_size, (8, 12), generator=g),
                "labels": torch.randint(0, 2, (8,), generator=g)} for _ in range(2)]
    lsq.calibrate(model, batches[0])
    loss_fn = partial(eval_subset_loss, batches=batches)
    by_hand = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("step_size")]
    everything = [p for p in model.parameters() if p.requires_grad]
    assert len(by_hand) < len(everything)
    kw = dict(eps=5e-3, dim=20, max_iter=5, seed=0)
    default = sharpness(model, loss_fn, **kw).phi
    assert default == sharpness(model, loss_fn, params=by_hand, **kw).phi
    assert default != sharpness(model, loss_fn, params=everything, **kw).phi
