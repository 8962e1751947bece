"""The fast-path GuestLib (Python front end): the reference GuestLib's logic, run over C.

GuestLib's behaviour (which calls it decides locally as Linux does, how it
matches replies, its threads and readiness) is written once, in
:mod:`netkernel.reference.guestlib`, and checked against Linux there. This
module executes that same code with its package set to ``netkernel.fastpath``,
so its ``from . import bell, device, nqe, shm`` and ``from .ring``/``.bufpool``
imports bind the fast path's C-backed modules: the rings (C11 atomics), the
futex bells, the send-half allocator and the NQE codec. The conformance
suite's ``guestlib`` role tests this module; tests/test_fastpath_interop.py
runs it against the reference CoreEngine and NSM, and the reference GuestLib
against the fast-path ones.

The LD_PRELOAD GuestLib for unmodified programs is C (issue 5); this one is for
Python programs that import ``socket`` from here.
"""

from __future__ import annotations

import importlib.util

_DOC = __doc__
_spec = importlib.util.find_spec("netkernel.reference.guestlib")
if _spec is None or _spec.origin is None:  # pragma: no cover - a broken install
    raise ImportError("netkernel.reference.guestlib is missing")
# compiled from its source, not through _spec.loader: under pytest the loader may be the
# assertion rewriter (the conformance plugin's entry point marks the package), which has
# no get_code
with open(_spec.origin, encoding="utf-8") as _src:
    _code = compile(_src.read(), _spec.origin, "exec")
exec(_code, globals())  # __package__ is netkernel.fastpath: relative imports bind the C modules
__doc__ = _DOC
del _code, _spec, _src
