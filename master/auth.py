"""Who may talk to the master, and as whom.

Three kinds of credential, never interchangeable:

- the **admin token** (``--token``, in the connection file): opens the client
  API as the admin, who sees and cancels every job;
- **login tokens**: ``POST /api/login`` with a user and password from the
  users file (``--users FILE``) returns a random token that expires after
  ``token_ttl`` seconds; it opens the client API as that user, who sees and
  cancels only their own jobs (or all, for a user marked ``admin``);
- the **slave secret**: opens ``/ws/slave`` only.

Passwords are hashed with Argon2id (argon2-cffi), never by code of ours.
Login tokens are kept only as SHA-256 digests, in memory and in a 0600
file beside the history (``logins_file``), so that a restarted master (an
upgrade in the middle of a class) still knows its users' logins: a digest
of a 256-bit random token opens nothing, at rest or in a memory dump.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass

import argon2
import tornado.websocket

from distexec_kernel import config

log = logging.getLogger("distexec.master.auth")

DEFAULT_TOKEN_TTL = 12 * 3600.0
# Logins one user may hold at once; past it their oldest ends.  Each login is kept (in memory and in
# the logins file, rewritten at each login) until it expires, so without a bound one user logging in
# again and again would grow both for everyone.  A command given --user logs in for itself: 100
# leaves a notebook's login alive through many of them.
MAX_LOGINS_PER_USER = 100
ADMIN = "admin"  # the name the admin token acts under; no user file entry may take it
# No '@', ':' or '/': a user's name never has to be told apart from what it is joined to.
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# argon2-cffi's default profile (RFC 9106, low memory): Argon2id, 64 MiB, 3 passes.
_hasher = argon2.PasswordHasher()


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    # Verified when the user does not exist, so a wrong name costs as much time as
    # a wrong password and the answer's timing does not tell which names exist.
    return _hasher.hash(secrets.token_urlsafe(16))


class UsersFileError(Exception):
    """The users file cannot be read or does not have the expected shape."""


def default_users_path() -> str:
    return os.path.join(config.home(), "users.json")


def check_user_name(name: str) -> None:
    if not isinstance(name, str) or not USER_NAME.match(name):
        raise ValueError(f"bad user name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    if name == ADMIN:
        raise ValueError(f"{ADMIN!r} is the admin token's name; give an admin user another name and --admin")


def hash_password(password: str, hasher: argon2.PasswordHasher | None = None) -> str:
    """An Argon2id hash of ``password``; its parameters travel in the hash, so checking it costs what making it did."""
    if not password:
        raise ValueError("the password must not be empty")
    return (hasher or _hasher).hash(password)


def load_users(path: str) -> dict[str, dict]:
    """``{name: {"password": ARGON2_HASH, "admin": bool}}``; a missing file is no users."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsersFileError(f"cannot read the users file {path}: {exc}") from None
    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, dict) or not all(
            isinstance(u, dict) and isinstance(u.get("password"), str) for u in users.values()):
        raise UsersFileError(f"the users file {path} is not of the form "
                             '{"users": {NAME: {"password": HASH, "admin": BOOL}}}')
    return users


def save_users(path: str, users: dict[str, dict]) -> None:
    _save_private(path, {"users": users})


def _save_private(path: str, data: dict) -> None:
    """Write the file with mode 0600 from the start, atomically (no window where others read it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def add_user(path: str, name: str, password: str, admin: bool = False,
             hasher: argon2.PasswordHasher | None = None) -> bool:
    """Add or replace a user; returns True if the user is new.

    ``hasher``: other Argon2 parameters than the default (tests use cheap ones
    to keep a loaded CI machine fast; never do that for real users).
    """
    check_user_name(name)
    users = load_users(path)
    new = name not in users
    # The same password given again (to change only the admin flag) keeps its hash, and so the
    # user's logins; a new one is hashed anew, which ends them (Identity.password_id).
    old = users.get(name, {}).get("password")
    kept = old if old is not None and _matches(old, password) else None
    users[name] = {"password": kept or hash_password(password, hasher), "admin": bool(admin)}
    save_users(path, users)
    return new


def _matches(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def remove_user(path: str, name: str) -> bool:
    users = load_users(path)
    if users.pop(name, None) is None:
        return False
    save_users(path, users)
    return True


def _password_id(entry: dict) -> str:
    """A short digest of a user's stored password hash (salted: a new one each time it is set)."""
    return hashlib.sha256(str(entry.get("password")).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Identity:
    """Who a request comes from.  ``admin`` sees and cancels every job."""

    user: str
    admin: bool
    expires_at: float | None = None  # epoch seconds; None for the admin token
    # A login's: which password it was given for (``_password_id``).  A new password, or the
    # user removed and added again (a new person, maybe), ends the logins of the old one.
    password_id: str | None = None

    @property
    def owner(self) -> str | None:
        """The user whose jobs this identity is limited to; None for an admin (all jobs)."""
        return None if self.admin else self.user


def rfc3339(epoch: float) -> str:
    return (_dt.datetime.fromtimestamp(epoch, _dt.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"))


def _digest(token: str) -> str:
    # Only digests are kept, so a memory dump or a log of the table leaks no usable token.
    return hashlib.sha256(token.encode()).hexdigest()


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


class Auth:
    """Checks every credential the master is shown.  A client token never opens /ws/slave and vice versa."""

    def __init__(self, token: str, slave_secret: str, *, users_file: str | None = None,
                 token_ttl: float = DEFAULT_TOKEN_TTL, logins_file: str | None = None,
                 max_logins_per_user: int = MAX_LOGINS_PER_USER):
        self.token = token
        self.slave_secret = slave_secret
        self.users_file = users_file
        self.token_ttl = token_ttl
        self.logins_file = logins_file
        self.max_logins_per_user = max_logins_per_user
        self._users: dict[str, dict] = {}
        self._users_stamp: tuple | None = None
        self._sessions: dict[str, Identity] = {}
        # login() runs its hash check on a worker thread.
        self._lock = threading.Lock()
        if users_file:
            load_users(users_file)  # a bad file stops the master at start, with its reason
            self._reload()
            self._load_logins()

    # -- logins kept across a restart --------------------------------------

    def _load_logins(self) -> None:
        """The logins an earlier master gave, still valid, of users still in the file."""
        if not self.logins_file:
            return
        try:
            with open(self.logins_file) as f:
                saved = json.load(f)["logins"]
            now = time.time()
            for key, entry in saved.items():
                user, expires, password_id = entry["user"], float(entry["expires_at"]), entry.get("password")
                if (expires > now and user in self._users and re.fullmatch(r"[0-9a-f]{64}", key)
                        and password_id == _password_id(self._users[user])):
                    self._sessions[key] = Identity(user, bool(self._users[user].get("admin")), expires,
                                                   password_id)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Only a convenience: without it, people log in again.
            log.warning("cannot read the saved logins %s (%s); people log in again", self.logins_file, exc)
            return
        if self._sessions:
            log.info("%d login(s) kept from before the restart", len(self._sessions))

    def _save_logins(self) -> None:
        """Under the lock: the digests of the valid logins, for the next master."""
        if not self.logins_file:
            return
        try:
            _save_private(self.logins_file, {"logins": {
                key: {"user": ident.user, "expires_at": ident.expires_at, "password": ident.password_id}
                for key, ident in self._sessions.items()}})
        except OSError as exc:
            log.warning("cannot save the logins to %s (%s); a restart will ask people to log in again",
                        self.logins_file, exc)

    # -- the users file ----------------------------------------------------

    def _reload(self) -> None:
        """Re-read the users file if it changed, so `distexec user add` needs no master restart."""
        try:
            st = os.stat(self.users_file)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._users_stamp:
            try:
                self._users = load_users(self.users_file) if stamp else {}
            except UsersFileError as exc:
                # A half-edited file must not lock everyone out: keep the users we had.
                log.error("%s; keeping the previous users", exc)
            self._users_stamp = stamp

    @property
    def logins_enabled(self) -> bool:
        return self.users_file is not None

    # -- checks ------------------------------------------------------------

    def identify(self, presented: str | None) -> Identity | None:
        """The identity a client token stands for, or None if it is not valid (or expired)."""
        if not presented:
            return None
        if _same(presented, self.token):
            return Identity(ADMIN, True)
        key = _digest(presented)
        with self._lock:
            ident = self._sessions.get(key)
            if ident is None:
                return None
            self._reload()
            entry = self._users.get(ident.user)
            # Removing a user from the file, or changing their password, ends their logins at once.
            if ident.expires_at <= time.time() or entry is None or _password_id(entry) != ident.password_id:
                del self._sessions[key]
                self._save_logins()
                return None
            if bool(entry.get("admin")) != ident.admin:
                ident = self._sessions[key] = Identity(ident.user, bool(entry.get("admin")), ident.expires_at,
                                                       ident.password_id)
        return ident

    def slave_ok(self, presented: str | None) -> bool:
        return _same(presented, self.slave_secret)

    def login(self, user: str, password: str) -> dict | None:
        """Check a password; on success a new login token ``{"token", "expires_at", "user", "admin"}``.

        Blocking (Argon2 costs tens of milliseconds by design): call it from a worker thread.
        """
        if not self.logins_enabled:
            return None
        if not isinstance(user, str) or not USER_NAME.match(user) or user == ADMIN:
            # A users file written before names were restricted may hold one: it cannot log in.
            return None
        with self._lock:
            self._reload()
            entry = self._users.get(user)
        try:
            ok = _hasher.verify(entry["password"] if entry else _dummy_hash(), password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            ok = False
        if not ok or entry is None:
            return None
        token = secrets.token_urlsafe(32)
        expires = time.time() + self.token_ttl
        ident = Identity(user, bool(entry.get("admin")), expires, _password_id(entry))
        with self._lock:
            self._prune()
            self._sessions[_digest(token)] = ident
            theirs = sorted((v.expires_at, k) for k, v in self._sessions.items() if v.user == user)
            for _, key in theirs[:max(0, len(theirs) - self.max_logins_per_user)]:
                del self._sessions[key]
            self._save_logins()
        return {"token": token, "expires_at": rfc3339(expires), "user": user, "admin": ident.admin}

    def _prune(self) -> None:
        now = time.time()
        for key in [k for k, v in self._sessions.items() if v.expires_at <= now]:
            del self._sessions[key]


UNAUTHORIZED = "a valid token is required (Authorization: Bearer TOKEN); login tokens expire: log in again"


def bearer(handler) -> str | None:
    """The token a request or WebSocket upgrade presents (``Authorization: Bearer``, or ``?token=``)."""
    header = handler.request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    # Browsers cannot set headers on a WebSocket: accept ?token= there, and only there (a URL
    # with a token ends up in logs and browser histories; an API request can send the header).
    if isinstance(handler, tornado.websocket.WebSocketHandler):
        return handler.get_query_argument("token", None)
    return None


def redacted(uri: str) -> str:
    """``uri`` with the value of any ``token`` in its query hidden: what the access log writes."""
    if "token=" not in uri:
        return uri
    path, _, query = uri.partition("?")
    return path + "?" + "&".join("token=…" if part.startswith("token=") else part for part in query.split("&"))
