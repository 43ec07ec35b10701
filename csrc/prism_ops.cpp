// The prism operator library: schemas (one per op, shared by every backend) and the Python module
// stub, so that `import prism._C` loads the shared library whose static initialisers register the
// CPU (cpu/kernels.cpp) and, in CUDA builds, CUDA (cuda/kernels.cu) implementations.
#include <Python.h>
#include <torch/library.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "prism's compiled ops (torch.ops.prism)", -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(prism, m) {
  // Per-example tangent blocks of a LoRA module (method.md 3.1) and their squared norms:
  //   Y_i = go_i^T (h_i R_B_inv),  W_i = x_i^T (go_i Q_A),  sqnorms_i = ||Y_i||^2 + ||W_i||^2 - ||Q_B^T W_i||^2.
  m.def("lora_tangent_blocks(Tensor x, Tensor h, Tensor go, Tensor R_B_inv, Tensor Q_A, Tensor Q_B)"
        " -> (Tensor Y, Tensor W, Tensor sqnorms)");
  // sum_i alpha_i per_example_i, examples with alpha_i = 0 skipped (exactly 0 even if not finite).
  m.def("clipped_sum(Tensor alpha, Tensor per_example) -> Tensor");
}
