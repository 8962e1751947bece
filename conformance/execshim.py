"""Attach an NSM device, then become the NSM program: ``--target exec:'CMD {device}'``.

``python -m netkernel.conformance.execshim -- CMD ARGS…`` connects to the
instance's ``engine.sock`` (``NETKERNEL_INSTANCE``), attaches a device of kind
``nsm`` with its own pid (RT-3), and ``exec``\\ s CMD in the same process, so the
pid the CoreEngine knows is the NSM's. In CMD's arguments ``{device}`` becomes
the attached file's absolute path; the control connection stays open in CMD
on the descriptor named by ``NETKERNEL_CONTROL_FD`` (RT-7): holding it holds
the device, its end is the hot-unplug (RT-4).
"""

from __future__ import annotations

import os
import sys

from netkernel.reference import coreengine

CONTROL_FD_ENV = "NETKERNEL_CONTROL_FD"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m netkernel.conformance.execshim -- CMD ARGS… ({device} in ARGS)",
              file=sys.stderr)
        return 2
    try:
        att = coreengine.attach("nsm", os.path.basename(args[0])[:64])
    except (OSError, coreengine.ControlError) as exc:
        print(f"execshim: cannot attach an NSM device: {exc}", file=sys.stderr)
        return 1
    att.dmap.close()  # the NSM maps the file itself
    fd = att.conn.detach()
    os.set_inheritable(fd, True)
    os.environ[CONTROL_FD_ENV] = str(fd)
    argv_out = [a.replace("{device}", str(att.path)) for a in args]
    try:
        os.execvp(argv_out[0], argv_out)
    except OSError as exc:
        print(f"execshim: cannot run {argv_out[0]}: {exc}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
