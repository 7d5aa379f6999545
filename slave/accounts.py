"""The /etc/passwd and /etc/group a job sees: its own uid has a name there.

A job runs as a uid that is no account on the host (uids.py), so without
these ``whoami`` failed, ``getpass.getuser()`` raised KeyError (Python jobs and
any library that calls it), git could not name a committer and Java's
``user.name`` was ``?``.  Each uid of the range gets an account ``job<uid>``
with /tmp (the job's own) as its home.  The host's system accounts (uid and gid
under 1000, and nobody) are kept so that ``ls -l`` still names the owners of
system files; people's accounts are not listed, and groups are listed without
their members: a job has no business learning who uses the host.

Written once per slave start by root, in root's own folder, and bound
read-only over the sandbox's /etc/passwd and /etc/group (bwrap.py), the warm
pool's parent's too (its children inherit its mounts); also over the backups
beside them (/etc/passwd-, /etc/group-) and, empty, the subordinate id lists
(/etc/subuid, /etc/subgid), which name the host's people as well.
"""
from __future__ import annotations

import grp
import os
import pwd
import tempfile

from . import safefs, uids

FOLDER = "/run/distexec-accounts"
HOME = "/tmp"
SHELL = "/bin/sh"
SYSTEM_BELOW = 1000  # Debian's system accounts; people's start at 1000
NOBODY = 65534


def name_of(uid: int) -> str:
    return f"job{uid}"


def passwd_text() -> str:
    host = pwd.getpwall()
    lines = [f"{p.pw_name}:x:{p.pw_uid}:{p.pw_gid}:{p.pw_gecos}:{p.pw_dir}:{p.pw_shell}"
             for p in host if _system(p.pw_uid)]
    # A uid that is an account here is never a job's (uids.take): it gets no job's name either.
    taken = {p.pw_uid for p in host}
    lines += [f"{name_of(uid)}:x:{uid}:{uid}:distexec job:{HOME}:{SHELL}"
              for uid in _job_uids() if uid not in taken]
    return "\n".join(lines) + "\n"


def group_text() -> str:
    host = grp.getgrall()
    lines = [f"{g.gr_name}:x:{g.gr_gid}:" for g in host if _system(g.gr_gid)]
    taken = {g.gr_gid for g in host}
    lines += [f"{name_of(gid)}:x:{gid}:" for gid in _job_uids() if gid not in taken]
    return "\n".join(lines) + "\n"


def _system(number: int) -> bool:
    return number < SYSTEM_BELOW or number == NOBODY


def _job_uids() -> range:
    return range(uids.FIRST, uids.FIRST + uids.COUNT)


def written(folder: str = FOLDER) -> dict[str, str]:
    """Write both files (again) and return {path inside the sandbox: path here}.

    Each file is replaced whole (a temporary file renamed over it), so a job of
    another slave on this host starting meanwhile binds the old text or the new,
    never half of one."""
    safefs.own_folder(folder, 0o755)
    out = {}
    for name, text in (("passwd", passwd_text()), ("group", group_text()), ("empty", "")):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, os.path.join(folder, name))
        except BaseException:
            os.unlink(tmp)
            raise
        if name != "empty":
            out[f"/etc/{name}"] = os.path.join(folder, name)
    # The host's other lists of its people, readable by all, are covered too where they are (a
    # bind needs its place to exist): shadow-utils' backups of the two files, and the subordinate
    # ids, one line per person.
    for dest, src in (("/etc/passwd-", "passwd"), ("/etc/group-", "group"), *(
            (f"/etc/{name}", "empty") for name in ("subuid", "subgid", "subuid-", "subgid-"))):
        if os.path.lexists(dest):
            out[dest] = os.path.join(folder, src)
    return out
