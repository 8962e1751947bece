"""The C structs' layout against the construct declarations (NQE-1, NQE-2, DEV-3).

``struct nk_nqe`` and ``struct nk_dev_header`` are what the C fast path reads
and writes in shared memory; ``reference.nqe.NQE_STRUCT`` and
``reference.device.HEADER_STRUCT`` are the one declaration of those bytes.
cffi's API mode checks its view of each struct against the C compiler's when
the extension loads, so ``ffi.offsetof``/``ffi.sizeof`` are the compiled
layout. The comparison is shown to fail on a deliberately altered layout.
"""

from __future__ import annotations

from netkernel.fastpath._lib import ffi
from netkernel.reference import device, nqe

Layout = list[tuple[str, int, int]]


def c_layout(struct: str) -> Layout:
    """``(name, offset, size)`` of every field of a C struct, as compiled."""
    return [(name, ffi.offsetof(struct, name), ffi.sizeof(field.type))
            for name, field in ffi.typeof(struct).fields]


def mismatches(c: Layout, declared: Layout, *, size: int, declared_size: int,
               padding: tuple[str, ...] = ()) -> list[str]:
    """Every difference between a C layout and a declaration; ``padding`` names the C
    fields that stand for the declaration's unnamed padding (they must cover it exactly)."""
    out = [f"sizeof {size} != {declared_size}"] if size != declared_size else []
    named = [f for f in c if f[0] not in padding]
    for got, want in zip(named, declared, strict=False):
        if got != want:
            out.append(f"C field {got} != declared {want}")
    if len(named) != len(declared):
        out.append(f"C has {len(named)} named fields, the declaration {len(declared)}")
    # the padding fields and the named ones tile the struct with no gap or overlap
    end = 0
    for name, offset, width in sorted(c, key=lambda f: f[1]):
        if offset != end:
            out.append(f"gap or overlap before {name} at {offset} (expected {end})")
        end = offset + width
    if end != size:
        out.append(f"fields end at {end}, the struct at {size}")
    return out


def test_nqe_struct_is_the_construct_declaration() -> None:
    got = c_layout("struct nk_nqe")
    assert got == nqe.field_layout()
    assert mismatches(got, nqe.field_layout(), size=ffi.sizeof("struct nk_nqe"),
                      declared_size=nqe.NQE_STRUCT.sizeof()) == []
    assert ffi.sizeof("struct nk_nqe") == nqe.NQE_SIZE == 32


def test_device_header_is_the_construct_declaration() -> None:
    got = c_layout("struct nk_dev_header")
    assert mismatches(got, device.header_field_layout(),
                      size=ffi.sizeof("struct nk_dev_header"),
                      declared_size=device.HEADER_STRUCT.sizeof(), padding=("pad",)) == []
    assert ffi.sizeof("struct nk_dev_header") == device.HEADER_SIZE


def test_layout_check_fails_on_an_altered_layout() -> None:
    """The check can fail: a moved field, a wider field, a missing one, a wrong size."""
    declared = nqe.field_layout()
    got = c_layout("struct nk_nqe")
    size = ffi.sizeof("struct nk_nqe")
    swapped = [("tag", 27, 2) if f[0] == "size" else ("size", 23, 4) if f[0] == "tag" else f
               for f in declared]
    wider = [(n, o, s + 1) if n == "tag" else (n, o, s) for n, o, s in declared]
    moved = [(n, o + 1, s) if n == "reserved" else (n, o, s) for n, o, s in declared]
    for altered in (swapped, wider, moved, declared[:-1]):
        assert mismatches(got, altered, size=size, declared_size=32) != [], altered
    assert mismatches(got, declared, size=size, declared_size=33) != []
    # and on the C side: a struct whose fields leave a hole is caught by the tiling check
    holed = [(n, o + (1 if n == "reserved" else 0), s) for n, o, s in got]
    assert mismatches(holed, holed, size=size, declared_size=size) != []
