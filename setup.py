"""Build script for fastsearch's compiled kernels (`fastsearch._C`).

Environment switches:
  FASTSEARCH_NO_EXT=1        install pure Python (the torch reference and Triton backends only)
  FASTSEARCH_NO_CUDA=1       build only the C++ CPU kernels even where CUDA is available
  FASTSEARCH_CPU_ARCH=...    extra -m flags for the CPU kernels (default: AVX2+FMA when the build
                             machine has them, so at::vec uses 256-bit registers; "generic" for none)
  TORCH_CUDA_ARCH_LIST       CUDA architectures to build for (default "9.0")
"""

import glob
import os
import platform
import shutil

from setuptools import setup

PACKAGES = ["fastsearch", "fastsearch.ops", "fastsearch.kernels"]
PACKAGE_DIR = {"fastsearch.kernels": "kernels"}


def _cpu_has_avx2():
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2 " in flags and " fma " in flags


def _cpu_arch_flags():
    arch = os.environ.get("FASTSEARCH_CPU_ARCH", "auto")
    if arch == "generic":
        return []
    if arch == "auto":
        if not _cpu_has_avx2():
            return []
        arch = "-mavx2 -mfma -mf16c"
    # at::vec picks its 256-bit specialisations from CPU_CAPABILITY_AVX2.
    return arch.split() + ["-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]


def _with_cuda():
    if os.environ.get("FASTSEARCH_NO_CUDA") == "1":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)


def _extensions():
    if os.environ.get("FASTSEARCH_NO_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    include_dirs = [os.path.join(here, "csrc")]
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    # torch 2.13's headers are written for C++20 (under C++17 they compile with warnings).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"] + _cpu_arch_flags()
    link_flags = ["-fopenmp"]
    if _with_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = CUDAExtension(
            "fastsearch._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("FASTSEARCH_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "fastsearch._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
