"""Only the C fast path's build lives here; everything else is in pyproject.toml."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _build_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "_nk_build", Path(__file__).resolve().parent / "fastpath" / "build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildExtAndTools(build_ext):
    """The cffi extension, then libnkpreload.so and nk-agent beside it (spec/preload.md)."""

    def run(self) -> None:
        super().run()
        out = Path(self.get_ext_fullpath("netkernel.fastpath._nk")).parent
        _build_module().build_tools(out.resolve())


setup(cffi_modules=["fastpath/build.py:ffibuilder"], cmdclass={"build_ext": BuildExtAndTools})
