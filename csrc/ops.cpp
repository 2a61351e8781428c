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

#include "cpu/isa.h"

TORCH_LIBRARY(riformer, m) {
  // Per-(n, c) mean and population variance over H*W of a 4-D tensor
  // (fp32/fp16/bf16 -> fp32 outputs, fp64 -> fp64), shape (N, C).
  m.def("moments(Tensor x) -> (Tensor mean, Tensor var)");

  // The fused block's kernels: CPU implementations in csrc/cpu/block_mlp.cpp;
  // CUDA ones for mlp_forward / mlp_forward_save_u in csrc/cuda/mlp_forward.cu
  // (mlp_backward and input_grad have none: the CUDA backward is the two
  // cuda_mlp_backward_* ops below).
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

  // The CUDA kernel set's two backward phases (csrc/cuda/mlp_backward.cu, CUDA kernels only),
  // with the signatures and outputs of the emulated ops riformer_cuda_emu::* (backends/
  // cuda_emu.py), so backends/cuda.py passes the same arguments whichever device runs them.
  // Phase 1: dw1 (Hd, C), db1 (Hd), dw2 (C, Hd), db2 (C) = sum l2 g, sums (5, N, C), all in
  // the statistics dtype; u: the forward's saved pre-activation (N, Hd, H, W), or None to
  // recompute it.
  m.def(
      "cuda_mlp_backward_weights_and_sums(Tensor g, Tensor x, Tensor mean, "
      "Tensor A, Tensor B, Tensor l2, Tensor w1, Tensor b1, Tensor w2, "
      "Tensor b2, Tensor? u) -> (Tensor dw1, Tensor db1, Tensor dw2, "
      "Tensor db2, Tensor sums)");
  // Phase 2: dx = P g + Q dz + R (x - m) + S in x's dtype and memory format, dz recomputed
  // per token tile (u read when given, as in phase 1; backends/cuda.py passes None).
  m.def(
      "cuda_mlp_backward_dx(Tensor g, Tensor x, Tensor mean, Tensor A, "
      "Tensor B, Tensor l2, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "Tensor P, Tensor Q, Tensor R, Tensor S, Tensor? u) -> Tensor");
}

// The Python module: the library's value is in its static operator
// registrations, reached through torch.ops.riformer.*; its two functions are
// controls of the CPU kernels' ISA level (csrc/cpu/isa.h), which are process
// settings rather than tensor operations.

namespace {

PyObject* level_name(int level) { return PyUnicode_FromString(riformer::isa::name(level)); }

// cpu_isa() -> (supported, cap, active, last_run, highest_built, fp32 GEMM
// route): level names, then the route's name.
PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    namespace isa = riformer::isa;
    return Py_BuildValue("(NNNNNs)", level_name(isa::supported()), level_name(isa::cap()),
                         level_name(isa::active()), level_name(isa::last_run()),
                         level_name(isa::kHighestBuilt), isa::fp32_gemm_route());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

// set_cpu_isa_cap(name) -> the previous cap's name.
PyObject* set_cpu_isa_cap(PyObject*, PyObject* arg) {
  const char* text = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  const int level = text ? riformer::isa::parse(text) : -1;
  if (level < 0) {
    PyErr_Format(PyExc_ValueError, "not an ISA level: %R (use 'baseline', 'avx2' or 'avx512')",
                 arg);
    return nullptr;
  }
  int previous = riformer::isa::kHighestBuilt;
  try {
    previous = riformer::isa::cap();
  } catch (const std::exception&) {
    // An invalid RIFORMER_CPU_ISA: the explicit choice replaces it.
  }
  riformer::isa::set_cap(static_cast<riformer::isa::Level>(level));
  return level_name(previous);
}

PyMethodDef riformer_c_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "cpu_isa() -> (supported, cap, active, last_run, highest_built, fp32_gemm_route)"},
    {"set_cpu_isa_cap", set_cpu_isa_cap, METH_O,
     "set_cpu_isa_cap(name) -> previous cap; name: 'baseline', 'avx2' or 'avx512'"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef riformer_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "riformer_kernels native ops; use torch.ops.riformer.*", -1,
    riformer_c_methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&riformer_c_module); }
