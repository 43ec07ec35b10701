// Shapes, dtypes and devices of the prism ops, checked once for every backend (ATen headers only,
// so that the CUDA file can include it too).
//
//   lora_tangent_blocks(x (b,T,n), h (b,T,r), go (b,T,m), R_B_inv (r,r), Q_A (m,r), Q_B (n,r))
//       -> Y (b,m,r), W (b,n,r), sqnorms (b,)
//   clipped_sum(alpha (b,), per_example (b,...)) -> (...)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace prism {

struct BlockSizes {
  int64_t b, tokens, m, n, r;
};

// The compute dtype is the basis' (float or double); x, h, go share one dtype, which is the compute
// dtype or, for a float basis, bfloat16 / float16 (read as they are, accumulated in float).
inline BlockSizes check_tangent_blocks(const at::Tensor& x, const at::Tensor& h, const at::Tensor& go,
                                       const at::Tensor& R_B_inv, const at::Tensor& Q_A, const at::Tensor& Q_B) {
  TORCH_CHECK(x.dim() == 3 && h.dim() == 3 && go.dim() == 3, "prism::lora_tangent_blocks: x, h, go must be (b, T, *)");
  TORCH_CHECK(R_B_inv.dim() == 2 && Q_A.dim() == 2 && Q_B.dim() == 2,
              "prism::lora_tangent_blocks: R_B_inv, Q_A, Q_B must be matrices");
  const BlockSizes s{x.size(0), x.size(1), go.size(2), x.size(2), h.size(2)};
  TORCH_CHECK(h.size(0) == s.b && go.size(0) == s.b && h.size(1) == s.tokens && go.size(1) == s.tokens,
              "prism::lora_tangent_blocks: x, h, go must agree on (b, T)");
  TORCH_CHECK(R_B_inv.size(0) == s.r && R_B_inv.size(1) == s.r && Q_A.size(0) == s.m && Q_A.size(1) == s.r &&
                  Q_B.size(0) == s.n && Q_B.size(1) == s.r,
              "prism::lora_tangent_blocks: expected R_B_inv (r, r), Q_A (m, r), Q_B (n, r) for x (b, T, n), "
              "h (b, T, r), go (b, T, m)");
  const auto dtype = Q_A.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "prism::lora_tangent_blocks: the basis must be float or double");
  TORCH_CHECK(R_B_inv.scalar_type() == dtype && Q_B.scalar_type() == dtype,
              "prism::lora_tangent_blocks: R_B_inv, Q_A, Q_B must share one dtype");
  const auto in = x.scalar_type();
  TORCH_CHECK(h.scalar_type() == in && go.scalar_type() == in, "prism::lora_tangent_blocks: x, h, go must share one dtype");
  TORCH_CHECK(in == dtype || (dtype == at::kFloat && (in == at::kBFloat16 || in == at::kHalf)),
              "prism::lora_tangent_blocks: inputs of dtype ", in, " with a basis of dtype ", dtype,
              " (expected the basis dtype, or bfloat16/float16 with a float basis)");
  for (const at::Tensor* t : {&h, &go, &R_B_inv, &Q_A, &Q_B}) {
    TORCH_CHECK(t->device() == x.device(), "prism::lora_tangent_blocks: all tensors must be on one device");
  }
  return s;
}

inline void check_clipped_sum(const at::Tensor& alpha, const at::Tensor& per_example) {
  TORCH_CHECK(alpha.dim() == 1 && per_example.dim() >= 1 && per_example.size(0) == alpha.size(0),
              "prism::clipped_sum: expected alpha (b,) and per_example (b, ...)");
  TORCH_CHECK(per_example.scalar_type() == at::kFloat || per_example.scalar_type() == at::kDouble,
              "prism::clipped_sum: per_example must be float or double");
  TORCH_CHECK(alpha.scalar_type() == per_example.scalar_type(), "prism::clipped_sum: alpha must have per_example's dtype");
  TORCH_CHECK(alpha.device() == per_example.device(), "prism::clipped_sum: alpha and per_example must be on one device");
}

}  // namespace prism
