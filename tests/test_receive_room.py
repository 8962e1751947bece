"""NSM-18 on the reference's model, ``bufpool.ReceiveAllocator.room``: whatever the
sockets of a tenant take and return, each socket that holds none of the slice is
still offered a granule, as long as no more than half the slice's granules are
wanted so. The conformance suite checks the behaviour on every NSM
(conformance/test_nsm.py); this pins the rule down over random histories, and shows
that the check fails for an NSM that keeps no reserve."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netkernel.reference.bufpool import ReceiveAllocator, Span
from netkernel.reference.device import Geometry

G = 4096
Room = Callable[[ReceiveAllocator, int, int, int], int]


def _no_reserve(pool: ReceiveAllocator, held: int, cap: int, empty: int) -> int:
    """A broken variant: the per-socket share only (NSM-16 alone), as before NSM-18."""
    return max(0, min(cap - held, pool.free_bytes()))


def _check(room: Room) -> None:
    @settings(max_examples=300, deadline=None, database=None)
    @given(total=st.integers(2, 32), sockets=st.integers(1, 16), seed=st.integers(0, 2**32 - 1),
           steps=st.lists(st.tuples(st.integers(0, 15), st.booleans(), st.integers(1, 40 * G)),
                          max_size=60))
    def history(total: int, sockets: int, seed: int,
                steps: list[tuple[int, bool, int]]) -> None:
        sockets = min(sockets, total // 2)  # at most half the granules wanted by empty sockets
        pool = ReceiveAllocator(Geometry(data_size=2 * total * G, send_size=total * G,
                                         buf_size=G), Span(total * G, total * G))
        cap = max(G, total * G // 2)
        held = [0] * sockets
        lent: list[list[tuple[int, int]]] = [[] for _ in range(sockets)]
        rng = random.Random(seed)
        for who, take, amount in steps:
            i = who % sockets
            empty = held.count(0)
            if take:
                want = min(room(pool, held[i], cap, empty), amount, pool.largest_free())
                assert held[i] + want <= cap, "the share (NSM-16)"
                if want > 0:
                    span = pool.alloc(want)
                    assert span is not None
                    lent[i].append((span.offset, want))
                    held[i] += want
            elif lent[i]:
                offset, size = lent[i].pop(rng.randrange(len(lent[i])))
                pool.free(offset)
                held[i] -= size
            empty = held.count(0)
            for j in range(sockets):
                if held[j] == 0:
                    assert room(pool, 0, cap, empty) >= G, (j, held, pool.free_bytes())

    history()


def test_every_socket_holding_nothing_is_offered_a_granule() -> None:
    _check(ReceiveAllocator.room)


def test_the_check_catches_an_nsm_with_no_reserve() -> None:
    with pytest.raises(AssertionError):
        _check(_no_reserve)
