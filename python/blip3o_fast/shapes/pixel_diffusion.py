"""The tiny model's diffusion decoder: 64 feature tokens -> 64x64 pixels, by flow matching in pixel space.

The features are first turned into a coarse image by the (frozen) autoencoder decoder; a small U-Net then
denoises pixels with that image concatenated to its input (as super-resolution diffusion models
condition on the low-resolution image), predicting the velocity eps - x0 of x_t = (1 - s) x0 + s eps.
Sampling is Euler over an even sigma grid from 1 to 0, from per-request seeded noise; classifier-free
guidance, when asked, combines the velocities for the features and for the negative features.
num_inference_steps = 0 decodes deterministically with the autoencoder decoder alone (the baseline).

`FeatureFlowDecoder` has the interface BLIP3o uses of its pixel decoder (decode, save_pretrained,
from_pretrained, to, cfg.num_inference_steps / cfg.guidance_scale), so a checkpoint's
diffusion-decoder/ folder may hold either kind; BLIP3o.from_pretrained tells them apart by CONFIG_FILE.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from blip3o_fast.shapes.autoencoder import AutoencoderConfig, ShapesAutoencoder, tensor_to_images

CONFIG_FILE = "feature_flow_decoder.json"
WEIGHTS_FILE = "feature_flow_decoder.safetensors"


@dataclass
class FeatureDecoderConfig:
    autoencoder: dict = field(default_factory=lambda: asdict(AutoencoderConfig()))
    channels: int = 24  # U-Net width at half resolution, twice that below
    num_inference_steps: int = 10  # 0: the autoencoder decoder alone (deterministic)
    guidance_scale: float = 1.0  # > 1: classifier-free guidance against the negative features
    feature_noise: float = 0.1  # training: Gaussian noise on the features (generated ones are imperfect)


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of sigma * 1000, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = sigma.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.time = nn.Linear(temb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(t)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class PixelUNet(nn.Module):
    """Two-level U-Net over (x_t, coarse image) -> velocity, (B, 3, R, R). It works on 2x2 pixel blocks
    (pixel unshuffle: 12 channels per image at R/2), a quarter of the full-resolution cost on the CPU."""

    def __init__(self, channels: int):
        super().__init__()
        c, temb = channels, 4 * channels
        self.temb_dim = c
        self.time_mlp = nn.Sequential(nn.Linear(c, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(24, c, 3, 1, 1)
        self.enc1 = ResBlock(c, c, temb)
        self.down1 = nn.Conv2d(c, c, 4, 2, 1)
        self.enc2 = ResBlock(c, 2 * c, temb)
        self.down2 = nn.Conv2d(2 * c, 2 * c, 4, 2, 1)
        self.mid = ResBlock(2 * c, 2 * c, temb)
        self.dec2 = ResBlock(4 * c, 2 * c, temb)
        self.dec1 = ResBlock(3 * c, c, temb)
        self.norm_out, self.conv_out = nn.GroupNorm(8, c), nn.Conv2d(c, 12, 3, 1, 1)

    def forward(self, x_t: torch.Tensor, coarse: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = self.time_mlp(timestep_embedding(sigma, self.temb_dim).to(x_t.dtype))
        h1 = self.enc1(self.conv_in(F.pixel_unshuffle(torch.cat([x_t, coarse], 1), 2)), t)
        h2 = self.enc2(self.down1(h1), t)
        h = self.mid(self.down2(h2), t)
        h = self.dec2(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h2], 1), t)
        h = self.dec1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h1], 1), t)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), 2)


class FeatureFlowDecoder(nn.Module):
    def __init__(self, cfg: FeatureDecoderConfig, autoencoder: ShapesAutoencoder | None = None):
        super().__init__()
        self.cfg = cfg
        self.autoencoder = autoencoder or ShapesAutoencoder(AutoencoderConfig(**cfg.autoencoder))
        self.autoencoder.requires_grad_(False)
        self.unet = PixelUNet(cfg.channels)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def resolution(self) -> int:
        return self.autoencoder.cfg.resolution

    def coarse(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.autoencoder.decode(features.to(self.device, self.dtype))

    def velocity(self, x_t: torch.Tensor, coarse: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, coarse, sigma)

    # ------------------------------------------------------------------ sampling
    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        r = self.resolution
        draws = [torch.randn((1, 3, r, r), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        return torch.cat(draws).to(self.device, torch.float32)

    @torch.no_grad()
    def sample(self, features: torch.Tensor, negative_features: torch.Tensor | None = None, num_steps: int = 10,
               guidance_scale: float = 1.0, seeds: list[int] | None = None) -> torch.Tensor:
        """features (B, T, D) -> images (B, 3, R, R) in [-1, 1]: Euler from seeded noise (seeds: one per
        request, default 0..B-1); num_steps 0: the autoencoder decoder's image."""
        b = features.shape[0]
        coarse = self.coarse(features)
        if num_steps == 0:
            return coarse.float().clamp(-1, 1)
        seeds = list(range(b)) if seeds is None else list(seeds)
        if len(seeds) != b:
            raise ValueError(f"need one seed per request: {b} requests, seeds {seeds}")
        guided = guidance_scale > 1.0 and negative_features is not None
        if guided:
            coarse = torch.cat([coarse, self.coarse(negative_features).expand_as(coarse)])
        x = self.initial_noise(seeds)
        sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
        for i in range(num_steps):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            inp = x.to(self.dtype)
            if guided:
                inp = torch.cat([inp, inp])
            v = self.velocity(inp, coarse, torch.full((inp.shape[0],), s, device=self.device)).float()
            if guided:
                v_c, v_u = v.chunk(2)
                v = v_u + guidance_scale * (v_c - v_u)
            x = x + (s_next - s) * v
        return x.clamp(-1, 1)

    def decode(self, features: torch.Tensor, negative_features: torch.Tensor | None = None, num_steps: int | None = None,
               guidance_scale: float | None = None, seeds: list[int] | None = None, height: int | None = None,
               width: int | None = None) -> list[Image.Image]:
        """BLIP3o's pixel-decoder call: features (B, 64, D) -> B PIL images at the training resolution."""
        r = self.resolution
        if (height or r) != r or (width or r) != r:
            raise ValueError(f"feature flow decoder: images are {r}x{r}, got {height}x{width}")
        steps = self.cfg.num_inference_steps if num_steps is None else num_steps
        scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        return tensor_to_images(self.sample(features, negative_features, steps, scale, seeds))

    # ------------------------------------------------------------------ I/O
    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps({"_class_name": type(self).__name__, **asdict(self.cfg)}, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "FeatureFlowDecoder":
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"feature flow decoder: missing {folder / name}")
        raw = json.loads((folder / CONFIG_FILE).read_text())
        raw.pop("_class_name", None)
        model = cls(FeatureDecoderConfig(**raw))
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return model.eval().to(device=device, dtype=dtype)


def is_feature_flow_decoder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def flow_loss(decoder: FeatureFlowDecoder, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One flow-matching loss on clean images (B, 3, R, R) in [-1, 1]: features from the autoencoder's
    encoder (noised by cfg.feature_noise), sigma ~ logit-normal(0, 1), velocity MSE."""
    with torch.no_grad():
        feats = decoder.autoencoder.encode(images)
        feats = feats + decoder.cfg.feature_noise * torch.randn(feats.shape, generator=g)
        coarse = decoder.autoencoder.decode(feats)
    b = images.shape[0]
    sigma = torch.sigmoid(torch.randn(b, generator=g))
    noise = torch.randn(images.shape, generator=g)
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * images + s * noise
    return F.mse_loss(decoder.velocity(x_t, coarse, sigma), noise - images)


def train_pixel_decoder(
    autoencoder: ShapesAutoencoder, images: torch.Tensor, cfg: FeatureDecoderConfig, steps: int,
    batch_size: int = 16, lr: float = 1e-3, seed: int = 0, log: Callable[[str], None] | None = print,
    log_every: int = 50,
) -> tuple[FeatureFlowDecoder, list[float]]:
    """AdamW with cosine decay on flow_loss; every draw from one seeded generator. The autoencoder stays frozen."""
    cfg = FeatureDecoderConfig(**{**asdict(cfg), "autoencoder": asdict(autoencoder.cfg)})
    torch.manual_seed(seed)
    decoder = FeatureFlowDecoder(cfg, autoencoder.eval())
    opt = torch.optim.AdamW(decoder.unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / max(steps, 1))))
    g = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    decoder.unet.train()
    for step in range(steps):
        x = images[torch.randint(len(images), (batch_size,), generator=g)]
        loss = flow_loss(decoder, x, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % log_every == 0:
            log(f"pixel decoder step {step + 1}/{steps}  loss {np.mean(losses[-log_every:]):.5f}  "
                f"{time.perf_counter() - t0:.0f} s")
    return decoder.eval(), losses
