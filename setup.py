"""Builds the CPU data-plane kernel (csrc/) as ``elasticep._C`` with pybind11, no torch headers."""

from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext = Pybind11Extension(
    "elasticep._C",
    sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-fvisibility=hidden"],
    libraries=["rt", "pthread"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
