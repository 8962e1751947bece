"""The guest image: a Debian kernel and an initramfs, built from Debian packages and cached.

Nothing is fetched but Debian's own packages through apt (``apt-get download`` of the
kernel, which is unpacked with ``dpkg -x`` and never installed); everything else is taken
from this host's installed packages:

- the kernel: ``linux-image-6.1.0-N-amd64`` (the one ``linux-image-amd64`` depends on, or
  ``NETKERNEL_KVM_KERNEL``), its ``vmlinuz`` and the uncompressed ELF ``vmlinux`` taken out
  of it (:func:`extract_vmlinux`), which QEMU starts through its PVH entry, faster under TCG
  since the guest does not decompress itself;
- the initramfs (:func:`build`): ``busybox-static`` for ``/init`` (``init.sh``) and the
  plumbing; the programs under test, dynamically linked so that ``LD_PRELOAD`` reaches
  them (``curl``; Debian's ``python3`` with the part of its standard library
  :data:`PYTHON_MODULES` needs, compiled); their shared libraries as ``ldd`` finds them;
  and the GuestLib, this installation's ``libnkpreload.so`` and ``nk-agent``.

The cache (:func:`cache_dir`) keeps the kernel per package version and one image per hash
of its inputs: the kernel's version, and the path, size and modification time of every
host file copied in (the programs, libraries, modules, the GuestLib, ``init.sh``, this
builder). An image is rebuilt when any of them changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final

from netkernel.adapters.kvm import cpio
from netkernel.fastpath import preload

HERE: Final = Path(__file__).resolve().parent
INIT_SCRIPT: Final = HERE / "init.sh"
CACHE_ENV: Final = "NETKERNEL_KVM_CACHE"
KERNEL_ENV: Final = "NETKERNEL_KVM_KERNEL"
KERNEL_META: Final = "linux-image-amd64"
BUSYBOX: Final = Path("/bin/busybox")
#: Dynamically linked programs in the guest (``LD_PRELOAD`` never reaches a static one).
PROGRAMS: Final = (Path("/usr/bin/curl"), Path("/usr/bin/python3"))
GUEST_PYTHON: Final = Path("/usr/bin/python3")
#: What the guest's python3 can import: enough for ``python3 -m http.server`` and small
#: clients (``urllib.request``, ``http.client``, ``socket``, ``hashlib``). These and what
#: they import are copied, compiled (unchecked-hash .pyc: no source time stamps checked).
PYTHON_MODULES: Final = (
    "site", "runpy", "http.server", "http.client", "urllib.request", "urllib.parse",
    "socketserver", "socket", "selectors", "select", "ssl", "hashlib", "json", "base64",
    "argparse", "subprocess", "threading", "time", "struct", "zlib", "shutil", "tempfile",
    "random", "signal", "errno", "io", "traceback", "encodings.idna", "encodings.latin_1",
    "encodings.ascii", "encodings.utf_8_sig", "mmap", "glob",
)
GUESTLIB_DIR: Final = "/usr/lib/netkernel"
#: Kernel modules of the guest, by what ``/init`` loads them for (busybox ``insmod``, in
#: the order of ``<group>.order``), taken from the kernel package with what they depend
#: on. ``agent``: always, before nk-agent: ``unix_diag``, the AF_UNIX handler of
#: sock_diag, with which the agent tells an app end still open from a closed one (PRE-6;
#: without it the kernel answers ENOENT, which reads as "closed", and a socket whose app
#: shut its write side is closed under it). ``nic``: only for ``netkernel vm --nic user``
#: (the baseline), a virtio-net PCI NIC (Debian builds virtio, virtio_pci and virtio_net
#: as modules): the default guest has no NIC.
GUEST_MODULES: Final = {"agent": ("unix_diag",), "nic": ("virtio_pci", "virtio_net")}
MODULE_DIR: Final = "usr/lib/netkernel/modules"
#: Who the files belong to and where they go: merged /usr, as on Debian 12.
_MERGED: Final = (("bin", "usr/bin"), ("sbin", "usr/bin"), ("lib", "usr/lib"),
                  ("lib64", "usr/lib64"))
_BUILDER_VERSION: Final = 2


class ImageError(RuntimeError):
    """The image cannot be built; the message says what is missing and how to get it."""


class Unavailable(ImageError):
    """A package the image is built from is not installed, or the kernel package cannot be
    downloaded (no apt lists, no registry): the tests skip on this, and only on this."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    package: str
    version: str
    vmlinuz: Path
    vmlinux: Path


@dataclasses.dataclass(frozen=True)
class Image:
    kernel: Kernel
    initramfs: Path
    key: str
    built: bool  # False: taken from the cache

    def kernel_file(self, uncompressed: bool = True) -> Path:
        return self.kernel.vmlinux if uncompressed else self.kernel.vmlinuz


def cache_dir() -> Path:
    """``$NETKERNEL_KVM_CACHE``, else ``$XDG_CACHE_HOME/netkernel/kvm`` (``~/.cache``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "netkernel" / "kvm"


def _run(argv: Sequence[str], *, error: type[ImageError] = ImageError, **kwargs: object) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False,
                              **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError:
        raise Unavailable(f"{argv[0]} is not installed") from None
    if done.returncode != 0:
        raise error(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    out: str = done.stdout
    return out


# -- the kernel ---------------------------------------------------------------------------


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage (what the kernel's ``scripts/extract-vmlinux`` does):
    the boot protocol header (offset 0x1f1 setup sectors, 0x248 payload offset and length)
    locates the compressed payload; Debian compresses it with xz."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise ImageError("not a bzImage (no HdrS boot header)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start:start + length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        import zlib

        elf = zlib.decompressobj(31).decompress(payload)
    else:
        raise ImageError(f"kernel payload compressed with an unknown method ({payload[:6]!r})")
    if not elf.startswith(b"\x7fELF"):
        raise ImageError("the kernel payload is not an ELF image")
    return elf


def kernel_package() -> str:
    """The kernel package: ``$NETKERNEL_KVM_KERNEL``, else the one ``linux-image-amd64``
    depends on (a ``linux-image-6.1.0-N-amd64``)."""
    if os.environ.get(KERNEL_ENV):
        return os.environ[KERNEL_ENV]
    for line in _run(["apt-cache", "depends", KERNEL_META], error=Unavailable).splitlines():
        key, _, word = line.strip().partition(" ")
        if key == "Depends:" and word.startswith("linux-image-") and word.endswith("-amd64"):
            return word
    raise Unavailable(f"apt-cache names no kernel for {KERNEL_META} (run `apt-get update`)")


def module_depends(ko: bytes) -> list[str]:
    """The modules a ``.ko`` depends on: its ``.modinfo`` section's ``depends=`` string
    (what ``modinfo -F depends`` prints; kmod need not be installed here)."""
    m = re.search(rb"\0depends=([^\0]*)\0", ko)
    names = m.group(1).decode() if m else ""
    return [n.replace("-", "_") for n in names.split(",") if n]


def _module_order(tree: Path, wanted: Sequence[str]) -> list[Path]:
    """The ``.ko`` files of ``wanted`` and their dependencies under ``tree``, each after
    what it depends on (busybox ``insmod`` resolves nothing itself)."""
    found = {p.name[:-3].replace("-", "_"): p for p in tree.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in found:
            raise ImageError(f"the kernel package holds no module {name}.ko")
        for dep in module_depends(found[name].read_bytes()):
            visit(dep)
        order.append(found[name])

    for name in wanted:
        visit(name)
    return order


def guest_modules(kern: Kernel) -> dict[str, list[Path]]:
    """Per group of :data:`GUEST_MODULES`, its modules and their dependencies in load
    order, unpacked from the kernel package next to its ``vmlinux``. A kernel cached
    before they were needed has them fetched now, from the same package version."""
    key = hashlib.sha256(json.dumps(GUEST_MODULES, sort_keys=True).encode()).hexdigest()[:8]
    dest = kern.vmlinux.parent / f"modules-{key}"
    if not all((dest / f"{group}.order").is_file() for group in GUEST_MODULES):
        with tempfile.TemporaryDirectory(dir=kern.vmlinux.parent) as tmp:
            _run(["apt-get", "download", "-o", "APT::Sandbox::User=root",
                  f"{kern.package}={kern.version}"], cwd=tmp, error=Unavailable)
            debs = list(Path(tmp).glob(f"{kern.package}_*.deb"))
            if not debs:
                raise ImageError(f"apt-get download {kern.package} left no .deb")
            unpacked = Path(tmp) / "x"
            _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)])
            staged = Path(tmp) / "modules"
            staged.mkdir()
            for group, wanted in GUEST_MODULES.items():
                names = []
                for ko in _module_order(unpacked / "lib" / "modules", wanted):
                    shutil.copyfile(ko, staged / ko.name)
                    names.append(ko.name[:-3])
                (staged / f"{group}.order").write_text("".join(f"{n}\n" for n in names))
            shutil.rmtree(dest, ignore_errors=True)
            with contextlib.suppress(OSError):  # another process unpacked them first
                os.rename(staged, dest)
    return {group: [dest / f"{n}.ko" for n in (dest / f"{group}.order").read_text().split()]
            for group in GUEST_MODULES}


def _cached_kernels(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("linux-image-*") if (p / "kernel.json").is_file()),
                  key=lambda p: p.stat().st_mtime, reverse=True)


def kernel(root: Path | None = None) -> Kernel:
    """The kernel, downloaded and unpacked on first use. Once one is cached it is used
    without asking apt again, unless ``$NETKERNEL_KVM_KERNEL`` names another."""
    root = (root or cache_dir()) / "kernel"
    root.mkdir(parents=True, exist_ok=True)
    wanted = os.environ.get(KERNEL_ENV)
    cached = [p for p in _cached_kernels(root) if not wanted or p.name.startswith(wanted + "_")]
    if not cached:
        cached = [_fetch_kernel(root, kernel_package())]
    doc = json.loads((cached[0] / "kernel.json").read_text())
    return Kernel(package=doc["package"], version=doc["version"],
                  vmlinuz=cached[0] / "vmlinuz", vmlinux=cached[0] / "vmlinux")


def _fetch_kernel(root: Path, package: str) -> Path:
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        # apt-get download writes into the current directory; '_apt' may not read ours.
        _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", package], cwd=tmp,
             error=Unavailable)
        debs = list(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise ImageError(f"apt-get download {package} left no .deb")
        version = _run(["dpkg-deb", "-f", str(debs[0]), "Version"]).strip()
        unpacked = Path(tmp) / "x"
        _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)])
        vmlinuz = next((unpacked / "boot").glob("vmlinuz-*"), None)
        if vmlinuz is None:
            raise ImageError(f"{package} holds no /boot/vmlinuz-*")
        dest = root / f"{package}_{version}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        shutil.copyfile(vmlinuz, dest / "vmlinuz")
        for config in (unpacked / "boot").glob("config-*"):
            shutil.copyfile(config, dest / "config")
        (dest / "vmlinux").write_bytes(extract_vmlinux((dest / "vmlinuz").read_bytes()))
        (dest / "kernel.json").write_text(json.dumps({"package": package, "version": version}))
    return dest


# -- what goes into the initramfs ------------------------------------------------------------


def _libraries(elfs: Iterable[Path]) -> set[Path]:
    """The shared libraries the ELF files load (``ldd``), the loader included."""
    libs: set[Path] = set()
    for elf in elfs:
        out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, check=False)
        for line in out.stdout.splitlines():
            words = line.split()
            if "=>" in words and len(words) > words.index("=>") + 1:
                path = words[words.index("=>") + 1]
            elif words and words[0].startswith("/"):
                path = words[0]
            else:
                continue
            if path.startswith("/"):
                libs.add(Path(path))
    return libs


_PYTHON_PROBE: Final = r"""
import importlib, json, sys, sysconfig
for name in sys.argv[1:]:
    importlib.import_module(name)
std, dyn = sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib") + "/lib-dynload"
files = sorted({m.__file__ for m in list(sys.modules.values())
                if getattr(m, "__file__", None) and m.__file__.startswith(std)})
print(json.dumps({"stdlib": std, "dynload": dyn, "files": files,
                  "tag": sys.implementation.cache_tag}))
"""


def python_files(modules: Sequence[str] = PYTHON_MODULES) -> dict[str, object]:
    """The standard library files the guest's python3 needs for ``modules``: what they
    import, asked of that python3 itself (it is Debian's, not this process's)."""
    out = _run([str(GUEST_PYTHON), "-I", "-c", _PYTHON_PROBE, *modules])
    doc: dict[str, object] = json.loads(out)
    return doc


_COMPILE: Final = r"""
import json, py_compile, sys
for src, dst in json.loads(sys.stdin.read()):
    py_compile.compile(src, cfile=dst, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


@dataclasses.dataclass
class _Tree:
    """The files of the image, by guest path: host file to copy, or bytes."""

    files: dict[str, Path | bytes] = dataclasses.field(default_factory=dict)
    modes: dict[str, int] = dataclasses.field(default_factory=dict)
    links: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, guest: str, source: Path | bytes, mode: int | None = None) -> None:
        self.files[guest] = source
        if mode is None and isinstance(source, Path):
            mode = source.stat().st_mode & 0o777
        self.modes[guest] = mode if mode is not None else 0o644

    def write(self, out: io.BufferedIOBase | io.BytesIO) -> None:
        w = cpio.Writer(out)
        dirs = {"dev", "proc", "sys", "tmp", "run", "root", "nk", "etc", "usr", "usr/bin",
                "usr/lib", "usr/lib64"}
        for path in [*self.files, *self.links]:
            parts = path.split("/")[:-1]
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        for d in sorted(dirs):
            w.directory(d, 0o1777 if d == "tmp" else 0o755)
        for link, target in sorted(self.links.items()):
            w.symlink(link, target)
        for guest, source in sorted(self.files.items()):
            data = source.read_bytes() if isinstance(source, Path) else source
            w.file(guest, data, self.modes[guest])
        w.close()


def _guest_path(host: Path) -> str:
    """Where a host file goes: its directory resolved (/lib -> /usr/lib), its own name kept
    (a library's soname link becomes a file holding the library)."""
    return str(host.parent.resolve() / host.name).lstrip("/")


def _inputs(guestlib: preload.Paths, kern: Kernel) -> tuple[_Tree, dict[str, object]]:
    tree = _Tree()
    for link, target in _MERGED:
        tree.links[link] = target
    if not BUSYBOX.is_file():
        raise Unavailable(f"{BUSYBOX} is missing: apt-get install busybox-static")
    tree.add("usr/bin/busybox", BUSYBOX.resolve(), 0o755)
    for prog in PROGRAMS:
        if not prog.is_file():
            raise Unavailable(f"{prog} is missing: apt-get install curl python3")
        tree.add(f"usr/bin/{prog.name}", prog.resolve(), 0o755)
    tree.add("usr/bin/nk-agent", guestlib.agent, 0o755)
    tree.add(f"{GUESTLIB_DIR}/libnkpreload.so".lstrip("/"), guestlib.lib, 0o755)
    tree.add("init", INIT_SCRIPT, 0o755)
    tree.add("etc/hosts", b"127.0.0.1\tlocalhost\n::1\tlocalhost\n")
    tree.add("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    tree.add("etc/group", b"root:x:0:\n")
    for group, modules in guest_modules(kern).items():
        for ko in modules:
            tree.add(f"{MODULE_DIR}/{ko.name}", ko, 0o644)
        tree.add(f"{MODULE_DIR}/{group}.order",
                 "".join(f"{ko.name[:-3]}\n" for ko in modules).encode())
    tree.add("etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files\n")

    py = python_files()
    stdlib, dynload = Path(str(py["stdlib"])), Path(str(py["dynload"]))
    sources = [Path(f) for f in py["files"]]  # type: ignore[attr-defined]
    # Python finds its prefix by this landmark (getpath); os.py is imported anyway.
    sources.append(stdlib / "os.py")
    elfs: list[Path] = [BUSYBOX, *PROGRAMS, guestlib.agent, guestlib.lib]
    for src in sorted(set(sources)):
        tree.add(_guest_path(src), src, 0o644)
        if src.suffix == ".so":
            elfs.append(src)
    for lib in _libraries(elfs):
        tree.add(_guest_path(lib), lib.resolve(), 0o755)
    for name in busybox_applets():
        guest = f"usr/bin/{name}"
        if guest not in tree.files:
            tree.links[guest] = "busybox"
    return tree, {"stdlib": str(stdlib), "dynload": str(dynload), "tag": py["tag"]}


def busybox_applets() -> list[str]:
    out = _run([str(BUSYBOX), "--list"])
    return [a for a in out.split() if a and "/" not in a]


def _signature(tree: _Tree, kern: Kernel) -> str:
    """The hash of the image's inputs: every host file's path, size and mtime, the kernel's
    version and this builder's."""
    h = hashlib.sha256(f"{_BUILDER_VERSION} {kern.package} {kern.version}\n".encode())
    h.update(Path(__file__).read_bytes())
    h.update(Path(cpio.__file__).read_bytes())
    for guest, source in sorted(tree.files.items()):
        if isinstance(source, Path):
            st = source.stat()
            h.update(f"{guest} {source} {st.st_size} {st.st_mtime_ns}\n".encode())
        else:
            h.update(f"{guest} {hashlib.sha256(source).hexdigest()}\n".encode())
    for link, target in sorted(tree.links.items()):
        h.update(f"{link} -> {target}\n".encode())
    return h.hexdigest()[:16]


def _compile(tree: _Tree, tag: str, workdir: Path) -> None:
    """Each module's .pyc beside it in ``__pycache__``, compiled by the guest's python."""
    jobs: list[tuple[str, str, str]] = []  # (source, compiled, guest path)
    for guest, source in list(tree.files.items()):
        if isinstance(source, Path) and guest.endswith(".py"):
            jobs.append((str(source), str(workdir / f"{len(jobs)}.pyc"), guest))
    _run([str(GUEST_PYTHON), "-I", "-c", _COMPILE],
         input=json.dumps([(src, pyc) for src, pyc, _ in jobs]))
    for _src, pyc, guest in jobs:
        parent, name = guest.rsplit("/", 1)
        tree.add(f"{parent}/__pycache__/{name[:-3]}.{tag}.pyc", Path(pyc).read_bytes())


def build(guestlib: preload.Paths | None = None, root: Path | None = None) -> Image:
    """The image for this host's packages and GuestLib, from the cache or built now."""
    root = root or cache_dir()
    kern = kernel(root)
    tree, info = _inputs(guestlib or preload.paths(), kern)
    key = _signature(tree, kern)
    images = root / "images"
    dest = images / key
    initramfs = dest / "initramfs.cpio"
    if initramfs.is_file():
        return Image(kernel=kern, initramfs=initramfs, key=key, built=False)
    images.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=images) as tmp:
        _compile(tree, str(info["tag"]), Path(tmp))
        part = Path(tmp) / "initramfs.cpio"
        with open(part, "wb") as out:
            tree.write(out)
        (Path(tmp) / "image.json").write_text(json.dumps({
            "key": key, "kernel": dataclasses.asdict(kern) | {
                "vmlinuz": str(kern.vmlinuz), "vmlinux": str(kern.vmlinux)},
            "files": len(tree.files), "links": len(tree.links),
            "size": part.stat().st_size}, indent=1))
        staged = Path(tmp) / "staged"
        staged.mkdir()
        for name in ("initramfs.cpio", "image.json"):
            os.rename(Path(tmp) / name, staged / name)
        with contextlib.suppress(OSError):  # another build of the same key won the race
            os.rename(staged, dest)
    _prune(images, keep=key)
    return Image(kernel=kern, initramfs=initramfs, key=key, built=True)


def _prune(images: Path, keep: str, count: int = 3) -> None:
    """Keep the newest few images (several worktrees may use one cache)."""
    old = sorted((p for p in images.iterdir() if p.is_dir() and p.name != keep
                  and not p.name.startswith("tmp")),
                 key=lambda p: p.stat().st_mtime, reverse=True)
    for p in old[count - 1:]:
        shutil.rmtree(p, ignore_errors=True)


# -- a run's own archive -------------------------------------------------------------------


def run_archive(cmd: Sequence[str], name: str, *, nic: str = "none",
                files: Mapping[str, bytes] | None = None) -> bytes:
    """The archive appended to the image for one run: ``/nk/cmd.sh``, which ``/init``
    sources (the command as positional parameters, quoted for sh; ``NK_NIC``, the
    guest's network device: ``none``, or ``user`` for the baseline's virtio-net NIC), and
    ``files``: guest path -> bytes, executable (a program under test, say)."""
    import shlex

    script = (f"NK_NAME={shlex.quote(name)}\n"
              f"NK_NIC={shlex.quote(nic)}\n"
              f"set -- {' '.join(shlex.quote(a) for a in cmd)}\n")
    out = io.BytesIO()
    w = cpio.Writer(out)
    dirs = {"nk"}
    for path in files or {}:
        parts = path.strip("/").split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    for d in sorted(dirs):
        w.directory(d)
    w.file("nk/cmd.sh", script.encode())
    for path, data in sorted((files or {}).items()):
        w.file(path.strip("/"), data, 0o755)
    w.close()
    return out.getvalue()
