// The one registration file: op schemas, the kernels behind each dispatch key, and the Python module stub.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_isa.h"
#include "ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace cbd_fast {

TORCH_LIBRARY(cbd_fast, m) {
  m.def("fill_coalitions(Tensor(a!) text_in, Tensor(b!) image_in, int seed) -> ()");
  m.def(
      "banzhaf_interaction(Tensor sim, Tensor text_mask, Tensor image_mask, Tensor text_weight, "
      "Tensor image_weight, int num_samples, int seed, str estimator) -> (Tensor, Tensor, Tensor)");
  m.def(
      "banzhaf_interaction_backward(Tensor grad_interaction, Tensor grad_text_value, Tensor grad_image_value, "
      "Tensor sim, Tensor text_mask, Tensor image_mask, Tensor text_weight, Tensor image_weight, "
      "int num_samples, int seed, str estimator) -> (Tensor, Tensor, Tensor)");
  m.def(
      "banzhaf_interaction_from_tokens(Tensor text, Tensor image, Tensor text_mask, Tensor image_mask, "
      "Tensor text_weight, Tensor image_weight, int num_samples, int seed, str estimator) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "maxsim_score(Tensor text, Tensor image, Tensor text_mask, Tensor image_mask, Tensor alpha, Tensor beta) "
      "-> Tensor");
  m.def(
      "maxsim_score_backward(Tensor grad_score, Tensor text, Tensor image, Tensor text_mask, Tensor image_mask, "
      "Tensor alpha, Tensor beta) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cbd_fast, CPU, m) {
  m.impl("fill_coalitions", &fill_coalitions_cpu);
  m.impl("banzhaf_interaction", &banzhaf_interaction_cpu);
  m.impl("banzhaf_interaction_backward", &banzhaf_interaction_backward_cpu);
  m.impl("maxsim_score", &maxsim_score_cpu);
  m.impl("maxsim_score_backward", &maxsim_score_backward_cpu);
}

#ifdef CBD_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(cbd_fast, CUDA, m) {
  m.impl("fill_coalitions", &fill_coalitions_cuda);
  m.impl("banzhaf_interaction", &banzhaf_interaction_cuda);
  m.impl("banzhaf_interaction_backward", &banzhaf_interaction_backward_cuda);
  m.impl("banzhaf_interaction_from_tokens", &banzhaf_interaction_from_tokens_cuda);
  m.impl("maxsim_score", &maxsim_score_cuda);
  m.impl("maxsim_score_backward", &maxsim_score_backward_cuda);
}
#endif

}  // namespace cbd_fast

#ifndef CBD_FAST_CUDA_ARCH_LIST
#define CBD_FAST_CUDA_ARCH_LIST ""
#endif
#ifndef CBD_FAST_CUDA_VERSION
#define CBD_FAST_CUDA_VERSION ""
#endif
#ifndef CBD_FAST_TORCH_VERSION
#define CBD_FAST_TORCH_VERSION ""
#endif

// What this binary was compiled with, and the best instruction set of this CPU its CPU kernels can use;
// cbd_fast.build_info() reads it.
static PyObject* compiled_config(PyObject*, PyObject*) {
#ifdef CBD_FAST_WITH_CUDA
  PyObject* cuda = Py_True;
#else
  PyObject* cuda = Py_False;
#endif
#ifdef _OPENMP
  PyObject* openmp = Py_True;
  const int openmp_version = _OPENMP;
#else
  PyObject* openmp = Py_False;
  const int openmp_version = 0;
#endif
  return Py_BuildValue("{s:O,s:O,s:i,s:s,s:s,s:s,s:s,s:s}", "cuda", cuda, "openmp", openmp, "openmp_version",
                       openmp_version, "cuda_version", CBD_FAST_CUDA_VERSION, "cuda_arch_list",
                       CBD_FAST_CUDA_ARCH_LIST, "torch_version", CBD_FAST_TORCH_VERSION, "cpu_isa",
                       cbd_fast::cpu_isa::name(cbd_fast::cpu_isa::detected()), "compiler",
#if defined(__clang__)
                       "clang " __clang_version__
#elif defined(__GNUC__)
                       "gcc " __VERSION__
#else
                       "unknown"
#endif
  );
}

static PyMethodDef module_methods[] = {
    {"compiled_config", compiled_config, METH_NOARGS, "Backends and toolchain this extension was built with."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "cbd_fast compiled ops", -1,
                                          module_methods};
  return PyModule_Create(&module_def);
}
