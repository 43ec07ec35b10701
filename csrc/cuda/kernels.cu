// CUDA kernels of the prism ops: the math of cpu/kernels.cpp, launched on the current stream of
// the inputs' device. Only ATen and c10 core headers (no c10/cuda, no ATen/cuda), so this file also
// compiles against a CPU-only torch: CI compile-checks it with nvcc.
//
// lora_tangent_blocks, for all examples at once (p, q: (b, T, r) scratch in the compute dtype):
//   1. p = h R_B^{-1}, q = go Q_A    one block per (example, token); threads split the reduction
//   2. Y = go^T p, W = x^T q         one thread per output row (coalesced over rows), r-column
//                                    chunks in registers, token tiles of p / q in shared memory
//   3. squared norms                 one block per example: ||Y||^2 + ||W||^2 - ||Q_B^T W||^2
// clipped_sum: one thread per output element, examples with alpha_i = 0 skipped.
// Every reduction has a fixed order: results do not depend on scheduling.
#include <ATen/DeviceAccelerator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <tuple>

#include "../prism_ops.h"

namespace prism::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTokenTile = 32;

struct Strides {  // element strides of a (b, T, features) input
  int64_t example, token, feature;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

cudaStream_t current_stream(const at::Tensor& t) {
  return static_cast<cudaStream_t>(at::accelerator::getCurrentStream(t.device().index()).native_handle());
}

void check_launch() {
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, "prism: CUDA kernel launch failed: ", cudaGetErrorString(error));
}

// Sum of `value` over the block, in a fixed order; the result is valid in thread 0.
template <typename T>
__device__ T block_sum(T value, T* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  const T total = shared[0];
  __syncthreads();
  return total;
}

// out[row, c] = sum_k in[row, k] mat[k, c], row = (example, token): rows of `in` times a (K, r) matrix.
template <typename T, typename S, int RC>
__global__ void rows_times_matrix(const S* in, Strides st, int64_t tokens, int64_t K, const T* mat, int64_t r,
                                  T* out) {
  __shared__ T shared[kThreads];
  const int64_t row = blockIdx.x;
  const S* a = in + (row / tokens) * st.example + (row % tokens) * st.token;
  for (int64_t c0 = 0; c0 < r; c0 += RC) {
    T acc[RC];
#pragma unroll
    for (int c = 0; c < RC; ++c) acc[c] = T(0);
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const T ak = static_cast<T>(a[k * st.feature]);
      const T* mk = mat + k * r + c0;
#pragma unroll
      for (int c = 0; c < RC; ++c) {
        if (c0 + c < r) acc[c] += ak * mk[c];
      }
    }
#pragma unroll
    for (int c = 0; c < RC; ++c) {
      const T total = block_sum(acc[c], shared);
      if (threadIdx.x == 0 && c0 + c < r) out[row * r + c0 + c] = total;
    }
  }
}

// out[e, i, c0 + c] = sum_t A[e, t, i] B[e, t, c0 + c] for c < RC: A (b, T, M) strided, B (b, T, r).
// Grid: (row blocks, column chunks, examples).
template <typename T, typename S, int RC>
__global__ void tokens_outer_sum(const S* A, Strides st, int64_t M, int64_t tokens, const T* B, int64_t r, T* out) {
  __shared__ T tile[kTokenTile][RC];
  const int64_t e = blockIdx.z, c0 = static_cast<int64_t>(blockIdx.y) * RC;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  T acc[RC];
#pragma unroll
  for (int c = 0; c < RC; ++c) acc[c] = T(0);
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokenTile) {
    const int64_t width = min(static_cast<int64_t>(kTokenTile), tokens - t0);
    for (int index = threadIdx.x; index < kTokenTile * RC; index += blockDim.x) {
      const int tt = index / RC, c = index % RC;
      tile[tt][c] = (tt < width && c0 + c < r) ? B[(e * tokens + t0 + tt) * r + c0 + c] : T(0);
    }
    __syncthreads();
    if (i < M) {
      const S* a = A + e * st.example + t0 * st.token + i * st.feature;
      for (int tt = 0; tt < width; ++tt) {
        const T v = static_cast<T>(a[tt * st.token]);
#pragma unroll
        for (int c = 0; c < RC; ++c) acc[c] += v * tile[tt][c];
      }
    }
    __syncthreads();
  }
  if (i < M) {
#pragma unroll
    for (int c = 0; c < RC; ++c) {
      if (c0 + c < r) out[(e * M + i) * r + c0 + c] = acc[c];
    }
  }
}

// sqnorms[e] = max(0, ||Y_e||^2 + ||W_e||^2 - ||Q_B^T W_e||^2); a NaN stays NaN.
template <typename T>
__global__ void tangent_sqnorms(const T* Y, const T* W, const T* Q_B, int64_t m, int64_t n, int64_t r, T* sqnorms) {
  __shared__ T shared[kThreads];
  const int64_t e = blockIdx.x;
  const T* Ye = Y + e * m * r;
  const T* We = W + e * n * r;
  T local = T(0);
  for (int64_t index = threadIdx.x; index < m * r; index += blockDim.x) local += Ye[index] * Ye[index];
  for (int64_t index = threadIdx.x; index < n * r; index += blockDim.x) local += We[index] * We[index];
  for (int64_t pair = threadIdx.x; pair < r * r; pair += blockDim.x) {
    const int64_t c1 = pair / r, c2 = pair % r;
    T s = T(0);
    for (int64_t k = 0; k < n; ++k) s += Q_B[k * r + c1] * We[k * r + c2];
    local -= s * s;
  }
  const T total = block_sum(local, shared);
  if (threadIdx.x == 0) sqnorms[e] = total < T(0) ? T(0) : total;
}

template <typename T>
__global__ void weighted_sum(const T* alpha, const T* rows, int64_t b, int64_t features, T* out) {
  const int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (f >= features) return;
  T acc = T(0);
  for (int64_t i = 0; i < b; ++i) {
    const T a = alpha[i];
    if (a != T(0)) acc += a * rows[i * features + f];
  }
  out[f] = acc;
}

unsigned blocks_for(int64_t count, int64_t per_block) { return static_cast<unsigned>((count + per_block - 1) / per_block); }

template <typename T, typename S, int RC>
void launch_blocks(const BlockSizes& s, const at::Tensor& x, const at::Tensor& h, const at::Tensor& go,
                   const at::Tensor& R_B_inv, const at::Tensor& Q_A, at::Tensor& p, at::Tensor& q, at::Tensor& Y,
                   at::Tensor& W, cudaStream_t stream) {
  const unsigned rows = static_cast<unsigned>(s.b * s.tokens);
  rows_times_matrix<T, S, RC><<<rows, kThreads, 0, stream>>>(h.const_data_ptr<S>(), strides_of(h), s.tokens, s.r,
                                                             R_B_inv.const_data_ptr<T>(), s.r, p.mutable_data_ptr<T>());
  check_launch();
  rows_times_matrix<T, S, RC><<<rows, kThreads, 0, stream>>>(go.const_data_ptr<S>(), strides_of(go), s.tokens, s.m,
                                                             Q_A.const_data_ptr<T>(), s.r, q.mutable_data_ptr<T>());
  check_launch();
  const unsigned chunks = blocks_for(s.r, RC), examples = static_cast<unsigned>(s.b);
  if (s.m > 0) {
    tokens_outer_sum<T, S, RC><<<dim3(blocks_for(s.m, kThreads), chunks, examples), kThreads, 0, stream>>>(
        go.const_data_ptr<S>(), strides_of(go), s.m, s.tokens, p.const_data_ptr<T>(), s.r, Y.mutable_data_ptr<T>());
    check_launch();
  }
  if (s.n > 0) {
    tokens_outer_sum<T, S, RC><<<dim3(blocks_for(s.n, kThreads), chunks, examples), kThreads, 0, stream>>>(
        x.const_data_ptr<S>(), strides_of(x), s.n, s.tokens, q.const_data_ptr<T>(), s.r, W.mutable_data_ptr<T>());
    check_launch();
  }
}

// Column chunks of 8, 16 or 32 registers, the smallest that holds r (or 32).
template <typename T, typename S>
void launch_blocks(const BlockSizes& s, const at::Tensor& x, const at::Tensor& h, const at::Tensor& go,
                   const at::Tensor& R_B_inv, const at::Tensor& Q_A, at::Tensor& p, at::Tensor& q, at::Tensor& Y,
                   at::Tensor& W, cudaStream_t stream) {
  if (s.r <= 8) {
    launch_blocks<T, S, 8>(s, x, h, go, R_B_inv, Q_A, p, q, Y, W, stream);
  } else if (s.r <= 16) {
    launch_blocks<T, S, 16>(s, x, h, go, R_B_inv, Q_A, p, q, Y, W, stream);
  } else {
    launch_blocks<T, S, 32>(s, x, h, go, R_B_inv, Q_A, p, q, Y, W, stream);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_tangent_blocks(const at::Tensor& x, const at::Tensor& h,
                                                                    const at::Tensor& go, const at::Tensor& R_B_inv,
                                                                    const at::Tensor& Q_A, const at::Tensor& Q_B) {
  const BlockSizes s = check_tangent_blocks(x, h, go, R_B_inv, Q_A, Q_B);
  TORCH_CHECK(s.b <= 65535, "prism::lora_tangent_blocks: at most 65535 examples per call on CUDA");
  const c10::DeviceGuard guard(x.device());
  at::Tensor Y = at::empty({s.b, s.m, s.r}, Q_A.options());
  at::Tensor W = at::empty({s.b, s.n, s.r}, Q_A.options());
  at::Tensor sqnorms = at::empty({s.b}, Q_A.options());
  if (s.b == 0) return {Y, W, sqnorms};
  if (s.tokens == 0) {
    Y.zero_();
    W.zero_();
    sqnorms.zero_();
    return {Y, W, sqnorms};
  }
  const at::Tensor rbinv = R_B_inv.contiguous(), qa = Q_A.contiguous(), qb = Q_B.contiguous();
  at::Tensor p = at::empty({s.b, s.tokens, s.r}, Q_A.options());
  at::Tensor q = at::empty({s.b, s.tokens, s.r}, Q_A.options());
  const cudaStream_t stream = current_stream(x);
  if (Q_A.scalar_type() == at::kDouble) {
    launch_blocks<double, double>(s, x, h, go, rbinv, qa, p, q, Y, W, stream);
    tangent_sqnorms<double><<<static_cast<unsigned>(s.b), kThreads, 0, stream>>>(
        Y.const_data_ptr<double>(), W.const_data_ptr<double>(), qb.const_data_ptr<double>(), s.m, s.n, s.r,
        sqnorms.mutable_data_ptr<double>());
  } else {
    if (x.scalar_type() == at::kFloat) {
      launch_blocks<float, float>(s, x, h, go, rbinv, qa, p, q, Y, W, stream);
    } else if (x.scalar_type() == at::kBFloat16) {
      launch_blocks<float, c10::BFloat16>(s, x, h, go, rbinv, qa, p, q, Y, W, stream);
    } else {
      launch_blocks<float, c10::Half>(s, x, h, go, rbinv, qa, p, q, Y, W, stream);
    }
    tangent_sqnorms<float><<<static_cast<unsigned>(s.b), kThreads, 0, stream>>>(
        Y.const_data_ptr<float>(), W.const_data_ptr<float>(), qb.const_data_ptr<float>(), s.m, s.n, s.r,
        sqnorms.mutable_data_ptr<float>());
  }
  check_launch();
  return {Y, W, sqnorms};
}

at::Tensor clipped_sum(const at::Tensor& alpha, const at::Tensor& per_example) {
  check_clipped_sum(alpha, per_example);
  const c10::DeviceGuard guard(per_example.device());
  at::Tensor out = at::empty(per_example.sizes().slice(1), per_example.options());
  const at::Tensor rows = per_example.contiguous(), weights = alpha.contiguous();
  const int64_t b = rows.size(0), features = out.numel();
  if (features == 0) return out;
  const cudaStream_t stream = current_stream(per_example);
  if (rows.scalar_type() == at::kDouble) {
    weighted_sum<double><<<blocks_for(features, kThreads), kThreads, 0, stream>>>(
        weights.const_data_ptr<double>(), rows.const_data_ptr<double>(), b, features, out.mutable_data_ptr<double>());
  } else {
    weighted_sum<float><<<blocks_for(features, kThreads), kThreads, 0, stream>>>(
        weights.const_data_ptr<float>(), rows.const_data_ptr<float>(), b, features, out.mutable_data_ptr<float>());
  }
  check_launch();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(prism, CUDA, m) {
  m.impl("lora_tangent_blocks", &lora_tangent_blocks);
  m.impl("clipped_sum", &clipped_sum);
}

}  // namespace prism::cuda
