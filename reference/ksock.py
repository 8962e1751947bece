"""Linux socket calls on raw addresses, with io_uring-style results (NQE-13).

The kernel-stack NSM (:mod:`netkernel.reference.nsm_kernel`) executes every
socket call on a real Linux socket, reading its arguments from and writing its
results into a tenant's data area *in place*: a sockaddr is passed to the
kernel exactly as the tenant wrote it, and received data lands in the receive
buffer with no copy in between. The standard library's ``socket`` module takes
and returns Python tuples, so it would need a sockaddr codec that can only
approximate Linux's own checks; these thin wrappers over libc instead hand the
kernel the bytes, and the kernel answers with its own errno.

Every function returns what the NQE reply carries: the call's non-negative
result, or ``-errno`` (io_uring's convention). Addresses are virtual addresses
in this process (a mapped data area, see :func:`netkernel.reference.bell.buffer_address`);
the kernel validates them, so a stale or bad address costs ``-EFAULT``, never
a crash. Nothing here blocks: the NSM creates every socket with
``SOCK_NONBLOCK``.

This module is the only place the NSM makes socket system calls.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import struct
import termios
from typing import Final

_libc = ctypes.CDLL(None, use_errno=True)

_int = ctypes.c_int
_ptr = ctypes.c_void_p
_size = ctypes.c_size_t
_ssize = ctypes.c_ssize_t
_socklen = ctypes.c_uint32
_socklen_p = ctypes.POINTER(_socklen)


def _fn(name: str, restype: type, *argtypes: type) -> ctypes._NamedFuncPointer:
    func = getattr(_libc, name)
    func.restype = restype
    func.argtypes = list(argtypes)
    return func  # type: ignore[no-any-return]


_socket = _fn("socket", _int, _int, _int, _int)
_bind = _fn("bind", _int, _int, _ptr, _socklen)
_connect = _fn("connect", _int, _int, _ptr, _socklen)
_listen = _fn("listen", _int, _int, _int)
_accept4 = _fn("accept4", _int, _int, _ptr, _socklen_p, _int)
_getsockname = _fn("getsockname", _int, _int, _ptr, _socklen_p)
_getpeername = _fn("getpeername", _int, _int, _ptr, _socklen_p)
_setsockopt = _fn("setsockopt", _int, _int, _int, _int, _ptr, _socklen)
_getsockopt = _fn("getsockopt", _int, _int, _int, _int, _ptr, _socklen_p)
_shutdown = _fn("shutdown", _int, _int, _int)
_close = _fn("close", _int, _int)
_recvfrom = _fn("recvfrom", _ssize, _int, _ptr, _size, _int, _ptr, _socklen_p)
_sendto = _fn("sendto", _ssize, _int, _ptr, _size, _int, _ptr, _socklen)

SOCK_NONBLOCK: Final = 0o4000
SOCK_CLOEXEC: Final = 0o2000000
MSG_PEEK: Final = 0x2
MSG_TRUNC: Final = 0x20
MSG_DONTWAIT: Final = 0x40
MSG_NOSIGNAL: Final = 0x4000
SOL_SOCKET: Final = 1
SO_ERROR: Final = 4
SO_LINGER: Final = 13
SOCKADDR_MAX: Final = 128  # sizeof(struct sockaddr_storage)

_linger = struct.Struct("<ii")
_c_int = struct.Struct("<i")


def _result(rc: int) -> int:
    """``rc``, or ``-errno`` when the call failed (NQE-13)."""
    return rc if rc >= 0 else -ctypes.get_errno()


def _addrlen(length: int) -> tuple[ctypes.c_uint32, ctypes._Pointer[ctypes.c_uint32]]:
    n = _socklen(length)
    return n, ctypes.pointer(n)


def socket(domain: int, type_: int, protocol: int) -> int:
    """A new non-blocking, close-on-exec socket: its fd, or -errno."""
    return _result(_socket(domain, type_ | SOCK_NONBLOCK | SOCK_CLOEXEC, protocol))


def bind(fd: int, addr: int, length: int) -> int:
    """bind(2) with the sockaddr at ``addr`` (``length`` bytes as the tenant gave them)."""
    return _result(_bind(fd, addr or None, length))


def connect(fd: int, addr: int, length: int) -> int:
    """connect(2); on a non-blocking socket ``-EINPROGRESS`` means "finishes later"."""
    return _result(_connect(fd, addr or None, length))


def listen(fd: int, backlog: int) -> int:
    return _result(_listen(fd, backlog))


def accept(fd: int, addr: int, length: int) -> tuple[int, int]:
    """accept4(2) with the new socket non-blocking: ``(fd or -errno, real address length)``.

    The peer address is written at ``addr`` (truncated to ``length`` bytes,
    as Linux does); the second value is its full length.
    """
    n, p = _addrlen(length)
    rc = _result(_accept4(fd, addr or None, p if addr else None,
                          SOCK_NONBLOCK | SOCK_CLOEXEC))
    return rc, n.value


def sockname(fd: int, addr: int, length: int, *, peer: bool = False) -> int:
    """getsockname(2) / getpeername(2) into ``addr``: the address's full length, or -errno."""
    n, p = _addrlen(length)
    rc = _result((_getpeername if peer else _getsockname)(fd, addr or None, p))
    return rc if rc < 0 else n.value


def setsockopt(fd: int, level: int, name: int, value: int, length: int) -> int:
    return _result(_setsockopt(fd, level, name, value or None, length))


def getsockopt(fd: int, level: int, name: int, value: int, length: int) -> int:
    """getsockopt(2) into ``value``: the value's length, or -errno."""
    n, p = _addrlen(length)
    rc = _result(_getsockopt(fd, level, name, value or None, p))
    return rc if rc < 0 else n.value


def shutdown(fd: int, how: int) -> int:
    return _result(_shutdown(fd, how))


def close(fd: int) -> int:
    return _result(_close(fd))


def recv(fd: int, buf: int, length: int, flags: int = 0,
         addr: int = 0, addr_len: int = 0) -> tuple[int, int]:
    """recvfrom(2) into ``buf``: ``(bytes or -errno, source address length)``.

    With ``addr`` the source sockaddr is written there (``addr_len`` bytes at
    most); without, none is asked for (TCP).
    """
    if addr:
        n, p = _addrlen(addr_len)
        rc = _result(_recvfrom(fd, buf or None, length, flags | MSG_DONTWAIT, addr, p))
        return rc, n.value
    return _result(_recvfrom(fd, buf or None, length, flags | MSG_DONTWAIT, None, None)), 0


def send(fd: int, buf: int, length: int, flags: int, addr: int = 0, addr_len: int = 0) -> int:
    """sendto(2) from ``buf``; never raises SIGPIPE, never blocks: bytes taken or -errno."""
    return _result(_sendto(fd, buf or None, length, flags | MSG_NOSIGNAL | MSG_DONTWAIT,
                           addr or None, addr_len if addr else 0))


def pending_bytes(fd: int) -> int:
    """FIONREAD: bytes readable now (TCP), or the size of the next datagram (UDP); -errno."""
    out = bytearray(4)
    try:
        fcntl.ioctl(fd, termios.FIONREAD, out)
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    value: int = _c_int.unpack(out)[0]
    return value


def peek_state(fd: int) -> int:
    """Peek one byte: 1 data waits, 0 end of stream, -errno an error (or -EAGAIN)."""
    scratch = ctypes.create_string_buffer(1)
    return _result(_recvfrom(fd, scratch, 1, MSG_PEEK | MSG_DONTWAIT, None, None))


def datagram_size(fd: int) -> int:
    """Size of the next datagram, 0 included (MSG_PEEK|MSG_TRUNC), or -errno (-EAGAIN: none)."""
    return _result(_recvfrom(fd, None, 0, MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT, None, None))


def pending_error(fd: int) -> int:
    """SO_ERROR, read and cleared: 0, or the pending error as -errno."""
    out = ctypes.c_int(0)
    _, p = _addrlen(4)
    rc = _result(_getsockopt(fd, SOL_SOCKET, SO_ERROR, ctypes.byref(out), p))
    if rc < 0:
        return rc
    return -out.value if out.value else 0


def lingers(fd: int) -> bool:
    """True if SO_LINGER is on with a non-zero time: close(2) would block the caller."""
    out = (ctypes.c_char * _linger.size)()
    _, p = _addrlen(_linger.size)
    if _getsockopt(fd, SOL_SOCKET, SO_LINGER, out, p) < 0:
        return False
    onoff, seconds = _linger.unpack(bytes(out))
    return bool(onoff) and seconds > 0


def linger_reset(fd: int) -> int:
    """SO_LINGER {on, 0}: the next close(2) resets the connection (RST), 0 or -errno."""
    value = ctypes.create_string_buffer(_linger.pack(1, 0), _linger.size)
    return _result(_setsockopt(fd, SOL_SOCKET, SO_LINGER, value, _linger.size))
