// Run-time CPU feature detection: kernels pick their AVX2/FMA path or the scalar one.
#pragma once

namespace blip3o::cpu {
bool has_avx2_fma();
const char* feature_string();
}  // namespace blip3o::cpu
