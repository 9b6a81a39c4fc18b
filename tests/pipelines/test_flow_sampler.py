"""The CLIP-feature sampler: Euler vs a loop over diffusers' FlowMatchEulerDiscreteScheduler (spec 5.1),
the higher-order solvers' convergence, batching, and the static-buffer loop."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from blip3o_fast.engine.flow_sampler import FlowSampler, flow_sigmas, multistep_coefficients, sample_features
from blip3o_fast.models.dit import NextDiT

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


SOLVER_CASES = [("euler", 2), ("heun", 2), ("multistep", 2), ("multistep", 3)]


@pytest.mark.parametrize("solver,order", SOLVER_CASES)
def test_batch_equals_single_calls(models, solver, order):
    _, ours = models
    cond = conditions(3, seed=8)
    seeds = [4, 9, 4]
    kw = dict(num_steps=5, solver=solver, order=order)
    batch = sample_features(ours, cond, seeds=seeds, **kw)
    for i, s in enumerate(seeds):
        one = sample_features(ours, cond[i : i + 1], seeds=[s], **kw)
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
    # forward() normalises the cross-attention keys inside the attention op, the sampler beforehand.
    assert rel_err(one, (x - v).flatten(2).transpose(1, 2)) < 1e-5


def test_bad_inputs_name_the_problem(models):
    _, ours = models
    cond = conditions(2)
    with pytest.raises(ValueError, match="one seed per request"):
        sample_features(ours, cond, seeds=[1])
    with pytest.raises(ValueError, match="noise must be"):
        sample_features(ours, cond, noise=torch.zeros(2, 63, CFG.in_channels))
    with pytest.raises(ValueError, match="cond_hidden must be"):
        sample_features(ours, cond[..., :-1], seeds=[1, 2])
    with pytest.raises(ValueError, match="solver must be one of"):
        sample_features(ours, cond, seeds=[1, 2], solver="rk4")
    with pytest.raises(ValueError, match="no reference"):
        sample_features(ours, cond, seeds=[1, 2], solver="heun", reference_exact=True)
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        sample_features(ours, cond, seeds=[1, 2], solver="multistep", order=4)


def test_multistep_coefficients_integrate_polynomials_exactly():
    sig = flow_sigmas(7, shift=3.0)  # a non-uniform grid
    c2 = multistep_coefficients(sig, 2)
    h = sig[1:] - sig[:-1]
    # Variable-step AB2: h * ((1 + r/2) v_n - (r/2) v_n-1), r = h_n / h_n-1; the first step is Euler.
    r = h[1:] / h[:-1]
    torch.testing.assert_close(c2[1:, 0], h[1:] * (1 + r / 2), rtol=1e-12, atol=0)
    torch.testing.assert_close(c2[1:, 1], -h[1:] * r / 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(c2[0], torch.stack([h[0], h.new_zeros(())]), rtol=0, atol=0)
    c3 = multistep_coefficients(sig, 3)
    for n in range(2, 7):
        nodes = sig[n - 2 : n + 1].flip(0)
        for p in range(3):  # v = sigma^p: exact integral over the step
            want = (sig[n + 1] ** (p + 1) - sig[n] ** (p + 1)) / (p + 1)
            torch.testing.assert_close((c3[n] * nodes**p).sum(), want, rtol=1e-10, atol=1e-14)


def smooth_dit() -> NextDiT:
    """A tiny random DiT whose velocity field is smooth enough for convergence orders to show:
    default init, random per-head gates (cross-attention on), and a timestep embedder reading only
    the low-frequency sinusoids. With random weights on the high ones (periods down to ~6 timesteps)
    v oscillates in sigma as no trained DiT does, and no solver converges in few steps."""
    torch.manual_seed(12)
    dit = NextDiT(CFG).eval()
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name.endswith(".gate"):
                p.copy_(torch.randn_like(p) * 0.5)
        w = dit.time_caption_embed.timestep_embedder.linear_1.weight  # columns [cos f_k, sin f_k], k < 128
        w[:, :80] = 0
        w[:, 128:208] = 0
    return dit


@pytest.fixture(scope="module")
def smooth():
    dit = smooth_dit()
    cond = conditions(1, seed=13)
    return dit, cond, sample_features(dit, cond, num_steps=200, seeds=[5])


@pytest.mark.parametrize("solver,order", SOLVER_CASES[1:])
def test_higher_order_solvers_converge(smooth, solver, order):
    dit, cond, exact = smooth
    err = {n: rel_err(sample_features(dit, cond, num_steps=n, seeds=[5], solver=solver, order=order), exact)
           for n in (4, 8)}
    euler8 = rel_err(sample_features(dit, cond, num_steps=8, seeds=[5]), exact)
    assert err[8] < err[4] / 2.5  # faster than first order
    assert err[8] < euler8 / 3


def test_cached_sampler_reloads_its_static_buffers(models):
    """What a captured CUDA graph relies on: a sampler built for one condition, given another,
    copies it into the same buffers and gives what a fresh sampler gives."""
    _, ours = models
    sig = flow_sigmas(4)
    ts = (sig[:-1] * 1000).float()

    def prepared(seed):
        with torch.no_grad():
            cond = ours.precompute_condition(torch.cat([torch.zeros_like(c := conditions(2, seed)), c]))
            return cond, ours.modulations(ts, cond)

    def make(cond, sched):
        return FlowSampler(ours, cond, sched, ts, sig, solver="multistep", order=3, guidance_scale=3.0,
                           guided=True, reference_exact=False)

    noise = torch.randn(2, CFG.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    (ca, sa), (cb, sb) = prepared(1), prepared(2)
    cached = make(ca, sa)
    addresses = [cached.x.data_ptr(), cached.inp.data_ptr(), cached.cond.cross_kv.data_ptr()]
    with torch.no_grad():
        cached.run(ours, ca, sa, noise, cuda_graph=False)
        got = cached.run(ours, cb, sb, noise, cuda_graph=False)
        want = make(cb, sb).run(ours, cb, sb, noise, cuda_graph=False)
    assert torch.equal(got, want)
    assert addresses == [cached.x.data_ptr(), cached.inp.data_ptr(), cached.cond.cross_kv.data_ptr()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver,order", SOLVER_CASES)
def test_cuda_graph_replay_equals_eager(solver, order):
    dit = smooth_dit().cuda()
    kw = dict(num_steps=6, solver=solver, order=order)
    for seed in (1, 2):  # the second call replays the graph captured by the first
        cond = conditions(2, seed).cuda()
        eager = sample_features(dit, cond, seeds=[seed, 7], cuda_graph=False, **kw)
        graph = sample_features(dit, cond, seeds=[seed, 7], **kw)
        assert rel_err(graph, eager) < 1e-5
