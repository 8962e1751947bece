"""The connection table (spec/coreengine.md CE-1..CE-7).

The ``conntable`` role provides ``EMPTY`` (the empty table; a table exposes
its two directions as the mappings ``fwd`` tenant key -> NSM key and ``rev``
NSM key -> tenant key), ``insert``, ``remove_tenant``, ``lookup_tenant``,
``lookup_nsm``, ``translate``, ``owns``, ``sockets_of_vm``,
``sockets_of_nsm``, ``detach_vm``, ``detach_nsm`` and ``TableError``. Every
operation is pure: it returns a new table and leaves the one it was given as
it was.

The main test drives the role with random inserts (keys drawn from small
pools, so collisions on either side are frequent), removals and detaches,
against a model that is a plain dict, and checks the invariants after every
step.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

Key = tuple[int, int, int]

# small pools: two keys collide often, on the tenant side and on the NSM side
owners = st.integers(1, 3)
qsets = st.integers(0, 1)
socks = st.integers(1, 3)
keys = st.tuples(owners, qsets, socks)
bad_keys = st.one_of(
    st.tuples(st.sampled_from([0, 255, 256, -1]), qsets, socks),
    st.tuples(owners, st.sampled_from([255, 256, -1]), socks),
    st.tuples(owners, qsets, st.sampled_from([0, 1 << 32, -1])),
)


def snapshot(table: Any) -> tuple[dict[Key, Key], dict[Key, Key]]:
    return dict(table.fwd), dict(table.rev)


def assert_bijection(table: Any) -> None:
    """CE-3: the two directions are inverse and the same size."""
    fwd, rev = snapshot(table)
    assert len(fwd) == len(rev)
    assert all(rev.get(n) == t for t, n in fwd.items())
    assert all(fwd.get(t) == n for n, t in rev.items())


class TableMachine(RuleBasedStateMachine):
    """The role under random operations against ``model``, a dict tenant key -> NSM key."""

    ct: Any

    @initialize()
    def start(self) -> None:
        self.table = self.ct.EMPTY
        self.model: dict[Key, Key] = {}

    def _step(self, new: Any) -> None:
        """Keep the new table; the old one must not have changed (CE-3: purity)."""
        before = self._before
        assert snapshot(self.table) == before, "an operation changed the table it was given"
        self.table = new

    def _take(self) -> None:
        self._before = snapshot(self.table)

    @rule(t=keys, n=keys)
    def insert(self, t: Key, n: Key) -> None:
        self._take()
        free = t not in self.model and n not in self.model.values()
        if free:
            self._step(self.ct.insert(self.table, t, n))
            self.model[t] = n
        else:
            with pytest.raises(self.ct.TableError):
                self.ct.insert(self.table, t, n)
            self._step(self.table)

    @rule(t=keys, n=keys, bad=bad_keys, side=st.booleans())
    def insert_malformed(self, t: Key, n: Key, bad: Key, side: bool) -> None:
        self._take()
        with pytest.raises(self.ct.TableError):
            self.ct.insert(self.table, bad, n) if side else self.ct.insert(self.table, t, bad)
        self._step(self.table)

    @rule(t=keys)
    def remove(self, t: Key) -> None:
        self._take()
        self._step(self.ct.remove_tenant(self.table, t))
        self.model.pop(t, None)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def remove_existing(self, data: st.DataObject) -> None:
        t = data.draw(st.sampled_from(sorted(self.model)))
        self.remove(t)

    @rule(vm=owners)
    def detach_vm(self, vm: int) -> None:
        self._take()
        new, gone = self.ct.detach_vm(self.table, vm)
        expect = {t: n for t, n in self.model.items() if t[0] == vm}
        assert dict(gone) == expect
        self._step(new)
        self.model = {t: n for t, n in self.model.items() if t[0] != vm}

    @rule(nsm=owners)
    def detach_nsm(self, nsm: int) -> None:
        self._take()
        new, gone = self.ct.detach_nsm(self.table, nsm)
        expect = {t: n for t, n in self.model.items() if n[0] == nsm}
        assert dict(gone) == expect
        self._step(new)
        self.model = {t: n for t, n in self.model.items() if n[0] != nsm}

    @invariant()
    def matches_model(self) -> None:
        if not hasattr(self, "model"):
            return
        assert_bijection(self.table)
        assert dict(self.table.fwd) == self.model
        rev = {n: t for t, n in self.model.items()}
        for o in range(1, 4):
            for q in range(2):
                for s in range(1, 4):
                    k = (o, q, s)
                    assert self.ct.lookup_tenant(self.table, k) == self.model.get(k)  # CE-1
                    assert self.ct.lookup_nsm(self.table, k) == rev.get(k)
                    found = self.ct.translate(self.table, o, q, s)  # CE-4
                    assert found == self.model.get(k)
                    assert found is None or rev[found][0] == o
                    for vm in range(1, 4):
                        assert self.ct.owns(self.table, vm, k) == (k in self.model and o == vm)
            assert dict(self.ct.sockets_of_vm(self.table, o)) == {
                t: n for t, n in self.model.items() if t[0] == o}
            assert dict(self.ct.sockets_of_nsm(self.table, o)) == {
                t: n for t, n in self.model.items() if n[0] == o}


@pytest.mark.req("CE-1", "CE-2", "CE-3", "CE-4", "CE-5", "CE-6")
def test_table_under_random_operations_against_a_dict(conntable: Any) -> None:
    machine = type("TargetTableMachine", (TableMachine,), {"ct": conntable})
    run_state_machine_as_test(machine)


@pytest.mark.req("CE-2")
@given(bad=bad_keys, good=keys, side=st.booleans())
def test_malformed_keys_are_refused(conntable: Any, bad: Key, good: Key, side: bool) -> None:
    t, n = (bad, good) if side else (good, bad)
    with pytest.raises(conntable.TableError):
        conntable.insert(conntable.EMPTY, t, n)
    edge = conntable.insert(conntable.EMPTY, (254, 254, (1 << 32) - 1), (1, 0, 1))
    assert snapshot(edge)[0] == {(254, 254, (1 << 32) - 1): (1, 0, 1)}


@pytest.mark.req("CE-3")
@given(t=keys, n=keys, t2=keys, n2=keys)
def test_insert_never_replaces(conntable: Any, t: Key, n: Key, t2: Key, n2: Key) -> None:
    table = conntable.insert(conntable.EMPTY, t, n)
    before = snapshot(table)
    for clash in ((t, n2), (t2, n)):
        with pytest.raises(conntable.TableError):
            conntable.insert(table, *clash)
        assert snapshot(table) == before
    if t2 != t and n2 != n:
        both = conntable.insert(table, t2, n2)
        assert snapshot(both)[0] == {t: n, t2: n2}
        assert snapshot(table) == before  # the input table is untouched
        assert_bijection(both)


@pytest.mark.req("CE-4")
@given(q=qsets, s=socks, a=owners, b=owners)
def test_a_tenant_never_reaches_another_tenants_entry(conntable: Any, q: int, s: int, a: int,
                                                    b: int) -> None:
    """Tenant a's socket (q, s) is invisible to tenant b, even with the same queue set and ID."""
    table = conntable.insert(conntable.EMPTY, (a, q, s), (1, 0, 7))
    found = conntable.translate(table, b, q, s)
    assert found == ((1, 0, 7) if a == b else None)
    assert conntable.owns(table, b, (a, q, s)) == (a == b)
    assert set(conntable.sockets_of_vm(table, b)) == ({(a, q, s)} if a == b else set())


@pytest.mark.req("CE-5")
def test_remove_takes_both_directions_and_nothing_else(conntable: Any) -> None:
    table = conntable.insert(conntable.EMPTY, (1, 0, 1), (1, 0, 10))
    table = conntable.insert(table, (2, 0, 1), (1, 0, 11))
    gone = conntable.remove_tenant(table, (1, 0, 1))
    assert snapshot(gone) == ({(2, 0, 1): (1, 0, 11)}, {(1, 0, 11): (2, 0, 1)})
    assert conntable.lookup_nsm(gone, (1, 0, 10)) is None
    assert snapshot(conntable.remove_tenant(gone, (1, 0, 1))) == snapshot(gone)


@pytest.mark.req("CE-6")
def test_detach_removes_exactly_the_devices_entries(conntable: Any) -> None:
    table = conntable.EMPTY
    pairs = {(1, 0, 1): (1, 0, 1), (1, 1, 2): (2, 0, 1), (2, 0, 1): (1, 0, 2),
             (3, 0, 9): (2, 0, 2)}
    for t, n in pairs.items():
        table = conntable.insert(table, t, n)
    left, gone = conntable.detach_vm(table, 1)
    assert dict(gone) == {(1, 0, 1): (1, 0, 1), (1, 1, 2): (2, 0, 1)}
    assert snapshot(left)[0] == {(2, 0, 1): (1, 0, 2), (3, 0, 9): (2, 0, 2)}
    assert_bijection(left)
    left, gone = conntable.detach_nsm(table, 2)
    assert dict(gone) == {(1, 1, 2): (2, 0, 1), (3, 0, 9): (2, 0, 2)}
    assert snapshot(left)[1] == {(1, 0, 1): (1, 0, 1), (1, 0, 2): (2, 0, 1)}
    assert_bijection(left)
    assert len(snapshot(table)[0]) == 4  # the table detached from is unchanged
