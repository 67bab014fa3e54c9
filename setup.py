"""Builds drs_ext._C: the C++ kernels, plus the CUDA kernels when torch has CUDA and nvcc exists.

`pip install --no-build-isolation -e .` compiles against the torch that is already installed.
Set FORCE_CUDA=1 (with TORCH_CUDA_ARCH_LIST) to build the CUDA kernels on a machine without a
visible GPU, or DRS_CPU_ONLY=1 to skip them.
"""

from __future__ import annotations

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("DRS_CPU_ONLY", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    with_cuda = want_cuda()
    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob("csrc/cpu/*.cpp"))
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    macros = [("DRS_VERSION", f'"{VERSION}"'), ("DRS_CUDA_ARCHS", f'"{archs}"')]
    # -fno-trapping-math (clang's default) changes no result; it lets GCC if-convert and
    # vectorise the selects, floor and sqrt of the Box-Muller loop (csrc/include/drs/normal.h).
    compile_args = {"cxx": ["-O3", "-fno-math-errno", "-fno-trapping-math"]}
    # at::parallel_for is an inline OpenMP loop: without -fopenmp it compiles to a serial loop in
    # this extension. Linking -fopenmp reuses the libgomp.so.1 torch has already loaded.
    link_args = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        compile_args["cxx"].append("-fopenmp")
        link_args.append("-fopenmp")
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("DRS_WITH_CUDA", None))
        compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        builder = CUDAExtension
    else:
        builder = CppExtension
    print(f"drs_ext: building {'CPU + CUDA' if with_cuda else 'CPU-only'} kernels")
    return builder(
        name="drs_ext._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")],
        define_macros=macros,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )


setup(
    version=VERSION,
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
