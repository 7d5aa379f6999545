"""Where a cluster is: $DISTEXEC_HOME, the connection file, the environment; and a seconds value's check,
shared by the servers' flags and the client's --timeout."""
from __future__ import annotations

import argparse
import fnmatch
import ipaddress
import json
import logging
import os
import sys
import secrets
import socket
import stat
import time
import urllib.parse
import warnings
from dataclasses import dataclass


def seconds(text: str) -> float:
    """A positive number of seconds (argparse type for --timeout: its name shows in argparse's messages)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def home() -> str:
    return os.path.expanduser(os.environ.get("DISTEXEC_HOME") or "~/.distexec")


# What distexec keeps in its home: a folder holding nothing else is its own.
HOME_ENTRIES = ("connection.json", "users.json", "history.sqlite3*", "history-artifacts", "tls", "cache",
                "slave-*.uid", "*.tmp", "login.json", "logins.json")


class UnsafeFolderError(OSError, ValueError):
    """A folder distexec would keep its secrets in that another user could read through or write."""


_told_readable: set[str] = set()


def private_dir(path: str, dedicated: bool = False, narrow: bool = True) -> str:
    """Make ``path`` (and missing parents) a directory only its owner can enter: 0700.

    One that exists with wider modes is narrowed only when it is distexec's
    own: holding nothing but its files (made by an older version), or
    ``dedicated`` (a folder distexec made for one thing, such as its compile
    cache); never with ``narrow=False`` (a folder an admin named).  A folder
    others may only read (``/srv``) is left as it is, with a warning:
    distexec's files in it are 0600 each.  Refused
    (``UnsafeFolderError``), where another user could redirect or plant what
    root writes: a symbolic link not made by this user, a folder of another
    user's, or one others can write (``/tmp``: its names are anyone's).
    Checked on the opened folder, not its name, so a swap in between is moot.
    """
    path = os.path.abspath(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    link = os.lstat(path)
    if stat.S_ISLNK(link.st_mode) and link.st_uid != os.getuid():
        raise UnsafeFolderError(f"{path} is a symbolic link of uid {link.st_uid}: distexec does not follow "
                                f"another user's link to keep its files")
    # O_DIRECTORY: a FIFO or anything else planted there fails at once, rather than waiting for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise UnsafeFolderError(f"{path} belongs to uid {st.st_uid}: distexec keeps its files only in "
                                    f"a folder of its own user's")
        if not st.st_mode & 0o077:
            return path
        ours = narrow and (dedicated or all(any(fnmatch.fnmatchcase(name, pattern) for pattern in HOME_ENTRIES)
                                            for name in os.listdir(fd)))
        if ours and not st.st_mode & stat.S_ISVTX:
            os.fchmod(fd, 0o700)
        elif st.st_mode & 0o022:
            raise UnsafeFolderError(f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): anyone "
                                    f"could plant names where distexec writes; choose a folder of its own")
        elif path not in _told_readable:  # once per folder: a master checks its home for each file it keeps
            _told_readable.add(path)
            logging.getLogger("distexec").warning(
                "%s is readable by others (mode %o) and is not distexec's own folder: left as it is; "
                "distexec's files in it are private (0600) all the same", path, stat.S_IMODE(st.st_mode))
    finally:
        os.close(fd)
    return path


def ensure_home() -> str:
    """``$DISTEXEC_HOME``, created private (it holds the connection file, users and history)."""
    return private_dir(home())


def connection_path() -> str:
    return os.path.join(home(), "connection.json")


def new_secret() -> str:
    # hex: never starts with "-", so it can follow a command-line flag as is
    return secrets.token_hex(24)


def kept_credentials() -> tuple[str | None, str | None]:
    """The client token and slave secret of this home's connection file, if it has one.

    A master restarted with no ``--token``/``--slave-secret`` keeps them, so the
    slaves that keep trying to reconnect, and the notebooks and panels still
    open, get back in; a new pair is made only when there was none (delete the
    file, or give new ones, to change them).
    """
    try:
        info = read_connection()
    except ConnectionConfigError:
        return None, None
    token, secret = info.get("token"), info.get("slave_secret")
    return (token if isinstance(token, str) and token else None,
            secret if isinstance(secret, str) and secret else None)


def write_connection(info: dict, path: str | None = None) -> str:
    """Write the connection file with mode 0600 from the start (no window where others can read it)."""
    path = path or connection_path()
    private_dir(os.path.dirname(path))
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, path)
    return path


def read_connection(path: str | None = None) -> dict:
    path = path or connection_path()
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConnectionConfigError(f"cannot read the connection file {path}: {exc}") from None


class ConnectionConfigError(Exception):
    pass


@dataclass
class Endpoint:
    url: str          # http(s)://host:port
    token: str | None
    slave_secret: str | None = None
    cafile: str | None = None
    unsent: str | None = None  # why a file's token was not sent to ``url``, for the refusal's message


def http_url(url: str) -> str:
    """Accept ws://, wss://, http://, https:// or host:port; return the HTTP base URL."""
    url = url.strip().rstrip("/")
    if url.startswith("ws://"):
        url = "http://" + url[5:]
    elif url.startswith("wss://"):
        url = "https://" + url[6:]
    elif "://" not in url:
        url = "http://" + url
    return url


def ws_url(url: str) -> str:
    url = http_url(url)
    return ("wss://" + url[8:]) if url.startswith("https://") else ("ws://" + url[7:])


def login_path() -> str:
    """Where ``distexec login`` keeps this account's login tokens (0600, like the connection file)."""
    return os.path.join(home(), "login.json")


def read_logins() -> list[dict]:
    """``distexec login``'s logins, one per master, the newest first (the default master)."""
    data = read_connection(login_path())
    if data.get("url"):  # written before several were kept: one login
        return [data]
    return [entry for entry in data.get("logins", []) if isinstance(entry, dict) and entry.get("url")]


def logins_of(url: str) -> tuple[list[dict], list[dict]]:
    """The logins to ``url``'s master and the others, each the newest first."""
    url = http_url(url)
    logins = read_logins()
    return ([e for e in logins if http_url(e["url"]) == url], [e for e in logins if http_url(e["url"]) != url])


def write_logins(logins: list[dict]) -> str:
    """Keep ``logins`` (newest first); with none left, the file goes.  Its path."""
    path = login_path()
    if logins:
        return write_connection({"logins": logins}, path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return path


def resolve(url: str | None = None, token: str | None = None, secret: str | None = None) -> Endpoint:
    """Explicit arguments, then DISTEXEC_URL/TOKEN/SLAVE_SECRET, then the login file (``distexec
    login``: the newest login's master by default, each master's own login for its URL), then the
    connection file.

    A file's token and slave secret go only to the master it names: sent to whatever other URL
    was given (a typo, a URL pasted from elsewhere), the local admin token or slave secret would
    be handed to that server.  Its CA file, too, is only for the master it names.
    """
    logins, conn = read_logins(), read_connection()
    files = [*logins, conn] if conn.get("url") else logins
    url = url or os.environ.get("DISTEXEC_URL") or (files[0]["url"] if files else None)
    if not url:
        raise ConnectionConfigError(
            f"no cluster found: start one with `distexec up`, log in to one with `distexec login URL --user "
            f"NAME`, or give a URL (DISTEXEC_URL, or the connection file {connection_path()})")
    url = http_url(url)
    named = [f for f in files if http_url(f["url"]) == url]
    mine = named[0] if named else {}
    unsent = None
    file_token = mine.get("token")
    if any(mine is login for login in logins) and mine.get("expires_epoch", 0) <= time.time():
        file_token = None
        unsent = f"the login of {mine.get('user')} to {url} has expired: run `distexec login` again"
    elif not mine and files and (files[0].get("token") or files[0].get("slave_secret")):
        which = "login file" if files[0] is not conn else "connection file"
        unsent = f"the {which}'s credentials are for {files[0]['url']}, not sent to {url}"
    return Endpoint(
        url=url,
        token=token or os.environ.get("DISTEXEC_TOKEN") or file_token,
        slave_secret=secret or os.environ.get("DISTEXEC_SLAVE_SECRET") or mine.get("slave_secret"),
        # A login without a CA file (a CA-signed master: the system's CAs) must not borrow the
        # connection file's self-signed certificate of another master: that could only refuse it.
        cafile=os.environ.get("DISTEXEC_CAFILE") or next((f["cafile"] for f in named if f.get("cafile")), None),
        unsent=unsent,
    )


class CleartextWarning(UserWarning):
    """A password about to go over plain http to another machine."""


_warned_cleartext: set[str] = set()


def cleartext(url: str) -> bool:
    """Whether ``url`` is plain http to another machine: what goes there (a password, a token) crosses
    the network unencrypted.  Loopback stays on this machine; a name is judged by what it resolves to."""
    parts = urllib.parse.urlsplit(http_url(url))
    if parts.scheme != "http" or not parts.hostname:
        return False
    try:
        infos = socket.getaddrinfo(parts.hostname, None)
    except OSError:
        return False  # unknown: the request itself will say it cannot reach it
    return any(not ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def warn_cleartext(url: str | None) -> None:
    """Before a login to ``url`` (None: the one configured), warn once per master and process if the
    password would cross the network unencrypted.  Called before the password is asked for."""
    try:
        url = resolve(url).url
    except ConnectionConfigError:
        return  # no master named: the login will say so
    if url in _warned_cleartext or not cleartext(url):
        return
    _warned_cleartext.add(url)
    warnings.warn(CleartextWarning(
        f"{url} is plain http to another machine: your password and the login token will cross the network "
        "unencrypted. Ask for the master's https:// address (docs/deploy.md)."), stacklevel=3)


def setup_logging() -> None:
    """Log lines to stderr for the master and slaves; DISTEXEC_LOG sets the level."""
    level = os.environ.get("DISTEXEC_LOG", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
