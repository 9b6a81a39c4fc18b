"""The pixel decoder: CLIP features (B, 64, C) -> images (spec 5.2, the Emu2-Gen visual decoder).

The UNet (SDXL layout) and the VAE are diffusers modules; the sampling loop is ours: the Euler
schedule of the checkpoint's EulerDiscreteScheduler config, computed once per step count, and
classifier-free guidance as one doubled batch, conditional half first as the released pipeline
orders it. The features condition the UNet twice: as cross-attention states and, averaged over
tokens, as SDXL's pooled "text_embeds" next to the size/crop time ids.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from torch import nn

from blip3o_fast.models.config import PixelDecoderConfig

WEIGHT_FILES = (  # (diffusers variant, file name), the first found is loaded
    (None, "diffusion_pytorch_model.safetensors"),
    ("bf16", "diffusion_pytorch_model.bf16.safetensors"),
    (None, "diffusion_pytorch_model.safetensors.index.json"),
)
SCHEDULER_FILE = "scheduler/scheduler_config.json"


@functools.lru_cache(maxsize=16)
def euler_schedule(scheduler_json: str, num_steps: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """EulerDiscreteScheduler's (timesteps (N,) fp32, sigmas (N+1,) fp32, init_noise_sigma) for a config.

    sigma_t = sqrt((1 - abar_t) / abar_t) over the training betas, read at the spaced timesteps by
    linear interpolation, then a final 0."""
    cfg = json.loads(scheduler_json)
    unsupported = {
        k: cfg[k]
        for k, ok in (
            ("interpolation_type", "linear"), ("timestep_type", "discrete"), ("final_sigmas_type", "zero"),
            ("use_karras_sigmas", False), ("use_exponential_sigmas", False), ("use_beta_sigmas", False),
            ("rescale_betas_zero_snr", False), ("trained_betas", None),
        )
        if cfg.get(k, ok) != ok
    }
    if unsupported:
        raise NotImplementedError(f"pixel decoder: unsupported Euler scheduler settings {unsupported}")
    n_train = int(cfg.get("num_train_timesteps", 1000))
    b0, b1 = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    kind = cfg.get("beta_schedule", "linear")
    if kind == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, n_train, dtype=torch.float32) ** 2
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n_train, dtype=torch.float32)
    else:
        raise NotImplementedError(f"pixel decoder: unsupported beta_schedule {kind!r}")
    abar = torch.cumprod(1.0 - betas, dim=0)
    train_sigmas = ((1 - abar) / abar) ** 0.5

    spacing, offset = cfg.get("timestep_spacing", "linspace"), int(cfg.get("steps_offset", 0))
    if spacing == "leading":
        ratio = n_train // num_steps
        t = torch.arange(num_steps, dtype=torch.float64).mul(ratio).round().flip(0) + offset
    elif spacing == "trailing":
        ratio = n_train / num_steps
        t = torch.arange(n_train, 0, -ratio, dtype=torch.float64).round() - 1
    elif spacing == "linspace":
        t = torch.linspace(0, n_train - 1, num_steps, dtype=torch.float64).flip(0)
    else:
        raise NotImplementedError(f"pixel decoder: unsupported timestep_spacing {spacing!r}")
    t = t.float().double()  # the scheduler keeps its timesteps in float32
    lo = t.floor().long().clamp(0, n_train - 2)
    frac = t - lo
    ts = train_sigmas.double()
    sig = ts[lo] + (ts[lo + 1] - ts[lo]) * frac
    sigmas = torch.cat([sig, sig.new_zeros(1)]).float()
    top = sigmas.max()
    init_sigma = float(top if spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5)
    return t.float(), sigmas, init_sigma


def _weights_variant(folder: Path) -> str | None:
    for variant, name in WEIGHT_FILES:
        if (folder / name).is_file():
            return variant
    names = " or ".join(name for _, name in WEIGHT_FILES)
    raise FileNotFoundError(f"pixel decoder: no weights in {folder}: expected {names}")


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"pixel decoder: missing {path}")
    return path


def _vae_dtype(dtype: torch.dtype | None, vae_config: dict[str, Any]) -> torch.dtype | None:
    """fp16 VAE decodes overflow (the config's force_upcast): such a VAE stays in fp32."""
    return torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast") else dtype


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers config without its bookkeeping keys (_class_name, _diffusers_version, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounded as diffusers' numpy_to_pil does."""
    arr = (images.float().permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


class PixelDecoder(nn.Module):
    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, cfg: PixelDecoderConfig):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.cfg = cfg
        self._scheduler_json = json.dumps(cfg.scheduler, sort_keys=True)

    # ------------------------------------------------------------------ construction and I/O
    @classmethod
    def from_config(cls, cfg: PixelDecoderConfig, seed: int = 0) -> "PixelDecoder":
        """Random weights, reproducible from `seed`, without touching the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel.from_config(_plain(cfg.unet))
            vae = AutoencoderKL.from_config(_plain(cfg.vae))
        return cls(unet.eval(), vae.eval(), cfg)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "PixelDecoder":
        """Read the diffusers layout: unet/, vae/ (config.json + safetensors weights, also the
        .bf16 variant file name) and scheduler/scheduler_config.json."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"pixel decoder: folder {folder} does not exist")
        parts = {}
        for name in ("unet", "vae"):
            sub = folder / name
            _require(sub / "config.json")
            parts[name] = (sub, _weights_variant(sub))
        scheduler = json.loads(_require(folder / SCHEDULER_FILE).read_text())
        unet = UNet2DConditionModel.from_pretrained(str(parts["unet"][0]), variant=parts["unet"][1], torch_dtype=dtype)
        vae_config = json.loads((parts["vae"][0] / "config.json").read_text())
        vae = AutoencoderKL.from_pretrained(
            str(parts["vae"][0]), variant=parts["vae"][1], torch_dtype=_vae_dtype(dtype, vae_config)
        )
        cfg = PixelDecoderConfig(unet=_plain(dict(unet.config)), vae=_plain(dict(vae.config)), scheduler=_plain(scheduler))
        return cls(unet.eval(), vae.eval(), cfg).to(device=device)

    def save_pretrained(self, folder: str | Path) -> None:
        import diffusers

        folder = Path(folder)
        self.unet.save_pretrained(str(folder / "unet"))
        self.vae.save_pretrained(str(folder / "vae"))
        (folder / "scheduler").mkdir(parents=True, exist_ok=True)
        scheduler = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": diffusers.__version__}
        (folder / SCHEDULER_FILE).write_text(json.dumps({**scheduler, **self.cfg.scheduler}, indent=2))
        index = {
            "_class_name": "DiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "PixelDecoder":
        # nn.Module.to, not diffusers' override: that one warns on every dtype cast even when the
        # model has no modules to keep in fp32.
        nn.Module.to(self.unet, device=device, dtype=dtype)
        nn.Module.to(self.vae, device=device, dtype=_vae_dtype(dtype, self.vae.config))
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ sampling
    def initial_latents(self, seeds: list[int], height: int, width: int, num_steps: int) -> torch.Tensor:
        """Per-request seeded latents (B, 4, H/8, W/8) in fp32, scaled by the init_noise_sigma of
        the num_steps schedule (with "leading" spacing it depends on the first timestep)."""
        _, _, init_sigma = euler_schedule(self._scheduler_json, num_steps)
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        draws = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        return torch.cat(draws).to(self.device) * init_sigma

    def sample_latents(
        self,
        features: torch.Tensor,
        negative_features: torch.Tensor,
        num_steps: int = 50,
        guidance_scale: float = 3.0,
        seeds: list[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The Euler CFG loop -> final latents (B, 4, H/8, W/8) fp32. `latents` (already scaled by
        init_noise_sigma) replaces the seeded initial latents."""
        height, width = self._size(height, width)
        b = self._check_features(features, negative_features)
        if latents is None:
            if seeds is None or len(seeds) != b:
                raise ValueError(f"need one seed per request: {b} requests, seeds {seeds}")
            latents = self.initial_latents(seeds, height, width, num_steps)
        x = latents.to(device=self.device, dtype=torch.float32)
        timesteps, sigmas, _ = euler_schedule(self._scheduler_json, num_steps)
        dtype, guided = self.dtype, guidance_scale > 1.0
        states = features.to(device=self.device, dtype=dtype)
        if guided:
            states = torch.cat([states, negative_features.to(device=self.device, dtype=dtype).expand_as(states)])
        time_ids = torch.tensor([height, width, 0, 0, height, width], device=self.device, dtype=dtype)
        added = {"text_embeds": states.mean(1), "time_ids": time_ids.expand(states.shape[0], 6)}
        v_pred = self.cfg.scheduler.get("prediction_type", "epsilon") == "v_prediction"
        with torch.no_grad():
            for i in range(num_steps):
                sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
                inp = (x / math.sqrt(sigma**2 + 1)).to(dtype)
                if guided:
                    inp = torch.cat([inp, inp])
                out = self.unet(inp, timesteps[i].to(self.device), encoder_hidden_states=states,
                                added_cond_kwargs=added, return_dict=False)[0].float()
                if guided:
                    out_c, out_u = out.chunk(2)
                    out = out_u + guidance_scale * (out_c - out_u)
                if v_pred:
                    # dx/dsigma = (x - x0) / sigma with x0 = x / (sigma^2 + 1) - sigma * v / sqrt(sigma^2 + 1)
                    x0 = x / (sigma**2 + 1) - out * (sigma / math.sqrt(sigma**2 + 1))
                    out = (x - x0) / sigma
                x = x + (sigma_next - sigma) * out
        return x

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode -> images (B, 3, H, W) fp32 in [0, 1]."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = (latents / self.vae.config.scaling_factor).to(vae_dtype)
        with torch.no_grad():
            img = self.vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def decode(
        self,
        features: torch.Tensor,
        negative_features: torch.Tensor,
        num_steps: int = 50,
        guidance_scale: float = 3.0,
        seeds: list[int] | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> list[Image.Image]:
        """features (B, 64, C), negative_features (B or 1, 64, C) -> B PIL images (default size:
        the UNet's sample_size times the VAE's downscale)."""
        latents = self.sample_latents(features, negative_features, num_steps, guidance_scale, seeds, height, width)
        return to_pil(self.decode_latents(latents))

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default, width or default
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"pixel decoder: height and width must be multiples of {f}, got {height}x{width}")
        return height, width

    def _check_features(self, features: torch.Tensor, negative: torch.Tensor) -> int:
        dim = self.unet.config.cross_attention_dim
        if features.dim() != 3 or features.shape[-1] != dim:
            raise ValueError(f"pixel decoder: features must be (B, tokens, {dim}), got {tuple(features.shape)}")
        b = features.shape[0]
        if negative.dim() != 3 or negative.shape[0] not in (1, b) or negative.shape[1:] != features.shape[1:]:
            raise ValueError(
                f"pixel decoder: negative_features must be (1 or {b}, {features.shape[1]}, {dim}), "
                f"got {tuple(negative.shape)}"
            )
        return b
