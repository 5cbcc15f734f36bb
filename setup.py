"""Build script for the C++ ranking-metrics extension (``sort_fast._ranking``).

Package metadata lives in ``pyproject.toml``; this file only declares the extension.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "sort_fast._ranking",
        ["csrc/ranking.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
