"""Build wiring only: metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["csrc/build_mdisk.py:ffibuilder", "csrc/build_runner.py:ffibuilder"])
