"""Frozen target towers for targets computed online: EVA-CLIP features (spec 7.1), a shapes autoencoder's
feature tokens (the tiny shapes model's "CLIP features"), or VAE latents.

Each tower has a per-image preprocessing (run per sample while encoding, where a bad image is
skipped and counted) and a batched encode on the training device, without gradients.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from blip3o_fast.models.eva_clip import EVAVisionConfig, EVAVisionTower, preprocess
from blip3o_fast.training.objectives import sample_generator


class EVATargets:
    """(B, 3, S, S) -> the 64 pooled EVA-CLIP features (B, 64, width)."""

    def __init__(self, source: str, seed: int = 0, device: torch.device | str = "cpu"):
        if source == "tiny":
            torch.manual_seed(seed)
            self.tower = EVAVisionTower(EVAVisionConfig.tiny()).eval().requires_grad_(False)
        else:
            self.tower = EVAVisionTower.from_pretrained(source)
        self.tower.to(device)
        self.image_size = self.tower.config.image_size

    @property
    def feature_dim(self) -> int:
        return self.tower.config.width

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, self.image_size)[0]

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, keys: list[str], seed: int, step: int) -> torch.Tensor:
        return self.tower.encode_targets(pixels.to(self.tower.pos_embed.dtype)).float()


class AutoencoderTargets:
    """(B, 3, R, R) in [-1, 1] -> the 64 feature tokens (B, 64, dim) of a trained ShapesAutoencoder
    (blip3o_fast.shapes.autoencoder): the clip_* targets when objective.autoencoder names its folder."""

    def __init__(self, folder: str, device: torch.device | str = "cpu"):
        from blip3o_fast.shapes.autoencoder import ShapesAutoencoder

        self.model = ShapesAutoencoder.from_pretrained(folder, device=device)

    @property
    def feature_dim(self) -> int:
        return self.model.cfg.dim

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        from blip3o_fast.shapes.autoencoder import image_to_tensor

        return image_to_tensor(image, self.model.cfg.resolution)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, keys: list[str], seed: int, step: int) -> torch.Tensor:
        return self.model.encode(pixels.float()).float()


def feature_targets(eva: str, autoencoder: str, seed: int, device) -> "EVATargets | AutoencoderTargets":
    """The clip_* target tower: the shapes autoencoder when a folder is given, else EVA-CLIP."""
    return AutoencoderTargets(autoencoder, device) if autoencoder else EVATargets(eva, seed=seed, device=device)


class VAETargets:
    """(B, 3, R, R) in [-1, 1] -> scaled latents (B, C, R/f, R/f) of a diffusers AutoencoderKL: a draw
    from its posterior (keyed per sample, like every training draw), minus shift_factor, times
    scaling_factor (what diffusion models train on)."""

    def __init__(self, vae: torch.nn.Module, resolution: int, device: torch.device | str = "cpu"):
        self.vae = vae.eval().requires_grad_(False).to(device)
        self.resolution = resolution
        cfg = vae.config
        self.scaling = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)

    @classmethod
    def from_source(cls, source: str, model, resolution: int, device) -> "VAETargets":
        if source == "decoder":
            if model.pixel_decoder is None:
                raise ValueError("objective.vae = 'decoder' but the model has no pixel decoder: give a diffusers VAE folder")
            return cls(model.pixel_decoder.vae, resolution, device)
        from diffusers import AutoencoderKL

        return cls(AutoencoderKL.from_pretrained(source), resolution, device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Shortest side to R (bicubic), centre crop R x R, to [-1, 1]."""
        image = image.convert("RGB")
        w, h = image.size
        r = self.resolution
        scale = r / min(w, h)
        image = image.resize((max(r, round(w * scale)), max(r, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = image.size
        left, top = (w - r) // 2, (h - r) // 2
        x = np.asarray(image.crop((left, top, left + r, top + r)), dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(x.transpose(2, 0, 1).copy())

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, keys: list[str], seed: int, step: int) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixels.to(dtype)).latent_dist
        eps = torch.stack([
            torch.randn(dist.mean.shape[1:], generator=sample_generator(seed, step, f"{k}/vae")) for k in keys
        ]).to(dist.mean.device, dist.mean.dtype)
        z = dist.mean + dist.std * eps
        return ((z - self.shift) * self.scaling).float()
