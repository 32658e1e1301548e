// The Python module fastsearch._C. The ops themselves are registered with the dispatcher by
// TORCH_LIBRARY_IMPL blocks in each family's file; this module only reports how it was built.
#include <torch/extension.h>

namespace {

bool has_cuda() {
#ifdef FASTSEARCH_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cpu_capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastsearch compiled kernels (CPU, and CUDA where built)";
  m.def("has_cuda", &has_cuda, "whether CUDA kernels were compiled in");
  m.def("cpu_capability", &cpu_capability, "the at::vec instruction set the CPU kernels use");
}
