"""config.json <-> BLIP3oConfig.

Reads the published BLIP3o layout (transformers 4.51 names: a flat Qwen2.5-VL config with
`rope_scaling`) and plain transformers 4.x / 5.x LLaMA 3 and Qwen2.5-VL configs (5.x nests the
text config and uses `rope_parameters`). DiT sizes come from our own `blip3o_fast` key when we
wrote the checkpoint, else from the weights' shapes (head_dim 64), as the published files carry none.
Writes the published layout.
"""

from __future__ import annotations

from typing import Any

import torch

from blip3o_fast.checkpoint.safetensors_io import CheckpointError
from blip3o_fast.models.config import BLIP3oConfig, DiTConfig, TextConfig, VisionConfig

DIT_PREFIX = "model.dit.model."
QWEN_TYPES = ("qwen2_5_vl", "blip3o_qwen", "blip3o_qwen_inference")
LLAMA_TYPES = ("llama", "blip3o_llama")
DIT_HEAD_DIM = 64


def backbone_of(raw: dict[str, Any]) -> str:
    model_type = raw.get("model_type", "")
    if model_type in QWEN_TYPES or "vision_config" in raw:
        return "qwen2_5_vl"
    if model_type in LLAMA_TYPES:
        return "llama3"
    raise CheckpointError(
        f"config.json model_type {model_type!r} is not a supported backbone (Qwen2.5-VL: {QWEN_TYPES}, LLaMA 3: {LLAMA_TYPES})"
    )


def _rope(text: dict[str, Any]) -> tuple[float, dict[str, Any] | None, list[int] | None]:
    """(theta, llama3 scaling or None, mrope_section or None) from 4.x rope_scaling or 5.x rope_parameters."""
    params = dict(text.get("rope_parameters") or {})
    legacy = dict(text.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", text.get("rope_theta", 10000.0)))
    merged = {**legacy, **params}
    mrope = merged.get("mrope_section")
    kind = merged.get("rope_type", merged.get("type"))
    scaling = None
    if kind == "llama3":
        scaling = {k: merged[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        scaling["rope_type"] = "llama3"
    elif kind not in (None, "default", "mrope"):
        raise CheckpointError(f"config.json: unsupported RoPE type {kind!r} (supported: default, llama3, mrope)")
    return theta, scaling, (list(mrope) if mrope else None)


def text_config_from_raw(raw: dict[str, Any], backbone: str) -> TextConfig:
    text = {**raw, **raw.get("text_config", {})}
    theta, scaling, mrope = _rope(text)
    if backbone == "qwen2_5_vl" and mrope is None:
        raise CheckpointError("config.json: a Qwen2.5-VL config needs mrope_section in rope_scaling / rope_parameters")
    return TextConfig(
        arch=backbone,
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        num_hidden_layers=int(text["num_hidden_layers"]),
        num_attention_heads=int(text["num_attention_heads"]),
        num_key_value_heads=int(text.get("num_key_value_heads", text["num_attention_heads"])),
        head_dim=text.get("head_dim"),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        mrope_section=mrope,
        attention_bias=bool(text.get("attention_bias", backbone == "qwen2_5_vl")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
    )


def vision_config_from_raw(raw: dict[str, Any]) -> VisionConfig:
    v = raw["vision_config"]
    return VisionConfig(
        depth=int(v["depth"]),
        hidden_size=int(v.get("hidden_size", v.get("embed_dim", 1280))),
        intermediate_size=int(v["intermediate_size"]),
        num_heads=int(v["num_heads"]),
        in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        patch_size=int(v.get("patch_size", 14)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        window_size=int(v.get("window_size", 112)),
        fullatt_block_indexes=list(v.get("fullatt_block_indexes", [])),
        out_hidden_size=int(v.get("out_hidden_size", raw.get("hidden_size", 0))),
        rms_norm_eps=float(v.get("rms_norm_eps", 1e-6)),
    )


def dit_config_from_weights(state: dict[str, torch.Tensor], patch_size: int = 1, sample_size: int = 8) -> DiTConfig | None:
    """DiT sizes from the published weights (spec 8): None when the checkpoint has no DiT."""
    if DIT_PREFIX + "patch_embedder.proj.weight" not in state:
        return None

    def shape(name: str) -> torch.Size:
        key = DIT_PREFIX + name
        if key not in state:
            raise CheckpointError(f"checkpoint has a DiT but no {key}")
        return state[key].shape

    hidden, patch_in = shape("patch_embedder.proj.weight")
    layer_ids = {int(k[len(DIT_PREFIX):].split(".")[1]) for k in state if k.startswith(DIT_PREFIX + "layers.")}
    return DiTConfig(
        hidden_size=hidden,
        num_layers=len(layer_ids),
        num_attention_heads=hidden // DIT_HEAD_DIM,
        num_kv_heads=shape("layers.0.attn1.to_k.weight")[0] // DIT_HEAD_DIM,
        in_channels=patch_in // (patch_size * patch_size),
        sample_size=sample_size,
        patch_size=patch_size,
        caption_dim=shape("caption_projection.linear_1.weight")[1],
        ffn_hidden=shape("layers.0.feed_forward.linear_1.weight")[0],
    )


def config_from_raw(raw: dict[str, Any], state: dict[str, torch.Tensor]) -> BLIP3oConfig:
    backbone = backbone_of(raw)
    text = text_config_from_raw(raw, backbone)
    vision = vision_config_from_raw(raw) if backbone == "qwen2_5_vl" else None
    ours = raw.get("blip3o_fast", {})
    if ours.get("dit") is not None:
        dit = DiTConfig(**ours["dit"])
    else:
        dit = dit_config_from_weights(state)
    return BLIP3oConfig(
        backbone=backbone,
        text=text,
        vision=vision,
        dit=dit,
        decoder=None,
        n_query=int(raw.get("n_query", 64)),
        flow_shift=float(ours.get("flow_shift", 1.0)),
        num_train_timesteps=int(ours.get("num_train_timesteps", 1000)),
        guidance_scale=float(ours.get("guidance_scale", 3.0)),
    )


def config_to_raw(cfg: BLIP3oConfig, token_ids: dict[str, Any]) -> dict[str, Any]:
    """The published layout: transformers 4.51 names, flat Qwen2.5-VL config, plus BLIP3o's keys."""
    t = cfg.text
    raw: dict[str, Any] = {
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "transformers_version": "4.51.3",
    }
    if t.head_dim is not None:
        raw["head_dim"] = t.head_dim
    has_dit = cfg.dit is not None
    if cfg.backbone == "qwen2_5_vl":
        raw["model_type"] = "blip3o_qwen" if has_dit else "qwen2_5_vl"
        raw["architectures"] = ["blip3oQwenForInferenceLM" if has_dit else "Qwen2_5_VLForConditionalGeneration"]
        raw["rope_scaling"] = {"type": "mrope", "mrope_section": list(t.mrope_section or [])}
        v = cfg.vision
        raw["vision_config"] = {
            "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads, "in_chans": v.in_channels, "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
            "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "out_hidden_size": v.out_hidden_size, "hidden_act": "silu", "model_type": "qwen2_5_vl",
        }
    else:
        raw["model_type"] = "blip3o_llama" if has_dit else "llama"
        raw["architectures"] = ["blip3oLlamaForCausalLM" if has_dit else "LlamaForCausalLM"]
        raw["attention_bias"] = t.attention_bias
        if t.rope_scaling is not None:
            raw["rope_scaling"] = dict(t.rope_scaling)
    raw.update({k: v for k, v in token_ids.items() if v is not None})
    if has_dit:
        raw.update({"n_query": cfg.n_query, "gen_hidden_size": cfg.dit.in_channels, "gen_pooling": "early_pool2d_4"})
        raw["blip3o_fast"] = {
            "dit": dict(vars(cfg.dit)),
            "flow_shift": cfg.flow_shift,
            "num_train_timesteps": cfg.num_train_timesteps,
            "guidance_scale": cfg.guidance_scale,
        }
    return raw
