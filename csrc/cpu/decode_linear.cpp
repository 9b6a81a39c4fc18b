// Small-M linear (decode steps) CPU kernel: y[m, n] = x[m, :] . weight[n, :] + bias[n].
// Weight-streaming: the threads split the weight's rows into contiguous slabs (OpenMP static
// schedule over row tiles), so each weight byte comes from DRAM once per call (once per kMBlock rows
// of x). A tile of kRows weight rows is multiplied with every x row while it is hot in L1: the AVX2
// micro-kernel loads each 8-wide K chunk of kRows weight rows once (bf16/fp16 widened to fp32 in
// registers) and FMAs it against kXRows x rows, keeping kRows * kXRows 8-lane accumulators.
// The next tile is prefetched into L2 during the first pass over a tile (the one that reads DRAM).
// K is cut into chunks so the x block in use (the m block's rows, one K chunk) stays in L2; the
// accumulators wait in a per-thread scratch between chunks and are summed across lanes once, at the
// end. x of a 16-bit dtype is widened to an fp32 copy first (it is tiny: M x K). K % 8 tail elements
// are added in scalar after the lane sum; the result is rounded once to the storage dtype.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/vec_avx2.h"

namespace blip3o::cpu {

namespace {

constexpr int kRows = 3;                    // weight rows per tile
constexpr int kXRows = 4;                   // x rows per micro-kernel call: 12 + 3 + 1 = 16 ymm registers
constexpr int64_t kMBlock = 64;             // x rows sharing one stream of the weight
constexpr int64_t kXBlockBytes = 128 << 10;  // the x block (m block rows x K chunk, fp32) kept within L2

// K chunk for mb rows of x: the x block fits kXBlockBytes; a multiple of 8 in [512, 8192]. Long chunks:
// each chunk costs every micro-kernel call a reload of its accumulators.
int64_t k_block(int64_t mb) { return std::clamp<int64_t>(kXBlockBytes / (4 * mb) / 8 * 8, 512, 8192); }

// acc[(m * kRows + r) * 8 + lane] += w[r, 0:kn] * x[m, 0:kn] lane-wise, for NR weight rows and MR x
// rows; kn % 8 == 0.
// PF: also prefetch the same span of the next NR weight rows (the next tile, read next) into L2.
template <class W, int NR, int MR, bool PF>
BLIP3O_AVX2 void micro_avx2(const W* w, const float* x, int64_t ld, int64_t kn, float* acc) {
  __m256 a[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) a[m][r] = _mm256_loadu_ps(acc + (m * kRows + r) * 8);
  for (int64_t k = 0; k < kn; k += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = avx2::load8(w + r * ld + k);
    if (PF && k % (64 / sizeof(W)) == 0)
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (NR + r) * ld + k), _MM_HINT_T1);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ld + k);
      for (int r = 0; r < NR; ++r) a[m][r] = _mm256_fmadd_ps(wv[r], xv, a[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) _mm256_storeu_ps(acc + (m * kRows + r) * 8, a[m][r]);
}

template <class W, int NR, bool PF>
BLIP3O_AVX2 void micro_rows_avx2(const W* w, const float* x, int64_t ld, int64_t kn, int mr, float* acc) {
  switch (mr) {
    case 4: micro_avx2<W, NR, 4, PF>(w, x, ld, kn, acc); break;
    case 3: micro_avx2<W, NR, 3, PF>(w, x, ld, kn, acc); break;
    case 2: micro_avx2<W, NR, 2, PF>(w, x, ld, kn, acc); break;
    default: micro_avx2<W, NR, 1, PF>(w, x, ld, kn, acc); break;
  }
}

// One tile: weight rows [n0, n0 + nr) against x rows [0, mb) (x already offset to the m block).
template <class T>
BLIP3O_AVX2 void tile_avx2(const T* w, const float* x, const T* bias, T* y, int64_t n0, int nr, int64_t mb,
                           int64_t n, int64_t k, bool prefetch, float* acc) {
  static_assert(kXRows == 4, "micro_rows_avx2 dispatches up to 4 x rows");
  const int64_t k8 = k / 8 * 8;
  const T* wt = w + n0 * k;
  std::fill(acc, acc + mb * kRows * 8, 0.0f);
  const int64_t kb = k_block(mb);
  for (int64_t k0 = 0; k0 < k8; k0 += kb) {
    const int64_t kn = std::min(kb, k8 - k0);
    for (int64_t m0 = 0; m0 < mb; m0 += kXRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kXRows, mb - m0));
      float* a = acc + m0 * kRows * 8;
      if (nr < kRows) {  // the matrix's last, partial tile: one weight row at a time
        for (int r = 0; r < nr; ++r)
          micro_rows_avx2<T, 1, false>(wt + r * k + k0, x + m0 * k + k0, k, kn, mr, a + r * 8);
      } else if (m0 == 0 && prefetch) {  // the first pass streams this tile from DRAM: fetch the next one too
        micro_rows_avx2<T, kRows, true>(wt + k0, x + k0, k, kn, mr, a);
      } else {
        micro_rows_avx2<T, kRows, false>(wt + k0, x + m0 * k + k0, k, kn, mr, a);
      }
    }
  }
  for (int64_t m = 0; m < mb; ++m) {
    for (int r = 0; r < nr; ++r) {
      float s = avx2::hsum(_mm256_loadu_ps(acc + (m * kRows + r) * 8));
      for (int64_t i = k8; i < k; ++i) s += x[m * k + i] * to_f32(wt[r * k + i]);
      if (bias != nullptr) s += to_f32(bias[n0 + r]);
      y[m * n + n0 + r] = from_f32<T>(s);
    }
  }
}

template <class T>
void tile_scalar(const T* w, const float* x, const T* bias, T* y, int64_t n0, int nr, int64_t mb, int64_t n,
                 int64_t k) {
  for (int r = 0; r < nr; ++r) {
    const T* wr = w + (n0 + r) * k;
    for (int64_t m = 0; m < mb; ++m) {
      float s = 0.0f;
      for (int64_t i = 0; i < k; ++i) s += x[m * k + i] * to_f32(wr[i]);
      if (bias != nullptr) s += to_f32(bias[n0 + r]);
      y[m * n + n0 + r] = from_f32<T>(s);
    }
  }
}

// x as fp32 rows: the tensor itself when it is fp32, else a widened copy in `buf`.
template <class T>
const float* x_as_f32(const T* x, int64_t count, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    buf.resize(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) buf[i] = to_f32(x[i]);
    return buf.data();
  }
}

template <class T>
void run(const T* x, const T* w, const T* bias, T* y, int64_t m, int64_t n, int64_t k) {
  std::vector<float> xbuf;
  const float* xf = x_as_f32(x, m * k, xbuf);
  const bool vec = use_avx2();
  const int64_t tiles = (n + kRows - 1) / kRows;
  for (int64_t m0 = 0; m0 < m; m0 += kMBlock) {
    const int64_t mb = std::min(kMBlock, m - m0);
    const float* xb = xf + m0 * k;
    T* yb = y + m0 * n;
#pragma omp parallel if (n * k > kParallelMin)
    {
      std::vector<float> acc(vec ? static_cast<size_t>(kMBlock * kRows * 8) : 0);  // 8-lane partials
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = t * kRows;
        const int nr = static_cast<int>(std::min<int64_t>(kRows, n - n0));
        if (vec)
          tile_avx2(w, xb, bias, yb, n0, nr, mb, n, k, n0 + 2 * kRows <= n, acc.data());
        else
          tile_scalar(w, xb, bias, yb, n0, nr, mb, n, k);
      }
    }
  }
}

}  // namespace

void decode_linear(const void* x, const void* weight, const void* bias, void* out, int64_t m, int64_t n, int64_t k,
                   DType dt) {
  visit_host_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    run(static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<T*>(out),
        m, n, k);
  });
}

}  // namespace blip3o::cpu
