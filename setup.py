import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

_HERE = os.path.dirname(os.path.abspath(__file__))
_KERNEL_PATTERNS = ("*.cu", "*.cuh", "*.cpp")


class build_py_with_kernels(build_py):  # noqa: N801 (setuptools command naming)
    """build_py that also copies cuda/kernels/**/{*.cu,*.cuh,*.cpp} into the built package
    as timemachine/backends/_kernels (where timemachine.backends.kernel_dir() looks first).

    Editable installs skip the copy: there kernel_dir() falls back to the source tree.
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        src_root = os.path.join(_HERE, "cuda", "kernels")
        dst_root = os.path.join(self.build_lib, "timemachine", "backends", "_kernels")
        sources = sorted(
            path
            for pattern in _KERNEL_PATTERNS
            for path in glob.glob(os.path.join(src_root, "**", pattern), recursive=True)
        )
        if os.path.join(src_root, "tm_kernels.cu") not in sources:
            raise RuntimeError(f"CUDA kernel sources missing under {src_root}: cannot build")
        for path in sources:
            dst = os.path.join(dst_root, os.path.relpath(path, src_root))
            self.mkpath(os.path.dirname(dst))
            self.copy_file(path, dst, preserve_mode=False)


setup(
    name="timemachine",
    version="0.1.0",
    description="Forward-mode sensitivity molecular dynamics: dx/dθ through Langevin dynamics",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["timemachine", "timemachine.*"]),
    include_package_data=True,
    # the kernel sources, copied in by build_py_with_kernels (see above)
    package_data={
        "timemachine.backends": [f"_kernels/**/{p}" for p in _KERNEL_PATTERNS],
        "timemachine.data": ["*.json"],  # shipped target files (graf2007_ala3.json)
    },
    cmdclass={"build_py": build_py_with_kernels},
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "jax>=0.4.30",
        "jaxlib>=0.4.30",
        "openmm>=8.1",
        "PeptideBuilder>=1.1",
        "biopython>=1.80",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "mdtraj>=1.10",
        "optax>=0.2",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-xdist>=3",
            "hypothesis>=6",
            "dask[distributed]>=2024.1",  # tests/test_executor.py
            "ruff==0.17.6",
            # NVRTC, the compiler CuPy runs: tests/test_kernels_compile.py builds the kernels
            # with it on machines without a GPU
            "nvidia-cuda-nvrtc==13.*; sys_platform == 'linux' and platform_machine == 'x86_64'",
        ],
        # CuPy built for the CUDA runtime: 12.x runs on drivers >= 525 (also CUDA 13's);
        # cuda13 for a CUDA 13 stack (drivers >= 580)
        "cuda": ["cupy-cuda12x>=13"],
        "cuda13": ["cupy-cuda13x>=14"],
        # replicas as tasks on a Dask cluster (timemachine.fitting.executor)
        "dask": ["dask[distributed]>=2024.1"],
        # JAX MD for the forward-mode column of python -m timemachine.bench
        "bench": ["jax-md==0.2.29"],
    },
    entry_points={"console_scripts": ["timemachine=timemachine.cli:main"]},
)
