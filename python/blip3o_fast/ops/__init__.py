"""blip3o_fast ops: each a torch.library custom op with a PyTorch reference and compiled faces.

See dispatch.py for how a face is chosen and when the reference is used instead.
"""

from blip3o_fast.ops.dispatch import BACKENDS, available_backends
from blip3o_fast.ops.dit_attention import dit_attention, dit_attention_reference
from blip3o_fast.ops.flow_step import flow_step, flow_step_reference
from blip3o_fast.ops.gated_residual_norm import gated_residual_norm, gated_residual_norm_reference
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
from blip3o_fast.ops.swiglu import swiglu, swiglu_reference

__all__ = [
    "BACKENDS",
    "available_backends",
    "dit_attention",
    "dit_attention_reference",
    "flow_step",
    "flow_step_reference",
    "gated_residual_norm",
    "gated_residual_norm_reference",
    "apply_rope",
    "lumina_2d_cos_sin",
    "mrope_cos_sin",
    "rms_norm",
    "rms_norm_modulate",
    "rms_norm_modulate_reference",
    "rms_norm_reference",
    "rope_cos_sin",
    "rope_inv_freq",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
]
