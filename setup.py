import importlib.util
from pathlib import Path

from setuptools import find_packages, setup


def _load_cuda_build():
    """csrc/build.py: the optional CUDA extension sat_kernels._C and its build_ext (variables: ENVs.md)."""
    path = Path(__file__).with_name("csrc") / "build.py"
    spec = importlib.util.spec_from_file_location("sat_kernels_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_cuda_build = _load_cuda_build()

setup(
    name="sat_kernels",
    version="0.1.0",
    description="Sparsity-Accelerated Training (SAT) kernels for Llama-family LLMs: neuron omission in forward "
                "and backward, as autograd ops and a one-call Hugging Face patch",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["sat_kernels", "sat_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    ext_modules=_cuda_build.cuda_extensions(),
    cmdclass={"build_ext": _cuda_build.BuildExtension},
    entry_points={"console_scripts": ["sat-train=sat_kernels.train.cli:main", "sat-bench=sat_kernels.bench.cli:main"]},
    extras_require={
        "hf": ["transformers>=4.45", "accelerate>=0.34"],
        "test": ["pytest>=7", "ruff>=0.5", "matplotlib>=3.7", "transformers>=4.45", "accelerate>=0.34", "peft>=0.13",
                 "trl>=0.19", "triton>=3.0; platform_system == 'Linux'",
                 "liger-kernel>=0.8; platform_system == 'Linux'", "deepspeed>=0.19.8; platform_system == 'Linux'"],
        "train": ["transformers>=4.45", "accelerate>=0.34", "gguf>=0.10", "matplotlib>=3.7", "tqdm>=4.60"],
    },
)
