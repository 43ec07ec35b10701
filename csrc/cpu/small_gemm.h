// C = A B for the thin products of the tangent blocks: B and C have a few vectors of columns (the
// rank, padded to whole vectors), A is a strided view of what the hooks captured (its rows, or its
// transpose). A tile of C (rows x vectors of columns) stays in registers while k runs: each step
// loads B's k-th row once and broadcasts each A(i, k). gemm() describes the blocking.
//
// The vector type is GCC/Clang's vector extension (32 bytes: one AVX2 register, or two SSE2 ones),
// and the loops are compiled twice on x86-64 (x86-64-v3 = AVX2 + FMA, and the baseline), picked at
// load time, so the extension runs on any x86-64 CPU and at full width where AVX2 exists.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PRISM_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PRISM_TARGET_CLONES
#endif

namespace prism::cpu {

typedef float vfloat __attribute__((vector_size(32)));
typedef double vdouble __attribute__((vector_size(32)));
template <typename T> struct VecOf;
template <> struct VecOf<float> { using type = vfloat; };
template <> struct VecOf<double> { using type = vdouble; };
template <typename T> using Vec = typename VecOf<T>::type;
template <typename T> constexpr int64_t kLanes = sizeof(Vec<T>) / sizeof(T);

// Direct A: the B rows a tile walks over per K block, about a quarter of a 512 KiB L2.
constexpr int64_t kBlockBytes = 128 * 1024;
// Packed A: K blocks of 32, panels whose C rows and packed A together take about half the L2.
constexpr int64_t kPackedK = 32, kPanelBytes = 256 * 1024;

// A(i, k) = data[i * si + k * sk], read as T (bfloat16 and float16 widen exactly to float).
template <typename S>
struct View {
  const S* data;
  int64_t si, sk;
};

// Copies A[i0 : i0 + rows, k0 : k1] into IB-row strips, buf[strip][k - k0][i % IB], as T; rows past
// `rows` in the last strip are 0. For each k it reads the run A[i0 : i0 + rows, k], contiguous when
// A is a transpose (si == 1).
template <int IB, typename T, typename S>
inline void pack(const View<S>& a, int64_t i0, int64_t rows, int64_t k0, int64_t k1, T* buf) {
  const int64_t kw = k1 - k0, full = rows / IB;
  std::fill(buf + full * kw * IB, buf + (rows + IB - 1) / IB * kw * IB, T(0));
  for (int64_t k = 0; k < kw; ++k) {
    const S* col = a.data + (k0 + k) * a.sk + i0 * a.si;
    for (int64_t s = 0; s < full; ++s) {
      T* out = buf + (s * kw + k) * IB;
      const S* in = col + s * IB * a.si;
      if (a.si == 1) {
        for (int i = 0; i < IB; ++i) out[i] = static_cast<T>(in[i]);
      } else {
        for (int i = 0; i < IB; ++i) out[i] = static_cast<T>(in[i * a.si]);
      }
    }
    for (int64_t i = full * IB; i < rows; ++i) buf[(full * kw + k) * IB + i % IB] = static_cast<T>(col[i * a.si]);
  }
}

// C[i, :NV vectors] (+)= sum_{k < kw} A(i, k) B[k, :] for the first `rows` of IB rows, with
// A(i, k) = a[i * si + k * sk].
template <int IB, int NV, typename T, typename S>
inline __attribute__((always_inline)) void tile(const S* a, int64_t si, int64_t sk, int64_t kw, const T* b,
                                                int64_t ldb, T* c, int64_t ldc, int64_t rows, bool accumulate) {
  constexpr int64_t L = kLanes<T>;
  Vec<T> acc[IB][NV];
  for (int i = 0; i < IB; ++i) {
    for (int v = 0; v < NV; ++v) {
      if (accumulate && i < rows) {
        std::memcpy(&acc[i][v], c + i * ldc + v * L, sizeof(Vec<T>));
      } else {
        acc[i][v] = Vec<T>{};
      }
    }
  }
  for (int64_t k = 0; k < kw; ++k) {
    Vec<T> bk[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bk[v], b + k * ldb + v * L, sizeof(Vec<T>));
    const S* ak = a + k * sk;
    for (int i = 0; i < IB; ++i) {
      const T aik = static_cast<T>(ak[i * si]);
      for (int v = 0; v < NV; ++v) acc[i][v] += aik * bk[v];
    }
  }
  for (int i = 0; i < rows; ++i) {
    for (int v = 0; v < NV; ++v) std::memcpy(c + i * ldc + v * L, &acc[i][v], sizeof(Vec<T>));
  }
}

// A's rows are contiguous T: read in place (IB row streams per tile). K blocks outer, so that the
// block of B rows every tile walks over stays in L2; a last strip of fewer than IB rows is copied
// (zero-padded).
template <int IB, int NV, typename T>
inline __attribute__((always_inline)) void gemm_direct(int64_t M, int64_t K, const T* a, int64_t lda, const T* b,
                                                       int64_t ldb, int64_t cols, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t width = NV * kLanes<T>;
  const int64_t kc = std::max<int64_t>(64, kBlockBytes / (cols * static_cast<int64_t>(sizeof(T))));
  std::vector<T> tail(IB * std::min(K, kc));
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t kw = std::min(K, k0 + kc) - k0;
    for (int64_t i0 = 0; i0 < M; i0 += IB) {
      const int64_t rows = std::min<int64_t>(IB, M - i0);
      const T* strip = a + i0 * lda + k0;
      int64_t si = lda, sk = 1;
      if (rows < IB) {
        pack<IB>(View<T>{a, lda, 1}, i0, rows, k0, k0 + kw, tail.data());
        strip = tail.data(), si = 1, sk = IB;
      }
      for (int64_t c0 = 0; c0 < cols; c0 += width) {
        tile<IB, NV>(strip, si, sk, kw, b + k0 * ldb + c0, ldb, c + i0 * ldc + c0, ldc, rows, accumulate || k0 > 0);
      }
    }
  }
}

// A transposed, strided or narrower than T: packed. Row panels outer, so that a panel of C stays in
// L2 while K runs in short blocks; each block of the panel is packed into strips first, reading runs
// of A that are contiguous when A is a transpose (unpacked, every k of a strided A would cost a
// cache line and a TLB entry; a narrow A would cost a conversion per use).
template <int IB, int NV, typename T, typename S>
inline __attribute__((always_inline)) void gemm_packed(int64_t M, int64_t K, const View<S>& a, const T* b,
                                                       int64_t ldb, int64_t cols, T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t width = NV * kLanes<T>;
  const int64_t row_bytes = (cols + kPackedK) * static_cast<int64_t>(sizeof(T));
  const int64_t panel = std::max<int64_t>(1, kPanelBytes / row_bytes / IB) * IB;
  std::vector<T> buf((std::min(panel, M) + IB) * std::min(K, kPackedK));
  for (int64_t p0 = 0; p0 < M; p0 += panel) {
    const int64_t panel_rows = std::min(panel, M - p0);
    for (int64_t k0 = 0; k0 < K; k0 += kPackedK) {
      const int64_t kw = std::min(K, k0 + kPackedK) - k0;
      pack<IB>(a, p0, panel_rows, k0, k0 + kw, buf.data());
      for (int64_t i0 = 0; i0 < panel_rows; i0 += IB) {
        const T* strip = buf.data() + (i0 / IB) * kw * IB;
        const int64_t rows = std::min<int64_t>(IB, panel_rows - i0);
        for (int64_t c0 = 0; c0 < cols; c0 += width) {
          tile<IB, NV>(strip, 1, IB, kw, b + k0 * ldb + c0, ldb, c + (p0 + i0) * ldc + c0, ldc, rows,
                       accumulate || k0 > 0);
        }
      }
    }
  }
}

template <int IB, int NV, typename T, typename S>
inline __attribute__((always_inline)) void gemm_tiles(int64_t M, int64_t K, const View<S>& a, const T* b,
                                                      int64_t ldb, int64_t cols, T* c, int64_t ldc, bool accumulate) {
  if constexpr (std::is_same_v<S, T>) {
    if (a.sk == 1) {
      gemm_direct<IB, NV>(M, K, a.data, a.si, b, ldb, cols, c, ldc, accumulate);
      return;
    }
  }
  gemm_packed<IB, NV>(M, K, a, b, ldb, cols, c, ldc, accumulate);
}

// C (M, cols) = A (M, K) B (K, cols), or C += A B with `accumulate`; cols is a multiple of
// kLanes<T>, ldb and ldc are row strides. Tiles hold 6 rows x 2 vectors (or 12 rows x 1 vector when
// cols is an odd number of vectors): 12 accumulators, the B vectors and one broadcast fit the 16
// AVX2 registers.
template <typename T, typename S>
PRISM_TARGET_CLONES void gemm(int64_t M, int64_t K, View<S> a, const T* b, int64_t ldb, int64_t cols, T* c,
                              int64_t ldc, bool accumulate) {
  if (K == 0) {
    for (int64_t i = 0; i < M && !accumulate; ++i) std::fill(c + i * ldc, c + i * ldc + cols, T(0));
  } else if (cols % (2 * kLanes<T>) == 0) {
    gemm_tiles<6, 2>(M, K, a, b, ldb, cols, c, ldc, accumulate);
  } else {
    gemm_tiles<12, 1>(M, K, a, b, ldb, cols, c, ldc, accumulate);
  }
}

// sum_i data[i]^2 in double, with independent partial sums (a vectorisable loop, no serial chain).
template <typename T>
PRISM_TARGET_CLONES double sum_of_squares(const T* data, int64_t count) {
  constexpr int64_t kWays = 8;
  double partial[kWays] = {};
  int64_t i = 0;
  for (; i + kWays <= count; i += kWays) {
    for (int64_t j = 0; j < kWays; ++j) partial[j] += static_cast<double>(data[i + j]) * static_cast<double>(data[i + j]);
  }
  for (; i < count; ++i) partial[0] += static_cast<double>(data[i]) * static_cast<double>(data[i]);
  double total = 0;
  for (double value : partial) total += value;
  return total;
}

}  // namespace prism::cpu
