"""Builds prism's compiled ops (csrc/) into the extension module prism._C; metadata is in pyproject.toml.

    pip install --no-build-isolation -e .

Build without isolation, so that the extension is compiled against the torch that runs it. The CPU
kernels are always built; the CUDA ones join them where a CUDA toolkit and a CUDA build of torch
both exist. If the build fails (or torch is missing, as in an isolated build), the install goes on
with a warning and prism uses its pure-PyTorch kernels, unless PRISM_REQUIRE_EXTENSION=1 (CI),
which makes the failure fatal.
"""

import os
import warnings

from setuptools import setup

SOURCES = ["csrc/prism_ops.cpp", "csrc/cpu/kernels.cpp"]
CUDA_SOURCES = ["csrc/cuda/kernels.cu"]
FLAGS = ["-O3"]
REQUIRED = os.environ.get("PRISM_REQUIRE_EXTENSION") == "1"


def extension_build() -> dict:
    """setup()'s ext_modules and cmdclass for prism._C; none where torch cannot be imported."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if REQUIRED:
            raise
        warnings.warn("torch cannot be imported (an isolated build?): prism is installed without its compiled "
                      "kernels; install it with pip install --no-build-isolation")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that, unless PRISM_REQUIRE_EXTENSION=1, turns a failed build into a warning."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if REQUIRED:
                    raise
                self.warn(f"building {ext.name} failed ({exc}); prism will run on its pure-PyTorch kernels")

    if CUDA_HOME is not None and torch.version.cuda is not None:
        extension = CUDAExtension("prism._C", SOURCES + CUDA_SOURCES, extra_compile_args={"cxx": FLAGS, "nvcc": FLAGS})
    else:
        extension = CppExtension("prism._C", SOURCES, extra_compile_args={"cxx": FLAGS})
    return dict(ext_modules=[extension], cmdclass={"build_ext": OptionalBuildExtension})


setup(**extension_build())
