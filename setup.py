"""lep-megatron: Learned Embedding Propagation on megatron-core.

Builds the csrc/ segment-mean extension: CUDA + C++ when a CUDA toolkit and a CUDA build of
torch are present, C++ (OpenMP) only otherwise. Install with `--no-build-isolation` so the
build uses the torch already in the environment (an isolated build would fetch a CUDA torch).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources or os.environ.get("LEP_MEGATRON_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-fopenmp", "-std=c++20"]  # recent torch headers need C++20
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda and os.environ.get("LEP_MEGATRON_FORCE_CPU_EXT") != "1":
        ext = CUDAExtension(
            "lep_megatron._C",
            cpp_sources + cuda_sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "lep_megatron._C", cpp_sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name="lep-megatron",
    version="0.1.0",
    description="Learned Embedding Propagation: adapt LLM vocabularies on megatron-core at cluster scale",
    python_requires=">=3.10",
    packages=find_packages(include=["lep_megatron", "lep_megatron.*"]) + ["lep_megatron.conf", "lep_megatron.conf.pretrain_groups"],
    # conf/ is the hydra config tree; installed as the package lep_megatron.conf so that
    # hydra finds it as `pkg://lep_megatron.conf` in editable and regular installs alike.
    package_dir={"lep_megatron.conf": "conf"},
    package_data={"lep_megatron.conf": ["*.yaml", "**/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        "hydra-core>=1.3",
        "numpy",
        "psutil",
    ],
    extras_require={"mpi": ["mpi4py"], "test": ["pytest"]},
    entry_points={"console_scripts": ["lep-megatron = lep_megatron.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
