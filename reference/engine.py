"""The CoreEngine's switching core, sans-IO (spec/coreengine.md CE-*, spec/security.md SEC-*).

Rules of this file:

* Everything that decides what happens to an NQE crossing the CoreEngine
  lives here: the connection table (:mod:`.conntable`), VM ID stamping, the
  outcome of every malformed input, the bounds checks, buffer ownership
  (:class:`.bufpool.Ledger`), NSM selection, detach cleanup and the counters.
* It does no I/O. :func:`switch` takes the 32 bytes read from one ring of one
  device and returns the NQEs to write and where (:class:`Output`); no
  sockets, no shared memory, no clock. The runtime
  (:mod:`netkernel.reference.coreengine`) moves the bytes and rings the bells.
* The engine is a value: every entry point takes an :class:`Engine` and
  returns a new one. A rejected NQE changes nothing but counters (SEC-8):
  the step starts over from the engine it was given.
* It never reads a data area. It decides from NQE fields only, and checks
  every buffer an NQE names before the NQE reaches anyone who dereferences
  it (SEC-3).

Where NQEs go (DEV-8): a tenant's socket calls and control ops arrive on its
JOB and SEND rings; the engine forwards calls to the serving NSM's COMPLETION
ring (SEND and BUF_RETURN to its RECEIVE ring, as do TENANT_MAP and
TENANT_UNMAP); NSM replies and events arrive on the NSM's JOB and SEND rings
and go to the tenant's COMPLETION ring (replies) or RECEIVE ring (events).
Every answer the engine makes itself goes to the COMPLETION ring of the queue
set the NQE came from.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import errno as E
from collections.abc import Callable, Mapping
from typing import Final, NamedTuple

from . import bufpool, conntable, nqe
from .bufpool import BufError, Half, Ledger, Span
from .conntable import NsmKey, Table, TenantKey
from .device import Geometry, Kind, RingId
from .nqe import NQE, Op

__all__ = [
    "NQE_VERSION", "Counters", "Dest", "Dev", "Engine", "EngineError", "Geometry", "Kind",
    "Output", "Policy", "RingId", "assign", "attach", "counters", "detach", "first_nsm",
    "open_sockets", "status", "switch",
]

NQE_VERSION: Final = 1  # CE-20: the version an ATTACH must speak
U32: Final = 0xFFFF_FFFF
ZERO3: Final = b"\x00\x00\x00"


class EngineError(ValueError):
    """A call the runtime made wrongly (unknown device, ID in use, wrong ring): a bug, not input."""


class Dev(NamedTuple):
    """A device as the engine knows it: ``(kind, VM ID or NSM ID)`` (CE-22)."""

    kind: Kind
    ident: int


class Dest(NamedTuple):
    """Where an output goes: a device's queue set and ring (DEV-8)."""

    kind: Kind
    ident: int
    qset: int
    ring: RingId

    @property
    def dev(self) -> Dev:
        return Dev(self.kind, self.ident)


class Output(NamedTuple):
    """One NQE to write: 32 bytes for ``dest``'s ring."""

    dest: Dest
    raw: bytes

    @property
    def nqe(self) -> NQE:
        return nqe.unpack(self.raw)


@dataclasses.dataclass(frozen=True)
class Counters:
    """What one device did, as the operator sees it (CE-23).

    ``nqes_in``: NQEs read from the device; ``nqes_out``: NQEs written to it;
    ``bytes_in`` / ``bytes_out``: payload bytes of the SEND requests and
    EV_DATA events it sent / received through the engine; ``rejected``: its
    NQEs the engine refused (answered with an error or dropped, SEC-6);
    ``stale``: its NQEs about something a detach had just removed (CE-18);
    ``ops``: NQEs read from it, by op name.
    """

    nqes_in: int = 0
    nqes_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    rejected: int = 0
    stale: int = 0
    ops: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                "ops": dict(sorted(self.ops.items()))}


FlightKey = tuple[NsmKey, int]  # (the NSM-side socket a request names, its tag) (NQE-9)


@dataclasses.dataclass(frozen=True)
class Flight:
    """A tenant request forwarded (or held) and not yet answered (CE-11).

    ``tkey`` is the socket the request names (for SOCKET, the new socket);
    ``request`` the request as the tenant sent it, stamped; ``out`` what the
    engine forwards; ``opens`` the entry a successful reply creates (CE-7).
    """

    tkey: TenantKey
    request: NQE
    out: Output
    opens: tuple[TenantKey, NsmKey] | None = None


@dataclasses.dataclass(frozen=True)
class Grant:
    """An NSM serving a tenant: its receive slice, and whether TENANT_MAP was answered (CE-16)."""

    slice: Span
    ready: bool = False
    held: tuple[FlightKey, ...] = ()  # SOCKET requests waiting for the TENANT_MAP reply


#: Which NSM serves a tenant's next SOCKET: ``policy(engine, vm_id) -> NSM ID or None`` (CE-15).
Policy = Callable[["Engine", int], "int | None"]


def first_nsm(engine: Engine, vm_id: int) -> int | None:
    """The default policy (CE-15): the NSM already serving the tenant, else the lowest NSM ID."""
    nsms = sorted(d.ident for d in engine.devices if d.kind is Kind.NSM)
    serving = [n for n in nsms if (vm_id, n) in engine.grants]
    return next(iter(serving or nsms), None)


def assign(table: Mapping[int, int], fallback: Policy = first_nsm) -> Policy:
    """A policy that sends tenant ``vm`` to NSM ``table[vm]`` while it is attached (CE-15)."""

    def policy(engine: Engine, vm_id: int) -> int | None:
        nsm = table.get(vm_id)
        if nsm is not None and Dev(Kind.NSM, nsm) in engine.devices:
            return nsm
        return fallback(engine, vm_id)

    return policy


@dataclasses.dataclass(frozen=True)
class Engine:
    """The whole state of a CoreEngine's switching core (CE-*).

    Configuration: ``policy`` picks the NSM for a tenant's SOCKET (CE-15);
    ``slices`` is how many NSMs may share one tenant's receive half (CE-17);
    ``max_inflight`` bounds a tenant's unanswered requests (SEC-5; ``None``:
    the tenant's completion capacity, ``n_qsets * ring_entries``).
    """

    policy: Policy = first_nsm
    slices: int = 1
    max_inflight: int | None = None
    devices: Mapping[Dev, Geometry] = dataclasses.field(default_factory=dict)
    table: Table = conntable.EMPTY
    flights: Mapping[FlightKey, Flight] = dataclasses.field(default_factory=dict)
    grants: Mapping[tuple[int, int], Grant] = dataclasses.field(default_factory=dict)
    ledgers: Mapping[int, Ledger] = dataclasses.field(default_factory=dict)
    #: (NSM ID, VM ID) -> NSM socket IDs of a detached tenant, until TENANT_UNMAP is answered
    draining: Mapping[tuple[int, int], frozenset[int]] = dataclasses.field(default_factory=dict)
    next_sock: Mapping[int, int] = dataclasses.field(default_factory=dict)
    counters: Mapping[Dev, Counters] = dataclasses.field(default_factory=dict)


# -- the tables everything below follows -----------------------------------------------


class OpClass(enum.Enum):
    """What an op is, for dispatch (NQE-7, SEC-10)."""

    CALL = "socket call"
    EVENT = "event"
    REPLY = "reply"
    ATTACH = "ATTACH"
    DETACH = "DETACH"
    BUF_RETURN = "BUF_RETURN"
    MAP = "TENANT_MAP/TENANT_UNMAP"


CALLS: Final = frozenset(op for op, info in nqe.OPS.items() if info.direction is nqe.Dir.REQUEST)
EVENTS: Final = frozenset(op for op, info in nqe.OPS.items() if info.direction is nqe.Dir.EVENT)


def op_class(op: int) -> OpClass:
    """The class of a known op (NQE-7)."""
    if op & nqe.REPLY_BIT:
        return OpClass.REPLY
    o = Op(op)
    if o in CALLS:
        return OpClass.CALL
    if o in EVENTS:
        return OpClass.EVENT
    return {Op.ATTACH: OpClass.ATTACH, Op.DETACH: OpClass.DETACH, Op.BUF_RETURN: OpClass.BUF_RETURN,
            Op.TENANT_MAP: OpClass.MAP, Op.TENANT_UNMAP: OpClass.MAP}[o]


#: The half of the tenant's data area each op's buffer lies in; None: no buffer (NQE-6, CE-14).
HALF: Final[dict[Op, Half | None]] = {
    Op.SOCKET: None, Op.BIND: Half.SEND, Op.LISTEN: None, Op.CONNECT: Half.SEND,
    Op.ACCEPT: Half.SEND, Op.SEND: Half.SEND, Op.SHUTDOWN: None, Op.CLOSE: None,
    Op.SETSOCKOPT: Half.SEND, Op.GETSOCKOPT: Half.SEND, Op.GETSOCKNAME: Half.SEND,
    Op.GETPEERNAME: Half.SEND, Op.EV_DATA: Half.RECEIVE, Op.EV_FIN: None, Op.EV_ERROR: None,
    Op.EV_ACCEPTABLE: None, Op.ATTACH: None, Op.DETACH: None, Op.BUF_RETURN: Half.RECEIVE,
    Op.TENANT_MAP: Half.RECEIVE, Op.TENANT_UNMAP: None,
}

#: The NSM ring a forwarded op goes to, by the tenant ring the op table names (DEV-8, CE-13).
TO_NSM_RING: Final[dict[str, RingId]] = {
    "job": RingId.COMPLETION, "send": RingId.RECEIVE, "receive": RingId.RECEIVE,
}


def to_nsm_ring(op: Op) -> RingId:
    return TO_NSM_RING[nqe.OPS[op].ring]


#: What an in-flight request is answered with when its NSM detaches (CE-19).
LOST_NSM_RESULT: Final[dict[Op, int]] = {Op.CLOSE: 0}
LOST_NSM_ERRNO: Final = E.ECONNRESET


# -- one step ----------------------------------------------------------------------------


class _Step:
    """Scratch state of one entry point: copies of the engine's maps, and the outputs.

    :meth:`refuse` throws every change away but the counters, so a rejected
    NQE leaves the engine as it found it (SEC-8).
    """

    def __init__(self, engine: Engine) -> None:
        self.base = engine
        self.counters = dict(engine.counters)
        self._counted = dict(self.counters)
        self._load(engine)

    def checkpoint(self) -> None:
        """The input has been counted: a refusal keeps the counts made so far (CE-23)."""
        self._counted = dict(self.counters)

    def _load(self, e: Engine) -> None:
        self.counters = dict(self._counted)
        self.devices = dict(e.devices)
        self.table = e.table
        self.flights = dict(e.flights)
        self.grants = dict(e.grants)
        self.ledgers = dict(e.ledgers)
        self._own: set[int] = set()
        self.draining = dict(e.draining)
        self.next_sock = dict(e.next_sock)
        self.out: list[Output] = []
        self.out_counts: list[tuple[Dev, int]] = []

    def engine(self) -> Engine:
        return dataclasses.replace(
            self.base, devices=self.devices, table=self.table, flights=self.flights,
            grants=self.grants, ledgers=self.ledgers, draining=self.draining,
            next_sock=self.next_sock, counters=self.counters,
        )

    def done(self) -> tuple[Engine, list[Output]]:
        return self.engine(), self.out

    # -- state helpers ----------------------------------------------------------------
    def ledger(self, vm_id: int) -> Ledger:
        """The tenant's buffer ledger, copied before its first change in this step."""
        if vm_id not in self._own:
            self.ledgers[vm_id] = _copy_ledger(self.ledgers[vm_id])
            self._own.add(vm_id)
        return self.ledgers[vm_id]

    def set_ledger(self, vm_id: int, ledger: Ledger) -> None:
        self.ledgers[vm_id] = ledger
        self._own.add(vm_id)

    def geo(self, kind: Kind, ident: int) -> Geometry:
        return self.devices[Dev(kind, ident)]

    def count(self, dev: Dev, op: str | None = None, **deltas: int) -> None:
        if dev not in self.counters:
            return
        c = self.counters[dev]
        changes = {k: getattr(c, k) + v for k, v in deltas.items()}
        if op is not None:
            changes["ops"] = {**c.ops, op: c.ops.get(op, 0) + 1}
        self.counters[dev] = dataclasses.replace(c, **changes)

    def send(self, dest: Dest, msg: NQE) -> None:
        """Write ``msg`` to ``dest`` (counted on the destination, CE-23)."""
        self.out.append(Output(dest, nqe.pack(msg)))
        payload = msg.size if msg.op in (Op.SEND, Op.EV_DATA) else 0
        self.count(dest.dev, nqes_out=1, bytes_out=payload)

    def refuse(self, src: Dev, qset: int, msg: NQE, errno: int) -> None:
        """Reject ``msg``: undo the step, count it, answer it if it is answerable (SEC-6, SEC-8)."""
        self._load(self.base)
        self.count(src, rejected=1)
        if _answerable(msg.op):
            reply = msg.reply(-errno)
            self.send(Dest(src.kind, src.ident, qset, RingId.COMPLETION),
                      dataclasses.replace(reply, reserved=ZERO3))

    def drop(self, src: Dev, *, stale: bool = False) -> None:
        """Drop an NQE nobody may answer: a reply, an event (NQE-8, SEC-7)."""
        self._load(self.base)
        if stale:
            self.count(src, stale=1)
        else:
            self.count(src, rejected=1)


def _answerable(op: int) -> bool:
    """True if ``op`` is a request or control op that has a reply code (NQE-8)."""
    return not op & nqe.REPLY_BIT and nqe.is_known_op(op | nqe.REPLY_BIT)


def _copy_ledger(old: Ledger) -> Ledger:
    """An independent copy of a ledger: its maps copied, their immutable spans shared."""
    new = copy.copy(old)
    for name, value in vars(old).items():
        if isinstance(value, dict):
            setattr(new, name, dict(value))
    return new


def _rebuild_ledger(old: Ledger, drop_nsm: int | None) -> Ledger:
    """A fresh ledger with ``old``'s slices and loans, minus NSM ``drop_nsm``'s slice and loans.

    Built through the ledger's public calls only, so it is as valid as the
    one it copies.
    """
    new = Ledger(old.geo)
    slices = {n: s for n, s in old.slices().items() if n != drop_nsm}
    for n, s in slices.items():
        new.grant(n, s.offset, s.size)
    for s in old.lent_send():
        new.lend_send(s.offset, s.size)
    for s in old.held_by_tenant():
        owner = next((n for n, sl in slices.items() if bufpool.within(sl, s.offset, s.size)), None)
        if owner is not None:
            new.lend_receive(owner, s.offset, s.size)
    return new


# -- entry points ------------------------------------------------------------------------


def attach(engine: Engine, geometry: Geometry, ident: int | None = None) -> tuple[Engine, Dev]:
    """Hot-plug a device of ``geometry.kind``; returns the engine and the device (CE-22).

    ``ident`` is the VM ID or NSM ID to use (the runtime may pick it); by
    default the lowest free one. A VM ID whose TENANT_UNMAP is still
    unanswered is not free (CE-18).
    """
    kind = geometry.kind
    taken = {d.ident for d in engine.devices if d.kind is kind}
    if kind is Kind.TENANT:
        taken |= {vm for _, vm in engine.draining}
    if ident is None:
        free = [i for i in range(conntable.ID_MIN, conntable.ID_MAX + 1) if i not in taken]
        if not free:
            raise EngineError(f"no free {kind.name} ID in {conntable.ID_MIN}..{conntable.ID_MAX}")
        ident = free[0]
    elif not conntable.ID_MIN <= ident <= conntable.ID_MAX or ident in taken:
        raise EngineError(f"{kind.name} ID {ident} is not free")
    dev = Dev(kind, ident)
    ledgers = {**engine.ledgers, ident: Ledger(geometry)} if kind is Kind.TENANT else engine.ledgers
    return dataclasses.replace(
        engine, devices={**engine.devices, dev: geometry}, ledgers=ledgers,
        counters={**engine.counters, dev: Counters()},
    ), dev


def detach(engine: Engine, dev: Dev) -> tuple[Engine, list[Output]]:
    """Remove a device and everything of it (CE-18 tenant, CE-19 NSM).

    Detaching a device that is not attached changes nothing.
    """
    if dev not in engine.devices:
        return engine, []
    step = _Step(engine)
    (_detach_tenant if dev.kind is Kind.TENANT else _detach_nsm)(step, dev)
    step.devices.pop(dev)
    step.counters.pop(dev, None)
    return step.done()


def switch(engine: Engine, src: Dev, qset: int, ring: RingId,
           raw: bytes | bytearray | memoryview) -> tuple[Engine, list[Output]]:
    """Switch one NQE read from ring ``ring`` of queue set ``qset`` of device ``src`` (CE-8).

    Returns the new engine and the NQEs to write, in order. An NQE from a
    device that is not attached is discarded (CE-24). Raises
    :class:`EngineError` for a ring the device does not produce or a queue
    set it does not have: that is a bug in the caller, not input.
    """
    geo = engine.devices.get(Dev(*src))
    if geo is None:
        return engine, []
    src = Dev(*src)
    if not ring.to_engine or not 0 <= qset < geo.n_qsets:
        raise EngineError(f"the engine reads JOB and SEND of queue sets 0..{geo.n_qsets - 1},"
                          f" not {ring.name} of queue set {qset}")
    data = bytes(raw)
    if len(data) != nqe.NQE_SIZE:
        raise EngineError(f"a ring slot holds {nqe.NQE_SIZE} bytes, got {len(data)}")
    step = _Step(engine)
    step.count(src, op=nqe.op_name(data[0]), nqes_in=1)
    step.checkpoint()
    try:
        msg = _stamp(nqe.unpack(data), src, qset)
    except nqe.NQEError:
        _malformed(step, src, qset, data)
        return step.done()
    _HANDLERS[(src.kind, op_class(msg.op))](step, src, msg)
    return step.done()


def counters(engine: Engine, dev: Dev) -> Counters:
    """The counters of an attached device (CE-23)."""
    return engine.counters[Dev(*dev)]


def open_sockets(engine: Engine, dev: Dev) -> int:
    """Entries of the connection table on the device's side (CE-23)."""
    dev = Dev(*dev)
    pick = conntable.sockets_of_vm if dev.kind is Kind.TENANT else conntable.sockets_of_nsm
    return len(pick(engine.table, dev.ident))


def status(engine: Engine) -> dict[str, object]:
    """Everything an operator's ``status`` shows of the engine (CE-23)."""
    devices = sorted(engine.devices)
    return {
        "devices": [{"kind": d.kind.name.lower(), "id": d.ident,
                     "sockets": open_sockets(engine, d),
                     "counters": engine.counters[d].as_dict()} for d in devices],
        "sockets": len(engine.table.fwd),
        "in_flight": len(engine.flights),
        "grants": [{"vm_id": vm, "nsm_id": n, "offset": g.slice.offset, "size": g.slice.size,
                    "ready": g.ready} for (vm, n), g in sorted(engine.grants.items())],
    }


# -- input from any device ---------------------------------------------------------------


def _stamp(msg: NQE, src: Dev, qset: int) -> NQE:
    """Overwrite the wire's VM ID and queue set with where the NQE was read (CE-8, SEC-2).

    A tenant's NQE gets its own VM ID; an NSM's gets 0 (the engine finds the
    tenant from the connection table, never from the NSM's word).
    """
    return dataclasses.replace(msg, vm_id=src.ident if src.kind is Kind.TENANT else 0, qset=qset)


def _malformed(step: _Step, src: Dev, qset: int, raw: bytes) -> None:
    """An NQE the codec rejects: answer it if it may be answered (NQE-10, NQE-11, SEC-6)."""
    step.count(src, rejected=1)
    reply = nqe.error_reply(raw)
    if reply is not None:
        step.send(Dest(src.kind, src.ident, qset, RingId.COMPLETION), _stamp(reply, src, qset))


def _forbidden(step: _Step, src: Dev, msg: NQE) -> None:
    """An op this kind of device may not send: -EPERM, or dropped if unanswerable (SEC-10)."""
    step.refuse(src, msg.qset, msg, E.EPERM)


def _attach_op(step: _Step, src: Dev, msg: NQE) -> None:
    """ATTACH: the device checks the version it speaks; the reply is its ID (CE-20)."""
    if msg.op_data >> 16:
        return step.refuse(src, msg.qset, msg, E.EINVAL)
    if msg.op_data != NQE_VERSION:
        return step.refuse(src, msg.qset, msg, E.EPROTO)
    step.send(Dest(src.kind, src.ident, msg.qset, RingId.COMPLETION), msg.reply(src.ident))


def _detach_op(step: _Step, src: Dev, msg: NQE) -> None:
    """DETACH: answer 0, then remove the device as :func:`detach` does (CE-21)."""
    step.send(Dest(src.kind, src.ident, msg.qset, RingId.COMPLETION), msg.reply(0))
    (_detach_tenant if src.kind is Kind.TENANT else _detach_nsm)(step, src)
    step.devices.pop(src)
    step.counters.pop(src, None)


# -- from a tenant -----------------------------------------------------------------------


def _in_half(geo: Geometry, half: Half | None, msg: NQE) -> bool:
    """The buffer check (NQE-14, SEC-3): size 0 names no buffer; otherwise inside the half."""
    if msg.size == 0 or half is None:
        return True
    return bufpool.within(bufpool.half_bounds(geo, half), msg.data_ptr, msg.size)


def _quota(step: _Step, vm_id: int) -> bool:
    """True if the tenant may have one more request in flight (SEC-5)."""
    geo = step.geo(Kind.TENANT, vm_id)
    limit = step.base.max_inflight
    if limit is None:
        limit = geo.n_qsets * geo.ring_entries
    return sum(1 for f in step.flights.values() if f.tkey[0] == vm_id) < limit


def _reserved_tenant_keys(step: _Step) -> set[TenantKey]:
    """Tenant sockets in the table or being opened (CE-10)."""
    opening = {f.opens[0] for f in step.flights.values() if f.opens}
    return set(step.table.fwd) | opening


def _alloc_sock(step: _Step, nsm_id: int) -> int:
    """A fresh NSM-side socket ID: in no entry, open or drain of that NSM (CE-10)."""
    used = {n[2] for n in step.table.rev if n[0] == nsm_id}
    used |= {f.opens[1][2] for f in step.flights.values() if f.opens and f.opens[1][0] == nsm_id}
    for (n, _vm), ids in step.draining.items():
        if n == nsm_id:
            used |= ids
    sock = step.next_sock.get(nsm_id, 1)
    while sock in used:
        sock = sock % U32 + 1
    step.next_sock[nsm_id] = sock % U32 + 1
    return sock


def _tenant_call(step: _Step, src: Dev, msg: NQE) -> None:
    """A socket call from a tenant (CE-9..CE-15); checks in the order of SEC-9."""
    vm = src.ident
    op = Op(msg.op)
    half = HALF[op]
    if not _in_half(step.geo(Kind.TENANT, vm), half, msg):  # step 4: the buffer (NQE-14)
        return step.refuse(src, msg.qset, msg, E.EFAULT)
    if op is Op.SOCKET:
        return _open_socket(step, src, msg)
    nkey = conntable.translate(step.table, vm, msg.qset, msg.sock_id)
    if nkey is None:  # not one of this tenant's sockets (CE-9, SEC-1)
        return step.refuse(src, msg.qset, msg, E.EBADF)
    errno = _argument_errno(op, msg)
    if errno:
        return step.refuse(src, msg.qset, msg, errno)
    new_tkey = (vm, msg.qset, msg.op_data & U32)  # ACCEPT: the new connection's ID (CE-10)
    if op is Op.ACCEPT and new_tkey in _reserved_tenant_keys(step):
        return step.refuse(src, msg.qset, msg, E.EEXIST)
    if (nkey, msg.tag) in step.flights:  # NQE-9: (socket, tag) already in flight
        return step.refuse(src, msg.qset, msg, E.EINVAL)
    if op is Op.SEND:
        try:
            step.ledger(vm).lend_send(msg.data_ptr, msg.size)  # BUF-3
        except BufError as exc:
            return step.refuse(src, msg.qset, msg, exc.errno)
    if not _quota(step, vm):
        return step.refuse(src, msg.qset, msg, E.ENOBUFS)
    fwd = dataclasses.replace(msg, qset=nkey[1], sock_id=nkey[2],
                              data_ptr=msg.data_ptr if msg.size else 0)
    opens = None
    if op is Op.ACCEPT:  # the NSM sees an ID the engine chose, never the tenant's (CE-10)
        new_nkey = (nkey[0], nkey[1], _alloc_sock(step, nkey[0]))
        opens = (new_tkey, new_nkey)
        fwd = dataclasses.replace(fwd, op_data=(msg.op_data & ~U32) | new_nkey[2])
    _forward(step, vm, nkey, msg, fwd, opens)


def _argument_errno(op: Op, msg: NQE) -> int:
    """Op-specific argument checks the engine itself depends on (SEC-9); 0 if fine."""
    if HALF[op] is None and msg.size:
        return E.EINVAL  # a buffer on an op that takes none
    if op is Op.ACCEPT and (msg.op_data >> 33 or not msg.op_data & U32):
        return E.EINVAL  # unknown flag bits, or new socket ID 0
    if op is Op.SEND and (msg.op_data >> 32) & 0xFFFF > msg.size:
        return E.EINVAL  # an address prefix longer than the buffer
    return 0


def _open_socket(step: _Step, src: Dev, msg: NQE) -> None:
    """SOCKET: pick the NSM, map the tenant into it if new, allocate its ID (CE-10, CE-15..17)."""
    vm = src.ident
    if msg.sock_id == 0 or msg.size:
        return step.refuse(src, msg.qset, msg, E.EINVAL)
    tkey = (vm, msg.qset, msg.sock_id)
    if tkey in _reserved_tenant_keys(step):
        return step.refuse(src, msg.qset, msg, E.EEXIST)
    if not _quota(step, vm):
        return step.refuse(src, msg.qset, msg, E.ENOBUFS)
    nsm = step.base.policy(step.engine(), vm)
    if nsm is None or Dev(Kind.NSM, nsm) not in step.devices:
        return step.refuse(src, msg.qset, msg, E.ENETDOWN)
    if (vm, nsm) not in step.grants:
        grant = _free_slice(step.ledgers[vm], step.base.slices)
        if grant is None:
            return step.refuse(src, msg.qset, msg, E.ENOBUFS)
        step.ledger(vm).grant(nsm, grant.offset, grant.size)
        step.grants[(vm, nsm)] = Grant(grant)
        step.send(Dest(Kind.NSM, nsm, 0, RingId.RECEIVE), NQE(
            op=Op.TENANT_MAP, vm_id=vm, op_data=vm, data_ptr=grant.offset, size=grant.size,
            tag=vm,
        ))
    nsm_geo = step.geo(Kind.NSM, nsm)
    nkey = (nsm, msg.qset % nsm_geo.n_qsets, _alloc_sock(step, nsm))
    fwd = dataclasses.replace(msg, qset=nkey[1], sock_id=nkey[2], data_ptr=0)
    _forward(step, vm, nkey, msg, fwd, (tkey, nkey))


def _free_slice(ledger: Ledger, n_slices: int) -> Span | None:
    """The first of ``n_slices`` equal, granule-aligned parts of the receive half no NSM holds.

    (CE-17, BUF-8)
    """
    geo = ledger.geo
    recv = bufpool.half_bounds(geo, Half.RECEIVE)
    per = min(recv.size // max(n_slices, 1), U32) // geo.buf_size * geo.buf_size
    if per == 0:
        return None
    taken = ledger.slices().values()
    for i in range(max(n_slices, 1)):
        span = Span(recv.offset + i * per, per)
        if not any(s.offset < span.end and span.offset < s.end for s in taken):
            return span
    return None


def _forward(step: _Step, vm: int, nkey: NsmKey, msg: NQE, fwd: NQE,
             opens: tuple[TenantKey, NsmKey] | None) -> None:
    """Send a checked request on to its NSM and remember it until answered (CE-11, CE-16)."""
    out = Output(Dest(Kind.NSM, nkey[0], nkey[1], to_nsm_ring(Op(msg.op))), nqe.pack(fwd))
    fk = (nkey, msg.tag)
    step.flights[fk] = Flight((vm, msg.qset, msg.sock_id), msg, out, opens)
    payload = msg.size if msg.op == Op.SEND else 0
    step.count(Dev(Kind.TENANT, vm), bytes_in=payload)
    grant = step.grants.get((vm, nkey[0]))
    if grant is not None and not grant.ready:
        step.grants[(vm, nkey[0])] = dataclasses.replace(grant, held=(*grant.held, fk))
        return
    step.out.append(out)
    step.count(out.dest.dev, nqes_out=1, bytes_out=payload)


def _buf_return(step: _Step, src: Dev, msg: NQE) -> None:
    """BUF_RETURN: a receive buffer goes back to the NSM that lent it (CE-14, BUF-5)."""
    vm = src.ident
    ledger = step.ledger(vm)
    try:
        bufpool.check_span(ledger.geo, Half.RECEIVE, msg.data_ptr, msg.size)
    except BufError as exc:
        return step.refuse(src, msg.qset, msg, exc.errno)
    if msg.sock_id != nqe.SOCK_NONE:
        return step.refuse(src, msg.qset, msg, E.EINVAL)  # NQE-7: control ops name no socket
    try:
        nsm = ledger.return_receive(msg.data_ptr, msg.size)
    except BufError as exc:
        return step.refuse(src, msg.qset, msg, exc.errno)
    qset = msg.qset % step.geo(Kind.NSM, nsm).n_qsets
    step.send(Dest(Kind.NSM, nsm, qset, RingId.RECEIVE), dataclasses.replace(msg, qset=qset))


# -- from an NSM -------------------------------------------------------------------------


def _unmatched(step: _Step, src: Dev, msg: NQE) -> None:
    """A reply or event naming nothing: stale after a detach, else the NSM's fault (CE-18)."""
    stale = any(n == src.ident and msg.sock_id in ids for (n, _), ids in step.draining.items())
    step.drop(src, stale=stale)


def _nsm_reply(step: _Step, src: Dev, msg: NQE) -> None:
    """A reply from an NSM: back to the tenant that asked (CE-7, CE-11)."""
    if msg.sock_id == nqe.SOCK_NONE and msg.request_op in (Op.TENANT_MAP, Op.TENANT_UNMAP):
        return _map_reply(step, src, msg)
    fk = ((src.ident, msg.qset, msg.sock_id), msg.tag)
    flight = step.flights.get(fk)
    if flight is None or msg.op not in (flight.request.op | nqe.REPLY_BIT, nqe.OP_UNKNOWN_REPLY):
        return _unmatched(step, src, msg)
    del step.flights[fk]
    _unhold(step, flight.tkey[0], src.ident, fk)
    req = flight.request
    ok = msg.op == req.op | nqe.REPLY_BIT and msg.result >= 0
    if req.op == Op.SEND and req.size:
        step.ledger(req.vm_id).settle_send(req.data_ptr, req.size)  # BUF-3
    if flight.opens and ok:
        step.table = conntable.insert(step.table, *flight.opens)
    if req.op == Op.CLOSE:
        step.table = conntable.remove_tenant(step.table, flight.tkey)
    _answer(step, flight, msg.op, msg.op_data)


def _unhold(step: _Step, vm: int, nsm: int, fk: FlightKey) -> None:
    """A held request answered before the TENANT_MAP reply is held no more (CE-16).

    The NSM never got it, so it guessed its socket ID and tag; the answer
    stands (the tenant gets it), and the map reply must not forward it.
    """
    grant = step.grants.get((vm, nsm))
    if grant is not None and fk in grant.held:
        step.grants[(vm, nsm)] = dataclasses.replace(
            grant, held=tuple(k for k in grant.held if k != fk))


def _answer(step: _Step, flight: Flight, op: int, op_data: int) -> None:
    """The tenant's reply: its request with op and result set (CE-11, SEC-4).

    It echoes the request's queue set, socket ID, tag, data_ptr and size,
    whatever the NSM wrote there.
    """
    req = flight.request
    reply = dataclasses.replace(req, op=op, op_data=op_data)
    step.send(Dest(Kind.TENANT, req.vm_id, req.qset, RingId.COMPLETION), reply)


def _nsm_event(step: _Step, src: Dev, msg: NQE) -> None:
    """An event from an NSM: to the tenant socket it serves (CE-12, SEC-4)."""
    tkey = conntable.lookup_nsm(step.table, (src.ident, msg.qset, msg.sock_id))
    if tkey is None:
        return _unmatched(step, src, msg)
    vm = tkey[0]
    if msg.op == Op.EV_DATA:
        if msg.op_data > msg.size:
            return step.drop(src)  # an address prefix longer than the buffer
        try:
            step.ledger(vm).lend_receive(src.ident, msg.data_ptr, msg.size)  # BUF-4, BUF-8
        except BufError:
            return step.drop(src)
    elif msg.size:
        return step.drop(src)  # a buffer on an event that takes none
    ev = dataclasses.replace(msg, vm_id=vm, qset=tkey[1], sock_id=tkey[2],
                             data_ptr=msg.data_ptr if msg.size else 0)
    step.count(src, bytes_in=ev.size if msg.op == Op.EV_DATA else 0)
    step.send(Dest(Kind.TENANT, vm, tkey[1], RingId.RECEIVE), ev)


def _map_reply(step: _Step, src: Dev, msg: NQE) -> None:
    """TENANT_MAP / TENANT_UNMAP answered (CE-16, CE-18). The tag is the VM ID."""
    nsm, vm = src.ident, msg.tag
    if msg.request_op == Op.TENANT_UNMAP:
        if (nsm, vm) not in step.draining:
            return step.drop(src)
        del step.draining[(nsm, vm)]
        return
    grant = step.grants.get((vm, nsm))
    if grant is None or grant.ready:
        return step.drop(src, stale=(nsm, vm) in step.draining)
    if msg.result >= 0:
        step.grants[(vm, nsm)] = dataclasses.replace(grant, ready=True, held=())
        for fk in grant.held:
            out = step.flights[fk].out
            step.out.append(out)
            step.count(out.dest.dev, nqes_out=1)
        return
    # the NSM could not map the tenant: its held requests fail with the NSM's errno
    del step.grants[(vm, nsm)]
    step.set_ledger(vm, _rebuild_ledger(step.ledgers[vm], drop_nsm=nsm))
    for fk in grant.held:
        _answer(step, step.flights.pop(fk), Op.SOCKET | nqe.REPLY_BIT, msg.op_data)


# -- detach ------------------------------------------------------------------------------


def _detach_tenant(step: _Step, dev: Dev) -> None:
    """Everything of a tenant goes; its NSMs get TENANT_UNMAP (CE-18, SEC-11)."""
    vm = dev.ident
    step.table, gone = conntable.detach_vm(step.table, vm)
    ids: dict[int, set[int]] = {}
    for n in gone.values():
        ids.setdefault(n[0], set()).add(n[2])
    for fk, f in list(step.flights.items()):
        if f.tkey[0] == vm:
            del step.flights[fk]
            ids.setdefault(fk[0][0], set()).add(fk[0][2])
            if f.opens:
                ids[fk[0][0]].add(f.opens[1][2])
    nsms = {n for (v, n) in step.grants if v == vm} | set(ids)
    for nsm in sorted(nsms):
        step.grants.pop((vm, nsm), None)
        if Dev(Kind.NSM, nsm) not in step.devices:
            continue
        step.draining[(nsm, vm)] = frozenset(ids.get(nsm, ()))
        step.send(Dest(Kind.NSM, nsm, 0, RingId.RECEIVE),
                  NQE(op=Op.TENANT_UNMAP, vm_id=vm, op_data=vm, tag=vm))
    step.ledgers.pop(vm, None)


def _detach_nsm(step: _Step, dev: Dev) -> None:
    """Everything an NSM served is answered or reset, then forgotten (CE-19, SEC-11)."""
    nsm = dev.ident
    closing: set[TenantKey] = set()
    for fk, f in sorted(step.flights.items()):
        if fk[0][0] != nsm:
            continue
        del step.flights[fk]
        req = f.request
        result = LOST_NSM_RESULT.get(Op(req.op), -LOST_NSM_ERRNO)
        if req.op == Op.CLOSE:
            closing.add(f.tkey)
        if req.op == Op.SEND and req.size and req.vm_id in step.ledgers:
            step.ledger(req.vm_id).settle_send(req.data_ptr, req.size)
        _answer(step, f, req.op | nqe.REPLY_BIT, nqe.encode_result(result))
    step.table, gone = conntable.detach_nsm(step.table, nsm)
    for tkey in sorted(gone):
        if tkey not in closing:
            step.send(Dest(Kind.TENANT, tkey[0], tkey[1], RingId.RECEIVE), NQE(
                op=Op.EV_ERROR, qset=tkey[1], vm_id=tkey[0], sock_id=tkey[2],
                op_data=nqe.encode_result(-LOST_NSM_ERRNO),
            ))
    for vm, n in [k for k in step.grants if k[1] == nsm]:
        del step.grants[(vm, n)]
    for vm in list(step.ledgers):
        if nsm in step.ledgers[vm].slices():
            step.set_ledger(vm, _rebuild_ledger(step.ledgers[vm], drop_nsm=nsm))
    for key in [k for k in step.draining if k[0] == nsm]:
        del step.draining[key]
    step.next_sock.pop(nsm, None)


Handler = Callable[[_Step, Dev, NQE], None]

#: Who may send what, and what the engine does with it (SEC-10). Every (kind, op class)
#: pair has an entry: there is no input without a defined outcome (SEC-6).
_HANDLERS: Final[dict[tuple[Kind, OpClass], Handler]] = {
    (Kind.TENANT, OpClass.CALL): _tenant_call,
    (Kind.TENANT, OpClass.BUF_RETURN): _buf_return,
    (Kind.TENANT, OpClass.ATTACH): _attach_op,
    (Kind.TENANT, OpClass.DETACH): _detach_op,
    (Kind.TENANT, OpClass.MAP): _forbidden,
    (Kind.TENANT, OpClass.EVENT): _forbidden,
    (Kind.TENANT, OpClass.REPLY): _forbidden,
    (Kind.NSM, OpClass.REPLY): _nsm_reply,
    (Kind.NSM, OpClass.EVENT): _nsm_event,
    (Kind.NSM, OpClass.ATTACH): _attach_op,
    (Kind.NSM, OpClass.DETACH): _detach_op,
    (Kind.NSM, OpClass.CALL): _forbidden,
    (Kind.NSM, OpClass.BUF_RETURN): _forbidden,
    (Kind.NSM, OpClass.MAP): _forbidden,
}
