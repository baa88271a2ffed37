"""Cheaper SAM's formulas (flatray.methods.cheap_sam) by hand on small tensors, and its config rules. The
engine-level runs against plain PyTorch (ZeRO 0/1/2, world size 1 and 2) are in test_deepspeed_sam.py."""

import pytest
import torch
from pydantic import ValidationError

from flatray.config import RunConfig
from flatray.methods import cheap_sam


def test_looksam_orthogonal_part_and_reconstruction_by_hand():
    # g = (3, 4 | 0), g_s = (1, 2 | 2): <g, g_s> = 11, ||g||^2 = 25
    g = [torch.tensor([3.0, 4.0]), torch.tensor([0.0])]
    g_s = [torch.tensor([1.0, 2.0]), torch.tensor([2.0])]
    g_v = cheap_sam.orthogonal(g, g_s)
    expected = [torch.tensor([1 - 33 / 25, 2 - 44 / 25]), torch.tensor([2.0])]
    for got, want in zip(g_v, expected):
        torch.testing.assert_close(got, want)
    assert abs(sum((a * b).sum() for a, b in zip(g, g_v)).item()) < 1e-6  # orthogonal to g
    # g + alpha ||g|| / ||g_v|| g_v with alpha 0.5: ||g|| = 5, ||g_v||^2 = 0.32^2 + 0.24^2 + 4 = 4.16
    out = cheap_sam.reconstruct(g, g_v, 0.5)
    factor = 0.5 * 5 / 4.16 ** 0.5
    torch.testing.assert_close(out[0], torch.tensor([3 - 0.32 * factor, 4 + 0.24 * factor]))
    torch.testing.assert_close(out[1], torch.tensor([2 * factor]))


def test_looksam_skips_parameters_without_a_gradient():
    g = [torch.tensor([1.0, 0.0]), None]
    g_v = cheap_sam.orthogonal(g, [torch.tensor([1.0, 1.0]), None])
    assert g_v[1] is None
    out = cheap_sam.reconstruct(g, g_v, 1.0)
    torch.testing.assert_close(out[0], torch.tensor([1.0, 1.0]))  # ||g|| = ||g_v|| = 1
    assert out[1] is None


def test_which_steps_are_sam_steps():
    assert [cheap_sam.sam_step_due(3, 1.0, 0, s) for s in range(7)] == [True, False, False, True, False, False, True]
    assert all(cheap_sam.sam_step_due(1, 1.0, 0, s) for s in range(5))
    draws = [cheap_sam.sam_step_due(1, 0.25, 7, s) for s in range(4000)]
    assert draws == [cheap_sam.sam_step_due(1, 0.25, 7, s) for s in range(4000)]  # the same on every call/worker
    assert 0.22 < sum(draws) / len(draws) < 0.28
    assert draws != [cheap_sam.sam_step_due(1, 0.25, 8, s) for s in range(4000)]  # the seed matters
    state = torch.get_rng_state()
    cheap_sam.sam_step_due(1, 0.5, 0, 3)
    assert torch.equal(state, torch.get_rng_state())  # torch's RNG (dropout) untouched


def config(**optimizer):
    return RunConfig(model="tiny-bert", task="toy", optimizer=optimizer)


@pytest.mark.parametrize("optimizer,key", [
    ({"name": "adam", "sam_every": 2}, "optimizer.sam_every"),
    ({"name": "adam", "sam_fraction": 0.5}, "optimizer.sam_fraction"),
    ({"name": "sam", "sam_every": 2, "sam_fraction": 0.5}, "optimizer.sam_fraction"),
    ({"name": "sam", "sam_between": "looksam"}, "optimizer.sam_between"),
    ({"name": "sam", "sam_fraction": 0.0}, "sam_fraction"),
])
def test_bad_cheaper_sam_settings_name_the_key(optimizer, key):
    with pytest.raises(ValidationError, match=key):
        config(**optimizer)


def test_good_cheaper_sam_settings():
    assert not config(name="sam", sam_every=5, sam_between="looksam").optimizer.every_step_sam
    assert config(name="asam", sam_fraction=0.3).optimizer.sam_fraction == 0.3
    with pytest.raises(ValidationError, match="cheaper SAM is for finetune"):
        RunConfig(model="tiny-bert", task="toy", kind="squat", optimizer={"name": "sam", "sam_every": 2})
