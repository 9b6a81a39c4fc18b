"""Image-target losses: flow matching (the release, spec section 4) and direct feature MSE.

Flow matching, as the release trains it: sigma comes from FlowMatchEulerDiscreteScheduler's
1000-step grid (shifted by its shift) at idx = floor(u * 1000), u ~ U[0, 1) per sample;
x_t = (1 - sigma) x0 + sigma eps; the DiT, fed the float timestep sigma * 1000, predicts the velocity
eps - x0 under an MSE averaged over all elements. 10% of samples get their whole conditioning zeroed
before the caption projection (the null condition of classifier-free guidance).

Every random draw of a sample comes from a generator seeded by (seed, step, sample key), so a
sample gets the same noise, sigma and dropout whichever rank or micro-batch it lands in: one process
and N processes with the same global batch see identical draws. (The text loss, the fused lm_head +
CE, is in model.py.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch



def sample_generator(seed: int, step: int, key: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{step}/{key}".encode(), digest_size=8).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def train_sigmas(num_train_timesteps: int = 1000, shift: float = 1.0) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's training grid (float32, sigma 1 first): timesteps
    linspace(1, N, N) reversed, sigma = t / N, shifted by shift * s / (1 + (shift - 1) * s)."""
    t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
    s = torch.from_numpy(t) / num_train_timesteps
    return shift * s / (1 + (shift - 1) * s)


@dataclass
class FlowDraws:
    """One sample's random draws for a flow-matching step."""

    sigma: float
    keep: bool  # False: the conditioning is dropped (zeroed)
    noise: torch.Tensor  # target-shaped, float32


def draw_flow(
    g: torch.Generator,
    target_shape: tuple[int, ...],
    sigmas: torch.Tensor,
    sampling: str,
    dropout: float,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> FlowDraws:
    """u -> grid index floor(u * N); logit_normal draws u = sigmoid(N(mean, std)) instead of U[0, 1)."""
    if sampling == "uniform":
        u = float(torch.rand((), generator=g))
    elif sampling == "logit_normal":
        u = float(torch.sigmoid(torch.randn((), generator=g) * logit_std + logit_mean))
    else:
        raise ValueError(f"sigma sampling must be uniform or logit_normal, got {sampling!r}")
    idx = min(int(u * len(sigmas)), len(sigmas) - 1)
    keep = float(torch.rand((), generator=g)) >= dropout
    noise = torch.randn(target_shape, generator=g)
    return FlowDraws(float(sigmas[idx]), keep, noise)


def flow_matching_loss(
    dit: torch.nn.Module, x0: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor, keep: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Per-sample MSE (B,) fp32 of the DiT's velocity. x0, noise (B, C, h, w); cond (B, L, H);
    sigma (B,) fp32; keep (B,) bool. The dropped samples' conditioning is zeroed before the DiT."""
    cond = cond * keep.to(cond.dtype)[:, None, None]
    s = sigma.view(-1, 1, 1, 1)
    x_t = ((1 - s) * x0.float() + s * noise.float()).to(cond.dtype)
    pred = dit(x_t, sigma * 1000.0, cond)
    velocity = noise.float() - x0.float()
    return (pred.float() - velocity).pow(2).flatten(1).mean(1)


def feature_mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE (B,) fp32 of directly regressed features (B, 64, D)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
