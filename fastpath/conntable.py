"""The connection table over C (fastpath/csrc/engine.c, ``nk_table_*``; CE-1..CE-6).

The pure-function API of :mod:`netkernel.reference.conntable`: a :class:`Table`
is an immutable value (a C table nobody changes once it is handed out);
``insert``, ``remove_tenant``, ``detach_vm`` and ``detach_nsm`` return a new
one. ``fwd`` and ``rev`` are read-only mappings built from the C table. The
C engine keeps its own table of the same code (``struct nk_table``).
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from netkernel.reference.conntable import (
    ID_MAX,
    ID_MIN,
    QSET_MAX,
    SOCK_MAX,
    NsmKey,
    TableError,
    TenantKey,
    valid_key,
)

from ._lib import ffi, lib

__all__ = [
    "EMPTY", "ID_MAX", "ID_MIN", "QSET_MAX", "SOCK_MAX", "NsmKey", "Table", "TableError",
    "TenantKey", "detach_nsm", "detach_vm", "insert", "lookup_nsm", "lookup_tenant", "owns",
    "remove_tenant", "sockets_of_nsm", "sockets_of_vm", "translate", "valid_key",
]


class Table:
    """The connection table: ``fwd`` tenant -> NSM and ``rev`` NSM -> tenant (CE-1)."""

    __slots__ = ("_fwd", "_h", "_rev")

    def __init__(self, handle: Any = None) -> None:
        if handle is None:
            handle = ffi.gc(lib.nk_table_new(), lib.nk_table_free)
        self._h = handle
        self._fwd: Mapping[TenantKey, NsmKey] | None = None
        self._rev: Mapping[NsmKey, TenantKey] | None = None

    def _load(self) -> None:
        n = lib.nk_table_list(self._h, ffi.NULL, 0)
        buf = ffi.new("struct nk_conn_info[]", max(n, 1))
        lib.nk_table_list(self._h, buf, n)
        fwd = {(c.vm, c.tqset, c.tsock): (c.nsm, c.nqset, c.nsock) for c in buf[0:n]}
        self._fwd = MappingProxyType(fwd)
        self._rev = MappingProxyType({nk: tk for tk, nk in fwd.items()})

    @property
    def fwd(self) -> Mapping[TenantKey, NsmKey]:
        if self._fwd is None:
            self._load()
        assert self._fwd is not None
        return self._fwd

    @property
    def rev(self) -> Mapping[NsmKey, TenantKey]:
        if self._rev is None:
            self._load()
        assert self._rev is not None
        return self._rev

    def _copy(self) -> Table:
        return Table(ffi.gc(lib.nk_table_clone(self._h), lib.nk_table_free))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Table):
            return NotImplemented
        return dict(self.fwd) == dict(other.fwd)

    def __hash__(self) -> int:
        return hash(frozenset(self.fwd.items()))

    def __repr__(self) -> str:
        return f"Table(fwd={dict(self.fwd)!r})"


EMPTY: Final = Table()


def _fits(key: tuple[int, int, int]) -> bool:
    return all(isinstance(x, int) for x in key) and valid_key(key)


def insert(table: Table, tkey: TenantKey, nkey: NsmKey) -> Table:
    """The table with the pair ``tkey <-> nkey`` added (CE-3, CE-4); TableError if taken."""
    if not (_fits(tkey) and _fits(nkey)):
        raise TableError(f"malformed key: {tkey} <-> {nkey}")
    new = table._copy()
    c = ffi.new("struct nk_conn_info *", {"vm": tkey[0], "tqset": tkey[1], "tsock": tkey[2],
                                          "nsm": nkey[0], "nqset": nkey[1], "nsock": nkey[2]})
    got = lib.nk_table_insert(new._h, c)
    if got == -_errno.EEXIST:
        raise TableError(f"tenant socket {tkey} is already in the table")
    if got == -_errno.EADDRINUSE:
        raise TableError(f"NSM socket {nkey} is already in the table")
    if got:
        raise TableError(f"malformed key: {tkey} <-> {nkey}")
    return new


def remove_tenant(table: Table, tkey: TenantKey) -> Table:
    """The table without the entry of tenant socket ``tkey``, if any (CE-5)."""
    if tkey not in table.fwd:
        return table
    new = table._copy()
    lib.nk_table_remove_tenant(new._h, *tkey)
    return new


def _lookup(table: Table, nsm_side: int, key: tuple[int, int, int]) -> Any:
    if not _fits(key):
        return None
    out = ffi.new("struct nk_conn_info *")
    if not lib.nk_table_lookup(table._h, nsm_side, key[0], key[1], key[2], out):
        return None
    return out


def lookup_tenant(table: Table, tkey: TenantKey) -> NsmKey | None:
    """The NSM socket paired with tenant socket ``tkey``, or None (CE-1)."""
    c = _lookup(table, 0, tkey)
    return None if c is None else (c.nsm, c.nqset, c.nsock)


def lookup_nsm(table: Table, nkey: NsmKey) -> TenantKey | None:
    """The tenant socket paired with NSM socket ``nkey``, or None (CE-1)."""
    c = _lookup(table, 1, nkey)
    return None if c is None else (c.vm, c.tqset, c.tsock)


def translate(table: Table, vm_id: int, qset: int, sock_id: int) -> NsmKey | None:
    """What a socket ID on tenant ``vm_id``'s queue set ``qset`` names, or None (CE-4)."""
    return lookup_tenant(table, (vm_id, qset, sock_id))


def owns(table: Table, vm_id: int, tkey: TenantKey) -> bool:
    """True if ``tkey`` is in the table and belongs to tenant ``vm_id`` (CE-4)."""
    return tkey[0] == vm_id and lookup_tenant(table, tkey) is not None


def sockets_of_vm(table: Table, vm_id: int) -> dict[TenantKey, NsmKey]:
    """Every entry of tenant ``vm_id`` (CE-4, CE-6)."""
    return {t: n for t, n in table.fwd.items() if t[0] == vm_id}


def sockets_of_nsm(table: Table, nsm_id: int) -> dict[TenantKey, NsmKey]:
    """Every entry served by NSM ``nsm_id`` (CE-6)."""
    return {t: n for t, n in table.fwd.items() if n[0] == nsm_id}


def _detach(table: Table, nsm_side: int, ident: int,
            gone: dict[TenantKey, NsmKey]) -> tuple[Table, dict[TenantKey, NsmKey]]:
    if not gone:
        return table, gone
    new = table._copy()
    lib.nk_table_detach(new._h, nsm_side, ident)
    return new, gone


def detach_vm(table: Table, vm_id: int) -> tuple[Table, dict[TenantKey, NsmKey]]:
    """The table without any entry of tenant ``vm_id``, and the entries removed (CE-6)."""
    return _detach(table, 0, vm_id, sockets_of_vm(table, vm_id))


def detach_nsm(table: Table, nsm_id: int) -> tuple[Table, dict[TenantKey, NsmKey]]:
    """The table without any entry served by NSM ``nsm_id``, and the entries removed (CE-6)."""
    return _detach(table, 1, nsm_id, sockets_of_nsm(table, nsm_id))
