"""SAM / ASAM against METHODS.md section 2, computed independently in plain PyTorch."""

import copy

import pytest
import torch

from flatray.methods.sam import SAM, perturbation


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)


def loss_fn(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def grads_at(model, x, y):
    model.zero_grad()
    loss_fn(model, x, y).backward()
    return [p.grad.clone() for p in model.parameters()]


def reference_step(model, x, y, rho, adaptive, eta, lr=0.01):
    """Two passes written out from the formulas: e, gradient at w + e, Adam step from w."""
    ref = copy.deepcopy(model)
    w = [p.detach().clone() for p in ref.parameters()]
    g = grads_at(ref, x, y)
    t = [(wi.abs() + eta) if (adaptive and wi.dim() >= 2) else torch.ones_like(wi) for wi in w]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    e = [rho * ti**2 * gi / (norm + 1e-12) for ti, gi in zip(t, g)]
    with torch.no_grad():
        for p, ei in zip(ref.parameters(), e):
            p.add_(ei)
    g2 = grads_at(ref, x, y)
    with torch.no_grad():
        for p, wi, gi in zip(ref.parameters(), w, g2):
            p.copy_(wi)
            p.grad = gi
    torch.optim.Adam(ref.parameters(), lr=lr).step()
    return ref, e


@pytest.mark.parametrize("adaptive,eta,rho", [(False, 0.0, 0.05), (True, 0.01, 0.5)])
def test_one_step_equals_two_pass_reference(adaptive, eta, rho):
    model = make_model()
    x, y = batch()
    ref, _ = reference_step(model, x, y, rho, adaptive, eta)
    opt = SAM(model.parameters(), torch.optim.Adam, rho=rho, adaptive=adaptive, eta=eta, lr=0.01)
    loss_fn(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_fn(model, x, y).backward()
    opt.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_step_with_closure_matches_first_second_step():
    x, y = batch()
    a, b = make_model(), make_model()
    opt_a = SAM(a.parameters(), torch.optim.Adam, rho=0.05, lr=0.01)
    opt_b = SAM(b.parameters(), torch.optim.Adam, rho=0.05, lr=0.01)
    loss_fn(a, x, y).backward()
    opt_a.step(lambda: (loss_fn(a, x, y).backward(), None)[1])
    loss_fn(b, x, y).backward()
    opt_b.first_step(zero_grad=True)
    loss_fn(b, x, y).backward()
    opt_b.second_step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("adaptive", [False, True])
def test_rho_zero_is_exactly_the_base_step(adaptive):
    x, y = batch()
    sam_model, base_model = make_model(), make_model()
    opt = SAM(sam_model.parameters(), torch.optim.AdamW, rho=0.0, adaptive=adaptive, eta=0.01, lr=0.01,
              weight_decay=0.1)
    base = torch.optim.AdamW(base_model.parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(3):
        loss_fn(sam_model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(sam_model, x, y).backward()
        opt.second_step(zero_grad=True)
        base.zero_grad()
        loss_fn(base_model, x, y).backward()
        base.step()
    for p, q in zip(sam_model.parameters(), base_model.parameters()):
        assert torch.equal(p, q)


def test_sam_perturbation_has_norm_rho():
    model = make_model()
    x, y = batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.Adam, rho=0.05, lr=0.01)
    loss_fn(model, x, y).backward()
    opt.first_step()
    delta = torch.cat([(p - w).flatten() for p, w in zip(model.parameters(), before)])
    assert delta.norm().item() == pytest.approx(0.05, rel=1e-5)


def test_asam_perturbation_formula_and_norm():
    """ASAM: e = rho T^2 g / ||T g||, so ||T^-1 e|| = rho; T = |w| + eta on matrices, 1 on vectors."""
    model = make_model()
    x, y = batch()
    g = grads_at(model, x, y)
    params = list(model.parameters())
    rho, eta = 0.5, 0.01
    e = perturbation(params, g, rho, adaptive=True, eta=eta)
    t = [(p.abs() + eta) if p.dim() >= 2 else torch.ones_like(p) for p in params]
    tg_norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    for ei, ti, gi in zip(e, t, g):
        torch.testing.assert_close(ei, rho * ti * ti * gi / tg_norm, rtol=1e-6, atol=0)
    scaled = torch.cat([(ei / ti).flatten() for ei, ti in zip(e, t)])
    assert scaled.norm().item() == pytest.approx(rho, rel=1e-5)
    # biases and LayerNorm get plain SAM scaling (T = 1): e is parallel to g there
    bias_e, bias_g = e[1], g[1]
    torch.testing.assert_close(bias_e, bias_g * (rho / tg_norm))


def test_restore_is_bit_exact():
    """Restoring by copy gives w back bit for bit (w + e - e would not, in floating point)."""
    model = make_model()
    x, y = batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.0)
    loss_fn(model, x, y).backward()
    opt.first_step(zero_grad=True)
    assert any(not torch.equal(p, w) for p, w in zip(model.parameters(), before))
    loss_fn(model, x, y).backward()
    opt.second_step()  # lr 0: the base step changes nothing, so w must be back exactly
    for p, w in zip(model.parameters(), before):
        assert torch.equal(p, w)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rho"):
        SAM(make_model().parameters(), torch.optim.Adam, rho=-1.0)
    with pytest.raises(ValueError, match="closure"):
        SAM(make_model().parameters(), torch.optim.Adam).step()


@pytest.mark.parametrize("adaptive", [False, True])
def test_in_place_perturbation_equals_the_formula(adaptive):
    from flatray.methods.sam import perturb_

    model = make_model()
    x, y = batch()
    g = grads_at(model, x, y)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    expected = perturbation(params, g, 0.3, adaptive=adaptive, eta=0.01)
    perturb_(params, g, 0.3, adaptive=adaptive, eta=0.01)
    for p, w, e in zip(params, before, expected):
        torch.testing.assert_close(p - w, e, rtol=1e-5, atol=1e-7)
