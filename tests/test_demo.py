"""``netkernel demo`` run as users run it: a subprocess, then a look for anything left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from netkernel import instance
from netkernel.reference import shm
from tests.live import pids_of

DEMO_TIMEOUT = 120


def _demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netkernel", "demo", *args],
                          capture_output=True, text=True, timeout=DEMO_TIMEOUT, env=env)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")




def _reported_pids(out: str) -> list[int]:
    return [int(p) for p in re.findall(r"\bpid (\d+)", out)]


@pytest.fixture
def name() -> Iterator[str]:
    """A unique instance name; whatever it left running is killed afterwards."""
    n = f"t-demo-{uuid.uuid4().hex[:8]}"
    yield n
    for pid in pids_of(n, environ=True):
        os.kill(pid, signal.SIGKILL)
    shm.remove_instance(n)


def _check_report(out: str, size: int) -> None:
    assert re.search(rf"GET / -> 200, {size:,} bytes", out), out
    digests = re.search(r"sha256  server (\w+)\.\.\.  client (\w+)\.\.\.  match", out)
    assert digests and digests.group(1) == digests.group(2), out
    # the per-op table: the HTTP exchange's calls from the tenants, replies and data from the NSM
    header = next(line for line in out.splitlines() if "(VM " in line)
    for column in ("http-server (VM", "http-client (VM", "NSM 1 ("):
        assert column in header, out
    # the default NSM pairs the two tenants' connection in shared memory (spec/shm.md)
    if "NSM 1 (shm)" in header:
        assert re.search(r"carried http-server's connection paired in shared memory, no TCP:"
                         rf" ({size:,}|[\d,]+) bytes out by shared memory", out), out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if re.match(r"^[A-Z_|]+ ", line)}
    for op in ("SOCKET", "BIND", "LISTEN", "CONNECT", "ACCEPT", "SEND", "CLOSE", "BUF_RETURN",
               "SEND|REPLY", "EV_DATA"):
        assert op in rows, (op, out)
    server, client, nsm = rows["SEND"][0], rows["EV_DATA"][2], rows["SEND|REPLY"][2]
    assert all(v != "-" for v in (server, client, nsm)), out
    moved = re.search(r"payload bytes in \(SEND, EV_DATA\)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)", out)
    assert moved and int(moved.group(1).replace(",", "")) >= size, out  # no bypass
    assert re.search(r"NQEs switched by the CoreEngine during the demo: [\d,]+", out), out


def test_demo_starts_an_embedded_instance_and_leaves_nothing(name: str) -> None:
    size = 1 << 20
    run = _demo("--instance", name)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert f"no instance {name!r} runs; starting an embedded one" in out
    _check_report(out, size)
    assert f"instance {name!r} stopped, nothing left behind" in out
    pids = _reported_pids(out)
    assert len(set(pids)) >= 4, out  # CoreEngine, NSM, server, client
    assert [pid for pid in pids if _alive(pid)] == []
    assert pids_of(name, environ=True) == []
    assert not shm.instance_dir(name).exists()


def test_demo_uses_a_running_instance_and_leaves_it_running(name: str) -> None:
    up = instance.up(name)
    try:
        env = dict(os.environ, NETKERNEL_INSTANCE=name)  # found through the environment
        run = _demo("--size", "300000", env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"using the running instance {name!r} (left running)" in run.stdout
        _check_report(run.stdout, 300_000)
        doc = instance.status(name)
        assert doc["pid"] == up["pid"] and [n["pid"] for n in doc["nsms"]] == \
            [n["pid"] for n in up["nsms"]]
        assert doc["tenants"] == [] and doc["sockets"] == 0
        assert sorted(p.name for p in shm.instance_dir(name).glob("vm-*")) == []
        assert set(pids_of(name, environ=True)) == {up["pid"], *(n["pid"] for n in up["nsms"])}
    finally:
        instance.down(name)


def test_demo_fails_clearly_without_an_nsm(name: str) -> None:
    instance.up(name, nsm="none")
    try:
        run = _demo("--instance", name)
        assert run.returncode == 1
        assert f"FAILED: instance {name!r} has no NSM attached" in run.stdout
        assert instance.running(name)  # not the demo's to stop
    finally:
        instance.down(name)


@pytest.mark.parametrize(("when", "sig"), [
    ("starting an embedded one", signal.SIGINT),  # while the instance starts
    ("listening on", signal.SIGTERM),  # while the client starts and the bytes travel
])
def test_demo_interrupted_stops_the_embedded_instance(name: str, when: str, sig: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "netkernel", "demo", "--instance", name,
                             "--size", str(128 << 20)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if when in line:
                proc.send_signal(sig)
                break
        out, err = proc.communicate(timeout=DEMO_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(seen) + out
    assert proc.returncode == 130, text + err
    assert "netkernel demo: interrupted" in text
    assert [pid for pid in _reported_pids(text) if _alive(pid)] == []
    assert pids_of(name, environ=True) == []
    assert not shm.instance_dir(name).exists()


def test_demo_rejects_a_bad_size() -> None:
    run = _demo("--size", "0")
    assert run.returncode == 2 and "--size must be positive" in run.stderr
