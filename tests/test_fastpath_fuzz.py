"""The libFuzzer target of the NQE decoder runs clean, and catches a broken decoder.

fastpath/csrc/fuzz/fuzz_nqe.c checks the decoder against oracles typed from the
spec; fastpath/csrc/fuzz/run.sh builds (``make fuzz``) and runs every target for a
bounded time on its seed corpus (fuzz/corpus/<name>/). A fuzz target counts only
if it can fail, so the same target built with ``-DNK_FUZZ_BROKEN`` (nqe.c then
ignores reserved byte 31) must crash: from the repository's corpus through
run.sh, as CI would run it, and from valid seeds only, where libFuzzer has to
find the bad input itself. Builds go to a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from netkernel.reference import nqe

CSRC = Path(__file__).resolve().parent.parent / "fastpath" / "csrc"
FUZZ = CSRC / "fuzz"
CORPUS = FUZZ / "corpus" / "nqe"
WALL = 300  # seconds: only stops a hung run on a loaded machine

needs_clang = pytest.mark.skipif(shutil.which("clang") is None,
                                 reason="clang is not installed: libFuzzer targets need clang")


def fuzzer_env() -> dict[str, str]:
    """The environment without LD_PRELOAD: a fuzzer links clang's sanitizer runtime, and
    CI's sanitizer run preloads gcc's into this Python (two ASan runtimes refuse to start)."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def run_sh(build: Path, out: Path, seconds: int,
           defs: str = "") -> subprocess.CompletedProcess[str]:
    env = {**fuzzer_env(), "FUZZ_BUILD": str(build), "FUZZ_OUT": str(out),
           "FUZZ_TARGETS": "nqe", "FUZZ_DEFS": defs}
    return subprocess.run([str(FUZZ / "run.sh"), str(seconds)], env=env, capture_output=True,
                          text=True, timeout=WALL)


def test_seed_corpus_holds_every_op_and_every_kind_of_malformed_nqe() -> None:
    seeds = [p.read_bytes() for p in CORPUS.iterdir()]
    valid = {s[0] for s in seeds if len(s) == 32 and _accepted(s)}
    assert valid == {op for op in range(256) if nqe.is_known_op(op)}
    errors = {_error(s) for s in seeds}
    assert {("length", 22), ("op", 38), ("reserved", 22)} <= errors


def test_seed_corpus_is_what_make_corpus_writes() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_corpus", FUZZ / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert {p.name: p.read_bytes() for p in CORPUS.iterdir()} == mod.seeds()


@needs_clang
def test_fuzz_target_runs_clean_on_its_corpus(tmp_path: Path) -> None:
    proc = run_sh(tmp_path / "build", tmp_path / "out", seconds=5)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stat::number_of_executed_units" in proc.stderr
    assert not list((tmp_path / "out").glob("nqe-crash-*"))


@needs_clang
def test_broken_decoder_is_caught_by_run_sh(tmp_path: Path) -> None:
    proc = run_sh(tmp_path / "build", tmp_path / "out", seconds=60, defs="-DNK_FUZZ_BROKEN")
    assert proc.returncode != 0
    assert "fuzz_nqe: oracle failed" in proc.stderr, proc.stderr[-3000:]
    assert list((tmp_path / "out").glob("nqe-crash-*"))


@needs_clang
def test_broken_decoder_is_found_from_valid_seeds_only(tmp_path: Path) -> None:
    """No seed has a bad reserved byte: libFuzzer must make one, within a bounded time."""
    build = tmp_path / "build"
    subprocess.run(["make", "-s", "-C", str(CSRC), "fuzz", f"OBJDIR={build}",
                    "FUZZ_DEFS=-DNK_FUZZ_BROKEN"], check=True, timeout=WALL, capture_output=True)
    seeds, work = tmp_path / "seeds", tmp_path / "work"
    seeds.mkdir()
    work.mkdir()
    for p in CORPUS.glob("op-*"):
        assert _accepted(p.read_bytes())
        shutil.copy(p, seeds)
    proc = subprocess.run([str(build / "fuzz_nqe"), "-max_total_time=120", "-seed=1",
                           f"-artifact_prefix={tmp_path}/", str(work), str(seeds)],
                          capture_output=True, text=True, timeout=WALL, env=fuzzer_env())
    assert proc.returncode != 0 and "fuzz_nqe: oracle failed" in proc.stderr
    (crash,) = tmp_path.glob("crash-*")
    found = crash.read_bytes()
    # exactly the planted bug: a known op, bytes 29-30 zero, byte 31 not
    assert len(found) == 32 and nqe.is_known_op(found[0])
    assert found[29:31] == b"\0\0" and found[31] != 0


def _accepted(raw: bytes) -> bool:
    return _error(raw) is None


def _error(raw: bytes) -> tuple[str, int] | None:
    try:
        nqe.unpack(raw)
    except nqe.NQEError as exc:
        return (exc.field, exc.errno)
    return None
