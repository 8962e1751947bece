"""Build the C fast path with cffi's out-of-line API mode (``pip install`` runs this).

``setup.py`` names :data:`ffibuilder`; ``pip install -e .`` compiles every
``csrc/*.c`` with the headers of ``csrc/include/nk/`` into the extension
``netkernel.fastpath._nk``. The declarations cffi sees are ``csrc/cdef/*.h``
(plain C: cffi's parser takes no macros or inline bodies), read in name order;
a file whose first line says ``cffi: packed`` is declared packed. They repeat
the prototypes of the headers, which is what cffi needs; API mode compiles
every declaration against the real header, so a mismatch fails the build.

``build_tools`` compiles the preloaded GuestLib's two programs, ``libnkpreload.so``
and ``nk-agent`` (``csrc/preload/``, ``csrc/agent/``), next to the extension.

``python fastpath/build.py [--sanitize] [--tools] --out DIR`` builds the same extension
(with AddressSanitizer and UndefinedBehaviorSanitizer) into ``DIR`` and prints
its path; ``NETKERNEL_FASTPATH_EXT`` pointed at it loads it instead of the
installed one.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent / "csrc"
#: Warnings are errors, in our sources and in what cffi generates around them.
CFLAGS = ["-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-fno-strict-aliasing"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
            "-fno-omit-frame-pointer", "-O1"]


def _compiler() -> str:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    exe = cc.split()[0]
    if shutil.which(exe) is None:
        raise SystemExit(
            f"netkernel: the C fast path needs a C compiler and none was found ({exe!r}).\n"
            "  Debian/Ubuntu: apt-get install gcc    Fedora: dnf install gcc\n"
            "  or set CC to a C11 compiler."
        )
    return exe


def _rel(path: Path) -> str:
    """Source paths relative to the project root when building from it (setuptools wants that)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def make(sanitize: bool = False, relative: bool = True) -> FFI:
    """The FFI builder; ``relative`` paths for setuptools, absolute for ``compile()``."""
    _compiler()
    rel = _rel if relative else str
    ffi = FFI()
    for decl in sorted((CSRC / "cdef").glob("*.h")):
        text = decl.read_text()
        ffi.cdef(text, packed="cffi: packed" in text.partition("\n")[0])
    headers = "\n".join(f'#include "nk/{h.name}"'
                        for h in sorted((CSRC / "include" / "nk").glob("*.h")))
    flags = CFLAGS + (SANITIZE if sanitize else [])
    ffi.set_source(
        "netkernel.fastpath._nk", headers,
        sources=[rel(p) for p in sorted(CSRC.glob("*.c"))],
        include_dirs=[rel(CSRC / "include")],
        extra_compile_args=flags,
        extra_link_args=SANITIZE[:1] if sanitize else [],
    )
    return ffi


ffibuilder = make(sanitize=False)

#: The preloaded GuestLib (spec/preload.md): what each artefact is built from. nk-agent
#: links the core's codec, device checks and buffer pool; the library needs libc only.
AGENT = "nk-agent"
PRELOAD = "libnkpreload.so"
_AGENT_CORE = ("nqe.c", "bufpool.c", "device.c")


def build_tools(out: Path, sanitize: bool = False) -> tuple[Path, Path]:
    """Compile ``libnkpreload.so`` and ``nk-agent`` into ``out``; their paths.

    The same commands as ``make -C fastpath/csrc agent preload``; ``pip install``
    runs this next to the extension (setup.py), so an installed package has both.
    """
    import subprocess

    cc = _compiler()
    out.mkdir(parents=True, exist_ok=True)
    flags = [*CFLAGS, f"-I{CSRC / 'include'}"]
    # With ``sanitize``: the agent (a program of its own) gets ASan + UBSan; the library
    # UBSan only, because ASan's runtime must come first in a process and the library is
    # preloaded into programs built without it.
    lib_san = ["-fsanitize=undefined", "-fno-sanitize-recover=undefined"] if sanitize else []
    agent_san = SANITIZE if sanitize else []
    agent_srcs = sorted((CSRC / "agent").glob("*.c")) + [CSRC / c for c in _AGENT_CORE]
    lib, agent = out / PRELOAD, out / AGENT
    for argv in (
        [cc, *flags, *lib_san, "-fPIC", "-shared", "-o", str(lib),
         *map(str, sorted((CSRC / "preload").glob("*.c"))), "-ldl", "-lpthread"],
        [cc, *flags, *agent_san, "-o", str(agent), *map(str, agent_srcs), "-lpthread"],
    ):
        try:
            subprocess.run(argv, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            raise SystemExit(f"netkernel: building {argv[argv.index('-o') + 1]} failed:\n"
                             f"{exc.stderr}") from None
    return lib, agent

def main(argv: list[str]) -> None:
    """``build.py [--sanitize] --out DIR``: build the extension into DIR, print the .so's path.

    For a second build beside the installed one (CI's sanitizer run, or a
    developer's scratch build): ``export NETKERNEL_FASTPATH_EXT=$(python
    fastpath/build.py --out /tmp/nk)`` makes ``netkernel.fastpath`` load it.
    """
    import argparse

    ap = argparse.ArgumentParser(prog="fastpath/build.py")
    ap.add_argument("--sanitize", action="store_true", help="ASan + UBSan")
    ap.add_argument("--out", required=True, type=Path, help="build directory")
    ap.add_argument("--tools", action="store_true",
                    help="build libnkpreload.so and nk-agent instead; print their paths")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tools:
        print(*build_tools(args.out.resolve(), sanitize=args.sanitize), sep="\n")
        return
    ffi = make(sanitize=args.sanitize, relative=False)
    so = ffi.compile(tmpdir=str(args.out.resolve()), verbose=False)
    print(so)


if __name__ == "__main__":
    main(sys.argv[1:])
