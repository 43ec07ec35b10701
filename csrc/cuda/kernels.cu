// CUDA kernels of the prism ops: the math of cpu/kernels.cpp, on the current stream of the inputs'
// device. Only ATen and c10 core headers (no c10/cuda, no ATen/cuda), so this file also compiles
// against a CPU-only torch: CI compile-checks it with nvcc.
//
// lora_tangent_blocks, for all examples at once:
//   1. p = h R_B^{-1}, q = go Q_A, Y = go^T p, W = x^T q, Q_B^T W   cuBLAS, through at::matmul
//      (bfloat16 / float16 inputs are converted to float first: cuBLAS takes operands of one dtype)
//   2. squared norms ||Y||^2 + ||W||^2 - ||Q_B^T W||^2               partial sums over (example, slice)
//                                                                   blocks, then one sum per example
// On an H100 the earlier hand-written products ran 4-25x slower than cuBLAS' batched products
// (benchmarks/README.md, "Kernels"); the products are cuBLAS' now, the reductions ours.
// clipped_sum: one thread per output element, examples with alpha_i = 0 skipped.
// Every reduction has a fixed order: results do not depend on scheduling.
#include <ATen/DeviceAccelerator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <c10/core/DeviceGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../prism_ops.h"

namespace prism::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSlices = 64;             // blocks per example in the norm reduction
constexpr int64_t kElementsPerThread = 16;     // fewer slices for small examples

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
  return shared[0];
}

// partial[e, s] = sum of the signed squares in slice s of example e's concatenation
// (Y_e: +, W_e: +, QtW_e: -); grid (slices, examples).
template <typename T>
__global__ void partial_sqnorms(const T* Y, const T* W, const T* QtW, int64_t y_size, int64_t w_size, int64_t q_size,
                                int64_t slice, T* partial) {
  __shared__ T shared[kThreads];
  const int64_t e = blockIdx.y, begin = static_cast<int64_t>(blockIdx.x) * slice;
  const int64_t end = min(begin + slice, y_size + w_size + q_size);
  const T* Ye = Y + e * y_size;
  const T* We = W + e * w_size;
  const T* Qe = QtW + e * q_size;
  T local = T(0);
  for (int64_t index = begin + threadIdx.x; index < end; index += blockDim.x) {
    if (index < y_size) {
      local += Ye[index] * Ye[index];
    } else if (index < y_size + w_size) {
      const T w = We[index - y_size];
      local += w * w;
    } else {
      const T q = Qe[index - y_size - w_size];
      local -= q * q;
    }
  }
  const T total = block_sum(local, shared);
  if (threadIdx.x == 0) partial[e * gridDim.x + blockIdx.x] = total;
}

// sqnorms[e] = max(0, sum_s partial[e, s]); a NaN stays NaN.
template <typename T>
__global__ void finish_sqnorms(const T* partial, int64_t b, int64_t slices, T* sqnorms) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= b) return;
  T total = T(0);
  for (int64_t s = 0; s < slices; ++s) total += partial[e * slices + s];
  sqnorms[e] = total < T(0) ? T(0) : total;
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

template <typename T>
void launch_sqnorms(const at::Tensor& Y, const at::Tensor& W, const at::Tensor& QtW, at::Tensor& sqnorms,
                    cudaStream_t stream) {
  const int64_t b = Y.size(0), y_size = Y.size(1) * Y.size(2), w_size = W.size(1) * W.size(2);
  const int64_t q_size = QtW.size(1) * QtW.size(2), total = y_size + w_size + q_size;
  const int64_t slices = std::clamp<int64_t>(total / (kThreads * kElementsPerThread), 1, kMaxSlices);
  const int64_t slice = (total + slices - 1) / slices;
  at::Tensor partial = at::empty({b, slices}, Y.options());
  partial_sqnorms<T><<<dim3(static_cast<unsigned>(slices), static_cast<unsigned>(b)), kThreads, 0, stream>>>(
      Y.const_data_ptr<T>(), W.const_data_ptr<T>(), QtW.const_data_ptr<T>(), y_size, w_size, q_size, slice,
      partial.mutable_data_ptr<T>());
  check_launch();
  finish_sqnorms<T><<<blocks_for(b, kThreads), kThreads, 0, stream>>>(partial.const_data_ptr<T>(), b, slices,
                                                                        sqnorms.mutable_data_ptr<T>());
  check_launch();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_tangent_blocks(const at::Tensor& x, const at::Tensor& h,
                                                                    const at::Tensor& go, const at::Tensor& R_B_inv,
                                                                    const at::Tensor& Q_A, const at::Tensor& Q_B) {
  const BlockSizes s = check_tangent_blocks(x, h, go, R_B_inv, Q_A, Q_B);
  TORCH_CHECK(s.b <= 65535, "prism::lora_tangent_blocks: at most 65535 examples per call on CUDA");
  const c10::DeviceGuard guard(x.device());
  const auto dtype = Q_A.scalar_type();
  const at::Tensor xc = x.to(dtype), hc = h.to(dtype), goc = go.to(dtype);
  at::Tensor Y = at::matmul(goc.transpose(1, 2), at::matmul(hc, R_B_inv)).contiguous();
  at::Tensor W = at::matmul(xc.transpose(1, 2), at::matmul(goc, Q_A)).contiguous();
  at::Tensor sqnorms = at::empty({s.b}, Q_A.options());
  if (s.b == 0) return {Y, W, sqnorms};
  const at::Tensor QtW = at::matmul(Q_B.t(), W).contiguous();
  const cudaStream_t stream = current_stream(x);
  if (dtype == at::kDouble) {
    launch_sqnorms<double>(Y, W, QtW, sqnorms, stream);
  } else {
    launch_sqnorms<float>(Y, W, QtW, sqnorms, stream);
  }
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
