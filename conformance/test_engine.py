"""The CoreEngine's switching core (spec/coreengine.md CE-7..CE-24, spec/security.md SEC-*).

The ``coreengine`` role is sans-IO and a value: ``Engine(**config)`` (config:
``policy``, ``slices``, ``max_inflight``), ``attach(engine, geometry,
ident=None) -> (engine, dev)``, ``detach(engine, dev) -> (engine, outputs)``,
``switch(engine, dev, qset, ring, raw) -> (engine, outputs)``, ``counters(engine,
dev)`` (``nqes_in``, ``nqes_out``, ``bytes_in``, ``bytes_out``, ``rejected``,
``stale``, ``ops``), ``open_sockets(engine, dev)``, ``assign(mapping)``,
``first_nsm``, ``Dev(kind, ident)``, ``EngineError`` and the device types
``Geometry``, ``Kind``, ``RingId``. An output has ``dest`` (``kind``,
``ident``, ``qset``, ``ring``) and ``raw`` (32 bytes).

NQEs are built and read with the reference codec: it is the oracle for the
bytes, the engine under test only ever sees and produces bytes. A *rig* holds
an engine with tenants and NSMs and plays the NSMs' part where a test needs
one.
"""

from __future__ import annotations

import dataclasses
import errno as E
import itertools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from netkernel.reference import nqe as ref_nqe

NQE = ref_nqe.NQE
Op = ref_nqe.Op
R = ref_nqe.REPLY_BIT
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
GRAIN = 4 << 10
DATA = 64 << 10
SEND_HALF = 32 << 10
STREAM = 2 | (1 << 16)  # AF_INET, SOCK_STREAM
EVENTS = (Op.EV_DATA, Op.EV_FIN, Op.EV_ERROR, Op.EV_ACCEPTABLE)
ON_SEND_RING = (Op.SEND, Op.BUF_RETURN, *EVENTS)
BUFFER_OPS = (Op.BIND, Op.CONNECT, Op.ACCEPT, Op.SEND, Op.SETSOCKOPT, Op.GETSOCKOPT,
              Op.GETSOCKNAME, Op.GETPEERNAME)
BUFFERLESS_OPS = (Op.LISTEN, Op.SHUTDOWN, Op.CLOSE)
SOCKET_CALLS = (*BUFFER_OPS, *BUFFERLESS_OPS)


class Out(NamedTuple):
    """One output of the engine, decoded."""

    kind: Any
    ident: int
    qset: int
    ring: Any
    nqe: NQE

    @property
    def op(self) -> int:
        return self.nqe.op

    @property
    def result(self) -> int:
        return self.nqe.result


def raw_of(msg: NQE | bytes) -> bytes:
    return msg if isinstance(msg, bytes) else ref_nqe.pack(msg)


def with_reserved(msg: NQE, reserved: bytes) -> bytes:
    return ref_nqe.pack(msg)[:29] + reserved


def with_op(msg: NQE, op: int) -> bytes:
    return bytes([op]) + ref_nqe.pack(msg)[1:]


class Rig:
    """An engine with tenants and NSMs, driven through the ``coreengine`` role."""

    def __init__(self, ce: Any, *, tenants: int = 2, nsms: int = 1, t_qsets: int = 2,
                 **config: Any) -> None:
        self.ce = ce
        self.T, self.N = ce.Kind.TENANT, ce.Kind.NSM
        self.JOB, self.SEND = ce.RingId.JOB, ce.RingId.SEND
        self.COMPLETION, self.RECEIVE = ce.RingId.COMPLETION, ce.RingId.RECEIVE
        self.e = ce.Engine(**config)
        self.tgeo = ce.Geometry(n_qsets=t_qsets, ring_entries=8, data_size=DATA,
                                send_size=SEND_HALF, buf_size=GRAIN, kind=self.T)
        self.ngeo = ce.Geometry(n_qsets=1, ring_entries=8, data_size=8 << 10,
                                send_size=4 << 10, buf_size=GRAIN, kind=self.N)
        self.tenants = [self.attach(self.tgeo) for _ in range(tenants)]
        self.nsms = [self.attach(self.ngeo) for _ in range(nsms)]
        self.nsm_side: dict[tuple[int, int, int], tuple[int, int, int]] = {}

    # -- plumbing ----------------------------------------------------------------------
    def attach(self, geo: Any, ident: int | None = None) -> Any:
        self.e, dev = self.ce.attach(self.e, geo, ident)
        return dev

    def dev(self, kind: Any, ident: int) -> Any:
        return self.ce.Dev(kind, ident)

    def decode(self, outputs: list[Any]) -> list[Out]:
        return [Out(o.dest.kind, o.dest.ident, o.dest.qset, o.dest.ring, ref_nqe.unpack(o.raw))
                for o in outputs]

    def detach(self, dev: Any) -> list[Out]:
        self.e, outs = self.ce.detach(self.e, dev)
        return self.decode(outs)

    def feed(self, dev: Any, msg: NQE | bytes, *, qset: int = 0, ring: Any = None) -> list[Out]:
        raw = raw_of(msg)
        if ring is None:
            ring = self.SEND if raw[0] in ON_SEND_RING else self.JOB
        self.e, outs = self.ce.switch(self.e, dev, qset, ring, raw)
        return self.decode(outs)

    def counters(self, dev: Any) -> Any:
        return self.ce.counters(self.e, dev)

    # -- the NSM's part --------------------------------------------------------------------
    def nsm_of(self, out: Out) -> Any:
        return self.dev(out.kind, out.ident)

    def reply(self, out: Out, result: int, **fields: Any) -> list[Out]:
        """The NSM that got ``out`` answers it with ``result``."""
        msg = dataclasses.replace(out.nqe.reply(result), **fields)
        return self.feed(self.nsm_of(out), msg, qset=out.qset, ring=self.JOB)

    def grant_maps(self, outs: list[Out], result: int = 0) -> list[Out]:
        """Answer every TENANT_MAP among ``outs``; the other outputs and what follows."""
        rest: list[Out] = []
        for o in outs:
            if o.kind is self.N and o.op == Op.TENANT_MAP:
                rest += self.reply(o, result)
            else:
                rest.append(o)
        return rest

    def open(self, tenant: Any, sock: int, *, qset: int = 0, tag: int = 1) -> Out:
        """Open tenant socket ``sock``; returns the SOCKET as the NSM got it."""
        outs = self.grant_maps(self.feed(tenant, NQE(op=Op.SOCKET, sock_id=sock,
                                                     op_data=STREAM, tag=tag), qset=qset))
        fwd = one(o for o in outs if o.kind is self.N and o.op == Op.SOCKET)
        back = self.reply(fwd, 0)
        assert [(o.ident, o.op, o.result, o.nqe.sock_id, o.nqe.tag) for o in back] == \
            [(tenant.ident, Op.SOCKET | R, 0, sock, tag)]
        self.nsm_side[(tenant.ident, qset, sock)] = (fwd.ident, fwd.qset, fwd.nqe.sock_id)
        return fwd

    def call(self, tenant: Any, op: Op, sock: int, *, qset: int = 0, **fields: Any) -> list[Out]:
        return self.feed(tenant, NQE(op=op, sock_id=sock, **fields), qset=qset)

    def event(self, nkey: tuple[int, int, int], op: Op, **fields: Any) -> list[Out]:
        nsm, q, sock = nkey
        return self.feed(self.dev(self.N, nsm), NQE(op=op, sock_id=sock, **fields), qset=q)


def one(outs: Iterator[Out] | list[Out]) -> Out:
    got = list(outs)
    assert len(got) == 1, got
    return got[0]


def refused(outs: list[Out], dev: Any, op: int, errno: int, qset: int = 0) -> None:
    """Exactly one output: the error answer to ``dev`` on its COMPLETION ring."""
    o = one(outs)
    assert (o.kind, o.ident, o.qset, o.ring.name) == (dev.kind, dev.ident, qset, "COMPLETION")
    assert (o.op, o.result) == (op, -errno), o
    assert o.nqe.reserved == b"\x00\x00\x00"


def forwarded(outs: list[Out], rig: Rig, op: int) -> Out:
    o = one(outs)
    assert (o.kind, o.op) == (rig.N, op), o
    return o


@pytest.fixture
def rig(coreengine: Any) -> Rig:
    return Rig(coreengine)


# -- CE-8, SEC-2: stamping -------------------------------------------------------------------


@pytest.mark.req("CE-8", "SEC-2")
@given(wire_vm=st.integers(0, 255), wire_q=st.integers(0, 255), q=st.integers(0, 1))
def test_vm_id_and_queue_set_come_from_the_device(coreengine: Any, wire_vm: int, wire_q: int,
                                                  q: int) -> None:
    rig = Rig(coreengine)
    a, b = rig.tenants
    outs = rig.feed(a, NQE(op=Op.SOCKET, sock_id=5, op_data=STREAM, vm_id=wire_vm,
                           qset=wire_q, tag=3), qset=q)
    fmap = one(o for o in outs if o.op == Op.TENANT_MAP)
    assert fmap.nqe.vm_id == a.ident and fmap.nqe.op_data == a.ident
    fwd = forwarded(rig.reply(fmap, 0), rig, Op.SOCKET)
    assert fwd.nqe.vm_id == a.ident  # the NSM learns the true tenant
    back = one(rig.reply(fwd, 0, vm_id=wire_vm))
    assert (back.ident, back.nqe.vm_id, back.qset, back.nqe.qset) == (a.ident, a.ident, q, q)
    # the socket lives on the queue set it was read from, whatever the qset byte said
    call = rig.feed(a, NQE(op=Op.LISTEN, sock_id=5, op_data=1, vm_id=b.ident, qset=1 - q),
                    qset=q)
    assert forwarded(call, rig, Op.LISTEN).nqe.vm_id == a.ident
    refused(rig.feed(a, NQE(op=Op.LISTEN, sock_id=5, op_data=1, qset=q), qset=1 - q),
            a, Op.LISTEN | R, E.EBADF, qset=1 - q)
    # B forging A's VM ID reaches nothing of A's
    refused(rig.feed(b, NQE(op=Op.CLOSE, sock_id=5, vm_id=a.ident, qset=q), qset=q),
            b, Op.CLOSE | R, E.EBADF, qset=q)


# -- CE-9, CE-4, SEC-1: translation ------------------------------------------------------------


@pytest.mark.req("CE-9", "CE-4", "SEC-1")
@pytest.mark.parametrize("op", SOCKET_CALLS)
def test_another_tenants_socket_id_is_ebadf(rig: Rig, op: Op) -> None:
    a, b = rig.tenants
    rig.open(a, 5)
    size = 16 if op in BUFFER_OPS else 0
    op_data = 9 if op == Op.ACCEPT else 0
    before = rig.counters(b).rejected
    outs = rig.feed(b, NQE(op=op, sock_id=5, vm_id=a.ident, size=size, op_data=op_data, tag=7))
    refused(outs, b, op | R, E.EBADF)
    assert rig.counters(b).rejected == before + 1
    # A's socket is untouched and still A's
    fwd = forwarded(rig.call(a, Op.SHUTDOWN, 5, op_data=2, tag=8), rig, Op.SHUTDOWN)
    assert fwd.nqe.sock_id == rig.nsm_side[(a.ident, 0, 5)][2]
    assert rig.ce.open_sockets(rig.e, a) == 1 and rig.ce.open_sockets(rig.e, b) == 0


@pytest.mark.req("CE-9")
@given(sock=st.integers(1, U32), op=st.sampled_from(SOCKET_CALLS))
def test_calls_are_forwarded_with_the_nsm_key(coreengine: Any, sock: int, op: Op) -> None:
    rig = Rig(coreengine)
    a = rig.tenants[0]
    opened = rig.open(a, sock)
    size = 16 if op in BUFFER_OPS else 0
    op_data = (sock % U32) + 1 if op == Op.ACCEPT else 0
    fwd = forwarded(rig.call(a, op, sock, size=size, op_data=op_data, tag=2), rig, op)
    assert (fwd.ident, fwd.qset, fwd.nqe.sock_id) == (opened.ident, opened.qset,
                                                      opened.nqe.sock_id)
    assert fwd.nqe.tag == 2
    refused(rig.call(a, op, sock % U32 + 1, size=size, op_data=op_data), a, op | R, E.EBADF)


# -- CE-10, CE-7: socket IDs and the entry life cycle ------------------------------------------


@pytest.mark.req("CE-10")
def test_socket_ids_chosen_by_the_tenant_are_checked(rig: Rig) -> None:
    a, b = rig.tenants
    refused(rig.call(a, Op.SOCKET, 0, op_data=STREAM), a, Op.SOCKET | R, E.EINVAL)
    outs = rig.grant_maps(rig.call(a, Op.SOCKET, 5, op_data=STREAM, tag=1))
    pending = forwarded(outs, rig, Op.SOCKET)
    refused(rig.call(a, Op.SOCKET, 5, op_data=STREAM, tag=2), a, Op.SOCKET | R, E.EEXIST)
    rig.reply(pending, 0)
    refused(rig.call(a, Op.SOCKET, 5, op_data=STREAM, tag=3), a, Op.SOCKET | R, E.EEXIST)
    # the same tenant ID in another tenant, and the NSM never sees tenant IDs
    other = rig.open(b, 5)
    assert other.nqe.sock_id != pending.nqe.sock_id


@pytest.mark.req("CE-10", "CE-7")
@given(new=st.integers(1, U32), nowait=st.booleans())
def test_accept_gets_a_fresh_nsm_socket_id(coreengine: Any, new: int, nowait: bool) -> None:
    rig = Rig(coreengine)
    a = rig.tenants[0]
    listening = 7 if new != 7 else 8
    lst = rig.open(a, listening)
    bit = int(nowait) << 32
    refused(rig.call(a, Op.ACCEPT, listening, op_data=bit), a, Op.ACCEPT | R, E.EINVAL)
    refused(rig.call(a, Op.ACCEPT, listening, op_data=listening | bit), a, Op.ACCEPT | R,
            E.EEXIST)
    refused(rig.call(a, Op.ACCEPT, listening, op_data=new | (1 << 40)), a, Op.ACCEPT | R,
            E.EINVAL)
    fwd = forwarded(rig.call(a, Op.ACCEPT, listening, op_data=new | bit, tag=4), rig, Op.ACCEPT)
    nsm_new = fwd.nqe.op_data & U32
    assert fwd.nqe.op_data >> 32 == int(nowait)
    assert nsm_new not in (0, lst.nqe.sock_id)
    assert fwd.nqe.sock_id == lst.nqe.sock_id
    refused(rig.call(a, Op.SOCKET, new, op_data=STREAM, tag=9), a, Op.SOCKET | R, E.EEXIST)
    back = one(rig.reply(fwd, 16))
    assert (back.op, back.result, back.nqe.sock_id, back.nqe.tag) == (Op.ACCEPT | R, 16,
                                                                      listening, 4)
    # the accepted connection now has an entry, on the listening socket's NSM (CE-7, CE-15)
    call = forwarded(rig.call(a, Op.SHUTDOWN, new, op_data=1), rig, Op.SHUTDOWN)
    assert (call.ident, call.qset, call.nqe.sock_id) == (fwd.ident, fwd.qset, nsm_new)


@pytest.mark.req("CE-7")
def test_entries_exist_from_successful_reply_to_close(rig: Rig) -> None:
    a = rig.tenants[0]
    nsm = rig.nsms[0]
    outs = rig.grant_maps(rig.call(a, Op.SOCKET, 5, op_data=STREAM, tag=1))
    pending = forwarded(outs, rig, Op.SOCKET)
    refused(rig.call(a, Op.CLOSE, 5), a, Op.CLOSE | R, E.EBADF)  # no entry before the reply
    assert rig.ce.open_sockets(rig.e, a) == 0
    failed = one(rig.reply(pending, -E.EAFNOSUPPORT))
    assert (failed.op, failed.result) == (Op.SOCKET | R, -E.EAFNOSUPPORT)
    refused(rig.call(a, Op.CLOSE, 5), a, Op.CLOSE | R, E.EBADF)  # a failure inserts nothing
    rig.open(a, 5)  # and frees the ID
    assert rig.ce.open_sockets(rig.e, a) == rig.ce.open_sockets(rig.e, nsm) == 1
    close = forwarded(rig.call(a, Op.CLOSE, 5, tag=2), rig, Op.CLOSE)
    forwarded(rig.call(a, Op.SHUTDOWN, 5, tag=3), rig, Op.SHUTDOWN)  # still there until the reply
    done = one(rig.reply(close, 0))
    assert (done.op, done.result, done.nqe.sock_id) == (Op.CLOSE | R, 0, 5)
    refused(rig.call(a, Op.SHUTDOWN, 5, tag=4), a, Op.SHUTDOWN | R, E.EBADF)
    assert rig.ce.open_sockets(rig.e, a) == rig.ce.open_sockets(rig.e, nsm) == 0


# -- CE-11, SEC-4: replies -----------------------------------------------------------------------


@pytest.mark.req("CE-11", "SEC-4")
@given(ptr=st.integers(0, U64), size=st.integers(0, U32), result=st.integers(-4095, 1 << 40))
def test_replies_carry_the_requests_buffer(coreengine: Any, ptr: int, size: int,
                                           result: int) -> None:
    rig = Rig(coreengine)
    a = rig.tenants[0]
    rig.open(a, 5)
    fwd = forwarded(rig.call(a, Op.GETSOCKNAME, 5, data_ptr=64, size=28, tag=6), rig,
                    Op.GETSOCKNAME)
    back = one(rig.reply(fwd, result, data_ptr=ptr, size=size))
    assert (back.ident, back.ring.name, back.op, back.result) == (a.ident, "COMPLETION",
                                                                  Op.GETSOCKNAME | R, result)
    assert (back.nqe.sock_id, back.nqe.tag, back.nqe.data_ptr, back.nqe.size) == (5, 6, 64, 28)


@pytest.mark.req("CE-11")
def test_a_reply_must_match_a_request_in_flight(rig: Rig) -> None:
    a = rig.tenants[0]
    nsm = rig.nsms[0]
    rig.open(a, 5)
    fwd = forwarded(rig.call(a, Op.CONNECT, 5, data_ptr=0, size=16, tag=2), rig, Op.CONNECT)
    refused(rig.call(a, Op.LISTEN, 5, op_data=1, tag=2), a, Op.LISTEN | R, E.EINVAL)  # NQE-9
    before = rig.counters(nsm).rejected
    wrong = [dataclasses.replace(fwd.nqe.reply(0), tag=3),
             dataclasses.replace(fwd.nqe.reply(0), op=Op.BIND | R),
             dataclasses.replace(fwd.nqe.reply(0), sock_id=fwd.nqe.sock_id + 1)]
    for msg in wrong:
        assert rig.feed(nsm, msg, ring=rig.JOB) == []
    assert rig.counters(nsm).rejected == before + len(wrong)
    unknown = one(rig.feed(nsm, dataclasses.replace(fwd.nqe.reply(-E.ENOSYS), op=0xFF)))
    assert (unknown.ident, unknown.op, unknown.result, unknown.nqe.tag) == (a.ident, 0xFF,
                                                                            -E.ENOSYS, 2)
    assert rig.reply(fwd, 0) == []  # answered once only


# -- CE-12, SEC-4: events ------------------------------------------------------------------------


@pytest.mark.req("CE-12", "SEC-4")
def test_events_reach_the_tenant_socket_the_nsm_serves(coreengine: Any) -> None:
    rig = Rig(coreengine, nsms=2, policy=coreengine.assign({1: 1, 2: 2}))
    a, b = rig.tenants
    nsm1, nsm2 = rig.nsms
    rig.open(a, 5, qset=1)
    rig.open(b, 5)
    nkey = rig.nsm_side[(a.ident, 1, 5)]
    ev = one(rig.event(nkey, Op.EV_FIN, tag=0))
    assert (ev.ident, ev.qset, ev.ring.name, ev.op, ev.nqe.sock_id, ev.nqe.vm_id) == \
        (a.ident, 1, "RECEIVE", Op.EV_FIN, 5, a.ident)
    start = SEND_HALF
    data = one(rig.event(nkey, Op.EV_DATA, data_ptr=start, size=100))
    assert (data.ident, data.op, data.nqe.data_ptr, data.nqe.size) == (a.ident, Op.EV_DATA,
                                                                       start, 100)
    assert rig.counters(a).bytes_out == 100 and rig.counters(nsm1).bytes_in == 100
    # what NSM 1 may not do: reach NSM 2's socket, write outside its slice, overlap a held buffer
    before = rig.counters(nsm1).rejected
    bad = [
        ((nkey[0], nkey[1], nkey[2] + 100), Op.EV_FIN, {}),
        (nkey, Op.EV_DATA, {"data_ptr": 0, "size": 100}),  # send half
        (nkey, Op.EV_DATA, {"data_ptr": DATA - 10, "size": 100}),  # past the area
        (nkey, Op.EV_DATA, {"data_ptr": U64, "size": 2}),  # wraps
        (nkey, Op.EV_DATA, {"data_ptr": start + 50, "size": 10}),  # overlaps a held buffer
        (nkey, Op.EV_DATA, {"data_ptr": start + GRAIN, "size": 0}),  # empty
        (nkey, Op.EV_DATA, {"data_ptr": start + GRAIN, "size": 10, "op_data": 16}),  # prefix
        (nkey, Op.EV_ERROR, {"data_ptr": start + GRAIN, "size": 10}),  # buffer on EV_ERROR
    ]
    for key, op, fields in bad:
        assert rig.event(key, op, **fields) == []
    assert rig.counters(nsm1).rejected == before + len(bad)
    # NSM 2 naming A's NSM socket ID reaches at most its own socket of that number, never A
    outs = rig.event((nsm2.ident, *nkey[1:]), Op.EV_FIN)
    assert all(o.ident != a.ident for o in outs)
    assert rig.nsm_side[(b.ident, 0, 5)][0] == nsm2.ident


# -- CE-13: rings ------------------------------------------------------------------------------


@pytest.mark.req("CE-13")
def test_every_nqe_goes_to_its_ring(rig: Rig) -> None:
    a = rig.tenants[0]
    outs = rig.call(a, Op.SOCKET, 5, op_data=STREAM, tag=1)
    fmap = one(outs)
    assert (fmap.kind, fmap.qset, fmap.ring.name, fmap.op) == (rig.N, 0, "RECEIVE",
                                                               Op.TENANT_MAP)
    sock = one(rig.reply(fmap, 0))
    assert (sock.kind, sock.ring.name) == (rig.N, "COMPLETION")
    assert one(rig.reply(sock, 0)).ring.name == "COMPLETION"
    for op, size, ring in ((Op.BIND, 16, "COMPLETION"), (Op.SEND, 10, "RECEIVE"),
                           (Op.LISTEN, 0, "COMPLETION")):
        fwd = forwarded(rig.call(a, op, 5, size=size, data_ptr=GRAIN * 2, tag=op), rig, op)
        assert fwd.ring.name == ring, op
        assert one(rig.reply(fwd, 0)).ring.name == "COMPLETION"
    nkey = (sock.ident, sock.qset, sock.nqe.sock_id)
    data = one(rig.event(nkey, Op.EV_DATA, data_ptr=SEND_HALF, size=10))
    assert data.ring.name == "RECEIVE"
    ret = one(rig.feed(a, NQE(op=Op.BUF_RETURN, data_ptr=SEND_HALF, size=10), qset=1))
    assert (ret.kind, ret.ring.name) == (rig.N, "RECEIVE")
    refused(rig.feed(a, NQE(op=Op.CLOSE, sock_id=99), qset=1), a, Op.CLOSE | R, E.EBADF, qset=1)


# -- CE-14, SEC-3: buffers -----------------------------------------------------------------------

offsets = st.one_of(st.integers(0, DATA + GRAIN), st.integers(U64 - (1 << 12), U64),
                    st.sampled_from([0, SEND_HALF - 1, SEND_HALF, U64, 1 << 63]))
sizes = st.one_of(st.integers(0, DATA), st.sampled_from([0, 1, U32]))


@pytest.mark.req("CE-14", "SEC-3", "NQE-6", "NQE-14")
@given(op=st.sampled_from(BUFFER_OPS), ptr=offsets, size=sizes)
def test_buffers_outside_the_send_half_are_efault(coreengine: Any, op: Op, ptr: int,
                                                   size: int) -> None:
    rig = Rig(coreengine)
    a = rig.tenants[0]
    rig.open(a, 5)
    op_data = 9 if op == Op.ACCEPT else 0
    outs = rig.call(a, op, 5, data_ptr=ptr, size=size, op_data=op_data, tag=2)
    inside = size == 0 or (ptr <= SEND_HALF and size <= SEND_HALF - ptr)
    if inside:
        fwd = forwarded(outs, rig, op)
        assert (fwd.nqe.data_ptr, fwd.nqe.size) == ((ptr if size else 0), size)
    else:
        refused(outs, a, op | R, E.EFAULT)


@pytest.mark.req("CE-14")
def test_buffer_rules_of_each_op(rig: Rig) -> None:
    a = rig.tenants[0]
    rig.open(a, 5)
    for op in BUFFERLESS_OPS:
        refused(rig.call(a, op, 5, data_ptr=0, size=8), a, op | R, E.EINVAL)
    refused(rig.call(a, Op.SOCKET, 6, op_data=STREAM, size=8), a, Op.SOCKET | R, E.EINVAL)
    fwd = forwarded(rig.call(a, Op.LISTEN, 5, data_ptr=U64, size=0, op_data=3), rig, Op.LISTEN)
    assert fwd.nqe.data_ptr == 0
    refused(rig.call(a, Op.SEND, 5, data_ptr=0, size=15, op_data=16 << 32), a, Op.SEND | R,
            E.EINVAL)  # address prefix longer than the buffer
    # BUF-3: a SEND buffer is lent until its reply
    send = forwarded(rig.call(a, Op.SEND, 5, data_ptr=0, size=100, tag=1), rig, Op.SEND)
    assert rig.counters(a).bytes_in == 100
    refused(rig.call(a, Op.SEND, 5, data_ptr=64, size=10, tag=2), a, Op.SEND | R, E.EINVAL)
    rig.reply(send, 100)
    forwarded(rig.call(a, Op.SEND, 5, data_ptr=64, size=10, tag=2), rig, Op.SEND)
    # BUF-5: BUF_RETURN names exactly a buffer the tenant holds, in the receive half
    nkey = rig.nsm_side[(a.ident, 0, 5)]
    rig.event(nkey, Op.EV_DATA, data_ptr=SEND_HALF, size=50)
    refused(rig.feed(a, NQE(op=Op.BUF_RETURN, data_ptr=0, size=50)), a, Op.BUF_RETURN | R,
            E.EFAULT)
    refused(rig.feed(a, NQE(op=Op.BUF_RETURN, data_ptr=SEND_HALF, size=40)), a,
            Op.BUF_RETURN | R, E.EINVAL)
    refused(rig.feed(a, NQE(op=Op.BUF_RETURN, sock_id=5, data_ptr=SEND_HALF, size=50)), a,
            Op.BUF_RETURN | R, E.EINVAL)
    ret = one(rig.feed(a, NQE(op=Op.BUF_RETURN, data_ptr=SEND_HALF, size=50)))
    assert (ret.kind, ret.ident, ret.op, ret.nqe.vm_id) == (rig.N, nkey[0], Op.BUF_RETURN,
                                                            a.ident)
    refused(rig.feed(a, NQE(op=Op.BUF_RETURN, data_ptr=SEND_HALF, size=50)), a,
            Op.BUF_RETURN | R, E.EINVAL)


# -- CE-15..CE-17: NSM selection and slices --------------------------------------------------------


@pytest.mark.req("CE-15")
def test_the_policy_picks_the_nsm(coreengine: Any) -> None:
    rig = Rig(coreengine, nsms=0)
    a, b = rig.tenants
    refused(rig.call(a, Op.SOCKET, 5, op_data=STREAM), a, Op.SOCKET | R, E.ENETDOWN)
    rig.attach(rig.ngeo, 2)
    assert rig.open(a, 5).ident == 2
    rig.attach(rig.ngeo, 1)
    assert rig.open(a, 6).ident == 2  # default: the NSM already serving the tenant
    assert rig.open(b, 5).ident == 1  # else the lowest NSM ID
    picky = Rig(coreengine, nsms=2, policy=coreengine.assign({1: 2}))
    assert picky.open(picky.tenants[0], 5).ident == 2
    assert picky.open(picky.tenants[1], 5).ident == 1
    nobody = Rig(coreengine, policy=lambda engine, vm: None)
    refused(nobody.call(nobody.tenants[0], Op.SOCKET, 5, op_data=STREAM), nobody.tenants[0],
            Op.SOCKET | R, E.ENETDOWN)


@pytest.mark.req("CE-16")
def test_tenant_map_comes_first_and_holds_sockets(rig: Rig) -> None:
    a = rig.tenants[0]
    fmap = one(rig.call(a, Op.SOCKET, 5, op_data=STREAM, tag=1))
    assert (fmap.op, fmap.nqe.op_data, fmap.nqe.tag, fmap.nqe.sock_id, fmap.nqe.vm_id) == \
        (Op.TENANT_MAP, a.ident, a.ident, 0, a.ident)
    assert rig.call(a, Op.SOCKET, 6, op_data=STREAM, tag=1) == []  # held as well
    released = rig.reply(fmap, 0)
    assert [(o.kind, o.op) for o in released] == [(rig.N, Op.SOCKET)] * 2
    socks = [o.nqe.sock_id for o in released]
    assert len(set(socks)) == 2
    assert forwarded(rig.call(a, Op.SOCKET, 7, op_data=STREAM, tag=1), rig, Op.SOCKET)
    # a failed TENANT_MAP fails what it held, and the next SOCKET maps again
    b = rig.tenants[1]
    fmap = one(rig.call(b, Op.SOCKET, 5, op_data=STREAM, tag=1))
    rig.call(b, Op.SOCKET, 6, op_data=STREAM, tag=2)
    failed = rig.reply(fmap, -E.EACCES)
    assert [(o.ident, o.op, o.result, o.nqe.sock_id) for o in failed] == [
        (b.ident, Op.SOCKET | R, -E.EACCES, 5), (b.ident, Op.SOCKET | R, -E.EACCES, 6)]
    again = one(rig.call(b, Op.SOCKET, 5, op_data=STREAM, tag=3))
    assert again.op == Op.TENANT_MAP and (again.nqe.data_ptr, again.nqe.size) == \
        (fmap.nqe.data_ptr, fmap.nqe.size)


@pytest.mark.req("CE-16", "CE-11")
def test_a_held_socket_answered_before_tenant_map_is_held_no_more(rig: Rig) -> None:
    a, nsm = rig.tenants[0], rig.nsms[0]
    fmap = one(rig.call(a, Op.SOCKET, 5, op_data=STREAM, tag=7))
    assert fmap.op == Op.TENANT_MAP
    # the NSM never got the SOCKET: it guesses the socket ID the engine chose, and the tag
    answered: list[Out] = []
    for guess in range(1, 9):
        answered += rig.feed(nsm, NQE(op=Op.SOCKET | R, sock_id=guess, tag=7), ring=rig.JOB)
    assert [(o.ident, o.op, o.result, o.nqe.sock_id) for o in answered] == \
        [(a.ident, Op.SOCKET | R, 0, 5)]
    assert rig.reply(fmap, 0) == []  # nothing held any more: the SOCKET is not forwarded


@pytest.mark.req("CE-17", "BUF-8")
def test_receive_slices_are_disjoint_granules(coreengine: Any) -> None:
    order = iter([1, 2, 3, 3])
    rig = Rig(coreengine, nsms=3, slices=2, policy=lambda engine, vm: next(order))
    a = rig.tenants[0]
    maps = []
    for sock in (5, 6):
        fmap = one(rig.call(a, Op.SOCKET, sock, op_data=STREAM))
        maps.append((fmap.nqe.data_ptr, fmap.nqe.size))
        rig.reply(fmap, 0)
    for off, size in maps:
        assert off >= SEND_HALF and size <= DATA - off and size > 0
        assert off % GRAIN == 0 and size % GRAIN == 0
    (o1, s1), (o2, s2) = maps
    assert o1 + s1 <= o2 or o2 + s2 <= o1
    refused(rig.call(a, Op.SOCKET, 7, op_data=STREAM), a, Op.SOCKET | R, E.ENOBUFS)
    rig.detach(rig.dev(rig.N, 1))
    fmap = one(rig.call(a, Op.SOCKET, 8, op_data=STREAM))  # NSM 1's slice is free again
    assert (fmap.ident, fmap.nqe.data_ptr, fmap.nqe.size) == (3, *maps[0])
    whole = Rig(coreengine)
    fmap = one(whole.call(whole.tenants[0], Op.SOCKET, 5, op_data=STREAM))
    assert (fmap.nqe.data_ptr, fmap.nqe.size) == (SEND_HALF, DATA - SEND_HALF)


# -- CE-18..CE-22, CE-24, SEC-11: devices coming and going -------------------------------------


@pytest.mark.req("CE-18", "SEC-11")
def test_tenant_detach_unmaps_and_drains(rig: Rig) -> None:
    a, b = rig.tenants
    nsm = rig.nsms[0]
    rig.open(a, 5)
    rig.open(a, 6)
    rig.open(b, 5)
    send = forwarded(rig.call(a, Op.SEND, 5, data_ptr=0, size=10, tag=2), rig, Op.SEND)
    nkey = rig.nsm_side[(a.ident, 0, 6)]
    outs = rig.detach(a)
    unmap = one(outs)
    assert (unmap.ident, unmap.ring.name, unmap.qset, unmap.op, unmap.nqe.op_data,
            unmap.nqe.tag, unmap.nqe.sock_id) == (nsm.ident, "RECEIVE", 0, Op.TENANT_UNMAP,
                                                  a.ident, a.ident, 0)
    assert rig.ce.open_sockets(rig.e, nsm) == 1
    c = rig.counters(nsm)
    assert rig.reply(send, 10) == [] and rig.event(nkey, Op.EV_FIN) == []
    after = rig.counters(nsm)
    assert (after.stale, after.rejected) == (c.stale + 2, c.rejected)  # not the NSM's fault
    with pytest.raises(rig.ce.EngineError):
        rig.attach(rig.tgeo, a.ident)  # the VM ID is draining
    assert rig.attach(rig.tgeo).ident not in (a.ident, b.ident)
    assert rig.reply(unmap, 0) == []
    assert rig.event(nkey, Op.EV_FIN) == [] and rig.counters(nsm).rejected == c.rejected + 1
    again = rig.attach(rig.tgeo, a.ident)
    assert rig.counters(again).nqes_in == 0 and rig.ce.open_sockets(rig.e, again) == 0
    refused(rig.call(again, Op.CLOSE, 5), again, Op.CLOSE | R, E.EBADF)
    assert forwarded(rig.call(b, Op.LISTEN, 5, op_data=1), rig, Op.LISTEN)


@pytest.mark.req("CE-19", "SEC-11")
def test_nsm_detach_answers_what_it_owed(rig: Rig) -> None:
    a, b = rig.tenants
    nsm = rig.nsms[0]
    for sock in (1, 2, 3):
        rig.open(a, sock)
    forwarded(rig.call(a, Op.CLOSE, 2, tag=1), rig, Op.CLOSE)
    forwarded(rig.call(a, Op.CONNECT, 3, data_ptr=0, size=16, tag=1), rig, Op.CONNECT)
    forwarded(rig.call(a, Op.SEND, 1, data_ptr=GRAIN, size=10, tag=1), rig, Op.SEND)
    forwarded(rig.call(a, Op.SOCKET, 4, op_data=STREAM, tag=1), rig, Op.SOCKET)
    held = one(rig.call(b, Op.SOCKET, 9, op_data=STREAM, tag=5))  # b's TENANT_MAP unanswered
    assert held.op == Op.TENANT_MAP
    outs = rig.detach(nsm)
    replies = sorted((o.ident, o.nqe.sock_id, o.op, o.result) for o in outs
                     if o.ring.name == "COMPLETION")
    assert replies == sorted([
        (a.ident, 1, Op.SEND | R, -E.ECONNRESET), (a.ident, 2, Op.CLOSE | R, 0),
        (a.ident, 3, Op.CONNECT | R, -E.ECONNRESET), (a.ident, 4, Op.SOCKET | R, -E.ECONNRESET),
        (b.ident, 9, Op.SOCKET | R, -E.ECONNRESET)])
    resets = sorted((o.ident, o.nqe.sock_id, o.op, o.result) for o in outs
                    if o.ring.name == "RECEIVE")
    assert resets == [(a.ident, 1, Op.EV_ERROR, -E.ECONNRESET),
                      (a.ident, 3, Op.EV_ERROR, -E.ECONNRESET)]
    assert all(o.kind is rig.T for o in outs)
    assert rig.ce.open_sockets(rig.e, a) == 0
    refused(rig.call(a, Op.CLOSE, 1), a, Op.CLOSE | R, E.EBADF)
    refused(rig.call(a, Op.SOCKET, 5, op_data=STREAM), a, Op.SOCKET | R, E.ENETDOWN)
    rig.attach(rig.ngeo)
    fmap = one(rig.call(a, Op.SOCKET, 5, op_data=STREAM, tag=2))
    assert fmap.op == Op.TENANT_MAP  # the new NSM is mapped, into the freed slice
    rig.reply(fmap, 0)
    rig.reply(forwarded(rig.call(a, Op.SOCKET, 6, op_data=STREAM), rig, Op.SOCKET), 0)
    forwarded(rig.call(a, Op.SEND, 6, data_ptr=GRAIN, size=10), rig, Op.SEND)  # buffer is back


@pytest.mark.req("CE-20")
def test_attach_checks_the_version(rig: Rig) -> None:
    for dev in (rig.tenants[1], rig.nsms[0]):
        ok = one(rig.feed(dev, NQE(op=Op.ATTACH, op_data=1, tag=4)))
        assert (ok.ident, ok.ring.name, ok.op, ok.result, ok.nqe.tag) == \
            (dev.ident, "COMPLETION", Op.ATTACH | R, dev.ident, 4)
        refused(rig.feed(dev, NQE(op=Op.ATTACH, op_data=2)), dev, Op.ATTACH | R, E.EPROTO)
        refused(rig.feed(dev, NQE(op=Op.ATTACH, op_data=1 | (1 << 16))), dev, Op.ATTACH | R,
                E.EINVAL)


@pytest.mark.req("CE-21", "CE-24")
def test_detach_op_answers_then_detaches(rig: Rig) -> None:
    a, b = rig.tenants
    nsm = rig.nsms[0]
    rig.open(a, 5)
    outs = rig.feed(a, NQE(op=Op.DETACH, tag=9))
    assert [(o.kind, o.ident, o.op, o.result) for o in outs] == [
        (rig.T, a.ident, Op.DETACH | R, 0), (rig.N, nsm.ident, Op.TENANT_UNMAP, a.ident)]
    assert rig.feed(a, NQE(op=Op.CLOSE, sock_id=5)) == []  # CE-24
    rig.open(b, 5)
    outs = rig.feed(nsm, NQE(op=Op.DETACH, tag=1))
    assert [(o.ident, o.op, o.result) for o in outs] == [
        (nsm.ident, Op.DETACH | R, 0), (b.ident, Op.EV_ERROR, -E.ECONNRESET)]
    before = rig.counters(b)
    assert rig.feed(nsm, NQE(op=Op.EV_FIN, sock_id=1)) == []
    assert rig.counters(b) == before


@pytest.mark.req("CE-22")
def test_ids_are_1_to_254_per_kind(coreengine: Any) -> None:
    rig = Rig(coreengine, tenants=0, nsms=0)
    t = rig.attach(rig.tgeo)
    n = rig.attach(rig.ngeo)
    assert (t.ident, n.ident) == (1, 1)  # two namespaces
    assert rig.attach(rig.tgeo, 254).ident == 254
    for bad in (0, 255, 254):
        with pytest.raises(coreengine.EngineError):
            rig.attach(rig.tgeo, bad)
    assert rig.attach(rig.tgeo).ident == 2
    rig.detach(rig.dev(rig.T, 1))
    assert rig.attach(rig.tgeo).ident == 1  # nothing to drain: free at once
    for _ in range(253):
        rig.attach(rig.ngeo)
    with pytest.raises(coreengine.EngineError):
        rig.attach(rig.ngeo)
    rig.detach(rig.dev(rig.N, 7))
    assert rig.attach(rig.ngeo).ident == 7


@pytest.mark.req("CE-24")
def test_nqes_of_unattached_devices_are_discarded(rig: Rig) -> None:
    _prepared(rig)
    engine = rig.e
    for dev in (rig.dev(rig.T, 99), rig.dev(rig.N, 99)):
        assert rig.feed(dev, NQE(op=Op.SOCKET, sock_id=1, op_data=STREAM)) == []
        assert rig.feed(dev, b"\xee" * 32) == []
    after = rig.e
    counted = [rig.counters(d) for d in (*rig.tenants, *rig.nsms)]
    got = probe(rig)
    rig.e = engine
    assert [rig.counters(d) for d in (*rig.tenants, *rig.nsms)] == counted
    assert probe(rig) == got
    del after


# -- CE-23: counters --------------------------------------------------------------------------


@pytest.mark.req("CE-23")
def test_counters_account_for_every_nqe(rig: Rig) -> None:
    a, b = rig.tenants
    nsm = rig.nsms[0]
    devs = (a, b, nsm)
    inputs = {d: 0 for d in devs}
    outputs = {d: 0 for d in devs}
    rejected = {d: 0 for d in devs}
    real_feed = rig.feed

    def feed(dev: Any, msg: Any, **kw: Any) -> list[Out]:
        inputs[dev] += 1
        outs = real_feed(dev, msg, **kw)
        for o in outs:
            outputs[rig.dev(o.kind, o.ident)] += 1
        return outs

    rig.feed = feed  # type: ignore[method-assign]
    rig.open(a, 5)
    rig.open(b, 5)
    send = forwarded(rig.call(a, Op.SEND, 5, data_ptr=0, size=300), rig, Op.SEND)
    rig.reply(send, 300)
    rig.event(rig.nsm_side[(b.ident, 0, 5)], Op.EV_DATA, data_ptr=SEND_HALF, size=70)
    for bad in (NQE(op=Op.CLOSE, sock_id=77), NQE(op=Op.SEND, sock_id=5, size=1, data_ptr=U64)):
        rig.feed(a, bad)
        rejected[a] += 1
    rig.feed(a, b"\x7e" + bytes(31))  # unknown op
    rejected[a] += 1
    rig.feed(nsm, NQE(op=Op.EV_FIN, sock_id=999))
    rejected[nsm] += 1
    for d in devs:
        c = rig.counters(d)
        assert (c.nqes_in, c.nqes_out, c.rejected) == (inputs[d], outputs[d], rejected[d]), d
        assert sum(c.ops.values()) == c.nqes_in
    assert rig.counters(a).ops.get("SEND") == 2 and rig.counters(a).ops.get("SOCKET") == 1
    assert (rig.counters(a).bytes_in, rig.counters(nsm).bytes_out) == (300, 300)
    assert (rig.counters(nsm).bytes_in, rig.counters(b).bytes_out) == (70, 70)
    assert rig.ce.open_sockets(rig.e, nsm) == 2 and rig.ce.open_sockets(rig.e, a) == 1


# -- SEC-5: bounded requests in flight ---------------------------------------------------------


@pytest.mark.req("SEC-5", "SEC-8")
def test_requests_in_flight_are_bounded_per_tenant(coreengine: Any) -> None:
    rig = Rig(coreengine, max_inflight=2)
    a, b = rig.tenants
    for sock in (1, 2, 3):
        rig.open(a, sock)
    rig.open(b, 1)
    first = forwarded(rig.call(a, Op.CONNECT, 1, size=16), rig, Op.CONNECT)
    forwarded(rig.call(a, Op.CONNECT, 2, size=16), rig, Op.CONNECT)
    refused(rig.call(a, Op.CONNECT, 3, size=16), a, Op.CONNECT | R, E.ENOBUFS)
    refused(rig.call(a, Op.SOCKET, 4, op_data=STREAM), a, Op.SOCKET | R, E.ENOBUFS)
    refused(rig.call(a, Op.SEND, 3, data_ptr=GRAIN, size=8, tag=1), a, Op.SEND | R, E.ENOBUFS)
    forwarded(rig.call(b, Op.LISTEN, 1, op_data=1), rig, Op.LISTEN)  # b has its own bound
    rig.reply(first, 0)
    # the refused SEND lent nothing (SEC-8): its buffer is free for the next one
    forwarded(rig.call(a, Op.SEND, 3, data_ptr=GRAIN, size=8, tag=1), rig, Op.SEND)
    refused(rig.call(a, Op.CONNECT, 3, size=16), a, Op.CONNECT | R, E.ENOBUFS)
    default = Rig(coreengine, t_qsets=1)  # default bound: 1 queue set x 8 entries
    t = default.tenants[0]
    default.open(t, 1)
    for tag in range(8):
        forwarded(default.call(t, Op.GETSOCKNAME, 1, size=28, tag=tag), default, Op.GETSOCKNAME)
    refused(default.call(t, Op.GETSOCKNAME, 1, size=28, tag=8), t, Op.GETSOCKNAME | R,
            E.ENOBUFS)


# -- SEC-6, SEC-9, SEC-10: the malformed-input table -------------------------------------------


class Row(NamedTuple):
    """One row of the table in spec/security.md SEC-6."""

    number: int
    sender: str  # "tenant" or "nsm"
    make: Callable[[Rig], bytes]
    outcome: str  # "answer", "drop", "stale"
    op: int = 0
    errno: int = 0


def _prepared(rig: Rig) -> None:
    """Tenant A with socket 5 open (a SEND of [0, 64) in flight, tag 1) and an EV_DATA held."""
    a = rig.tenants[0]
    rig.open(a, 5)
    forwarded(rig.call(a, Op.SEND, 5, data_ptr=0, size=64, tag=1), rig, Op.SEND)
    rig.event(rig.nsm_side[(a.ident, 0, 5)], Op.EV_DATA, data_ptr=SEND_HALF, size=64)


def _nkey(rig: Rig) -> tuple[int, int, int]:
    return rig.nsm_side[(rig.tenants[0].ident, 0, 5)]


def _drain(rig: Rig) -> bytes:
    """Detach tenant B with an open socket; the NSM then reports on it."""
    b = rig.tenants[1]
    rig.open(b, 5)
    key = rig.nsm_side[(b.ident, 0, 5)]
    rig.detach(b)
    return ref_nqe.pack(NQE(op=Op.EV_FIN, sock_id=key[2]))


ROWS = [
    Row(1, "tenant", lambda r: with_op(NQE(op=Op.CLOSE, sock_id=5, tag=3), 0x7E), "answer", 0xFF,
        E.ENOSYS),
    Row(1, "nsm", lambda r: with_op(NQE(op=Op.CLOSE), 0x20), "answer", 0xFF, E.ENOSYS),
    Row(2, "tenant", lambda r: with_op(NQE(op=Op.CLOSE), 0xC4), "drop"),
    Row(3, "tenant", lambda r: with_reserved(NQE(op=Op.CLOSE, sock_id=5), b"\x00\x01\x00"),
        "answer", Op.CLOSE | R, E.EINVAL),
    Row(4, "nsm", lambda r: with_reserved(NQE(op=Op.EV_FIN, sock_id=_nkey(r)[2]), b"\x01\0\0"),
        "drop"),
    Row(5, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.EV_FIN, sock_id=5)), "drop"),
    Row(5, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.CLOSE | R, sock_id=5)), "drop"),
    Row(6, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.TENANT_MAP, op_data=2, data_ptr=SEND_HALF,
                                                size=GRAIN)), "answer", Op.TENANT_MAP | R,
        E.EPERM),
    Row(6, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.TENANT_UNMAP, op_data=2)), "answer",
        Op.TENANT_UNMAP | R, E.EPERM),
    Row(7, "nsm", lambda r: ref_nqe.pack(NQE(op=Op.SOCKET, sock_id=5, op_data=STREAM)),
        "answer", Op.SOCKET | R, E.EPERM),
    Row(7, "nsm", lambda r: ref_nqe.pack(NQE(op=Op.BUF_RETURN, data_ptr=SEND_HALF, size=64)),
        "answer", Op.BUF_RETURN | R, E.EPERM),
    Row(7, "nsm", lambda r: ref_nqe.pack(NQE(op=Op.TENANT_MAP, op_data=1)), "answer",
        Op.TENANT_MAP | R, E.EPERM),
    Row(8, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.BIND, sock_id=5, data_ptr=SEND_HALF - 8,
                                                size=16)), "answer", Op.BIND | R, E.EFAULT),
    Row(9, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.LISTEN, sock_id=6)), "answer",
        Op.LISTEN | R, E.EBADF),
    Row(10, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.CLOSE, sock_id=5, size=4)), "answer",
        Op.CLOSE | R, E.EINVAL),
    Row(10, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.SOCKET, op_data=STREAM)), "answer",
        Op.SOCKET | R, E.EINVAL),
    Row(10, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.ACCEPT, sock_id=5, op_data=1 << 32)),
        "answer", Op.ACCEPT | R, E.EINVAL),
    Row(10, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.ACCEPT, sock_id=5, op_data=9 | 1 << 33)),
        "answer", Op.ACCEPT | R, E.EINVAL),
    Row(10, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.SEND, sock_id=5, data_ptr=GRAIN, size=4,
                                                op_data=16 << 32)), "answer", Op.SEND | R,
        E.EINVAL),
    Row(11, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.SOCKET, sock_id=5, op_data=STREAM)),
        "answer", Op.SOCKET | R, E.EEXIST),
    Row(11, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.ACCEPT, sock_id=5, op_data=5)),
        "answer", Op.ACCEPT | R, E.EEXIST),
    Row(12, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.LISTEN, sock_id=5, tag=1)), "answer",
        Op.LISTEN | R, E.EINVAL),
    Row(13, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.SEND, sock_id=5, data_ptr=32, size=64,
                                                tag=2)), "answer", Op.SEND | R, E.EINVAL),
    Row(17, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.BUF_RETURN, data_ptr=0, size=64)),
        "answer", Op.BUF_RETURN | R, E.EFAULT),
    Row(18, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.BUF_RETURN, data_ptr=SEND_HALF + GRAIN,
                                                size=64)), "answer", Op.BUF_RETURN | R, E.EINVAL),
    Row(18, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.BUF_RETURN, sock_id=5, data_ptr=SEND_HALF,
                                                size=64)), "answer", Op.BUF_RETURN | R, E.EINVAL),
    Row(19, "tenant", lambda r: ref_nqe.pack(NQE(op=Op.ATTACH, op_data=1 << 20 | 1)), "answer",
        Op.ATTACH | R, E.EINVAL),
    Row(19, "nsm", lambda r: ref_nqe.pack(NQE(op=Op.ATTACH, op_data=7)), "answer",
        Op.ATTACH | R, E.EPROTO),
    Row(20, "nsm", lambda r: ref_nqe.pack(NQE(op=Op.SEND | R, sock_id=_nkey(r)[2], tag=2)),
        "drop"),
    Row(20, "nsm", lambda r: ref_nqe.pack(NQE(op=Op.BIND | R, sock_id=_nkey(r)[2], tag=1)),
        "drop"),
    Row(21, "nsm", lambda r: ref_nqe.pack(NQE(op=Op.TENANT_MAP | R, tag=1)), "drop"),
    Row(21, "nsm", lambda r: ref_nqe.pack(NQE(op=Op.TENANT_UNMAP | R, tag=1)), "drop"),
    Row(22, "nsm", lambda r: ref_nqe.pack(NQE(op=Op.EV_FIN, sock_id=_nkey(r)[2] + 50)), "drop"),
    Row(23, "nsm", lambda r: ref_nqe.pack(NQE(op=Op.EV_DATA, sock_id=_nkey(r)[2], data_ptr=0,
                                              size=8)), "drop"),
    Row(23, "nsm", lambda r: ref_nqe.pack(NQE(op=Op.EV_DATA, sock_id=_nkey(r)[2],
                                              data_ptr=SEND_HALF + 8, size=8)), "drop"),
    Row(23, "nsm", lambda r: ref_nqe.pack(NQE(op=Op.EV_ACCEPTABLE, sock_id=_nkey(r)[2],
                                              op_data=1, data_ptr=SEND_HALF + GRAIN, size=8)),
        "drop"),
    Row(24, "nsm", _drain, "stale"),
]


@pytest.mark.req("SEC-6", "SEC-10", "NQE-10", "NQE-11")
@pytest.mark.parametrize("row", ROWS, ids=[f"row{r.number}-{i}" for i, r in enumerate(ROWS)])
def test_malformed_input_table(coreengine: Any, row: Row) -> None:
    rig = Rig(coreengine)
    _prepared(rig)
    raw = row.make(rig)
    sender = rig.tenants[0] if row.sender == "tenant" else rig.nsms[0]
    before = rig.counters(sender)
    outs = rig.feed(sender, raw)
    after = rig.counters(sender)
    if row.outcome == "answer":
        refused(outs, sender, row.op, row.errno)
        msg = one(outs).nqe
        sent = ref_nqe.NQE_STRUCT.parse(raw)
        assert (msg.sock_id, msg.tag, msg.data_ptr, msg.size) == (sent.sock_id, sent.tag,
                                                                  sent.data_ptr, sent.size)
    else:
        assert outs == []
    counted = "stale" if row.outcome == "stale" else "rejected"
    assert getattr(after, counted) == getattr(before, counted) + 1
    other = "rejected" if counted == "stale" else "stale"
    assert getattr(after, other) == getattr(before, other)


@pytest.mark.req("SEC-6")
def test_socket_needs_an_nsm_and_a_slice(coreengine: Any) -> None:
    """Rows 14-16 of the table, which need an engine configured for them."""
    none = Rig(coreengine, nsms=0)
    refused(none.call(none.tenants[0], Op.SOCKET, 5, op_data=STREAM), none.tenants[0],
            Op.SOCKET | R, E.ENETDOWN)
    order = itertools.cycle([1, 2])
    full = Rig(coreengine, nsms=2, policy=lambda engine, vm: next(order))
    t = full.tenants[0]
    full.open(t, 5)
    refused(full.call(t, Op.SOCKET, 6, op_data=STREAM), t, Op.SOCKET | R, E.ENOBUFS)
    bounded = Rig(coreengine, max_inflight=1)
    t = bounded.tenants[0]
    bounded.open(t, 5)
    forwarded(bounded.call(t, Op.LISTEN, 5, op_data=1), bounded, Op.LISTEN)
    refused(bounded.call(t, Op.LISTEN, 5, op_data=1, tag=1), t, Op.LISTEN | R, E.ENOBUFS)


@pytest.mark.req("SEC-9", "NQE-12")
def test_checks_run_in_a_fixed_order(rig: Rig) -> None:
    _prepared(rig)
    a = rig.tenants[0]
    far = {"data_ptr": U64, "size": 16}
    cases = [
        (bytes([0x7D]) + with_reserved(NQE(op=Op.BIND, sock_id=99, **far), b"\0\0\1")[1:],
         0xFF, E.ENOSYS),
        (with_reserved(NQE(op=Op.BIND, sock_id=99, **far), b"\0\0\1"), Op.BIND | R, E.EINVAL),
        (ref_nqe.pack(NQE(op=Op.TENANT_MAP, **far)), Op.TENANT_MAP | R, E.EPERM),
        (ref_nqe.pack(NQE(op=Op.BIND, sock_id=99, **far)), Op.BIND | R, E.EFAULT),
        (ref_nqe.pack(NQE(op=Op.CLOSE, sock_id=99, size=3)), Op.CLOSE | R, E.EBADF),
        (ref_nqe.pack(NQE(op=Op.ACCEPT, sock_id=5, op_data=5 | 1 << 40)), Op.ACCEPT | R,
         E.EINVAL),
        (ref_nqe.pack(NQE(op=Op.ACCEPT, sock_id=5, op_data=5, tag=1)), Op.ACCEPT | R, E.EEXIST),
        (ref_nqe.pack(NQE(op=Op.SEND, sock_id=5, data_ptr=0, size=8, tag=1)), Op.SEND | R,
         E.EINVAL),
        (ref_nqe.pack(NQE(op=Op.BUF_RETURN, sock_id=5, data_ptr=0, size=8)), Op.BUF_RETURN | R,
         E.EFAULT),
    ]
    for raw, op, errno in cases:
        refused(rig.feed(a, raw), a, op, errno)


# -- SEC-7, SEC-8: answers and refusals ---------------------------------------------------------

fields = {
    "sock_id": st.one_of(st.integers(0, 8), st.integers(0, U32)),
    "op_data": st.one_of(st.integers(0, 64), st.integers(0, U64)),
    "data_ptr": st.one_of(st.integers(0, DATA), st.integers(0, U64)),
    "size": st.one_of(st.integers(0, 256), st.integers(0, U32)),
    "tag": st.integers(0, 3),
    "vm_id": st.integers(0, 255),
    "qset": st.integers(0, 255),
}
wire = st.builds(
    lambda op, reserved, **f: with_op(NQE(op=Op.CLOSE, **f), op)[:29] + reserved,
    op=st.one_of(st.sampled_from([int(o) for o in Op]), st.integers(0, 255),
                 st.sampled_from([int(o) | R for o in Op] + [0xFF])),
    reserved=st.one_of(st.just(b"\0\0\0"), st.binary(min_size=3, max_size=3)),
    **fields,
)


@pytest.mark.req("SEC-7")
@given(raw=wire, from_nsm=st.booleans(), ring_is_job=st.booleans())
def test_replies_and_events_are_never_answered(coreengine: Any, raw: bytes, from_nsm: bool,
                                               ring_is_job: bool) -> None:
    rig = Rig(coreengine)
    _prepared(rig)
    sender = rig.nsms[0] if from_nsm else rig.tenants[0]
    ring = rig.JOB if ring_is_job else rig.SEND
    outs = rig.feed(sender, raw, ring=ring)
    to_sender = [o for o in outs if (o.kind, o.ident) == (sender.kind, sender.ident)]
    op = raw[0]
    if op & R or op in EVENTS:
        assert to_sender == []
    assert len(to_sender) <= 1


PROBE_TAG = 3


def probe(rig: Rig) -> list[tuple[Any, ...]]:
    """A fixed script whose outputs depend on every part of the engine's state (SEC-8)."""
    a, b = rig.tenants
    nsm = rig.nsms[0]
    log: list[tuple[Any, ...]] = []

    def note(outs: list[Out]) -> list[Out]:
        log.extend((o.kind, o.ident, o.qset, o.ring, o.nqe) for o in outs)
        return outs

    for sock in (5, 6, 7):
        for t in (a, b):
            note(rig.call(t, Op.LISTEN, sock, op_data=1, tag=PROBE_TAG))
    note(rig.call(a, Op.SEND, 5, data_ptr=0, size=64, tag=PROBE_TAG + 1))
    note(rig.call(a, Op.SEND, 5, data_ptr=GRAIN, size=8, tag=PROBE_TAG + 2))
    note(rig.feed(a, NQE(op=Op.BUF_RETURN, data_ptr=SEND_HALF, size=64)))
    for sock in (8, 9):
        outs = note(rig.grant_maps(rig.call(b, Op.SOCKET, sock, op_data=STREAM, tag=PROBE_TAG)))
        for o in outs:
            if o.kind is rig.N:
                note(rig.reply(o, 0))
    for sock in range(1, 4):
        note(rig.feed(nsm, NQE(op=Op.EV_FIN, sock_id=sock)))
    return log


@pytest.mark.req("SEC-8")
@given(raw=wire, from_nsm=st.booleans())
def test_a_refused_nqe_changes_nothing_but_counters(coreengine: Any, raw: bytes,
                                                    from_nsm: bool) -> None:
    rig = Rig(coreengine)
    _prepared(rig)
    sender = rig.nsms[0] if from_nsm else rig.tenants[0]
    assume(raw[0] not in (Op.DETACH, Op.ATTACH))
    engine = rig.e
    before = rig.counters(sender)
    rig.feed(sender, raw)
    after = rig.counters(sender)
    assume(after.rejected + after.stale > before.rejected + before.stale)
    got = probe(rig)
    rig.e = engine
    assert got == probe(rig)


# -- SEC-1 (and SEC-2..SEC-4, SEC-11): one tenant's garbage never reaches another -------------

B_SCRIPT = [
    ("open", 5), ("call", Op.BIND, 5, {"data_ptr": 0, "size": 16}),
    ("call", Op.LISTEN, 5, {"op_data": 8}), ("open", 6),
    ("call", Op.CONNECT, 6, {"data_ptr": 64, "size": 16}),
    ("call", Op.SEND, 6, {"data_ptr": GRAIN, "size": 100}),
    ("event", 6, Op.EV_DATA, {"data_ptr": SEND_HALF, "size": 40}),
    ("buf_return", SEND_HALF, 40), ("event", 6, Op.EV_FIN, {}),
    ("call", Op.CLOSE, 6, {}), ("call", Op.GETSOCKNAME, 5, {"data_ptr": 128, "size": 28}),
]

garbage = st.one_of(
    st.tuples(st.just("a"), wire),
    st.tuples(st.just("nsm2"), wire),
    st.tuples(st.just("a-open"), st.integers(4, 7)),
    st.tuples(st.just("a-detach"), st.just(0)),
    st.tuples(st.just("nsm2-detach"), st.just(0)),
)


def run_b(ce: Any, noise: list[tuple[str, Any]], where: list[int]) -> list[tuple[Any, ...]]:
    """Tenant B's script, with ``noise`` from tenant A and NSM 2 slipped in; B's outputs.

    Every request an NSM gets is answered at once (0; a SEND with its size),
    as a well-behaved NSM would; only B's outputs are recorded.
    """
    rig = Rig(ce, nsms=2, policy=ce.assign({1: 2, 2: 1}))
    a, b = rig.tenants
    nsm2 = rig.nsms[1]
    seen: list[tuple[Any, ...]] = []
    tags = itertools.count(10)

    def run(outs: list[Out]) -> None:
        queue = list(outs)
        while queue:
            o = queue.pop(0)
            if o.kind is rig.T and o.ident == b.ident:
                seen.append((o.qset, o.ring, o.nqe))
            if o.kind is rig.N and not o.op & R and o.op not in (*EVENTS, Op.BUF_RETURN):
                answers = rig.reply(o, o.nqe.size if o.op == Op.SEND else 0)
                if o.op == Op.SOCKET:  # learn the NSM key of the new socket, as an NSM does
                    for r in answers:
                        if r.op == Op.SOCKET | R and r.result == 0:
                            rig.nsm_side[(r.ident, r.qset, r.nqe.sock_id)] = \
                                (o.ident, o.qset, o.nqe.sock_id)
                queue += answers

    def noisy(step: int) -> None:
        for (kind, arg), at in zip(noise, where, strict=True):
            if at != step:
                continue
            if kind == "a":
                run(rig.feed(a, arg))
            elif kind == "nsm2":
                run(rig.feed(nsm2, arg, ring=rig.SEND))
            elif kind == "a-open":
                run(rig.call(a, Op.SOCKET, arg, op_data=STREAM, tag=next(tags)))
            elif kind == "a-detach":
                run(rig.detach(a))
            elif kind == "nsm2-detach":
                run(rig.detach(nsm2))

    for step, action in enumerate(B_SCRIPT):
        noisy(step)
        if action[0] == "open":
            run(rig.call(b, Op.SOCKET, action[1], op_data=STREAM, tag=1))
        elif action[0] == "call":
            _, op, sock, kw = action
            run(rig.call(b, op, sock, tag=2, **kw))
        elif action[0] == "event":
            _, sock, op, kw = action
            run(rig.event(rig.nsm_side[(b.ident, 0, sock)], op, **kw))
        elif action[0] == "buf_return":
            run(rig.feed(b, NQE(op=Op.BUF_RETURN, data_ptr=action[1], size=action[2])))
    noisy(len(B_SCRIPT))
    seen.append(("sockets", rig.ce.open_sockets(rig.e, b)))
    return seen


@pytest.mark.req("SEC-1", "SEC-2", "SEC-4", "SEC-11", "CE-4")
@given(noise=st.lists(garbage, max_size=25), data=st.data())
def test_other_parties_garbage_never_changes_what_a_tenant_sees(coreengine: Any,
                                                                 noise: list[Any],
                                                                 data: st.DataObject) -> None:
    where = data.draw(st.lists(st.integers(0, len(B_SCRIPT)), min_size=len(noise),
                               max_size=len(noise)))
    clean = run_b(coreengine, [], [])
    assert clean == run_b(coreengine, noise, where)
    assert any(ring.name == "RECEIVE" for _, ring, *_ in clean[:-1])  # B did get its events
