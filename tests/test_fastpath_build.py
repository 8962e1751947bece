"""How the fast path is built (issue 4): by pip through cffi, with a clear error and no
traceback when there is no C compiler, and as a plain C library that needs no Python."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "fastpath" / "csrc"


def test_a_missing_c_compiler_is_one_clear_message(tmp_path: Path) -> None:
    env = dict(os.environ, CC="no-such-cc-for-netkernel")
    r = subprocess.run([sys.executable, str(ROOT / "fastpath" / "build.py"), "--out",
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "needs a C compiler" in r.stderr and "apt-get install gcc" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(not Path("/usr/bin/make").exists(), reason="make is not installed")
def test_the_c_library_builds_without_python(tmp_path: Path) -> None:
    r = subprocess.run(["make", "-s", "-C", str(CSRC), f"OBJDIR={tmp_path}",
                        f"{tmp_path}/libnetkernel.so"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lib = tmp_path / "libnetkernel.so"
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True,
                            check=True).stdout
    libs = [line.split("[")[1].rstrip("]") for line in needed.splitlines() if "(NEEDED)" in line]
    assert libs and not [name for name in libs if "python" in name], libs
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True,
                             text=True, check=True).stdout
    for name in ("nk_nqe_decode", "nk_engine_switch", "nk_ce_poll", "nk_nsm_run"):
        assert f" {name}\n" in symbols + "\n", name
