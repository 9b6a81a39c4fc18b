// RoPE math shared by the CPU and CUDA faces (oracle: python/blip3o_fast/ops/rope.py).
// A pair (a, b) is (x[i], x[i + D/2]) in the "half" layout and (x[2i], x[2i+1]) interleaved;
// both layouts rotate it the same way. inverse=True passes -sin (negation is exact).
#pragma once
#include "blip3o/common.h"

namespace blip3o::rope {

BLIP3O_HD float rotate_a(float a, float b, float c, float s) { return a * c - b * s; }
BLIP3O_HD float rotate_b(float a, float b, float c, float s) { return b * c + a * s; }

}  // namespace blip3o::rope
