"""The ``coreengine`` role over the C switching core (fastpath/csrc/engine.c).

The same API as :mod:`netkernel.reference.engine`: an :class:`Engine` is a
value; :func:`attach`, :func:`detach` and :func:`switch` return a new engine
(a deep copy of the C engine, changed) and leave the one they were given as
it was. The C engine decides everything; this module converts types.

The policy (CE-15) is :func:`first_nsm`, :func:`assign` over a mapping (both
run in C), or any other callable ``policy(engine, vm_id)``, which is asked in
Python before a tenant's SOCKET reaches the C engine (so it may be asked for a
SOCKET that is refused before the reference would ask it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from netkernel.reference import nqe as ref_nqe
from netkernel.reference.bufpool import Span
from netkernel.reference.device import Geometry, Kind, RingId
from netkernel.reference.engine import (
    NQE_VERSION,
    Counters,
    Dest,
    Dev,
    EngineError,
    Grant,
    Output,
)
from netkernel.reference.engine import first_nsm as _ref_first_nsm

from ._lib import ffi, lib

__all__ = [
    "NQE_VERSION", "Counters", "Dest", "Dev", "Engine", "EngineError", "Geometry", "Kind",
    "Output", "Policy", "RingId", "assign", "attach", "counters", "detach", "first_nsm",
    "open_sockets", "status", "switch",
]

Policy = Callable[["Engine", int], "int | None"]
_U32 = 0xFFFF_FFFF
_KINDS = {int(k): k for k in Kind}
_RINGS = {int(r): r for r in RingId}
_OP_NAMES = [ref_nqe.op_name(b) for b in range(256)]
_OUT_SIZE = ffi.sizeof("struct nk_out")
_MAX_ID = 254


def first_nsm(engine: Engine, vm_id: int) -> int | None:
    """The default policy (CE-15): the NSM already serving the tenant, else the lowest NSM ID."""
    nsms = sorted(d.ident for d in engine.devices if d.kind is Kind.NSM)
    grants = engine.grants
    serving = [n for n in nsms if (vm_id, n) in grants]
    return next(iter(serving or nsms), None)


class _Assign:
    """The policy :func:`assign` returns: ``table[vm]`` while attached, else first_nsm."""

    def __init__(self, table: Mapping[int, int]) -> None:
        self.table = dict(table)

    def __call__(self, engine: Engine, vm_id: int) -> int | None:
        nsm = self.table.get(vm_id)
        if nsm is not None and Dev(Kind.NSM, nsm) in engine.devices:
            return nsm
        return first_nsm(engine, vm_id)


def assign(table: Mapping[int, int], fallback: Policy = first_nsm) -> Policy:
    """A policy that sends tenant ``vm`` to NSM ``table[vm]`` while it is attached (CE-15)."""
    if fallback not in (first_nsm, _ref_first_nsm):
        raise TypeError("the fast path's assign() falls back to first_nsm only")
    return _Assign(table)


def _config(policy: Policy, slices: int) -> Any:
    cfg = ffi.new("struct nk_engine_config *")
    cfg.slices = max(1, min(int(slices), _U32))
    if isinstance(policy, _Assign):
        for vm, nsm in policy.table.items():
            if isinstance(vm, int) and 0 <= vm <= 255 and isinstance(nsm, int) \
                    and 1 <= nsm <= _MAX_ID:
                cfg.assign[vm] = nsm
    elif policy not in (first_nsm, _ref_first_nsm) and not callable(policy):
        raise TypeError(f"policy must be first_nsm, assign(mapping) or a callable, got {policy!r}")
    return cfg


class Engine:
    """The whole state of a CoreEngine's switching core, held by the C engine (CE-*)."""

    __slots__ = ("_custom", "_h", "max_inflight", "policy", "slices")

    def __init__(self, policy: Policy = first_nsm, slices: int = 1,
                 max_inflight: int | None = None, *, _handle: Any = None) -> None:
        self.policy = policy
        self.slices = slices
        self.max_inflight = max_inflight
        self._custom = not isinstance(policy, _Assign) and policy not in (first_nsm,
                                                                          _ref_first_nsm)
        if _handle is None:
            _handle = ffi.gc(lib.nk_engine_new(_config(policy, slices)), lib.nk_engine_free)
            if max_inflight is not None:
                lib.nk_engine_set_max_inflight(_handle, max(0, min(int(max_inflight), 1 << 62)))
        self._h = _handle

    def _copy(self) -> Engine:
        h = ffi.gc(lib.nk_engine_clone(self._h), lib.nk_engine_free)
        return Engine(self.policy, self.slices, self.max_inflight, _handle=h)

    # -- views of the state, as the reference engine's fields ---------------------------
    @property
    def devices(self) -> dict[Dev, Geometry]:
        out: dict[Dev, Geometry] = {}
        geo = ffi.new("struct nk_geometry *")
        for kind in (Kind.TENANT, Kind.NSM):
            for ident in range(1, _MAX_ID + 1):
                if lib.nk_engine_geometry(self._h, kind, ident, geo) == 0:
                    out[Dev(kind, ident)] = Geometry(
                        n_qsets=geo.n_qsets, ring_entries=geo.ring_entries,
                        data_size=geo.data_size, send_size=geo.send_size,
                        buf_size=geo.buf_size, kind=kind)
        return out

    @property
    def grants(self) -> dict[tuple[int, int], Grant]:
        n = lib.nk_engine_grants(self._h, ffi.NULL, 0)
        buf = ffi.new("struct nk_grant_info[]", max(n, 1))
        lib.nk_engine_grants(self._h, buf, n)
        return {(g.vm, g.nsm): Grant(Span(g.offset, g.size), bool(g.ready),
                                     self._held(g.vm, g.nsm, g.held))
                for g in buf[0:n]}

    def _held(self, vm: int, nsm: int, n: int) -> tuple[Any, ...]:
        keys = ffi.new("uint64_t[]", max(n, 1))
        lib.nk_engine_grant_held(self._h, vm, nsm, keys, n)
        return tuple((((k >> 56) & 0xFF, (k >> 48) & 0xFF, (k >> 16) & _U32), k & 0xFFFF)
                     for k in keys[0:n])

    @property
    def table(self) -> dict[tuple[int, int, int], tuple[int, int, int]]:
        """The connection table, tenant key -> NSM key (CE-1)."""
        n = lib.nk_engine_table(self._h, ffi.NULL, 0)
        buf = ffi.new("struct nk_conn_info[]", max(n, 1))
        lib.nk_engine_table(self._h, buf, n)
        return {(c.vm, c.tqset, c.tsock): (c.nsm, c.nqset, c.nsock) for c in buf[0:n]}

    @property
    def flights(self) -> dict[Any, dict[str, Any]]:
        """Requests in flight, ``((nsm, qset, sock), tag) -> {tkey, request, out, opens, held}``."""
        n = lib.nk_engine_flights(self._h, ffi.NULL, 0)
        buf = ffi.new("struct nk_flight_info[]", max(n, 1))
        lib.nk_engine_flights(self._h, buf, n)
        out = {}
        for f in buf[0:n]:
            opens = ((f.open_vm, f.open_tqset, f.open_tsock),
                     (f.open_nsm, f.open_nqset, f.open_nsock)) if f.opens else None
            out[((f.nsm, f.nqset, f.nsock), f.tag)] = {
                "tkey": (f.vm, f.tqset, f.tsock),
                "request": bytes(ffi.buffer(ffi.addressof(f, "request"), 32)),
                "out": Output(Dest(Kind.NSM, f.nsm, f.fwd_qset, _RINGS[f.fwd_ring]),
                              bytes(ffi.buffer(ffi.addressof(f, "fwd"), 32))),
                "opens": opens, "held": bool(f.held),
            }
        return out

    @property
    def draining(self) -> dict[tuple[int, int], frozenset[int]]:
        n = lib.nk_engine_draining(self._h, ffi.NULL, 0)
        buf = ffi.new("struct nk_drain_info[]", max(n, 1))
        lib.nk_engine_draining(self._h, buf, n)
        out: dict[tuple[int, int], set[int]] = {}
        for d in buf[0:n]:
            ids = out.setdefault((d.nsm, d.vm), set())
            if d.sock:
                ids.add(d.sock)
        return {k: frozenset(v) for k, v in out.items()}

    @property
    def next_sock(self) -> dict[int, int]:
        return {n: s for n in range(1, _MAX_ID + 1) if (s := lib.nk_engine_next_sock(self._h, n))}

    def ledger(self, vm_id: int) -> dict[str, Any]:
        """Tenant ``vm_id``'s ledger: ``slices`` {nsm: Span}, ``sent`` and ``held`` span lists."""
        parts: dict[str, Any] = {}
        for name, part in (("slices", 0), ("sent", 1), ("held", 2)):
            n = lib.nk_engine_ledger(self._h, vm_id, part, ffi.NULL, 0)
            if n < 0:
                raise KeyError(vm_id)
            buf = ffi.new("struct nk_span_info[]", max(n, 1))
            lib.nk_engine_ledger(self._h, vm_id, part, buf, n)
            if part == 0:
                parts[name] = {s.nsm: Span(s.offset, s.size) for s in buf[0:n]}
            elif part == 1:
                parts[name] = sorted(Span(s.offset, s.size) for s in buf[0:n])
            else:
                parts[name] = sorted((Span(s.offset, s.size), s.nsm) for s in buf[0:n])
        return parts

    @property
    def counters(self) -> dict[Dev, Counters]:
        return {d: counters(self, d) for d in self.devices}


def _outputs(h: Any, n: int) -> list[Output]:
    if n <= 0:
        return []
    count = ffi.new("uint32_t *")
    outs = lib.nk_engine_outputs(h, count)
    blob = bytes(ffi.buffer(outs, _OUT_SIZE * n))
    result = []
    for i in range(0, _OUT_SIZE * n, _OUT_SIZE):
        result.append(Output(Dest(_KINDS[blob[i]], blob[i + 1], blob[i + 2], _RINGS[blob[i + 3]]),
                             blob[i + 4:i + _OUT_SIZE]))
    return result


def attach(engine: Engine, geometry: Geometry, ident: int | None = None) -> tuple[Engine, Dev]:
    """Hot-plug a device of ``geometry.kind``; returns the engine and the device (CE-22)."""
    kind = Kind(geometry.kind)
    if ident is not None and not 1 <= ident <= _MAX_ID:
        raise EngineError(f"{kind.name} ID {ident} is not free")
    geo = ffi.new("struct nk_geometry *", {
        "n_qsets": geometry.n_qsets, "ring_entries": geometry.ring_entries,
        "data_size": geometry.data_size, "send_size": geometry.send_size,
        "buf_size": geometry.buf_size, "kind": int(kind)})
    new = engine._copy()
    got = lib.nk_engine_attach(new._h, geo, -1 if ident is None else ident)
    if got == -28:  # ENOSPC
        raise EngineError(f"no free {kind.name} ID in 1..{_MAX_ID}")
    if got < 0:
        raise EngineError(f"{kind.name} ID {ident} is not free")
    return new, Dev(kind, got)


def detach(engine: Engine, dev: Dev) -> tuple[Engine, list[Output]]:
    """Remove a device and everything of it (CE-18 tenant, CE-19 NSM)."""
    kind, ident = int(dev[0]), int(dev[1])
    if not 0 <= ident <= 255 or lib.nk_engine_geometry(engine._h, kind, ident,
                                                       ffi.new("struct nk_geometry *")):
        return engine, []
    new = engine._copy()
    n = lib.nk_engine_detach(new._h, kind, ident)
    return new, _outputs(new._h, n)


def switch(engine: Engine, src: Dev, qset: int, ring: RingId,
           raw: bytes | bytearray | memoryview) -> tuple[Engine, list[Output]]:
    """Switch one NQE read from ring ``ring`` of queue set ``qset`` of device ``src`` (CE-8)."""
    kind, ident = int(src[0]), int(src[1])
    if not 0 <= ident <= 255 or kind not in _KINDS:
        return engine, []
    geo = ffi.new("struct nk_geometry *")
    if lib.nk_engine_geometry(engine._h, kind, ident, geo):
        return engine, []  # CE-24
    ring = RingId(ring)
    if not ring.to_engine or not 0 <= qset < geo.n_qsets:
        raise EngineError(f"the engine reads JOB and SEND of queue sets 0..{geo.n_qsets - 1},"
                          f" not {ring.name} of queue set {qset}")
    data = bytes(raw)
    if len(data) != ref_nqe.NQE_SIZE:
        raise EngineError(f"a ring slot holds {ref_nqe.NQE_SIZE} bytes, got {len(data)}")
    new = engine._copy()
    if engine._custom and kind == Kind.TENANT and data[0] == ref_nqe.Op.SOCKET \
            and data[29:32] == b"\0\0\0":
        nsm = engine.policy(engine, ident)
        lib.nk_engine_set_policy_choice(new._h, nsm if isinstance(nsm, int)
                                        and 1 <= nsm <= _MAX_ID else 0)
    n = lib.nk_engine_switch(new._h, kind, ident, qset, int(ring),
                             ffi.from_buffer("struct nk_nqe *", data))
    lib.nk_engine_set_policy_choice(new._h, -1)
    if n < 0:
        raise EngineError(f"the C engine refused the call: {n}")
    return new, _outputs(new._h, n)


def counters(engine: Engine, dev: Dev) -> Counters:
    """The counters of an attached device (CE-23)."""
    c = ffi.new("struct nk_counters *")
    if lib.nk_engine_counters(engine._h, int(dev[0]), int(dev[1]), c):
        raise KeyError(Dev(*dev))
    ops = {_OP_NAMES[b]: c.ops[b] for b in range(256) if c.ops[b]}
    return Counters(nqes_in=c.nqes_in, nqes_out=c.nqes_out, bytes_in=c.bytes_in,
                    bytes_out=c.bytes_out, rejected=c.rejected, stale=c.stale, ops=ops)


def open_sockets(engine: Engine, dev: Dev) -> int:
    """Entries of the connection table on the device's side (CE-23)."""
    return int(lib.nk_engine_open_sockets(engine._h, int(dev[0]), int(dev[1])))


def status(engine: Engine) -> dict[str, object]:
    """Everything an operator's ``status`` shows of the engine (CE-23)."""
    devices = sorted(engine.devices)
    return {
        "devices": [{"kind": d.kind.name.lower(), "id": d.ident,
                     "sockets": open_sockets(engine, d),
                     "counters": counters(engine, d).as_dict()} for d in devices],
        "sockets": int(lib.nk_engine_sockets(engine._h)),
        "in_flight": int(lib.nk_engine_in_flight(engine._h)),
        "grants": [{"vm_id": vm, "nsm_id": n, "offset": g.slice.offset, "size": g.slice.size,
                    "ready": g.ready} for (vm, n), g in sorted(engine.grants.items())],
    }
