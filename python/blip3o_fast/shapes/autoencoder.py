"""The tiny model's target feature encoder: a convolutional autoencoder for 64x64 images.

There is no pretrained CLIP for the shapes world, so the "CLIP features" the DiT learns are the 64 tokens
(an 8x8 grid, row-major) of this autoencoder's encoder, each of width `dim`. The encoder ends in a
LayerNorm without affine parameters, so every token has zero mean and unit variance over its channels:
the scale flow matching expects of its targets, whatever the training run. The decoder maps tokens
back to pixels; it is the deterministic baseline decoder and the pixel diffusion decoder's conditioning.

Images are (B, 3, 64, 64) in [-1, 1]. Weights: <folder>/autoencoder.safetensors + autoencoder.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_FILE = "autoencoder.json"
WEIGHTS_FILE = "autoencoder.safetensors"


@dataclass
class AutoencoderConfig:
    dim: int = 32  # feature width per token (the DiT's in_channels)
    channels: int = 16  # conv width at 64x64 and 32x32; twice that at 16x16 and 8x8
    resolution: int = 64  # 3 stride-2 stages: resolution / 8 = the token grid side

    @property
    def grid(self) -> int:
        return self.resolution // 8


def image_to_tensor(image: Image.Image, resolution: int = 64) -> torch.Tensor:
    """A PIL image -> (3, R, R) float32 in [-1, 1] (resized when it is not R x R)."""
    image = image.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    x = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4 if stride == 2 else 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _block(cin, cout))


class ShapesAutoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        c, d = cfg.channels, cfg.dim
        self.encoder = nn.Sequential(
            _block(3, c), _block(c, c, 2), _block(c, 2 * c, 2), _block(2 * c, 2 * c, 2), _block(2 * c, 2 * c),
            nn.Conv2d(2 * c, d, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(d, 2 * c, 1), nn.SiLU(), _block(2 * c, 2 * c), _up(2 * c, 2 * c), _up(2 * c, c), _up(c, c),
            nn.Conv2d(c, 3, 3, 1, 1),
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> feature tokens (B, (R/8)^2, dim), row-major over the grid."""
        z = self.encoder(images).flatten(2).transpose(1, 2)
        return F.layer_norm(z, (z.shape[-1],))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, (R/8)^2, dim) -> images (B, 3, R, R), roughly in [-1, 1] (not clamped)."""
        g = self.cfg.grid
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], g, g)
        return self.decoder(grid.to(self.decoder[0].weight.dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    # ------------------------------------------------------------------ I/O
    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "ShapesAutoencoder":
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"autoencoder: missing {folder / name}")
        model = cls(AutoencoderConfig(**json.loads((folder / CONFIG_FILE).read_text())))
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return model.eval().requires_grad_(False).to(device)


def load_images(shards: str | Sequence[str], limit: int | None = None, resolution: int = 64) -> torch.Tensor:
    """The generation images of WebDataset shards (through the data layer, in shard order) as (N, 3, R, R)."""
    from blip3o_fast.data import GENERATION, WebDataset

    images = []
    for sample in WebDataset(shards, tasks=(GENERATION,), shuffle_shards=False):
        images.append(image_to_tensor(sample.image, resolution))
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"no generation images in {shards!r}")
    return torch.stack(images)


def object_weights(images: torch.Tensor, object_weight: float, threshold: float = 0.25) -> torch.Tensor:
    """(B, 1, H, W) per-pixel loss weights: 1 on the background, 1 + object_weight on and next to objects.
    The background is each image's border median; a pixel belongs to an object when it is farther than
    `threshold` (RGB distance in [-1, 1] units) from it, grown by one pixel so edges count too. Objects
    cover a few percent of a shapes image, so plain MSE mostly teaches the background colour."""
    border = torch.cat([images[..., :2, :].flatten(2), images[..., -2:, :].flatten(2),
                        images[..., :, :2].flatten(2), images[..., :, -2:].flatten(2)], dim=2)
    background = border.median(dim=2).values[..., None, None]
    mask = ((images - background).norm(dim=1, keepdim=True) > threshold).float()
    return 1.0 + object_weight * F.max_pool2d(mask, 3, 1, 1)


def train_autoencoder(
    images: torch.Tensor, cfg: AutoencoderConfig, steps: int, batch_size: int = 32, lr: float = 2e-3,
    seed: int = 0, object_weight: float = 0.0, latent_noise: float = 0.0, log: Callable[[str], None] | None = print,
    log_every: int = 50,
) -> tuple[ShapesAutoencoder, list[float]]:
    """Pixel MSE weighted toward objects (object_weights; 0: plain MSE), AdamW with cosine decay; batches
    drawn with replacement from `images` by a seeded generator, so a run is a function of (images, cfg,
    steps, batch_size, lr, seed, object_weight, latent_noise). latent_noise: the decoder reconstructs
    from the tokens plus N(0, latent_noise^2) noise, so the encoder keeps its codes that far apart and the
    decoder turns features near a code (what a generator produces) into the clean image. Returns the model
    (eval mode, frozen) and the loss of every step."""
    torch.manual_seed(seed)
    model = ShapesAutoencoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / max(steps, 1))))
    g = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(steps):
        x = images[torch.randint(len(images), (batch_size,), generator=g)]
        w = object_weights(x, object_weight)
        z = model.encode(x)
        if latent_noise:
            z = z + latent_noise * torch.randn(z.shape, generator=g)
        loss = (w * (model.decode(z) - x).square()).sum() / (w.sum() * x.shape[1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % log_every == 0:
            log(f"autoencoder step {step + 1}/{steps}  mse {np.mean(losses[-log_every:]):.5f}  "
                f"{time.perf_counter() - t0:.0f} s")
    return model.eval().requires_grad_(False), losses


@torch.no_grad()
def reconstruct(model: ShapesAutoencoder, images: Sequence[Image.Image], batch_size: int = 64) -> list[Image.Image]:
    """Encode and decode PIL images (the bound on what decoding generated features can reach)."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([image_to_tensor(im, model.cfg.resolution) for im in images[i:i + batch_size]])
        out += tensor_to_images(model(x))
    return out
