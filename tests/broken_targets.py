"""Deliberately broken targets: the conformance suite must catch each one.

Used by tests/test_report.py to show that the suite fails an implementation
that breaks a requirement, and names that requirement in its report.
"""

from __future__ import annotations

import dataclasses
import types

from netkernel.conformance import targets
from netkernel.reference import nqe


def _lax_unpack(buf: bytes | bytearray | memoryview) -> nqe.NQE:
    """Accepts non-zero reserved bytes (breaks the reserved-bytes rule)."""
    raw = bytearray(bytes(buf))
    if len(raw) == nqe.NQE_SIZE:
        raw[29:32] = b"\x00\x00\x00"
    return nqe.unpack(raw)


def lax_codec() -> targets.Target:
    """The reference, except that its decoder ignores the reserved bytes."""
    ref = targets.reference()
    public = {k: getattr(nqe, k) for k in dir(nqe) if not k.startswith("__")}
    codec = types.SimpleNamespace(**public)
    codec.unpack = _lax_unpack
    return dataclasses.replace(ref, name="lax-codec", roles={**ref.roles, "codec": codec})


def codec_only() -> targets.Target:
    """A target that implements the codec role only: every other role is not applicable."""
    ref = targets.reference()
    return targets.Target("codec-only", {"codec": ref.roles["codec"]})
