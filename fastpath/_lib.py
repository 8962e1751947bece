"""The compiled fast path: ``ffi`` and ``lib`` of ``netkernel.fastpath._nk``.

``pip install`` builds the extension (fastpath/build.py). Setting
``NETKERNEL_FASTPATH_EXT`` to the path of another build of it (the sanitizer
build CI makes) loads that one instead.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Any


def _load() -> ModuleType:
    path = os.environ.get("NETKERNEL_FASTPATH_EXT")
    if path:
        spec = importlib.util.spec_from_file_location("netkernel.fastpath._nk", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"NETKERNEL_FASTPATH_EXT={path}: not a loadable extension")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    try:
        from . import _nk  # type: ignore[attr-defined]
    except ImportError as exc:
        raise ImportError(
            "the C fast path is not built: run `pip install -e .` (it needs a C compiler)"
        ) from exc
    return _nk  # type: ignore[no-any-return]


_mod = _load()
ffi: Any = _mod.ffi
lib: Any = _mod.lib
