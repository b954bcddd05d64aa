"""Build fused-lora.

* ``fused_lora`` is the Python package; its Triton kernels live in ``fused_lora/kernels/``. (They are not a top-level
  ``kernels/`` folder: run from a checkout, that folder would be importable as ``kernels`` and shadow the unrelated
  PyPI package of that name, which transformers and bitsandbytes look for.)
* ``fused_lora._C`` is the C++/CUDA extension for paged optimizer state. It is built with CUDA when a CUDA
  toolkit and a CUDA build of torch are both present, and as a host-memory C++ build otherwise.

torch is imported from the environment (build with ``pip install --no-build-isolation``); it is not a build
requirement, so pip never downloads a CUDA torch into an isolated build environment.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    """The fused_lora._C extension, or nothing when torch is not importable or FUSED_LORA_NO_EXT=1."""
    if os.environ.get("FUSED_LORA_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fused-lora: torch is not installed, building without the fused_lora._C extension")
        return [], {}

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    if not cpp_sources:
        return [], {}
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("FUSED_LORA_FORCE_CPU_EXT") != "1"
    )
    extra = {"cxx": ["-O3", "-std=c++17"]}
    # OpenMP runs at::parallel_for in the CPU kernels (csrc/cpu_kernels.cpp) on torch's own intra-op threads: on
    # Linux torch ships libgomp.so.1, which the extension then shares. Elsewhere the kernels run on one thread.
    link = []
    if sys.platform.startswith("linux"):
        extra["cxx"].append("-fopenmp")
        link.append("-fopenmp")
    if with_cuda:
        extra["cxx"].append("-DFUSED_LORA_WITH_CUDA")
        extra["nvcc"] = ["-O3", "-std=c++17", "-DFUSED_LORA_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension(
            "fused_lora._C", cpp_sources + cuda_sources, extra_compile_args=extra, extra_link_args=link,
            libraries=["cudart"],
        )
    else:
        ext = cpp_extension.CppExtension("fused_lora._C", cpp_sources, extra_compile_args=extra, extra_link_args=link)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="fused-lora",
    version="0.1.0",
    description="Fused Triton kernels for LoRA/QLoRA over NF4 weights, and paged optimizer state",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the library core, its kernels, and the tooling subpackages (fused_lora.cli, fused_lora.bench, ...)
    packages=find_packages(include=["fused_lora", "fused_lora.*"]),
    package_data={"fused_lora": ["data/*"]},
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.2"],
        "qlora": ["bitsandbytes>=0.47", "peft>=0.14", "transformers>=4.46", "safetensors"],
        "bench": ["matplotlib"],
        "test": [
            "triton>=3.2",
            "bitsandbytes>=0.47",
            "peft>=0.14",
            "transformers>=4.46",
            "safetensors",
            "trl>=1.0",
            "accelerate",
            "hypothesis",
            "pytest",
            "pytest-benchmark",
            "matplotlib",
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["fused-lora=fused_lora.__main__:main"]},
)
