"""Build wiring only: metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["csrc/build.py:mdisk_ffi", "csrc/build.py:runner_ffi",
                     "csrc/build.py:process_ffi"])
