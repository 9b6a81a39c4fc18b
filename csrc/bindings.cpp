// nanobind module blip3o_fast._C: one line per kernel. Tensors arrive zero-copy over DLPack;
// the Python layer (python/blip3o_fast/ops/) checks shapes and dtypes before calling in.
#include <nanobind/nanobind.h>

#include "cpu/cpu_features.h"

namespace nb = nanobind;

NB_MODULE(_C, m) {
  m.doc() = "blip3o_fast compiled kernels (CPU, and CUDA when built with a toolkit)";
  m.def("cpu_features", &blip3o::cpu::feature_string);
#ifdef BLIP3O_WITH_CUDA
  m.def("has_cuda", [] { return true; });
#else
  m.def("has_cuda", [] { return false; });
#endif
}
