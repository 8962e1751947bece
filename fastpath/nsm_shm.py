"""The shm NSM: ``python -m netkernel.fastpath.nsm_shm --instance NAME [--placement auto|shm]``.

The C NSM of :mod:`netkernel.fastpath.nsm_kernel` with on-host pairing on
(spec/shm.md): it serves every tenant on Linux sockets like the kernel NSM,
and carries a TCP connection in shared memory when a tenant of its own
listens at the address a CONNECT names (SHM-2). ``--placement auto`` (the
default) falls back to Linux TCP when the listener's accept queue is full,
``--placement shm`` refuses the connection then (SHM-1). It attaches with
the name ``shm`` unless ``--name`` says otherwise, and writes its per-tenant
counters to ``<runtime>/nsm-<ID>.stats.json`` while it runs (SHM-7).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import nsm_kernel


def main(argv: Sequence[str] | None = None) -> int:
    return nsm_kernel.main(argv, placement="auto", name="shm",
                           placements=("auto", "shm"),
                           prog="python -m netkernel.fastpath.nsm_shm",
                           description="NetKernel shm NSM (C fast path): tenants' sockets on "
                                       "Linux sockets, tenant-to-tenant TCP paired in shared "
                                       "memory")


if __name__ == "__main__":
    sys.exit(main())
