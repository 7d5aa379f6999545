"""The system-call filter every job step runs under (x86_64).

A job as nobody can still make a user namespace and be "root" inside it:
mounts, netfilter, the kernel code that most container escapes go through.
This filter (installed before exec, inherited by bwrap and the job) refuses
new user namespaces and a few other interfaces programs do not need and
exploits do (keyrings, shared by every job of the nobody uid; bpf;
userfaultfd; perf events; io_uring).  clone3 passes its flags in memory a
filter cannot read, so it answers ENOSYS, and glibc falls back to clone,
whose flags it can (as Docker's default profile does).  x86_64 only.
"""
from __future__ import annotations

import ctypes
import errno
import platform
import subprocess

_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here, never between fork and exec

class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_AUDIT_ARCH_X86_64 = 0xC000003E
_CLONE_NEWUSER = 0x10000000
_X86_64 = {"clone": 56, "unshare": 272, "clone3": 435, "add_key": 248, "request_key": 249, "keyctl": 250,
           "perf_event_open": 298, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
           "io_uring_enter": 426, "io_uring_register": 427}
REFUSED_SYSCALLS = ("new user namespaces (clone/unshare CLONE_NEWUSER), keyrings, bpf, userfaultfd, "
                    "perf_event_open, io_uring")


def _seccomp_program() -> "_SockFprog | None":
    if platform.machine() != "x86_64":
        return None
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    errno_ret = 0x00050000
    prog: list = [
        (ld, 0, 0, 4),                                  # arch
        (jeq, 0, "nosys", _AUDIT_ARCH_X86_64),          # i386 and others: refused whole
        (ld, 0, 0, 0),                                  # syscall number
        (jge, "nosys", 0, 0x40000000),                  # the x32 ABI
        (jeq, "flags", 0, _X86_64["clone"]),
        (jeq, "flags", 0, _X86_64["unshare"]),
        (jeq, "nosys", 0, _X86_64["clone3"]),
    ]
    for name in ("add_key", "request_key", "keyctl", "perf_event_open", "bpf", "userfaultfd"):
        prog.append((jeq, "perm", 0, _X86_64[name]))
    for name in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
        prog.append((jeq, "nosys", 0, _X86_64[name]))
    prog.append((ret, 0, 0, 0x7FFF0000))               # allow
    labels = {"flags": len(prog)}
    prog += [(ld, 0, 0, 16),                            # clone/unshare flags: low word of args[0]
             (jset, "perm", 0, _CLONE_NEWUSER),
             (ret, 0, 0, 0x7FFF0000)]
    labels["perm"] = len(prog)
    prog.append((ret, 0, 0, errno_ret | errno.EPERM))
    labels["nosys"] = len(prog)
    prog.append((ret, 0, 0, errno_ret | errno.ENOSYS))

    def jump(target, at):
        return labels[target] - at - 1 if isinstance(target, str) else target

    filters = (_SockFilter * len(prog))(*[
        _SockFilter(code, jump(jt, i), jump(jf, i), k) for i, (code, jt, jf, k) in enumerate(prog)])
    fprog = _SockFprog(len(prog), filters)
    fprog._keep = filters  # the program must outlive every fork
    return fprog


_SECCOMP = _seccomp_program()


def _install_seccomp() -> None:
    """Between fork and exec: install the filter, or raise (the spawn then fails)."""
    if _LIBC.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(_SECCOMP), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter refused")


def seccomp_available() -> str | None:
    """None if the filter can be installed here, else why not (asked once, in a child)."""
    if _SECCOMP is None:
        return f"no seccomp filter for {platform.machine()}"
    try:
        subprocess.run(["true"], preexec_fn=_install_seccomp, check=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"seccomp unavailable: {exc}"
    return None



def program_bytes() -> bytes:
    """The filter's instructions as raw ``struct sock_filter`` bytes (empty: none here), for the
    warm pool's parent, which attaches the same program to each job with one prctl."""
    return bytes(_SECCOMP._keep) if _SECCOMP is not None else b""
