"""Build script for fastsearch's compiled kernels.

Modules it builds (csrc/README.md, "CPU capabilities"):
  fastsearch._C                build facts and what the running CPU supports (csrc/cpu/module.cpp), and the
                               CUDA kernels where built; compiled with no -m flag
  fastsearch._C_cpu_<name>     the CPU kernels (csrc/cpu), once per capability: default (no -m flag), avx2
                               and avx512 (x86-64 only). fastsearch imports the best one the CPU runs,
                               chosen by cpuid at run time (FASTSEARCH_CPU_CAPABILITY forces one), so a
                               wheel built here runs on any x86-64 CPU

Environment switches:
  FASTSEARCH_NO_EXT=1        install pure Python (the torch reference and Triton backends only)
  FASTSEARCH_NO_CUDA=1       build only the C++ CPU kernels even where CUDA is available
  FASTSEARCH_CPU_CAPABILITIES=default,avx2,avx512
                             which CPU kernel builds to make (default: all three on x86-64, default
                             elsewhere); a CPU without any of those listed gets the PyTorch reference
  TORCH_CUDA_ARCH_LIST       CUDA architectures to build for (default "9.0")
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

# Every package under fastsearch/, found rather than listed, plus the Triton folder kernels/, reached as
# fastsearch/kernels (a link to ../kernels) and installed as fastsearch.kernels. It has no __init__.py, so
# no regular package named `kernels` exists at the repository root (see kernels/README.md).
PACKAGES = find_packages(include=["fastsearch", "fastsearch.*"]) + ["fastsearch.kernels"]


def _cpu_capabilities():
    """The CPU kernel builds to make, from FASTSEARCH_CPU_CAPABILITIES (default: every one the platform has)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    available = ["default", "avx2", "avx512"] if x86 else ["default"]
    requested = os.environ.get("FASTSEARCH_CPU_CAPABILITIES")
    if requested is None:
        return available
    names = [name.strip().lower() for name in requested.split(",") if name.strip()]
    for name in names:
        if name not in ("default", "avx2", "avx512"):
            sys.exit(f"setup.py: FASTSEARCH_CPU_CAPABILITIES names {name!r}; choose from default, avx2, avx512")
        if name not in available:
            sys.exit(f"setup.py: FASTSEARCH_CPU_CAPABILITIES names {name!r}, an x86-64 instruction set, but this "
                     f"build is for {platform.machine()}")
    return [name for name in available if name in names]


def _cpu_arch_flags(capability):
    """The -m flags and at::vec macros of one CPU kernel build, as PyTorch compiles its own CPU kernels."""
    return {
        "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
        "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
        "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                   "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    }[capability]


def _with_cuda():
    if os.environ.get("FASTSEARCH_NO_CUDA") == "1":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)


def _build_ext_command():
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtensionPerModule(BuildExtension):
        """torch's BuildExtension with each module's objects in a folder of its own: the CPU capability modules
        compile the same sources with different flags, and in one folder would overwrite each other's."""

        def build_extension(self, ext):
            shared_temp = self.build_temp
            self.build_temp = os.path.join(shared_temp, ext.name.rpartition(".")[2])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = shared_temp

    return BuildExtensionPerModule.with_options(use_ninja=True)


def _extensions():
    if os.environ.get("FASTSEARCH_NO_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    include_dirs = [os.path.join(here, "csrc")]
    # torch 2.13's headers are written for C++20 (under C++17 they compile with warnings). -g0 overrides the -g
    # of Python's sysconfig flags: debug information would take a third of the build time.
    cxx_flags = ["-O3", "-g0", "-std=c++20", "-fopenmp"]
    link_flags = ["-fopenmp"]
    module_sources = ["csrc/cpu/module.cpp"]
    kernel_sources = sorted(set(glob.glob("csrc/cpu/*.cpp")) - set(module_sources))
    if _with_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        main = CUDAExtension(
            "fastsearch._C",
            module_sources + sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp")),
            include_dirs=include_dirs,
            define_macros=[("FASTSEARCH_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=link_flags,
        )
    else:
        main = CppExtension("fastsearch._C", module_sources, extra_compile_args={"cxx": cxx_flags})
    # One module per capability, the same sources with its flags. No FMA contraction: the selection
    # kernels give the same bits in every build (the step kernels ask for FMA where they want it).
    cpu_modules = [
        CppExtension(
            f"fastsearch._C_cpu_{capability}",
            kernel_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-ffp-contract=off"] + _cpu_arch_flags(capability)},
            extra_link_args=link_flags,
        )
        for capability in _cpu_capabilities()
    ]
    return [main, *cpu_modules], {"build_ext": _build_ext_command()}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
