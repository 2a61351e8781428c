// Operator schemas of the `riformer` namespace, defined exactly once here.
// Kernels register per backend in their own translation units with
// TORCH_LIBRARY_IMPL(riformer, CPU|CUDA, m). Fake (meta) kernels for
// torch.compile belong in Python (torch.library.register_fake, which refuses
// to run if a C++ Meta kernel exists), so none is defined here; none is
// registered yet either.
//
// This file also provides the Python module init, so that
// `import riformer_kernels._C` loads the shared library (and with it the
// static registrations above) without pulling pybind11/torch/extension.h
// into any translation unit.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(riformer, m) {
  // Per-(n, c) mean and population variance over H*W of a 4-D tensor
  // (fp32/fp16/bf16 -> fp32 outputs, fp64 -> fp64), shape (N, C).
  m.def("moments(Tensor x) -> (Tensor mean, Tensor var)");

  // The fused block's kernels: CPU implementations in csrc/cpu/block_mlp.cpp;
  // no CUDA implementation yet (calling one on a CUDA tensor fails with "no
  // kernel registered").
  m.def(
      "mlp_forward(Tensor x, Tensor A, Tensor B, Tensor a, Tensor b, "
      "Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor l2, "
      "bool emit_moments) -> (Tensor out, Tensor out_mean, Tensor out_var)");
  // mlp_forward that also returns u = W1 z + b1 (N, 4C, H, W) in x's dtype and
  // memory format, for a backward that reads u instead of recomputing it
  // (recompute=False). A separate op so mlp_forward keeps its three outputs.
  m.def(
      "mlp_forward_save_u(Tensor x, Tensor A, Tensor B, Tensor a, Tensor b, "
      "Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor l2, "
      "bool emit_moments) -> (Tensor out, Tensor out_mean, Tensor out_var, "
      "Tensor u)");
  m.def(
      "mlp_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor A, "
      "Tensor B, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor l2, "
      "Tensor? u_saved) -> (Tensor dz, Tensor dw1, Tensor db1, Tensor dw2, "
      "Tensor db2, Tensor sums)");
  m.def(
      "input_grad(Tensor grad_out, Tensor dz, Tensor x, Tensor mean, "
      "Tensor P, Tensor Q, Tensor R, Tensor S) -> Tensor");
}

// An empty Python module: the library's value is in its static operator
// registrations, reached through torch.ops.riformer.*.
static PyModuleDef riformer_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "riformer_kernels native ops; use torch.ops.riformer.*",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&riformer_c_module); }
