"""Where the preloaded GuestLib's two programs are (spec/preload.md PRE-1).

``pip install`` builds ``libnkpreload.so`` (the LD_PRELOAD library) and ``nk-agent``
(the tenant's guest-side process) next to the extension (``fastpath/build.py``,
``build_tools``). ``NETKERNEL_PRELOAD`` and ``NETKERNEL_AGENT_BIN`` point at other
builds (a sanitizer build, a developer's ``make -C fastpath/csrc agent preload``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

HERE: Final = Path(__file__).resolve().parent
LIB_ENV: Final = "NETKERNEL_PRELOAD"
AGENT_ENV: Final = "NETKERNEL_AGENT_BIN"
SOCKET_ENV: Final = "NETKERNEL_AGENT"
LIB_NAME: Final = "libnkpreload.so"
AGENT_NAME: Final = "nk-agent"


@dataclass(frozen=True)
class Paths:
    lib: Path
    agent: Path


def _find(env: str, name: str) -> Path:
    override = os.environ.get(env)
    candidates = [Path(override)] if override else [HERE / name, HERE / "csrc" / "build" / name]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(
        f"{name} is not built (looked at {', '.join(map(str, candidates))}): run"
        f" `pip install -e .`, or `make -C fastpath/csrc agent preload` and set {env}"
    )


def paths() -> Paths:
    """The library and the agent this installation runs; FileNotFoundError says how to
    build them when they are missing."""
    return Paths(lib=_find(LIB_ENV, LIB_NAME), agent=_find(AGENT_ENV, AGENT_NAME))
