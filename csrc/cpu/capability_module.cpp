// The Python module fastsearch._C_cpu_<capability> (default, avx2 or avx512): the CPU kernels of this
// folder compiled for one instruction set (setup.py builds one module per capability from the same
// sources). Importing it registers the kernels: their TORCH_LIBRARY_IMPL blocks run as the shared object
// loads. The modules all register the same ops, so a process imports one of them only
// (fastsearch/_backend.py picks it); this file just names the capability the module was built for.
#include <Python.h>

#define FASTSEARCH_CONCAT_(a, b) a##b
#define FASTSEARCH_CONCAT(a, b) FASTSEARCH_CONCAT_(a, b)
#define FASTSEARCH_STRING_(name) #name
#define FASTSEARCH_STRING(name) FASTSEARCH_STRING_(name)

namespace {

constexpr const char* kCapability =
#if defined(CPU_CAPABILITY_AVX512)
    "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
    "avx2";
#else
    "default";
#endif

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, FASTSEARCH_STRING(TORCH_EXTENSION_NAME),
    "fastsearch CPU kernels for one instruction set; importing it registers them", -1, nullptr,
};

}  // namespace

// torch's build names the module in TORCH_EXTENSION_NAME (_C_cpu_avx2, ...); its init function must match.
PyMODINIT_FUNC FASTSEARCH_CONCAT(PyInit_, TORCH_EXTENSION_NAME)() {
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "capability", kCapability) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
