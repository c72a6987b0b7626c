"""Builds the CPU data-plane kernel and the EPLB planner core (csrc/) as ``elasticep._C`` with pybind11,
no torch headers. No fast-math and no floating-point contraction: the planner core must round as
numpy does (csrc/eplb_planner.cpp)."""

from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext = Pybind11Extension(
    "elasticep._C",
    sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-fvisibility=hidden", "-ffp-contract=off", "-fno-fast-math"],
    libraries=["rt", "pthread"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
