"""ringpack build: a pure-Python package plus an optional CUDA extension (csrc/).

The extension is built only when torch is importable at build time with CUDA support and a CUDA
toolkit is found; otherwise the package installs without it and uses torch fallbacks.
Build switches (read at build time):
  RINGPACK_SKIP_CUDA_BUILD=1   never build the extension
  RINGPACK_CUDA_ARCHS="90;100" compute capabilities to build for (default "80;90")
Install with ``pip install --no-build-isolation .`` so the build sees the installed torch.
"""

import os

from setuptools import find_packages, setup


def cuda_extensions():
    if os.environ.get("RINGPACK_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".cpp", ".cu")))
    if not sources:
        return [], {}
    archs = os.environ.get("RINGPACK_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    ext = CUDAExtension("ringpack._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *gencode]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="ringpack",
    version="0.1.0",
    description="Exact context-parallel ring attention over packed variable-length sequences",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ringpack", "ringpack.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest>=7", "numpy", "matplotlib"],
        "flash": ["flash-attn>=2.7,<2.9"],
        "fa4": ["flash-attn-4>=4.0.0b36,<4.1"],
        "deepspeed": ["deepspeed>=0.14"],
        "megatron": ["megatron-core>=0.8"],
        "transformers": ["transformers>=5.23"],
        "trainer": ["transformers>=5.23", "accelerate>=1.15"],
        "trl": ["transformers>=5.23", "accelerate>=1.15", "trl>=1.16"],
        "mpi": ["mpi4py>=3.1"],
        "plot": ["matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["ringpack=ringpack.__main__:main"]},
)
