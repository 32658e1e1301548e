// The Python module fastsearch._C: how the extension was built, and which CPU capabilities the running
// machine supports. It holds no CPU kernel: those are compiled once per instruction set into the modules
// fastsearch._C_cpu_<capability> (capability_module.cpp), of which fastsearch/_backend.py imports one.
// This file is compiled without any -m flag and must stay so: the process runs it before it knows what
// the CPU can do. In CUDA builds the CUDA kernels (csrc/cuda) are linked in here and register with the
// dispatcher when the module loads.
//
// A plain C-API module: pybind11 or <torch/extension.h> would cost the build far more than these two
// functions are worth.
#include <Python.h>

namespace {

PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef FASTSEARCH_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// The capabilities this CPU runs, weakest first: each needs every instruction set extension its build's
// -m flags allow (setup.py). __builtin_cpu_supports also checks that the OS saves the wider registers.
PyObject* cpu_capabilities(PyObject*, PyObject*) {
  bool avx2 = false;
  bool avx512 = false;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  if (avx512) return Py_BuildValue("(sss)", "default", "avx2", "avx512");
  if (avx2) return Py_BuildValue("(ss)", "default", "avx2");
  return Py_BuildValue("(s)", "default");
}

PyMethodDef methods[] = {
    {"has_cuda", has_cuda, METH_NOARGS, "whether CUDA kernels were compiled in"},
    {"cpu_capabilities", cpu_capabilities, METH_NOARGS,
     "the CPU kernel builds (instruction sets) this machine can run, weakest first"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C", "fastsearch compiled extension: build facts (and the CUDA kernels, where built)",
    -1, methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
