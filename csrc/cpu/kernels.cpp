// CPU kernels of the prism ops (method.md 3.1-3.2), parallel over examples.
//
// lora_tangent_blocks, per example i (one thread each):
//   p = h_i R_B^{-1} (T, r),  q = go_i Q_A (T, r),  Y_i = go_i^T p (m, r),  W_i = x_i^T q (n, r),
//   sqnorm_i = max(0, ||Y_i||^2 + ||W_i||^2 - ||Q_B^T W_i||^2),
// with the inputs read through their strides and in their own dtype (no transposed or widened copies
// of whole inputs: the products pack cache-sized panels), in blocks of tokens so that a block of go_i
// read from memory for q is still in cache for Y, and with the norms taken from the Y_i, W_i just
// computed. Extra memory per thread: 2 T P + P^2 numbers, P = r rounded up to whole vectors (8
// floats), (m + n) P more when P > r, and packing buffers of about 300 KiB.
//
// clipped_sum: sum_i alpha_i t_i, skipping examples with alpha_i = 0 (their t_i may hold inf/NaN).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../prism_ops.h"
#include "small_gemm.h"

namespace prism::cpu {
namespace {

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// A (rows, cols) matrix copied row-major into (rows, width), zero beyond its columns; or its
// transpose, copied into (width, rows).
template <typename T>
std::vector<T> padded(const at::Tensor& matrix, int64_t width, bool transpose = false) {
  const auto a = matrix.accessor<T, 2>();
  const int64_t rows = matrix.size(0);
  std::vector<T> out(rows * width, T(0));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < matrix.size(1); ++j) out[transpose ? j * rows + i : i * width + j] = a[i][j];
  }
  return out;
}

// t[example, first:, :] of a (b, T, features) tensor as a (tokens, features) matrix view.
template <typename S>
View<S> token_rows(const at::Tensor& t, int64_t example, int64_t first = 0) {
  return {t.const_data_ptr<S>() + example * t.stride(0) + first * t.stride(1), t.stride(1), t.stride(2)};
}

template <typename S>
View<S> transposed(const View<S>& a) {
  return {a.data, a.sk, a.si};
}

// T: compute dtype (float, double); S: dtype of x, h, go.
template <typename T, typename S>
void tangent_blocks(const BlockSizes& s, const at::Tensor& x, const at::Tensor& h, const at::Tensor& go,
                    const at::Tensor& R_B_inv, const at::Tensor& Q_A, const at::Tensor& Q_B, at::Tensor& Y,
                    at::Tensor& W, at::Tensor& sqnorms) {
  const int64_t P = round_up(s.r, kLanes<T>);  // padded rank: whole vectors; the padding stays 0
  const std::vector<T> rbinv = padded<T>(R_B_inv, P), qa = padded<T>(Q_A, P), qbt = padded<T>(Q_B, P, true);
  const bool in_place = P == s.r;  // Y and W rows are P wide: compute them straight into the outputs
  // tokens per block: about 1 MiB of go_i, still in cache when its second product reads it
  const int64_t block = std::max<int64_t>(
      kPackedK, (1 << 20) / (std::max<int64_t>(s.m, 1) * static_cast<int64_t>(sizeof(S))) / kPackedK * kPackedK);
  T* Yd = Y.mutable_data_ptr<T>();
  T* Wd = W.mutable_data_ptr<T>();
  T* sq = sqnorms.mutable_data_ptr<T>();
  at::parallel_for(0, s.b, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p(s.tokens * P), q(s.tokens * P), WQ(P * P);
    std::vector<T> ybuf(in_place ? 0 : s.m * P), wbuf(in_place ? 0 : s.n * P);
    for (int64_t e = begin; e < end; ++e) {
      T* Ye = in_place ? Yd + e * s.m * s.r : ybuf.data();
      T* We = in_place ? Wd + e * s.n * s.r : wbuf.data();
      gemm<T, S>(s.tokens, s.r, token_rows<S>(h, e), rbinv.data(), P, P, p.data(), P, false);  // p = h R_B^-1
      if (s.tokens == 0) {
        std::fill(Ye, Ye + s.m * P, T(0));
        std::fill(We, We + s.n * P, T(0));
      }
      for (int64_t t0 = 0; t0 < s.tokens; t0 += block) {
        const int64_t tw = std::min(block, s.tokens - t0);
        const View<S> go_rows = token_rows<S>(go, e, t0), x_rows = token_rows<S>(x, e, t0);
        T* qt = q.data() + t0 * P;
        gemm<T, S>(tw, s.m, go_rows, qa.data(), P, P, qt, P, false);                              // q = go Q_A
        gemm<T, S>(s.m, tw, transposed(go_rows), p.data() + t0 * P, P, P, Ye, P, t0 > 0);        // Y += go^T p
        gemm<T, S>(s.n, tw, transposed(x_rows), qt, P, P, We, P, t0 > 0);                        // W += x^T q
      }
      gemm<T, T>(P, s.n, View<T>{qbt.data(), s.n, 1}, We, P, P, WQ.data(), P, false);            // Q_B^T W
      const double total =
          sum_of_squares(Ye, s.m * P) + sum_of_squares(We, s.n * P) - sum_of_squares(WQ.data(), P * P);
      sq[e] = static_cast<T>(total < 0 ? 0 : total);  // clamp at 0; a NaN total stays NaN
      if (!in_place) {
        for (int64_t j = 0; j < s.m; ++j) std::copy(Ye + j * P, Ye + j * P + s.r, Yd + (e * s.m + j) * s.r);
        for (int64_t k = 0; k < s.n; ++k) std::copy(We + k * P, We + k * P + s.r, Wd + (e * s.n + k) * s.r);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_tangent_blocks(const at::Tensor& x, const at::Tensor& h,
                                                                    const at::Tensor& go, const at::Tensor& R_B_inv,
                                                                    const at::Tensor& Q_A, const at::Tensor& Q_B) {
  const BlockSizes s = check_tangent_blocks(x, h, go, R_B_inv, Q_A, Q_B);
  at::Tensor Y = at::empty({s.b, s.m, s.r}, Q_A.options());
  at::Tensor W = at::empty({s.b, s.n, s.r}, Q_A.options());
  at::Tensor sqnorms = at::empty({s.b}, Q_A.options());
  if (s.b == 0) return {Y, W, sqnorms};
  if (Q_A.scalar_type() == at::kDouble) {
    tangent_blocks<double, double>(s, x, h, go, R_B_inv, Q_A, Q_B, Y, W, sqnorms);
  } else if (x.scalar_type() == at::kFloat) {
    tangent_blocks<float, float>(s, x, h, go, R_B_inv, Q_A, Q_B, Y, W, sqnorms);
  } else if (x.scalar_type() == at::kBFloat16) {
    tangent_blocks<float, c10::BFloat16>(s, x, h, go, R_B_inv, Q_A, Q_B, Y, W, sqnorms);
  } else {
    tangent_blocks<float, c10::Half>(s, x, h, go, R_B_inv, Q_A, Q_B, Y, W, sqnorms);
  }
  return {Y, W, sqnorms};
}

// out[f0:f1] = sum_i alpha_i rows[i, f0:f1] in chunks that stay in L1; the inner loop is contiguous.
template <typename T>
PRISM_TARGET_CLONES void weighted_sum(const T* alpha, const T* rows, int64_t b, int64_t features, int64_t f0,
                                      int64_t f1, T* out) {
  constexpr int64_t kChunk = 1024;
  T acc[kChunk];
  for (int64_t c0 = f0; c0 < f1; c0 += kChunk) {
    const int64_t width = std::min(kChunk, f1 - c0);
    std::fill(acc, acc + width, T(0));
    for (int64_t i = 0; i < b; ++i) {
      const T a = alpha[i];
      if (a == T(0)) continue;
      const T* __restrict row = rows + i * features + c0;
      for (int64_t j = 0; j < width; ++j) acc[j] += a * row[j];
    }
    std::copy(acc, acc + width, out + c0);
  }
}

at::Tensor clipped_sum(const at::Tensor& alpha, const at::Tensor& per_example) {
  check_clipped_sum(alpha, per_example);
  at::Tensor out = at::empty(per_example.sizes().slice(1), per_example.options());
  const at::Tensor rows = per_example.contiguous();
  const at::Tensor weights = alpha.contiguous();
  const int64_t b = rows.size(0), features = out.numel();
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "prism::clipped_sum", [&] {
    const scalar_t* a = weights.const_data_ptr<scalar_t>();
    const scalar_t* t = rows.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, features, 4096, [&](int64_t f0, int64_t f1) { weighted_sum(a, t, b, features, f0, f1, o); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(prism, CPU, m) {
  m.impl("lora_tangent_blocks", &lora_tangent_blocks);
  m.impl("clipped_sum", &clipped_sum);
}

}  // namespace prism::cpu
