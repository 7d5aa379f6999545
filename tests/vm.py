"""A throwaway virtual machine for tests that need a kernel set up otherwise than this one.

These machines mount cgroup v1, which our own init process holds: the unified
(v2) hierarchy, the only one on Debian 12, Ubuntu 22.04 and later, cannot be
had here.  So the test boots Debian's kernel (``linux-image-amd64``) under
QEMU with ``cgroup_no_v1=all``, the host's ``/`` as its read-only root over
9p (same programs, same checkout, same venv; ``/tmp`` too, read-only, since
a checkout may be there), a tmpfs on ``/run`` (``TMPDIR`` is ``/run/tmp``) and
a read-write share at ``/run/share`` for the results.  Software
emulation (TCG): the ``/dev/kvm`` here is a paravirtual one that boots no
stock kernel.  A boot costs about 3 s; Python in it runs ~20x slower.
"""
from __future__ import annotations

import glob
import gzip
import lzma
import os
import shutil
import subprocess

MODULES = ["drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_pci_legacy_dev",
           "drivers/virtio/virtio_pci_modern_dev", "drivers/virtio/virtio_pci", "fs/netfs/netfs",
           "fs/fscache/fscache", "net/9p/9pnet", "net/9p/9pnet_virtio", "fs/9p/9p"]

# The guest's /init (busybox): the host's / as root, the guest's own /proc, /sys, /dev, a tmpfs on
# /run, cgroup2 alone at /sys/fs/cgroup with no controller passed on yet (what the code
# under test must do itself), the loopback up; then the share's run.sh, its status in share/rc.
INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do insmod /mod/$m.ko || echo "insmod $m failed"; done
R=/root
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot $R || echo "no root"
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mount -t tmpfs run $R/run
mkdir -p $R/run/share $R/run/tmp $R/run/home
mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 $R/sys/fs/cgroup  # as systemd mounts it
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share $R/run/share || echo "no share"
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
TMPDIR=/run/tmp HOME=/run/home chroot $R /bin/sh /run/share/run.sh > $R/run/share/out.txt 2>&1
echo $? > $R/run/share/rc
umount $R/run/share
poweroff -f
"""


def missing() -> str | None:
    """Why no machine can be booted here (a package not installed), or None."""
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static")):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian: {package}; scripts/apt-packages-tests.txt lists it)"
    if not _kernels():
        return "no kernel in /boot with its modules (Debian: linux-image-amd64)"
    return None


def _kernels() -> list[tuple[str, str]]:
    found = []
    for image in sorted(glob.glob("/boot/vmlinuz-*")):
        release = image[len("/boot/vmlinuz-"):]
        if os.path.isdir(f"/lib/modules/{release}/kernel"):
            found.append((image, release))
    return found


class Machine:
    """Built once (``build``), booted per ``run``."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.kernel = os.path.join(workdir, "vmlinux")
        self.initrd = os.path.join(workdir, "initrd.cpio.gz")

    def build(self) -> "Machine":
        image, release = _kernels()[-1]
        # The bzImage's payload unpacked: QEMU boots it directly, 4 s sooner than the bzImage
        # (its decompressor is slow under emulation).
        with open(image, "rb") as f:
            data = f.read()
        with open(self.kernel, "wb") as f:
            f.write(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[data.index(b"\xfd7zXZ\x00"):]))
        root = os.path.join(self.workdir, "initrd")
        for d in ("bin", "mod", "proc", "sys", "dev", "root"):
            os.makedirs(os.path.join(root, d))
        shutil.copy(shutil.which("busybox"), os.path.join(root, "bin", "busybox"))
        for applet in ("sh", "mount", "umount", "insmod", "mkdir", "echo", "poweroff", "chroot", "ip", "ifconfig"):
            os.symlink("busybox", os.path.join(root, "bin", applet))
        for module in MODULES:
            path = f"/lib/modules/{release}/kernel/{module}.ko"
            for packed, opener in ((path, open), (path + ".xz", lzma.open)):
                if os.path.exists(packed):
                    with opener(packed, "rb") as src, open(os.path.join(root, "mod", os.path.basename(path)), "wb") as dst:
                        dst.write(src.read())
                    break
            else:
                raise FileNotFoundError(path)
        with open(os.path.join(root, "init"), "w") as f:
            f.write(INIT.format(modules=" ".join(os.path.basename(m) for m in MODULES)))
        os.chmod(os.path.join(root, "init"), 0o755)
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files,
                              capture_output=True, check=True).stdout
        with open(self.initrd, "wb") as f:
            f.write(gzip.compress(cpio, 1))
        return self

    def run(self, script: str, share: str, timeout: float) -> tuple[int | None, str, str]:
        """Boot, run ``script`` (sh) as the guest's root, power off: (its status, its output, the console)."""
        with open(os.path.join(share, "run.sh"), "w") as f:
            f.write(script)
        argv = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "1536",
                "-machine", "q35", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
                "-kernel", self.kernel, "-initrd", self.initrd,
                "-append", "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off cgroup_no_v1=all",
                "-fsdev", "local,id=r,path=/,security_model=none,readonly=on,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=r,mount_tag=hostroot",
                "-fsdev", f"local,id=s,path={share},security_model=none,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=s,mount_tag=share"]
        try:
            console = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL).stdout
        except subprocess.TimeoutExpired as exc:  # run() has killed QEMU
            console = exc.stdout or b""
        return _int(_text(os.path.join(share, "rc"))), _text(os.path.join(share, "out.txt")), \
            console.decode(errors="replace")


def _text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _int(text: str) -> int | None:
    return int(text) if text.strip() else None
