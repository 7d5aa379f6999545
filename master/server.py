"""Start a master: ``python -m master`` or ``distexec master``."""
from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import logging
import os
import signal
import ssl
import sys
import urllib.parse

import tornado.httpserver
import tornado.netutil

from distexec_kernel import config, protocol as P
from distexec_kernel.config import seconds

from .app import MAX_BODY_BYTES, make_app
from .auth import DEFAULT_TOKEN_TTL, Auth, UsersFileError
from .admission import DEFAULT_MAX_QUEUE, DEFAULT_MAX_QUEUED_MB_PER_USER, DEFAULT_MAX_QUEUED_PER_USER
from .core import DEFAULT_KEEP_DAYS, DEFAULT_KEEP_MB, DEFAULT_MAX_CLIENTS_PER_USER, PRUNE_INTERVAL, Master
from .jobs import END_GRACE
from .limits import DEFAULT_BURST, DEFAULT_RATE, DEFAULT_READ_BURST, DEFAULT_READ_RATE, Gate, parse_rate
from .sockets import PING_INTERVAL
from .store import JobStore

log = logging.getLogger("distexec.master")

READY = "distexec master ready at"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (0 picks a free one; default 8765)")
    p.add_argument("--max-jobs", type=int, default=None, help="most jobs running at once in the cluster")
    p.add_argument("--db", default=None, help="history database (default $DISTEXEC_HOME/history.sqlite3)")
    p.add_argument("--token", default=None, help="client token (default: a random one)")
    p.add_argument("--slave-secret", default=None, help="secret slaves present (default: a random one)")
    p.add_argument("--certfile", default=None, help="TLS certificate (serve https/wss)")
    p.add_argument("--keyfile", default=None, help="TLS private key")
    p.add_argument("--url", default=None, metavar="URL",
                   help="the address clients and slaves reach this master at (e.g. https://master.lab:8765), "
                        "written in the connection file for this machine's commands (default: from --host and "
                        "the port); with a certificate, a name it was issued for")
    p.add_argument("--cafile", default=None,
                   help="CA certificate clients should verify the master with, written to the connection file "
                        "(default: --certfile if it is self-signed, else none: the system's CAs)")
    p.add_argument("--lost-grace", type=float, default=30.0,
                   help="seconds a restarted master waits for a running job's slave to come back")
    p.add_argument("--end-grace", type=seconds, default=END_GRACE, metavar="SECONDS",
                   help=f"seconds past its timeout (or 10%% of it, if more) a running job's end may take to "
                        f"reach the master before the master ends it as slave_lost (default {END_GRACE:g})")
    p.add_argument("--ping-interval", type=seconds, default=PING_INTERVAL, metavar="SECONDS",
                   help=f"seconds between pings to each slave and client; one silent for twice that is dropped "
                        f"(default {PING_INTERVAL:g})")
    p.add_argument("--users", default=None, metavar="FILE",
                   help="users file enabling POST /api/login (manage it with `distexec user add`)")
    p.add_argument("--token-ttl", type=float, default=DEFAULT_TOKEN_TTL, metavar="SECONDS",
                   help=f"how long a login token lasts (default {DEFAULT_TOKEN_TTL:g} s)")
    p.add_argument("--rate", type=parse_rate, default=DEFAULT_RATE, metavar="N/s",
                   help=f"submissions per second per user, not admins (default {DEFAULT_RATE:g}/s; 0 = no limit)")
    p.add_argument("--burst", type=int, default=DEFAULT_BURST,
                   help=f"submissions a user may send at once before --rate applies (default {DEFAULT_BURST})")
    p.add_argument("--read-rate", type=parse_rate, default=DEFAULT_READ_RATE, metavar="MiB/s",
                   help="MiB of submissions per second the master reads for one user, not admins; a user past "
                        f"it is read later, not refused (default {DEFAULT_READ_RATE:g}/s; 0 = no limit)")
    p.add_argument("--read-burst", type=float, default=DEFAULT_READ_BURST, metavar="MiB",
                   help=f"MiB of submissions read for a user at once before --read-rate applies "
                        f"(default {DEFAULT_READ_BURST:g})")
    p.add_argument("--max-queued-per-user", type=_count, default=DEFAULT_MAX_QUEUED_PER_USER, metavar="N",
                   help="most jobs one user (the admin token counts as one) may have waiting; past it their "
                        f"submission gets 429 queue_full (default {DEFAULT_MAX_QUEUED_PER_USER}; 0 = no cap)")
    p.add_argument("--max-queued-mb-per-user", type=_amount, default=DEFAULT_MAX_QUEUED_MB_PER_USER, metavar="MIB",
                   help="most MiB of inputs (programs, files, stdin) one user's waiting jobs may hold in the "
                        "history (queued jobs are never pruned); past it their submission gets 429 queue_full "
                        f"(default {DEFAULT_MAX_QUEUED_MB_PER_USER:g}; 0 = no cap)")
    p.add_argument("--max-running-per-user", type=_count, default=0, metavar="N",
                   help="most jobs of one user (the admin token counts as one) running at once; the others wait "
                        "their turn, however many slots are free (default 0 = no cap: one user may use them all)")
    p.add_argument("--max-timeout", type=_amount, default=0, metavar="SECONDS",
                   help="the longest a job may ask to run; a longer timeout is refused (400) and the default "
                        f"({P.DEFAULT_TIMEOUT:g} s) is cut to it (default 0 = {P.MAX_TIMEOUT:g} s)")
    p.add_argument("--max-clients-per-user", type=_count, default=DEFAULT_MAX_CLIENTS_PER_USER, metavar="N",
                   help="event channels (notebooks, panels, kernels) one user may hold open, not admins; past it "
                        f"another is refused with 429 (default {DEFAULT_MAX_CLIENTS_PER_USER}; 0 = no cap)")
    p.add_argument("--max-queue", type=_count, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help=f"safety cap on all waiting jobs together; past it a submission gets 503 "
                        f"(default {DEFAULT_MAX_QUEUE}; 0 = no cap)")
    p.add_argument("--keep-days", type=_amount, default=DEFAULT_KEEP_DAYS, metavar="D",
                   help=f"prune finished jobs submitted more than D days ago (default {DEFAULT_KEEP_DAYS:g}; "
                        "0 = keep all)")
    p.add_argument("--keep-mb", type=_amount, default=DEFAULT_KEEP_MB, metavar="M",
                   help=f"prune the oldest finished jobs while the history is over M MiB "
                        f"(default {DEFAULT_KEEP_MB:g}; 0 = no bound)")
    p.add_argument("--prune-interval", type=float, default=PRUNE_INTERVAL, metavar="SECONDS",
                   help=f"seconds between two retention passes (default {PRUNE_INTERVAL:g})")
    p.add_argument("--no-connection-file", action="store_true",
                   help="do not write $DISTEXEC_HOME/connection.json")


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    kept_token, kept_secret = (None, None) if args.no_connection_file else config.kept_credentials()
    token = args.token or os.environ.get("DISTEXEC_TOKEN") or kept_token or config.new_secret()
    secret = args.slave_secret or os.environ.get("DISTEXEC_SLAVE_SECRET") or kept_secret or config.new_secret()
    db = args.db or os.path.join(config.ensure_home(), "history.sqlite3")
    store = JobStore(db)  # first: it refuses a folder others could plant names in
    # The logins beside the history: they are the master's state, as it is (docs/security.md).
    auth = Auth(token, secret, users_file=args.users, token_ttl=args.token_ttl,
                logins_file=os.path.join(os.path.dirname(os.path.abspath(db)), "logins.json"))
    master = Master(store, max_jobs=args.max_jobs, lost_grace=args.lost_grace,
                    max_queue=args.max_queue or None, max_queued_per_user=args.max_queued_per_user or None,
                    max_queued_mb_per_user=args.max_queued_mb_per_user or None,
                    max_clients_per_user=args.max_clients_per_user or None,
                    max_running_per_user=args.max_running_per_user or None,
                    max_timeout=args.max_timeout or None,
                    keep_days=args.keep_days or None, keep_mb=args.keep_mb or None,
                    prune_interval=args.prune_interval, end_grace=args.end_grace)
    app = make_app(master, auth, Gate(args.rate, args.burst, args.read_rate, args.read_burst), args.ping_interval)
    ssl_ctx = None
    if args.certfile:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(args.certfile, args.keyfile)
    server = tornado.httpserver.HTTPServer(app, ssl_options=ssl_ctx, max_body_size=MAX_BODY_BYTES + (1 << 20),
                                           xheaders=False)
    sockets = tornado.netutil.bind_sockets(args.port, args.host)
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    scheme = "https" if ssl_ctx else "http"
    host = args.host if ":" not in args.host else f"[{args.host}]"
    url = f"{scheme}://{host}:{port}"
    if args.url:
        given = urllib.parse.urlsplit(config.http_url(args.url))
        if given.scheme != scheme or not given.hostname:
            raise SystemExit(f"distexec master: --url {args.url} must be a {scheme}:// address: this master "
                             f"serves {scheme}" + (" (--certfile)" if ssl_ctx else " (no --certfile)"))
        url = f"{scheme}://{given.netloc}"
    if ssl_ctx:
        names = certificate_names(args.certfile)
        if not names_host(names, urllib.parse.urlsplit(url).hostname):
            log.warning("the connection file names %s, which the certificate does not (it is for %s): this "
                        "machine's commands would refuse it; give --url with one of those names", url,
                        ", ".join(names) or "no name")
    if not ssl_ctx and not ipaddress.ip_address(sockets[0].getsockname()[0]).is_loopback:
        log.warning("serving plain http on %s: tokens, passwords and programs cross the network unencrypted; "
                    "use --certfile/--keyfile (or `distexec up --tls`)", args.host)
    master.start()
    if not args.no_connection_file:
        info = {"url": url, "token": token, "slave_secret": secret, "pid": os.getpid()}
        cafile = args.cafile or (args.certfile if args.certfile and _self_signed(args.certfile) else None)
        if cafile:
            info["cafile"] = os.path.abspath(cafile)
        path = config.write_connection(info)
        log.info("connection file: %s", path)
    log.info("history: %s", db)
    print(f"{READY} {url}", flush=True)
    try:
        await stop.wait()
    finally:
        # Before connections close: their jobs stay running for the next master.
        master.shutdown()
        server.stop()
        await server.close_all_connections()
        store.close()
        log.info("master stopped")


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _amount(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number, 0 or more, not {text}")
    return value


def certificate_names(certfile: str) -> list[str]:
    """The names and addresses the (first) certificate in ``certfile`` is valid for (its SubjectAltName)."""
    from cryptography import x509
    with open(certfile, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]


def names_host(names: list[str], host: str | None) -> bool:
    """Whether a certificate valid for ``names`` verifies for ``host`` (as clients check: an address must be
    listed as one; a name may match a one-label wildcard)."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        host = host.lower().rstrip(".")
        return any(n.lower() == host or (n.startswith("*.") and host.partition(".")[2] == n[2:].lower()
                                         and "." in n[2:]) for n in names)
    return any(_address(n) == address for n in names)


def _address(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _self_signed(certfile: str) -> bool:
    """Whether the (first) certificate in ``certfile`` is its own issuer, so it can be its clients' CA file.

    A CA-signed leaf cannot: OpenSSL (before Python 3.13's partial-chain
    default) wants the chain to end at a self-signed root.
    """
    from cryptography import x509
    with open(certfile, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return cert.issuer == cert.subject


# Python collects its youngest generation every 700 allocations by default. A master holds tens of
# thousands of long-lived objects (queued jobs, pending submissions, connections) and allocates a few
# thousand per job, so those collections, and the older ones they trigger, ran every few jobs; they
# rarely find garbage here (asyncio's few cycles wait a little longer).  benchmarks/master_scale.py,
# 4 pairs in turns: master CPU per job 771-851 -> 686-756 us, RSS 81 -> 78 MiB (docs/performance.md).
GC_THRESHOLD = (50_000, 20, 20)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distexec master", description="Run the distexec master.")
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    config.setup_logging()
    gc.set_threshold(*GC_THRESHOLD)
    stop = asyncio.Event()

    async def runner():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(args, stop)

    try:
        asyncio.run(runner())
    except (OSError, UsersFileError) as exc:
        print(f"distexec master: {exc}", file=sys.stderr)
        return 1
    return 0



