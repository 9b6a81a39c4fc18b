"""Tiny transformers models and ours with the same weights, for the tests that hold our backbone to
transformers (tests/models, tests/engine). Importable because pytest puts tests/ (conftest.py's
folder) on sys.path."""

import numpy as np
import torch
import transformers
from PIL import Image

from blip3o_fast.checkpoint.state_dict import normalize_keys
from blip3o_fast.models.causal_lm import CausalLM
from blip3o_fast.models.config import BLIP3oConfig
from blip3o_fast.models.image_processing import QwenImageProcessor

# Special ids for the tiny vocabulary: passed around as arguments, as real ones would be.
PAD, EOS, IMG, VS, VE, VID = 0, 7, 500, 501, 502, 503
PROC = QwenImageProcessor()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention and RoPE matter (the default init makes them near uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if ("norm" in name or "ln_q" in name) else 0.15 * noise)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# Different sizes: 8x12 patches (one window) and 20x16 patches (edge windows of several sizes).
IMAGES = [noise_image(168, 112, 1), noise_image(224, 280, 2)]


def _load_into_ours(hf: torch.nn.Module, ours: CausalLM) -> CausalLM:
    ours.load_state_dict(normalize_keys(hf.state_dict()), strict=True)
    return ours.eval()


def llama_twins(rope_scaling: bool = True, seed: int = 0) -> tuple[torch.nn.Module, CausalLM]:
    """LlamaForCausalLM and our CausalLM on the tiny LLaMA 3 config (llama3 rope scaling unless off)."""
    cfg = BLIP3oConfig.tiny("llama3", with_decoder=False).text
    if not rope_scaling:
        cfg.rope_scaling = None
    rope = {**(cfg.rope_scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_theta}
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    randomize(hf, seed)
    return hf, _load_into_ours(hf, CausalLM(cfg))


def qwen_twins(seed: int = 0) -> tuple[torch.nn.Module, CausalLM]:
    """Qwen2_5_VLForConditionalGeneration and our CausalLM (text decoder + vision tower), tiny config."""
    c = BLIP3oConfig.tiny("qwen2_5_vl", with_decoder=False)
    t, v = c.text, c.vision
    hf_cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
            rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta, mrope_section=t.mrope_section),
            max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=t.tie_word_embeddings,
            bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
        ),
        vision_config=dict(
            depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_heads=v.num_heads,
            patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
            window_size=v.window_size, fullatt_block_indexes=v.fullatt_block_indexes, out_hidden_size=v.out_hidden_size,
            in_channels=v.in_channels,
        ),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
        tie_word_embeddings=t.tie_word_embeddings,
    )
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    randomize(hf, seed)
    return hf, _load_into_ours(hf, CausalLM(t, v))
