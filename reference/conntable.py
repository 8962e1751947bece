"""The CoreEngine's connection table (spec/coreengine.md, CE-1..CE-6).

The table pairs a tenant's socket with the NSM socket that serves it::

    <VM ID, queue set ID, socket ID>  <->  <NSM ID, queue set ID, socket ID>

Rules of this file:

* The table is an immutable value; every function here is pure (table in,
  table out). Nothing here knows about NQEs, rings or devices.
* The invariants are PEP 316 contracts that ``crosshair check`` verifies. Each
  contract's precondition is :func:`is_table` over a table *given as an
  argument*, so CrossHair explores arbitrary valid non-empty tables rather
  than only the ones a constructor happens to build (a class invariant over
  a table that starts empty is confirmed vacuously).
* Every ``post:`` includes purity (the argument is unchanged) and "nothing
  but the named entries changed", so a function that edits the wrong map or
  the wrong tenant is a counterexample. ``tests/contracts/conntable_broken.py``
  breaks each function once and ``tests/test_crosshair.py`` shows CrossHair
  rejecting it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final

#: ``(vm_id, qset, sock_id)``: a socket as its tenant names it (CE-1).
TenantKey = tuple[int, int, int]
#: ``(nsm_id, qset, sock_id)``: the same socket as its NSM names it (CE-1).
NsmKey = tuple[int, int, int]

ID_MIN: Final = 1  # CE-2: VM IDs and NSM IDs are 1..254; 0 names nobody, 255 is reserved
ID_MAX: Final = 254
QSET_MAX: Final = 254  # a queue set ID is one byte and a device has at most 255 of them
SOCK_MAX: Final = 0xFFFF_FFFF  # socket IDs are nonzero u32 (0 names no socket)


class TableError(ValueError):
    """An insert that would break the table's invariants (CE-3)."""


@dataclasses.dataclass(frozen=True)
class Table:
    """The connection table: ``fwd`` tenant -> NSM and ``rev`` NSM -> tenant (CE-1)."""

    fwd: Mapping[TenantKey, NsmKey] = dataclasses.field(default_factory=dict)
    rev: Mapping[NsmKey, TenantKey] = dataclasses.field(default_factory=dict)


EMPTY: Final = Table()


def valid_key(key: tuple[int, int, int]) -> bool:
    """True if ``key`` is ``(ID 1..254, queue set 0..254, socket 1..2**32-1)`` (CE-2)."""
    owner, qset, sock = key
    return ID_MIN <= owner <= ID_MAX and 0 <= qset <= QSET_MAX and 1 <= sock <= SOCK_MAX


def is_table(table: Table) -> bool:
    """The table invariant (CE-3): ``fwd`` and ``rev`` are inverse bijections.

    Same size, and every forward entry is mirrored in ``rev``; that makes
    ``fwd`` injective, so with equal sizes ``rev`` holds nothing else. Key
    well-formedness (CE-2) is not part of it: :func:`insert` is the only way
    in and refuses malformed keys, and keeping the invariant small keeps
    CrossHair's search deep.
    """
    return len(table.fwd) == len(table.rev) and all(
        table.rev.get(n) == t for t, n in table.fwd.items()
    )


def insert(table: Table, tkey: TenantKey, nkey: NsmKey) -> Table:
    """The table with the pair ``tkey <-> nkey`` added (CE-3, CE-4).

    Raises :class:`TableError` unless both keys are well formed and free: an
    entry never replaces another, on either side.

    pre: is_table(table)
    pre: valid_key(tkey) and valid_key(nkey)
    pre: tkey not in table.fwd and nkey not in table.rev
    post: table == __old__.table
    post: is_table(__return__) and __return__.fwd == {**table.fwd, tkey: nkey}
    """
    if not (valid_key(tkey) and valid_key(nkey)):
        raise TableError(f"malformed key: {tkey} <-> {nkey}")
    if tkey in table.fwd:
        raise TableError(f"tenant socket {tkey} is already in the table")
    if nkey in table.rev:
        raise TableError(f"NSM socket {nkey} is already in the table")
    return Table({**table.fwd, tkey: nkey}, {**table.rev, nkey: tkey})


def remove_tenant(table: Table, tkey: TenantKey) -> Table:
    """The table without the entry of tenant socket ``tkey``, if any (CE-5).

    Removing an absent key returns the table unchanged.

    pre: is_table(table)
    post: is_table(__return__)
    post: __return__.fwd == {t: n for t, n in table.fwd.items() if t != tkey}
    """
    nkey = table.fwd.get(tkey)
    if nkey is None:
        return table
    return Table(
        {t: n for t, n in table.fwd.items() if t != tkey},
        {n: t for n, t in table.rev.items() if n != nkey},
    )


def lookup_tenant(table: Table, tkey: TenantKey) -> NsmKey | None:
    """The NSM socket paired with tenant socket ``tkey``, or None (CE-1).

    pre: is_table(table)
    post: (tkey in table.fwd) == (__return__ is not None and table.rev[__return__] == tkey)
    """
    return table.fwd.get(tkey)


def lookup_nsm(table: Table, nkey: NsmKey) -> TenantKey | None:
    """The tenant socket paired with NSM socket ``nkey``, or None (CE-1).

    pre: is_table(table)
    post: (nkey in table.rev) == (__return__ is not None and table.fwd[__return__] == nkey)
    """
    return table.rev.get(nkey)


def translate(table: Table, vm_id: int, qset: int, sock_id: int) -> NsmKey | None:
    """What a socket ID on tenant ``vm_id``'s queue set ``qset`` names, or None (CE-4).

    ``vm_id`` is the stamped VM ID of the device the NQE came from, never a
    wire value (CE-8): the only entries a tenant can reach are its own.

    pre: is_table(table)
    post: __return__ is None or table.rev[__return__] == (vm_id, qset, sock_id)
    """
    return table.fwd.get((vm_id, qset, sock_id))


def owns(table: Table, vm_id: int, tkey: TenantKey) -> bool:
    """True if ``tkey`` is in the table and belongs to tenant ``vm_id`` (CE-4).

    pre: is_table(table)
    post: __return__ == (tkey in table.fwd and tkey[0] == vm_id)
    """
    return tkey[0] == vm_id and tkey in table.fwd


def sockets_of_vm(table: Table, vm_id: int) -> dict[TenantKey, NsmKey]:
    """Every entry of tenant ``vm_id`` (CE-4, CE-6).

    pre: is_table(table)
    post: __return__ == {t: n for t, n in table.fwd.items() if t[0] == vm_id}
    """
    return {t: n for t, n in table.fwd.items() if t[0] == vm_id}


def sockets_of_nsm(table: Table, nsm_id: int) -> dict[TenantKey, NsmKey]:
    """Every entry served by NSM ``nsm_id`` (CE-6).

    pre: is_table(table)
    post: __return__ == {t: n for t, n in table.fwd.items() if n[0] == nsm_id}
    """
    return {t: n for t, n in table.fwd.items() if n[0] == nsm_id}


def detach_vm(table: Table, vm_id: int) -> tuple[Table, dict[TenantKey, NsmKey]]:
    """The table without any entry of tenant ``vm_id``, and the entries removed (CE-6).

    pre: is_table(table)
    post: is_table(__return__[0]) and all(t[0] != vm_id for t in __return__[0].fwd)
    post: {**__return__[0].fwd, **__return__[1]} == table.fwd
    post: all(t[0] == vm_id for t in __return__[1])
    """
    gone = {t: n for t, n in table.fwd.items() if t[0] == vm_id}
    return _without(table, gone), gone


def detach_nsm(table: Table, nsm_id: int) -> tuple[Table, dict[TenantKey, NsmKey]]:
    """The table without any entry served by NSM ``nsm_id``, and the entries removed (CE-6).

    pre: is_table(table)
    post: is_table(__return__[0]) and all(n[0] != nsm_id for n in __return__[0].rev)
    post: {**__return__[0].fwd, **__return__[1]} == table.fwd
    post: all(n[0] == nsm_id for n in __return__[1].values())
    """
    gone = {t: n for t, n in table.fwd.items() if n[0] == nsm_id}
    return _without(table, gone), gone


def _without(table: Table, gone: Mapping[TenantKey, NsmKey]) -> Table:
    """``table`` minus the entries in ``gone`` (which must be entries of ``table``)."""
    if not gone:
        return table
    dead = set(gone.values())
    return Table(
        {t: n for t, n in table.fwd.items() if t not in gone},
        {n: t for n, t in table.rev.items() if n not in dead},
    )
