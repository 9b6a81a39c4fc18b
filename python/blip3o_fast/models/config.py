"""Model configuration: plain dataclasses, one per component, assembled into BLIP3oConfig.

Field names follow the transformers / diffusers configs they are read from, so the checkpoint code
maps keys one to one (python/blip3o_fast/checkpoint/).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

BACKBONES = ("qwen2_5_vl", "llama3")


@dataclass
class TextConfig:
    """The autoregressive decoder: LLaMA 3 or the Qwen2.5-VL text model (Qwen2 layers + 3-D M-RoPE)."""

    arch: str = "qwen2_5_vl"  # "qwen2_5_vl" | "llama3"
    vocab_size: int = 151668
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: dict[str, Any] | None = None  # LLaMA 3.1+ "llama3" frequency scaling
    mrope_section: list[int] | None = None  # Qwen2.5-VL: sums to head_dim / 2
    attention_bias: bool = True  # q/k/v biases (Qwen2); LLaMA has none
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def check_mrope(self) -> None:
        """Qwen2.5-VL's M-RoPE splits each head's rotary frequencies into (t, h, w) sections: they must
        exist and cover head_dim / 2 exactly."""
        if self.arch != "qwen2_5_vl":
            return
        if not self.mrope_section:
            raise ValueError("a qwen2_5_vl decoder needs TextConfig.mrope_section")
        if 2 * sum(self.mrope_section) != self.dim_per_head:
            raise ValueError(f"TextConfig.mrope_section {list(self.mrope_section)} must sum to head_dim / 2 = "
                             f"{self.dim_per_head // 2}")


@dataclass
class VisionConfig:
    """Qwen2.5-VL vision tower: window + full attention blocks, 2x2 patch merger to the text width."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    out_hidden_size: int = 2048
    rms_norm_eps: float = 1e-6


@dataclass
class DiTConfig:
    """Lumina-Next DiT with BLIP3-o's caption projection (spec section 3)."""

    hidden_size: int = 1792
    num_layers: int = 24
    num_attention_heads: int = 28
    num_kv_heads: int = 28
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    in_channels: int = 1792  # CLIP feature width
    sample_size: int = 8  # feature grid side: sample_size**2 tokens
    patch_size: int = 1
    caption_dim: int = 2048  # backbone hidden size, projected to hidden_size
    rope_theta: float = 10000.0
    ffn_hidden: int | None = None  # set when read from weight shapes; else derived as Lumina does

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def time_embed_dim(self) -> int:
        return min(self.hidden_size, 1024)

    @property
    def ffn_hidden_size(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.hidden_size / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


@dataclass
class PixelDecoderConfig:
    """The diffusion decoder from CLIP features to pixels, as diffusers configs (diffusion-decoder/)."""

    unet: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    num_inference_steps: int = 50
    guidance_scale: float = 3.0


@dataclass
class BLIP3oConfig:
    backbone: str = "qwen2_5_vl"
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    dit: DiTConfig | None = field(default_factory=DiTConfig)
    decoder: PixelDecoderConfig | None = None
    n_query: int = 64
    flow_shift: float = 1.0  # FlowMatchEulerDiscreteScheduler shift of the DiT's sigma grid
    num_train_timesteps: int = 1000
    guidance_scale: float = 3.0  # the DiT sampler's CFG scale when a call gives none (the release's 3.0)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.backbone == "llama3" and self.vision is not None:
            raise ValueError("the llama3 backbone has no vision tower: pass vision=None")

    @property
    def feature_dim(self) -> int:
        if self.dit is None:
            raise ValueError("this model has no DiT, so it has no image-feature width")
        return self.dit.in_channels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BLIP3oConfig":
        d = dict(d)
        parts = {"text": TextConfig, "vision": VisionConfig, "dit": DiTConfig, "decoder": PixelDecoderConfig}
        for key, kind in parts.items():
            if d.get(key) is not None:
                d[key] = kind(**d[key])
        return cls(**d)

    @classmethod
    def tiny(cls, backbone: str = "qwen2_5_vl", *, vocab_size: int = 512, with_decoder: bool = True) -> "BLIP3oConfig":
        """A small model of the full architecture for tests and the embedded default.

        vocab_size must cover the tokenizer (blip3o_fast.tiny builds one with fewer ids)."""
        if backbone == "qwen2_5_vl":
            text = TextConfig(
                arch="qwen2_5_vl", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                rope_theta=1000000.0, mrope_section=[2, 3, 3], attention_bias=True, tie_word_embeddings=True,
            )
            vision = VisionConfig(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1], out_hidden_size=64,
            )
        elif backbone == "llama3":
            text = TextConfig(
                arch="llama3", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                attention_bias=False, tie_word_embeddings=True, max_position_embeddings=131072,
            )
            vision = None
        else:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        dit = DiTConfig(
            hidden_size=128, num_layers=2, num_attention_heads=2, num_kv_heads=2, multiple_of=32,
            in_channels=32, sample_size=8, patch_size=1, caption_dim=text.hidden_size,
        )
        decoder = tiny_pixel_decoder_config(dit.in_channels) if with_decoder else None
        return cls(backbone=backbone, text=text, vision=vision, dit=dit, decoder=decoder, n_query=64)


def tiny_pixel_decoder_config(feature_dim: int, resolution: int = 64) -> PixelDecoderConfig:
    """SDXL-layout UNet + VAE at toy size: same conditioning path as the Emu2-Gen decoder."""
    time_dim = 8
    unet = {
        "sample_size": resolution // 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "attention_head_dim": [2, 4],
        "transformer_layers_per_block": [1, 1],
        "cross_attention_dim": feature_dim,
        "norm_num_groups": 16,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": feature_dim + 6 * time_dim,
        "use_linear_projection": True,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [16, 16, 32, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": resolution,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }
    scheduler = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 1,
    }
    return PixelDecoderConfig(unet=unet, vae=vae, scheduler=scheduler, num_inference_steps=50, guidance_scale=3.0)
