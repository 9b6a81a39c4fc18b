"""EVA02-CLIP-E-14-plus vision tower: BLIP3o's generation-target encoder (spec 4 and 7.1).

A plain ViT at 448 px: Conv2d patch embedding, a learned CLS token, learned absolute position
embeddings (CLS included), no RoPE, and post-norm blocks `x + LN(attn(x))`, `x + LN(mlp(x))` with a
GELU MLP. There is no final norm or head: the target is the last block's output without the CLS
token, a 32 x 32 grid average-pooled 4 x 4 to 8 x 8 = 64 tokens (the release's `early_pool2d_4`).

Parameter names equal the published ones: the bare names of `jiuhai/eva_clip_vision_tower`'s
pytorch_model.bin, and the same under `model.gen_vision_tower.vision_tower.model.` in BLIP3o's
shards. BLIP3o's copy of the EVA code fuses the qkv bias into `attn.qkv.bias` (3 * width); the
original EVA-CLIP / Emu2 code keeps `attn.q_bias` and `attn.v_bias` with no k bias, so those are
folded into the fused bias (k part zero) on load.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import nn

from blip3o_fast.checkpoint.safetensors_io import CheckpointError, weight_files
from blip3o_fast.checkpoint.state_dict import load_strict
from blip3o_fast.models.image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

BLIP3O_PREFIX = "model.gen_vision_tower.vision_tower.model."
BIN_NAME = "pytorch_model.bin"
EVA_E_HEAD_WIDTH = 112  # `head_width` of eva-clip-E-14-plus.json; not recoverable from the weights' shapes


@dataclass
class EVAVisionConfig:
    """eva-clip-E-14-plus.json's vision_cfg; the defaults are the released target encoder."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1792
    depth: int = 64
    num_heads: int = 16
    mlp_dim: int = 15360  # int(width * 8.571428571428571)
    layer_norm_eps: float = 1e-6
    target_grid: int = 8  # pooled to target_grid x target_grid tokens (BLIP3o's 64 queries)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.grid % self.target_grid:
            g, t = self.grid, self.target_grid
            raise ValueError(f"the {g} x {g} patch grid does not pool evenly to {t} x {t}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pool_kernel(self) -> int:
        return self.grid // self.target_grid

    @classmethod
    def tiny(cls) -> "EVAVisionConfig":
        """A few-kB tower for tests: 16 x 16 patches pooled 2 x 2, so pooling is exercised."""
        return cls(image_size=224, patch_size=14, width=32, depth=2, num_heads=2, mlp_dim=64)

    @classmethod
    def from_weights(cls, state: dict[str, torch.Tensor], head_width: int = EVA_E_HEAD_WIDTH) -> "EVAVisionConfig":
        """Sizes from a (prefix-stripped) state dict's shapes; the head count needs head_width."""
        for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
            if key not in state:
                raise CheckpointError(f"not an EVA-CLIP vision tower: no {key}")
        width, _, patch, _ = state["patch_embed.proj.weight"].shape
        grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
        if width % head_width:
            raise CheckpointError(f"width {width} is not a multiple of head_width {head_width}: pass the config")
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        return cls(
            image_size=grid * patch, patch_size=patch, width=width, depth=depth,
            num_heads=width // head_width, mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
        )


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EVAVisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, grid * grid, width), row-major


class Attention(nn.Module):
    def __init__(self, cfg: EVAVisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=True)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as EVA's
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: EVAVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU: nn.GELU's default in EVA


class Block(nn.Module):
    """Post-norm: the LayerNorm sits on the branch output, not on the block input."""

    def __init__(self, cfg: EVAVisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm1(self.attn(x))
        return x + self.norm2(self.mlp(x))


class EVAVisionTower(nn.Module):
    def __init__(self, cfg: EVAVisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid + 1, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> last block output without CLS, (B, grid * grid, width)."""
        s = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(f"pixel_values must be (B, 3, {s}, {s}), got {tuple(pixel_values.shape)}")
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x[:, 1:]

    def encode_targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The flow-matching target: (B, target_grid ** 2, width) tokens, row-major over the pooled grid."""
        cfg = self.config
        x = self(pixel_values)
        grid = x.transpose(1, 2).reshape(x.shape[0], cfg.width, cfg.grid, cfg.grid)
        pooled = F.avg_pool2d(grid, kernel_size=cfg.pool_kernel, stride=cfg.pool_kernel)
        return pooled.flatten(2).transpose(1, 2)

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], config: EVAVisionConfig | None = None, *, source: str = "state dict",
        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    ) -> "EVAVisionTower":
        state = tower_state(state)
        cfg = config or EVAVisionConfig.from_weights(state)
        with torch.device("meta"):  # no random init of 4 B parameters that the checkpoint overwrites
            tower = cls(cfg)
        tower = tower.to(dtype=dtype).to_empty(device=device)
        load_strict(tower, state, source)
        return tower.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, config: EVAVisionConfig | None = None, *,
        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    ) -> "EVAVisionTower":
        """From a .bin / .safetensors file, or a folder holding pytorch_model.bin or safetensors
        (a BLIP3o checkpoint: only the gen tower's tensors are read from its shards)."""
        return cls.from_state_dict(read_tower_weights(path), config, source=str(path), device=device, dtype=dtype)


def tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare tower names: strip BLIP3o's prefix (dropping the rest of a full checkpoint) and fold
    EVA's separate q/v biases into the fused qkv bias."""
    if any(k.startswith(BLIP3O_PREFIX) for k in state):
        state = {k[len(BLIP3O_PREFIX):]: v for k, v in state.items() if k.startswith(BLIP3O_PREFIX)}
    out = dict(state)
    for key in [k for k in state if k.endswith(".attn.q_bias")]:
        stem = key[: -len("q_bias")]
        if stem + "v_bias" in out and stem + "qkv.bias" not in out:
            q, v = out.pop(key), out.pop(stem + "v_bias")
            out[stem + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


def read_tower_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir():
        if (path / BIN_NAME).is_file():
            return _read_bin(path / BIN_NAME)
        return _read_safetensors(weight_files(path))
    if not path.is_file():
        raise FileNotFoundError(f"EVA-CLIP checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors([path])
    return _read_bin(path)


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:  # mmap (zip-format files only): a 4 B-parameter file is not copied into memory before the module takes it
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {exc}") from exc
    for wrapper in ("model", "state_dict", "module"):  # training checkpoints nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """The tower's tensors only: a full BLIP3o checkpoint's shards also hold the LLM and the DiT."""
    try:
        keys = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                keys[file] = list(f.keys())
        prefixed = any(k.startswith(BLIP3O_PREFIX) for names in keys.values() for k in names)
        state: dict[str, torch.Tensor] = {}
        for file, names in keys.items():
            wanted = [k for k in names if k.startswith(BLIP3O_PREFIX)] if prefixed else names
            if wanted:
                with safe_open(str(file), framework="pt") as f:
                    state.update({k: f.get_tensor(k) for k in wanted})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"corrupt or unreadable safetensors file among {[str(f) for f in files]}: {exc}") from exc
    return state


def preprocess(images: Image.Image | list[Image.Image], image_size: int = 448) -> torch.Tensor:
    """PIL images -> (B, 3, S, S) float32, as the release's EvaClipImageTrainProcessor (spec 7.1):
    RGB, shortest side resized to S (PIL bicubic), centre crop S x S, /255, CLIP mean/std."""
    if isinstance(images, Image.Image):
        images = [images]
    if not isinstance(images, (list, tuple)) or not images:
        raise TypeError(f"images must be a PIL image or a non-empty list of them, got {type(images).__name__}")
    mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)[:, None, None]
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"image {i} must be a PIL.Image.Image, got {type(image).__name__}")
        try:  # plain convert("RGB") as transformers 4.51's convert_to_rgb (no alpha compositing)
            crop = resize_center_crop(image.convert("RGB"), image_size)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL decodes lazily: a corrupt file fails here
            raise ValueError(f"image {i} could not be read: {exc}") from exc
        x = np.asarray(crop).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        out.append((x - mean) / std)
    return torch.from_numpy(np.stack(out))


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision Resize(size) + CenterCrop(size) on a PIL image, reproduced exactly."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    top = int(round((new_h - size) / 2.0))  # Python's round (half to even), as torchvision
    left = int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))
