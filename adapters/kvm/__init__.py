"""The KVM adapter (issue 8, docs/kvm.md): tenants in QEMU/KVM guests.

The tenant's NK device reaches the guest as an ``ivshmem-plain`` PCI device (1af4:1110)
over a ``memory-backend-file`` (``share=on``) on the device file, so the CoreEngine on the
host and the GuestLib in the guest share its rings and data area. The guest has no
network device at all.

- :mod:`.image`: the guest image (Debian kernel, busybox initramfs with curl, python3 and
  the GuestLib), built from Debian packages and cached;
- :mod:`.qemu`: the QEMU command line, the boot and its console protocol, the
  accelerator probe (KVM, else TCG);
- :mod:`.vm`: ``netkernel vm -- CMD``: a device attached for the guest, the guest booted,
  CMD run in it, its output and exit status relayed.
"""
