"""The running CoreEngine's side of the control protocol (spec/runtime.md).

The CoreEngine under test is the target's ``coreengine`` role's ``process``
(targets.py), started by the suite with the target's NSM, or the reference's
(:mod:`netkernel.conformance.runtime`). The suite is the client here: it speaks
the protocol from the spec, not with the reference's client.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from netkernel.conformance.runtime import (
    Control,
    Instance,
    RawTenant,
    Runtime,
    control,
    instance_dir,
    wait_until,
)
from netkernel.reference import device as dev
from netkernel.reference import shm
from netkernel.reference.nqe import Op


@pytest.fixture
def inst(engine: Any, nk_runtime: Runtime) -> Instance:
    return nk_runtime.shared()


@pytest.mark.req("RT-1")
def test_the_runtime_directory_holds_the_socket_and_the_devices(inst: Instance) -> None:
    assert inst.dir == instance_dir(inst.name)
    assert (inst.dir / "engine.sock").is_socket()
    with RawTenant(inst.dir) as t:
        assert t.path == inst.dir / f"vm-{t.id}.nk" and t.path.is_file()
        (nsm,) = inst.status()["nsms"]
        assert Path(nsm["path"]) == inst.dir / f"nsm-{nsm['id']}.nk"
        assert Path(nsm["path"]).is_file()


@pytest.mark.req("RT-2")
def test_requests_are_answered_one_line_each_in_order(inst: Instance) -> None:
    ctl = Control(inst.dir)
    try:
        lines = [b"this is not JSON\n", b"[1, 2]\n", b'{"cmd": "frobnicate"}\n',
                 b'{"no": "cmd"}\n', b'{"cmd": "status"}\n']
        ctl.send_line(b"".join(lines))  # pipelined: one write, five requests
        replies = [ctl.read_reply() for _ in lines]
        for reply in replies[:4]:
            assert reply["ok"] is False and isinstance(reply["error"], str) and reply["error"]
        assert replies[4]["ok"] is True and replies[4]["instance"] == inst.name
        assert ctl.request({"cmd": "status"})["ok"] is True  # still usable
        assert ctl._buf == b"", "more than one line for a request"
    finally:
        ctl.close()


@pytest.mark.req("RT-3")
def test_attach_answers_a_ready_device(inst: Instance) -> None:
    ctl = Control(inst.dir)
    try:
        reply = ctl.request({"cmd": "attach", "kind": "tenant", "pid": os.getpid(),
                             "name": "conformance-rt-3"})
        assert reply["ok"] is True and reply["kind"] == "tenant"
        assert isinstance(reply["id"], int) and 1 <= reply["id"] <= 254
        path = Path(reply["path"])
        assert path.is_absolute() and path == inst.dir / f"vm-{reply['id']}.nk"
        with shm.open_device(path) as dmap:  # DEV-2, DEV-3: a valid header
            assert dmap.state is dev.State.READY
            assert dmap.header("dev_id") == reply["id"]
            assert dmap.geo.kind is dev.Kind.TENANT
        again = ctl.request({"cmd": "attach", "kind": "tenant", "pid": os.getpid()})
        assert again["ok"] is False, "a second device on one connection"
        entry = [x for x in inst.status()["tenants"] if x["id"] == reply["id"]]
        assert entry and entry[0]["pid"] == os.getpid() and entry[0]["name"] == "conformance-rt-3"
    finally:
        ctl.close()


@pytest.mark.req("RT-3")
@pytest.mark.parametrize("request_", [
    {"cmd": "attach", "kind": "router", "pid": 1},
    {"cmd": "attach", "kind": "tenant", "pid": 0},
    {"cmd": "attach", "kind": "tenant", "pid": "1"},
    {"cmd": "attach", "kind": "tenant", "pid": True},
    {"cmd": "attach", "kind": "tenant", "pid": 1, "name": "x" * 65},
    {"cmd": "attach", "kind": "nsm", "pid": 1, "name": 7},
])
def test_attach_refuses_what_it_cannot_honour(inst: Instance, request_: dict[str, Any]) -> None:
    before = {p.name for p in inst.dir.iterdir()}
    reply = control(inst.dir, request_)
    assert reply["ok"] is False and reply["error"], reply
    # files of earlier tests' devices may still be going away (detach is asynchronous, RT-4):
    # what matters is that the refused attach added none
    assert {p.name for p in inst.dir.iterdir()} <= before, "a refused attach left a file"


@pytest.mark.req("RT-4")
def test_hanging_up_unplugs_the_device_within_a_second(inst: Instance) -> None:
    t = RawTenant(inst.dir)
    s = t.new_id()
    assert t.do(Op.SOCKET, s, socket.AF_INET | socket.SOCK_STREAM << 16) == 0
    watch = shm.open_device(t.path)  # a mapping of our own, to see the state change
    try:
        path, vm = t.path, t.id
        gone = time.monotonic()
        t.close()
        wait_until("the device file is removed", lambda: not path.exists(), 1.0)
        wait_until("the device is DETACHED", lambda: watch.state is dev.State.DETACHED,
                   1.0 - (time.monotonic() - gone))
        assert not [x for x in inst.status()["tenants"] if x["id"] == vm]
        assert time.monotonic() - gone < 1.0
    finally:
        watch.close()


@pytest.mark.req("RT-5")
def test_status_reports_devices_sockets_and_counters(inst: Instance) -> None:
    with RawTenant(inst.dir, name="conformance-rt-5") as t:
        socks = [t.new_id() for _ in range(3)]
        for s in socks:
            assert t.do(Op.SOCKET, s, socket.AF_INET | socket.SOCK_DGRAM << 16) == 0
        assert t.do(Op.SEND, socks[0], 0, b"12345") == -errno.EDESTADDRREQ  # no peer: counted
        doc = inst.status()
        for key, kind in (("instance", str), ("pid", int), ("sockets", int), ("in_flight", int),
                          ("tenants", list), ("nsms", list)):
            assert isinstance(doc[key], kind), key
        assert doc["ok"] is True and doc["instance"] == inst.name
        os.kill(doc["pid"], 0)  # the CoreEngine's own, alive
        (me,) = [x for x in doc["tenants"] if x["id"] == t.id]
        assert (me["name"], me["pid"], Path(me["path"]), me["sockets"]) == (
            "conformance-rt-5", os.getpid(), t.path, 3)
        c = me["counters"]
        assert c["nqes_in"] == 4 and c["nqes_out"] == 4
        assert c["ops"] == {"SOCKET": 3, "SEND": 1}
        assert c["bytes_in"] == 5 and c["rejected"] == 0 and c["stale"] == 0
        assert doc["sockets"] >= 3
        nsm = doc["nsms"][0]
        assert nsm["counters"]["ops"].get("SOCKET|REPLY", 0) >= 3
        json.dumps(doc)  # plain JSON all through


@pytest.mark.req("RT-6")
def test_shutdown_unplugs_everything_and_exits(engine: Any, nk_runtime: Runtime) -> None:
    inst = nk_runtime.new()
    try:
        t = RawTenant(inst.dir)
        nsm_path = Path(inst.status()["nsms"][0]["path"])
        assert control(inst.dir, {"cmd": "shutdown"}) == {"ok": True}
        assert t.ctl.at_eof(2.0), "the tenant's control connection stayed open"
        assert inst.engine.wait(2.0) == 0, "the CoreEngine did not exit with status 0"
        assert not (inst.dir / "engine.sock").exists()
        assert not t.path.exists() and not nsm_path.exists()
        assert not list(inst.dir.glob("*.nk"))
        t.close()
    finally:
        inst.stop()
