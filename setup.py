"""Build the compiled visual-BPE core (tessera/bpe/_core.cpp); everything else is in pyproject.toml."""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

setup(
    ext_modules=[
        Pybind11Extension(
            "tessera.bpe._core",
            ["tessera/bpe/_core.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ],
)
