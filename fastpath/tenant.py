"""The minimal C tenant (csrc/tenant.c) from Python: attach, map, and thin wrappers.

Python does what the C tenant leaves to its caller: the attach conversation on
``engine.sock`` (the reference GuestLib's, RUNTIME.md; the connection stays
open and its end is the detach) and the mapping of ``vm-<id>.nk``. Everything
else, NQEs, replies, events, buffers, bells, is C. The wrappers raise
:class:`OSError` with the errno the C call returned; blocking calls release the
GIL (cffi does for every call).

For tests and the benchmark (bench/kernel_nsm.py); applications use the
GuestLib (:mod:`netkernel.fastpath.guestlib`, later the C one of issue 5).
"""

from __future__ import annotations

import os
import socket as _std
from typing import Any

from netkernel.reference.guestlib import _attach

from . import shm
from ._lib import ffi, lib

Address = tuple[str, int]


def _check(rc: int) -> int:
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return rc


def _sockaddr(family: int, address: Address) -> tuple[Any, int]:
    """The Linux sockaddr bytes of ``(host, port)`` (NQE-15), as a cffi buffer."""
    host, port = address
    if family == _std.AF_INET:
        raw = (family.to_bytes(2, "little") + port.to_bytes(2, "big") +
               _std.inet_pton(family, host) + bytes(8))
    else:
        raw = (family.to_bytes(2, "little") + port.to_bytes(2, "big") + bytes(4) +
               _std.inet_pton(family, host) + bytes(4))
    return ffi.new("char[]", raw), len(raw)


def _address(raw: bytes) -> Address:
    family = int.from_bytes(raw[:2], "little")
    port = int.from_bytes(raw[2:4], "big")
    host = raw[4:8] if family == _std.AF_INET else raw[8:24]
    return _std.inet_ntop(family, host), port


class Tenant:
    """One attached tenant device driven by the C tenant (one thread at a time)."""

    def __init__(self, instance: str | None = None, *, spin_ns: int = -1,
                 max_sends: int = 0, send_batch: int = 0) -> None:
        self.control, self.vm_id, path = _attach(shm.instance_name(instance))
        try:
            self.map = shm.open_device(path)
            self._buf = ffi.from_buffer(self.map.buf, require_writable=True)
            opts = ffi.new("struct nk_tenant_opts *", {
                "spin_ns": spin_ns, "max_sends": max_sends, "control_fd": self.control.fileno(),
                "send_batch": send_batch})
            out = ffi.new("struct nk_tenant **")
            _check(lib.nk_tenant_init(out, self._buf, len(self.map.buf), opts))
        except BaseException:
            self.control.close()
            raise
        self.ptr: Any = out[0]

    # -- life --------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Wait for SENDs and CLOSEs in flight (GL-10), free the tenant, detach."""
        if self.ptr is None:
            return
        ptr, self.ptr = self.ptr, None
        lib.nk_tenant_exit(ptr, int(timeout * 1e9))
        del self._buf
        self.control.close()  # the detach (RT-4)

    def __enter__(self) -> Tenant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        out = ffi.new("struct nk_tenant_stats *")
        lib.nk_tenant_get_stats(self.ptr, out)
        return {name: int(getattr(out, name)) for name, _ in ffi.typeof(out[0]).fields}

    # -- sockets (handles are socket IDs) --------------------------------------------
    def socket(self, family: int = _std.AF_INET, type: int = _std.SOCK_STREAM,
               proto: int = 0) -> int:
        return _check(lib.nk_tenant_socket(self.ptr, family, type, proto))

    def bind(self, s: int, address: Address, family: int = _std.AF_INET) -> None:
        raw, n = _sockaddr(family, address)
        _check(lib.nk_tenant_bind(self.ptr, s, ffi.cast("struct sockaddr *", raw), n))

    def listen(self, s: int, backlog: int = 16) -> None:
        _check(lib.nk_tenant_listen(self.ptr, s, backlog))

    def accept(self, s: int) -> tuple[int, Address]:
        raw = ffi.new("char[28]")
        n = ffi.new("socklen_t *", 28)
        new = _check(lib.nk_tenant_accept(self.ptr, s, ffi.cast("struct sockaddr *", raw), n))
        return new, _address(ffi.buffer(raw, n[0])[:])

    def connect(self, s: int, address: Address, family: int = _std.AF_INET) -> None:
        raw, n = _sockaddr(family, address)
        _check(lib.nk_tenant_connect(self.ptr, s, ffi.cast("struct sockaddr *", raw), n))

    def setsockopt(self, s: int, level: int, name: int, value: int) -> None:
        v = ffi.new("int *", value)
        _check(lib.nk_tenant_setsockopt(self.ptr, s, level, name, v, 4))

    def getsockname(self, s: int) -> Address:
        raw = ffi.new("char[28]")
        n = ffi.new("socklen_t *", 28)
        _check(lib.nk_tenant_getsockname(self.ptr, s, ffi.cast("struct sockaddr *", raw), n))
        return _address(ffi.buffer(raw, n[0])[:])

    def send(self, s: int, data: bytes) -> int:
        return _check(lib.nk_tenant_send(self.ptr, s, ffi.from_buffer(data), len(data), 0))

    def recv(self, s: int, size: int) -> bytes:
        buf = ffi.new("char[]", max(size, 1))
        n = _check(lib.nk_tenant_recv(self.ptr, s, buf, size, 0))
        data: bytes = ffi.buffer(buf, n)[:]
        return data

    def shutdown(self, s: int, how: int) -> None:
        _check(lib.nk_tenant_shutdown(self.ptr, s, how))

    def close_socket(self, s: int) -> None:
        _check(lib.nk_tenant_close(self.ptr, s))
