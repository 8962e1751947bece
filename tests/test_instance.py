"""``netkernel up/status/down`` (netkernel/instance.py, cli.py) with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from netkernel import instance
from netkernel.reference import coreengine, shm
from tests.live import pids_of, until

CLI_TIMEOUT = 60


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netkernel", *args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT)




@pytest.fixture
def name() -> Iterator[str]:
    """A unique instance name; whatever it left running is killed afterwards."""
    n = f"t-inst-{uuid.uuid4().hex[:8]}"
    yield n
    for pid in pids_of(n):
        os.kill(pid, signal.SIGKILL)
    shm.remove_instance(n)


def test_up_status_down_with_the_kernel_nsm(name: str) -> None:
    up = _cli("up", "--instance", name)
    assert up.returncode == 0, up.stderr
    assert f"instance {name} is up" in up.stdout
    d = shm.instance_dir(name)
    assert (d / "engine.sock").exists() and (d / "engine.pid").exists()
    assert (d / "nsm-1.pid").exists() and (d / "nsm-1.nk").exists()

    st = _cli("status", "--instance", name, "--json")
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    assert doc["instance"] == name
    assert doc["tenants"] == []
    assert [(n["id"], n["pid"]) for n in doc["nsms"]] == [
        (1, int((d / "nsm-1.pid").read_text()))]
    assert doc["pid"] == int((d / "engine.pid").read_text())
    assert set(pids_of(name)) == {doc["pid"], doc["nsms"][0]["pid"]}

    text = _cli("status", "--instance", name)
    assert text.returncode == 0 and f"instance {name}" in text.stdout and "NSMs: 1" in text.stdout

    down = _cli("down", "--instance", name)
    assert down.returncode == 0, down.stderr
    assert pids_of(name) == []
    assert not d.exists()


@pytest.mark.parametrize(("nsm", "kind", "placement"), [
    ("auto", "shm", "auto"), ("shm", "shm", "shm"), ("kernel", "kernel", "kernel")])
def test_up_nsm_picks_the_nsm_and_its_placement(name: str, nsm: str, kind: str,
                                                placement: str) -> None:
    """``up --nsm kernel|auto|shm`` (spec/shm.md SHM-1): the NSM the CoreEngine sees, and
    the placement it publishes, shown by ``status`` (SHM-7)."""
    up = _cli("up", "--instance", name, "--nsm", nsm)
    assert up.returncode == 0, up.stderr
    try:
        # the NSM publishes its counters once attached, a moment after `up` returned
        def published() -> dict[str, Any] | None:
            e: dict[str, Any] = instance.status(name)["nsms"][0]
            return e if "placement" in e else None

        entry = until("the NSM's counters", published)
        assert entry["name"] == kind
        assert entry["placement"] == placement and entry["served"] == {}
        text = _cli("status", "--instance", name)
        assert f"placement={placement}" in text.stdout, text.stdout
    finally:
        assert _cli("down", "--instance", name).returncode == 0
    assert not (shm.instance_dir(name) / "nsm-1.stats.json").exists()


def test_the_reference_has_no_shm_nsm(name: str) -> None:
    bad = _cli("up", "--instance", name, "--impl", "reference", "--nsm", "shm")
    assert bad.returncode == 1 and "the reference implementation has no shm NSM" in bad.stderr
    assert pids_of(name) == [] and not shm.instance_dir(name).exists()


def test_instance_from_the_environment_and_a_tenant_attached(name: str) -> None:
    """NETKERNEL_INSTANCE picks the instance; a tenant shows up in status; down detaches it."""
    env_before = os.environ.get("NETKERNEL_INSTANCE")
    os.environ["NETKERNEL_INSTANCE"] = name
    try:
        doc = instance.up(nsm="none")
        assert doc["instance"] == name and doc["nsms"] == []
        tenant = coreengine.attach("tenant", "probe")
        st = instance.status()
        seen = [(t["id"], t["name"], t["pid"]) for t in st["tenants"]]
        assert seen == [(1, "probe", os.getpid())]
        assert tenant.path.exists()
        instance.down()
        assert tenant.conn.recv(1) == b""  # the CoreEngine hung up on us
        tenant.close()
    finally:
        if env_before is None:
            os.environ.pop("NETKERNEL_INSTANCE", None)
        else:
            os.environ["NETKERNEL_INSTANCE"] = env_before
    assert pids_of(name) == []
    assert not shm.instance_dir(name).exists()


def test_status_and_down_of_an_instance_that_is_not_running(name: str) -> None:
    st = _cli("status", "--instance", name)
    assert st.returncode == 1 and "not running" in st.stderr
    down = _cli("down", "--instance", name)
    assert down.returncode == 0 and "none running" in down.stdout


def test_up_twice_is_refused_and_down_cleans_a_killed_instance(name: str) -> None:
    doc = instance.up(name, nsm="none")
    with pytest.raises(instance.InstanceError, match="already running"):
        instance.up(name, nsm="none")
    os.kill(doc["pid"], signal.SIGKILL)  # a crashed CoreEngine leaves its files behind
    assert shm.instance_dir(name).exists()
    instance.down(name)
    assert pids_of(name) == [] and not shm.instance_dir(name).exists()


def test_up_fails_cleanly_when_the_nsm_cannot_start(name: str) -> None:
    with pytest.raises(instance.InstanceError, match="NSM auto"):
        instance.up(name, netns=f"no-such-netns-{name}", timeout=10)
    assert pids_of(name) == [] and not shm.instance_dir(name).exists()


def test_bad_instance_name_is_refused() -> None:
    up = _cli("up", "--instance", "../etc")
    assert up.returncode == 1 and "bad instance name" in up.stderr


def _can_make_netns() -> bool:
    probe = f"nk-probe-{uuid.uuid4().hex[:6]}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    except OSError:  # no `ip` command
        return False
    if made:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return made


@pytest.mark.skipif(not _can_make_netns(), reason="needs root to create a network namespace")
def test_up_starts_the_nsm_inside_a_network_namespace(name: str) -> None:
    netns = f"nk-{name}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        doc = instance.up(name, netns=netns)
        (nsm,) = doc["nsms"]
        def netns_of(path: str) -> int:
            return os.stat(path).st_ino

        assert netns_of(f"/proc/{nsm['pid']}/ns/net") == netns_of(f"/run/netns/{netns}")
        assert netns_of(f"/proc/{doc['pid']}/ns/net") == netns_of("/proc/self/ns/net")
        instance.down(name)
        assert pids_of(name) == [] and not shm.instance_dir(name).exists()
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
