#include "cpu/cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace blip3o::cpu {

// BLIP3O_FAST_CPU_SCALAR=1 forces the scalar path (tests use it to cover both paths on one machine).
bool has_avx2_fma() {
  static const bool value = [] {
    const char* force = std::getenv("BLIP3O_FAST_CPU_SCALAR");
    if (force != nullptr && std::strcmp(force, "1") == 0) return false;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return value;
}

const char* feature_string() { return has_avx2_fma() ? "avx2+fma" : "scalar"; }

}  // namespace blip3o::cpu
