"""The CLIP-feature sampler: Euler integration of the DiT's flow-matching velocity (spec 5.1).

x runs from noise at sigma = 1 to features at sigma = 0 with x += (sigma_next - sigma) * v.
Classifier-free guidance runs as one doubled batch, the unconditional half (zeroed backbone
states) first. Work that does not change across steps is done once per call: the condition's
caption projection and cross-attention K/V, and the adaLN terms of every timestep of the schedule.

`reference_exact=True` reproduces the released sampler's arithmetic: the sigma grid as diffusers'
FlowMatchEulerDiscreteScheduler holds it (float32), the timestep fed to the DiT truncated to an
integer, the guidance combine in the model's dtype and the latents rounded to it after each step.
The default keeps the latents in fp32 and feeds float timesteps, as in training.
"""

from __future__ import annotations

import numpy as np
import torch

from blip3o_fast.models.dit import NextDiT


def flow_sigmas(num_steps: int, shift: float = 1.0, reference_exact: bool = False) -> torch.Tensor:
    """Sigmas (num_steps + 1,): linspace(1, 1/N, N) shifted by shift*s / (1 + (shift-1)*s), then 0.

    Exact mode builds the grid as the reference does (numpy float64 linspace, then float32
    arithmetic) and returns float32; otherwise the grid is float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    s = np.linspace(1.0, 1.0 / num_steps, num_steps)
    if reference_exact:
        # The scheduler casts the given sigmas to float32 before shifting; with 30 steps that grid
        # gives sigma*1000 = 200.0 and 100.0 at steps 24 and 27 where float64 gives 199.99... and
        # 99.99..., and the integer cast turns that into a different timestep.
        s = s.astype(np.float32)
    s = shift * s / (1 + (shift - 1) * s)
    sig = torch.from_numpy(np.ascontiguousarray(s))
    return torch.cat([sig, sig.new_zeros(1)])


def initial_noise(seeds: list[int], channels: int, size: int, device: torch.device) -> torch.Tensor:
    """Per-request seeded fp32 noise (B, C, size, size): a request's noise does not depend on its batch."""
    draws = [
        torch.randn((1, channels, size, size), generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
        for s in seeds
    ]
    return torch.cat(draws).to(device)


def sample_features(
    dit: NextDiT,
    cond_hidden: torch.Tensor,
    *,
    num_steps: int = 30,
    guidance_scale: float = 3.0,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
    noise: torch.Tensor | None = None,
    seeds: list[int] | None = None,
    reference_exact: bool = False,
) -> torch.Tensor:
    """cond_hidden (B, n_query, caption_dim) -> CLIP features (B, size*size, C) in the DiT's dtype,
    tokens row-major. `noise` (B, size*size, C) replaces the seeded initial noise."""
    cfg = dit.cfg
    param = next(dit.parameters())
    device, dtype = param.device, param.dtype
    size, c = cfg.sample_size, cfg.in_channels
    if cond_hidden.dim() != 3 or cond_hidden.shape[-1] != cfg.caption_dim:
        raise ValueError(f"cond_hidden must be (B, n_query, {cfg.caption_dim}), got {tuple(cond_hidden.shape)}")
    b = cond_hidden.shape[0]
    if noise is not None:
        if tuple(noise.shape) != (b, size * size, c):
            raise ValueError(f"noise must be ({b}, {size * size}, {c}) (B, tokens, feature dim), got {tuple(noise.shape)}")
        x = noise.to(device=device, dtype=torch.float32).transpose(1, 2).reshape(b, c, size, size)
    elif seeds is not None:
        if len(seeds) != b:
            raise ValueError(f"need one seed per request: {b} requests, {len(seeds)} seeds")
        x = initial_noise(seeds, c, size, device)
    else:
        raise ValueError("sample_features needs seeds (one per request) or noise")
    if reference_exact:
        x = x.to(dtype)  # the released sampler keeps its latents in the model's dtype

    sigmas = flow_sigmas(num_steps, shift, reference_exact)
    timesteps = sigmas[:-1] * num_train_timesteps
    timesteps = (timesteps.to(torch.long) if reference_exact else timesteps.float()).to(device)

    cond_hidden = cond_hidden.to(device=device, dtype=dtype)
    guided = guidance_scale > 1.0
    if guided:
        cond_hidden = torch.cat([torch.zeros_like(cond_hidden), cond_hidden])
    with torch.no_grad():
        cond = dit.precompute_condition(cond_hidden)
        mods = dit.modulations(timesteps, cond)
        for i in range(num_steps):
            inp = x.to(dtype)
            if guided:
                inp = torch.cat([inp, inp])
            v = dit.forward_with_condition(inp, timesteps[i].expand(inp.shape[0]), cond, mods[i])
            if reference_exact:
                if guided:
                    v_u, v_c = v.chunk(2)
                    v = v_u + guidance_scale * (v_c - v_u)
                # As the scheduler's step: fp32 sample plus a float32 0-dim dt times v, back to v's dtype.
                x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
            else:
                v = v.float()
                if guided:
                    v_u, v_c = v.chunk(2)
                    v = v_u + guidance_scale * (v_c - v_u)
                x = x + float(sigmas[i + 1] - sigmas[i]) * v
    return x.to(dtype).flatten(2).transpose(1, 2).contiguous()
