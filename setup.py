"""Only the C fast path's build lives here; everything else is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["fastpath/build.py:ffibuilder"])
