"""The CLIP-feature sampler vs a loop over diffusers' FlowMatchEulerDiscreteScheduler (spec 5.1)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from blip3o_fast.engine.flow_sampler import flow_sigmas, sample_features

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_dit import DiffusersDiT, make_pair, rel_err, tiny_cfg  # noqa: E402

CFG = tiny_cfg()


@pytest.fixture(scope="module")
def models():
    return make_pair(CFG, seed=5)


def conditions(b: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(b, 64, CFG.caption_dim, generator=torch.Generator().manual_seed(seed))


def seeded_noise(seed: int) -> torch.Tensor:
    return torch.randn((1, CFG.in_channels, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))


def released_sampler(ref: DiffusersDiT, cond: torch.Tensor, latents: torch.Tensor, shift: float, steps: int = 30):
    """The released loop: a fresh scheduler, uncond-first doubled batch, integer timesteps, guidance 3."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    cond2 = torch.cat([torch.zeros_like(cond), cond])
    with torch.no_grad():
        for t in sched.timesteps:
            inp = torch.cat([latents, latents])
            v = ref(inp, t.expand(inp.shape[0]).to(torch.long), cond2)
            v_u, v_c = v.chunk(2)
            latents = sched.step(v_u + 3.0 * (v_c - v_u), t, latents, return_dict=False)[0]
    return latents.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_reference_exact_matches_released_loop(models, shift):
    ref, ours = models
    cond = conditions(1)
    want = released_sampler(ref, cond, seeded_noise(11), shift)
    got = sample_features(ours, cond, num_steps=30, guidance_scale=3.0, shift=shift, seeds=[11], reference_exact=True)
    assert got.shape == (1, 64, CFG.in_channels)
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_exact_grid_equals_the_scheduler(shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 30, 30))
    sig = flow_sigmas(30, shift, reference_exact=True)
    assert sig.dtype == torch.float32 and torch.equal(sig, sched.sigmas)
    assert torch.equal((sig[:-1] * 1000).long(), sched.timesteps.long())
    # The float32 grid is what makes the integer cast differ from a float64 grid.
    f64 = flow_sigmas(30, shift)
    torch.testing.assert_close(f64.float(), sig, rtol=1e-6, atol=1e-7)


def test_float_timesteps_differ_slightly_from_exact_mode(models):
    _, ours = models
    cond = conditions(1)
    exact = sample_features(ours, cond, num_steps=30, seeds=[3], reference_exact=True)
    default = sample_features(ours, cond, num_steps=30, seeds=[3])
    err = rel_err(default, exact)
    assert 0 < err < 5e-2


def test_batch_equals_single_calls(models):
    _, ours = models
    cond = conditions(3, seed=8)
    seeds = [4, 9, 4]
    batch = sample_features(ours, cond, num_steps=6, seeds=seeds)
    for i, s in enumerate(seeds):
        one = sample_features(ours, cond[i : i + 1], num_steps=6, seeds=[s])
        assert rel_err(batch[i : i + 1], one) < 1e-5


def test_given_noise_is_used_as_is(models):
    _, ours = models
    cond = conditions(2)
    noise = torch.cat([seeded_noise(21), seeded_noise(22)]).flatten(2).transpose(1, 2)
    a = sample_features(ours, cond, num_steps=4, noise=noise)
    b = sample_features(ours, cond, num_steps=4, seeds=[21, 22])
    assert torch.equal(a, b)
    # One step from sigma 1 to 0 with guidance off: x = noise - v(noise, t=1000).
    one = sample_features(ours, cond, num_steps=1, guidance_scale=1.0, noise=noise)
    with torch.no_grad():
        x = noise.transpose(1, 2).reshape(2, CFG.in_channels, 8, 8)
        v = ours(x, torch.full((2,), 1000.0), cond)
    torch.testing.assert_close(one, (x - v).flatten(2).transpose(1, 2))


def test_bad_inputs_name_the_problem(models):
    _, ours = models
    cond = conditions(2)
    with pytest.raises(ValueError, match="one seed per request"):
        sample_features(ours, cond, seeds=[1])
    with pytest.raises(ValueError, match="noise must be"):
        sample_features(ours, cond, noise=torch.zeros(2, 63, CFG.in_channels))
    with pytest.raises(ValueError, match="cond_hidden must be"):
        sample_features(ours, cond[..., :-1], seeds=[1, 2])
