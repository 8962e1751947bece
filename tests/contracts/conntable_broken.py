"""A deliberately broken connection table: ``crosshair check`` must find every bug here.

Each function below carries *exactly* the contracts of its namesake in
:mod:`netkernel.reference.conntable` (tests/test_crosshair.py checks that
the ``pre:``/``post:`` lines are identical) and breaks one invariant the way
a real slip would.
``tests/test_crosshair.py`` runs CrossHair on this file and expects a
counterexample naming each function: proof that the contract check over the
reference can fail, and is not confirmed vacuously over an empty table.
"""

from __future__ import annotations

from netkernel.reference.conntable import NsmKey, Table, TenantKey, is_table, valid_key

__all__ = ["Table", "detach_vm", "insert", "is_table", "remove_tenant", "translate",
           "valid_key"]


def remove_tenant(table: Table, tkey: TenantKey) -> Table:
    """Forgets the reverse map: the NSM side still names the closed socket (CE-3, CE-5).

    pre: is_table(table)
    post: is_table(__return__)
    post: __return__.fwd == {t: n for t, n in table.fwd.items() if t != tkey}
    """
    if tkey not in table.fwd:
        return table
    return Table({t: n for t, n in table.fwd.items() if t != tkey}, dict(table.rev))


def detach_vm(table: Table, vm_id: int) -> tuple[Table, dict[TenantKey, NsmKey]]:
    """Leaves the VM's last entry behind (CE-6).

    pre: is_table(table)
    post: is_table(__return__[0]) and all(t[0] != vm_id for t in __return__[0].fwd)
    post: {**__return__[0].fwd, **__return__[1]} == table.fwd
    post: all(t[0] == vm_id for t in __return__[1])
    """
    gone = {t: n for t, n in table.fwd.items() if t[0] == vm_id}
    if gone:
        gone.pop(next(reversed(gone)))
    dead = set(gone.values())
    kept = Table({t: n for t, n in table.fwd.items() if t not in gone},
                 {n: t for n, t in table.rev.items() if n not in dead})
    return kept, gone


def translate(table: Table, vm_id: int, qset: int, sock_id: int) -> NsmKey | None:
    """Matches the socket ID on any VM: a tenant can name another's socket (CE-4, SEC-1).

    pre: is_table(table)
    post: __return__ is None or table.rev[__return__] == (vm_id, qset, sock_id)
    """
    for (_vm, q, s), n in table.fwd.items():
        if q == qset and s == sock_id:
            return n
    return None


def insert(table: Table, tkey: TenantKey, nkey: NsmKey) -> Table:
    """Writes the new pair into the caller's table in place (purity, CE-3).

    pre: is_table(table)
    pre: valid_key(tkey) and valid_key(nkey)
    pre: tkey not in table.fwd and nkey not in table.rev
    post: table == __old__.table
    post: is_table(__return__) and __return__.fwd == {**table.fwd, tkey: nkey}
    """
    fwd, rev = table.fwd, table.rev
    fwd[tkey] = nkey  # type: ignore[index]
    rev[nkey] = tkey  # type: ignore[index]
    return Table(dict(fwd), dict(rev))
