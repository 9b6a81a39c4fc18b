"""blip3o_fast ops: each a torch.library custom op with a PyTorch reference and compiled faces.

See dispatch.py for how a face is chosen and when the reference is used instead.
"""

from blip3o_fast.ops.dispatch import BACKENDS, available_backends
from blip3o_fast.ops.decode_linear import decode_linear, decode_linear_reference
from blip3o_fast.ops.dit_attention import dit_attention, dit_attention_reference
from blip3o_fast.ops.flow_step import flow_step, flow_step_reference
from blip3o_fast.ops.gated_residual_norm import gated_residual_norm, gated_residual_norm_reference
from blip3o_fast.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from blip3o_fast.ops.paged_decode_attention import paged_decode_attention, paged_decode_attention_reference
from blip3o_fast.ops.residual_rms_norm import residual_rms_norm, residual_rms_norm_reference
from blip3o_fast.ops.rms_norm import rms_norm, rms_norm_reference
from blip3o_fast.ops.rms_norm_modulate import rms_norm_modulate, rms_norm_modulate_reference
from blip3o_fast.ops.rope import (
    apply_rope,
    lumina_2d_cos_sin,
    mrope_cos_sin,
    rope_cos_sin,
    rope_inv_freq,
    rope_reference,
)
from blip3o_fast.ops.rope_kv_cache_write import rope_kv_cache_write, rope_kv_cache_write_reference
from blip3o_fast.ops.sample_tokens import sample_tokens, sample_tokens_reference
from blip3o_fast.ops.swiglu import swiglu, swiglu_reference
from blip3o_fast.ops.varlen_prefill_attention import (
    varlen_prefill_attention,
    varlen_prefill_attention_reference,
)

__all__ = [
    "BACKENDS",
    "available_backends",
    "decode_linear",
    "decode_linear_reference",
    "dit_attention",
    "dit_attention_reference",
    "flow_step",
    "flow_step_reference",
    "gated_residual_norm",
    "gated_residual_norm_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "apply_rope",
    "lumina_2d_cos_sin",
    "mrope_cos_sin",
    "residual_rms_norm",
    "residual_rms_norm_reference",
    "rms_norm",
    "rms_norm_modulate",
    "rms_norm_modulate_reference",
    "rms_norm_reference",
    "rope_cos_sin",
    "rope_inv_freq",
    "rope_reference",
    "rope_kv_cache_write",
    "rope_kv_cache_write_reference",
    "sample_tokens",
    "sample_tokens_reference",
    "swiglu",
    "swiglu_reference",
    "varlen_prefill_attention",
    "varlen_prefill_attention_reference",
]
