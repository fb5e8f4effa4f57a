from setuptools import find_packages, setup

setup(
    name="timemachine",
    version="0.1.0",
    description="Forward-mode sensitivity molecular dynamics: dx/dθ through Langevin dynamics",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["timemachine", "timemachine.*"]),
    include_package_data=True,
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
        "test": ["pytest>=7", "ruff==0.17.6"],
        "cuda": ["cupy-cuda12x>=13"],
        # JAX MD for the forward-mode column of python -m timemachine.bench
        "bench": ["jax-md==0.2.29"],
    },
    entry_points={"console_scripts": ["timemachine=timemachine.cli:main"]},
)
