"""Only the C fast path's build lives here; everything else is in pyproject.toml."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


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


class BuildPyAndSpec(build_py):
    """The packages, then spec/*.md as netkernel/spec/: the conformance suite reads the
    requirements at run time (conformance/requirements.py finds them at ../spec)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's spec/
        dest = Path(self.build_lib) / "netkernel" / "spec"
        self.mkpath(str(dest))
        for md in sorted((HERE / "spec").glob("*.md")):
            self.copy_file(str(md), str(dest / md.name))


setup(cffi_modules=["fastpath/build.py:ffibuilder"],
      cmdclass={"build_ext": BuildExtAndTools, "build_py": BuildPyAndSpec})
