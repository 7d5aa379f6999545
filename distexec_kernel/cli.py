"""The ``distexec`` command line."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from . import config, dashes, display, protocol as P
from .cli_base import cluster_of, print_json, read_password, reader_gone, show, write_output
from .cli_submit import cmd_submit

def cmd_up(args) -> int:
    from .local import run_local_cluster
    return run_local_cluster(args)


def _master(argv: list[str]) -> int:
    from master.server import main as run
    return run(argv)


def _slave(argv: list[str]) -> int:
    from slave.server import main as run
    return run(argv)


# The commands that start a server hand their arguments to the role's own
# parser: the role alone knows its options, and every other command (`jobs`,
# `submit`, their --help) loads no server code (store, SQLite, argon2, sandbox).
SERVERS = {"master": _master, "slave": _slave}


def cmd_login(args) -> int:
    """Log in once; the token is kept for this account's commands, kernels and notebooks."""
    import time

    from .cluster import Cluster
    config.warn_cleartext(args.url)
    password = read_password(args.user, args.password_stdin, confirm=False)
    with Cluster(args.url, user=args.user, password=password, cafile=args.cafile, events=False) as c:
        info = {"url": c.url, "user": args.user, "token": c.token, "expires_at": c.login_info["expires_at"],
                "expires_epoch": P.parse_time(c.login_info["expires_at"]).timestamp()}
    if args.cafile:
        info["cafile"] = os.path.abspath(args.cafile)
    _, others = config.logins_of(info["url"])
    path = config.write_logins([info, *others])
    until = time.strftime("%Y-%m-%d %H:%M", time.localtime(info["expires_epoch"]))
    print(f"logged in to {info['url']} as {args.user} until {until}; kept in {path}: the default master "
          f"for this account's commands, kernels and notebooks (`distexec logout {info['url']}` forgets it)")
    if others:
        print(f"still logged in to {', '.join(entry['url'] for entry in others)}, for commands given its URL")
    return 0


def cmd_logout(args) -> int:
    """Forget one master's login (``URL``), or all of them."""
    gone, kept = (config.read_logins(), []) if args.url is None else config.logins_of(args.url)
    if not gone:
        print(f"distexec: not logged in{f' to {args.url}' if args.url else ''}", file=sys.stderr)
        return 1
    config.write_logins(kept)
    print(f"logged out of {', '.join(entry['url'] for entry in gone)}"
          + (f"; the default is now {kept[0]['url']}" if kept else ""))
    return 0


def cmd_user(args) -> int:
    from master import auth
    if not args.users:
        try:
            config.ensure_home()  # before the users file is written there: 0700
        except config.UnsafeFolderError as exc:
            print(f"distexec: {exc}", file=sys.stderr)
            return 2
    path = args.users or auth.default_users_path()
    if args.action != "list" and not args.name:
        raise SystemExit(f"distexec user {args.action}: give a user NAME")
    try:
        if args.action == "list":
            users = auth.load_users(path)
            if args.json:
                print_json({"users": [{"name": n, "admin": bool(u.get("admin"))} for n, u in sorted(users.items())]})
            else:
                for name, entry in sorted(users.items()):
                    print(f"{name}{' (admin)' if entry.get('admin') else ''}")
            return 0
        if args.action == "remove":
            if not auth.remove_user(path, args.name):
                print(f"distexec: no user {args.name!r} in {path}", file=sys.stderr)
                return 1
            print(f"removed {args.name} from {path}")
            return 0
        auth.check_user_name(args.name)
        new = auth.add_user(path, args.name, read_password(args.name, args.password_stdin), admin=args.admin)
    except (ValueError, auth.UsersFileError) as exc:
        print(f"distexec: {exc}", file=sys.stderr)
        return 2
    print(f"{'added' if new else 'updated'} {args.name}{' (admin)' if args.admin else ''} in {path}")
    return 0


def cmd_jobs(args) -> int:
    with cluster_of(args) as c:
        jobs, total = c.jobs_page(status=args.status, limit=args.limit, summary=not args.json, user=args.of)
    if args.json:
        print_json({"jobs": jobs, "total": total})
    else:
        show(display.jobs_text(jobs))
        if total > len(jobs):
            print(f"({len(jobs)} of {total} shown; --limit for more)")
    return 0


def cmd_show(args) -> int:
    with cluster_of(args) as c:
        job = c.job(args.job_id).record
    if args.json:
        print_json(job)
    else:
        # It holds the job's output: escaped on a terminal only, as `submit` prints it.
        write_output(display.job_detail_text(job) + "\n", sys.stdout, args.raw)
    return 0


def cmd_get(args) -> int:
    """``distexec get ID [NAME...] [-o DIR]``: a job's collected files, written under DIR with their folders."""
    from .files import FilesError
    with cluster_of(args) as c:
        job = c.job(args.job_id)
        if not job.artifacts and not args.names:
            print(f"distexec: job {args.job_id} has no collected files"
                  f"{'' if job.done else ' (it has not ended yet)'}", file=sys.stderr)
            return 1
        try:
            written = job.save_artifacts(args.output, args.names or None)
        except FilesError as exc:
            show(f"distexec: {exc}", file=sys.stderr)
            return 1
    for path in written:  # a name a job chose: no escape sequence reaches the terminal, no line is faked
        print(display.clean_name(path))
    return 0


def cmd_cancel(args) -> int:
    with cluster_of(args, events=False) as c:
        # The master answers once the slave has killed a running job (within a few seconds).
        job = c.cancel(args.job_id)
        if job.status != P.CANCELLED and job.done:
            print(f"distexec: job {job.id} had already ended", file=sys.stderr)
        elif not job.done:
            print(f"distexec: cancel asked; job {job.id} has not ended yet (its slave may be away)",
                  file=sys.stderr)
    show(display.status_line(job.record))
    return 0


def cmd_slaves(args) -> int:
    with cluster_of(args) as c:
        slaves = c.slaves()
    print_json({"slaves": slaves}) if args.json else show(display.slaves_text(slaves))
    return 0


def cmd_clients(args) -> int:
    with cluster_of(args) as c:
        clients = c.clients()
    print_json({"clients": clients}) if args.json else show(display.clients_text(clients))
    return 0


def cmd_prune(args) -> int:
    with cluster_of(args) as c:
        count = c.prune(before=args.before)
    print(f"pruned {count} job(s)")
    return 0


def cmd_languages(args) -> int:
    with cluster_of(args) as c:
        langs = c.languages()
    if args.json:
        print_json({"languages": langs})
    else:
        print(display.languages_text(langs))
    return 0


def cmd_kernel(args) -> int:
    from . import kernelspec
    try:
        if args.action == "install":
            langs = [x for x in (args.languages or "").split(",") if x] or None
            done = kernelspec.install(langs, user=args.user, prefix=args.prefix, sys_prefix=args.sys_prefix)
            for name, path in done.items():
                print(f"installed {name} in {path}")
        elif args.action == "list":
            found = kernelspec.installed(args.prefix)
            for name, path in found.items():
                print(f"{name:<22} {path}")
            if not found:
                print("no distexec kernels installed (distexec kernel install)")
        else:
            for name, path in kernelspec.remove(args.languages_ or None, args.prefix).items():
                print(f"removed {name} from {path}")
    except (ValueError, KeyError) as exc:
        print(f"distexec kernel {args.action}: {exc.args[0]}", file=sys.stderr)
        return 2
    return 0


AFTER_DASHES = "; the program's arguments go after --: distexec submit FILE [options] -- ARG..."


class Parser(argparse.ArgumentParser):
    def error(self, message):
        super().error(dashes.hint(message, "distexec submit FILE [options]"))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="distexec", description="Run programs on a pool of machines.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client_opts(sp):
        sp.add_argument("--url", default=None, help="master URL (default: DISTEXEC_URL or the connection file)")
        sp.add_argument("--token", default=None, help="client token (default: DISTEXEC_TOKEN or the connection file)")
        sp.add_argument("--user", default=None, help="log in as this user (asks the password) instead of a token")
        sp.add_argument("--password-stdin", action="store_true", help="with --user: read the password from stdin")
        sp.add_argument("--cafile", default=None, metavar="PEM",
                        help="verify an https master with this certificate (default: DISTEXEC_CAFILE or the "
                             "connection file's, else the system's CAs)")

    sp = sub.add_parser("up", help="start a master and local slaves; Ctrl-C stops all")
    sp.add_argument("--slaves", type=int, default=2, help="how many slaves to start here (default 2)")
    sp.add_argument("--slots", type=int, default=None, help="most jobs each slave runs at once (default: CPU count)")
    sp.add_argument("--max-jobs", type=int, default=None,
                    help="most jobs running at once in the whole cluster (default: no limit but the slots)")
    sp.add_argument("--port", type=int, default=8765, help="the master's port (0 picks a free one; default 8765)")
    sp.add_argument("--host", default="127.0.0.1", help="the master's address to listen on (default 127.0.0.1)")
    sp.add_argument("--languages", default=None, metavar="L,...",
                    help="the languages the slaves offer (default: all they find)")
    sp.add_argument("--warm-imports", default=None, metavar="MODULES",
                    help="Python modules each slave's warm pool imports once, for every Python job (e.g. numpy)")
    sp.add_argument("--db", default=None, metavar="PATH",
                    help="the master's history (default $DISTEXEC_HOME/history.sqlite3)")
    sp.add_argument("--tls", action="store_true",
                    help="serve https/wss with a self-signed certificate kept in $DISTEXEC_HOME/tls")
    sp.set_defaults(func=cmd_up)

    sp = sub.add_parser("user", help="manage the users file of `distexec master --users FILE`")
    sp.add_argument("action", choices=("add", "remove", "list"))
    sp.add_argument("name", nargs="?", default=None)
    sp.add_argument("--admin", action="store_true", help="the user sees and cancels every job")
    sp.add_argument("--users", default=None, metavar="FILE", help="default: $DISTEXEC_HOME/users.json")
    sp.add_argument("--password-stdin", action="store_true", help="read the password from stdin (scripts)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_user)

    sp = sub.add_parser("login", help="log in to a master once, for this account's commands, kernels, notebooks")
    sp.add_argument("url", help="the master, e.g. https://master.lab:8765")
    sp.add_argument("--user", required=True)
    sp.add_argument("--password-stdin", action="store_true", help="read the password from stdin (scripts)")
    sp.add_argument("--cafile", default=None, metavar="PEM", help="verify an https master with this certificate")
    sp.set_defaults(func=cmd_login)
    sp = sub.add_parser("logout", help="forget the logins `distexec login` kept (or one master's)")
    sp.add_argument("url", nargs="?", default=None, help="forget only this master's login")
    sp.set_defaults(func=cmd_logout)

    sp = sub.add_parser("kernel", help="install, list or remove the Jupyter kernels (one per language)")
    sp.add_argument("action", choices=("install", "list", "remove"))
    sp.add_argument("languages_", nargs="*", metavar="LANG", help="remove: these languages' kernels (default: all)")
    where = sp.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for this user only")
    where.add_argument("--sys-prefix", action="store_true", help="install into this Python's prefix (a venv, conda)")
    where.add_argument("--prefix", default=None, metavar="P", help="install into P/share/jupyter/kernels")
    sp.add_argument("--languages", default=None, metavar="L,...",
                    help="install: these languages (default: every language distexec knows)")
    sp.set_defaults(func=cmd_kernel)

    # Listed for `distexec --help`; main() hands their arguments to the role (see SERVERS).
    sub.add_parser("master", help="run a master (`distexec master --help` for its options)", add_help=False)
    sub.add_parser("slave", help="run a slave (`distexec slave --help` for its options)", add_help=False)

    sp = sub.add_parser("submit", help="run a file on the cluster; prints its output, exits with its code",
                        epilog="The program's arguments: --arg A (repeat; --arg=-v for one that starts with -), "
                               "then any after --: distexec submit FILE [options] -- -v --out x")
    sp.add_argument("file", help="the program (-: read it from stdin, with --lang)")
    sp.add_argument("--lang", default=None, help="language (default: from the file extension)")
    sp.add_argument("--timeout", type=float, default=None)
    sp.add_argument("--arg", action="append", default=[], metavar="A",
                    help="an argument for the program (repeat; --arg=-v for one that starts with -)")
    sp.add_argument("--stdin-file", default=None, metavar="FILE",
                    help="the program's stdin (-: this command's stdin); without it the program's stdin is empty")
    sp.add_argument("--name", default=None)
    sp.add_argument("--retries", type=int, default=0)
    sp.add_argument("--no-wait", action="store_true", help="print the job id and return")
    sp.add_argument("--each", metavar="ARGS_FILE", default=None,
                    help="one job per line of ARGS_FILE, the line (split as a shell would) as its arguments; "
                         "prints the outputs in order; exits non-zero if any job failed")
    sp.add_argument("--progress", action="store_true",
                    help="with --each: show the progress bar even when stderr is not a terminal")
    sp.add_argument("--raw", action="store_true",
                    help="print the job's output as it is on a terminal too (redirected to a file or a pipe it "
                         "always is; on a terminal its control characters are shown as \\x1b...)")
    sp.add_argument("--file", dest="file_", action="append", default=[], metavar="PATH",
                    help="send this local file (under its base name) or folder (under its name) with the job")
    sp.add_argument("--collect", action="append", default=[], metavar="PAT",
                    help="keep the job's files matching this glob (*.png, out/**); fetch them with `distexec get`")
    client_opts(sp)
    # main() takes what follows `--` before argparse sees it; the usage still shows it.
    sp.usage = sp.format_usage().removeprefix("usage: ").rstrip("\n") + " [-- ARG ...]"
    sp.set_defaults(func=cmd_submit, program_args=[])

    sp = sub.add_parser("get", help="save a job's collected files (its --collect), folders kept")
    sp.add_argument("job_id", type=int)
    sp.add_argument("names", nargs="*", metavar="NAME", help="only these files (default: all)")
    sp.add_argument("-o", "--output", default=".", metavar="DIR", help="where to write them (default: here)")
    client_opts(sp)
    sp.set_defaults(func=cmd_get)

    sp = sub.add_parser("jobs", help="the job history, newest first")
    sp.add_argument("--status", choices=P.STATES, default=None)
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--of", default=None, metavar="NAME", help="only this user's jobs (for an admin)")
    sp.add_argument("--json", action="store_true")
    client_opts(sp)
    sp.set_defaults(func=cmd_jobs)

    sp = sub.add_parser("show", help="one job in full")
    sp.add_argument("job_id", type=int)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--raw", action="store_true",
                    help="print the job's name and output as they are on a terminal too (redirected they "
                         "always are; on a terminal control characters are shown as \\x1b...)")
    client_opts(sp)
    sp.set_defaults(func=cmd_show)

    sp = sub.add_parser("cancel", help="cancel a job")
    sp.add_argument("job_id", type=int)
    client_opts(sp)
    sp.set_defaults(func=cmd_cancel)

    sp = sub.add_parser("prune", help="delete finished jobs from the master's history (admins)")
    sp.add_argument("--before", default=None, metavar="DATE",
                    help="those submitted before DATE (ISO date or time, UTC unless it says); "
                         "default: apply the master's --keep-days and --keep-mb now")
    client_opts(sp)
    sp.set_defaults(func=cmd_prune)

    for name, func, text in (("slaves", cmd_slaves, "connected slaves"), ("clients", cmd_clients, "connected clients"),
                             ("languages", cmd_languages, "languages the connected slaves run")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--json", action="store_true")
        client_opts(sp)
        sp.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SERVERS:
        try:
            return SERVERS[argv[0]](argv[1:])
        except KeyboardInterrupt:  # a Ctrl-C before the server set its own handlers
            return 130
    argv, after = dashes.split(argv) if argv[:1] == ["submit"] else (argv, [])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}"
                     + (AFTER_DASHES if args.command == "submit" else ""))
    if args.command == "submit":
        args.program_args = after
    # A warning meant for a person at a terminal: one line, not Python's file and line.
    warnings.formatwarning = lambda message, *_, **__: f"distexec: warning: {message}\n"
    from .cluster import DistexecError
    try:
        code = args.func(args)
        sys.stdout.flush()  # now, so a reader that left (`| head`) is met below, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return reader_gone()
    except (DistexecError, config.ConnectionConfigError) as exc:
        print(f"distexec: {exc}", file=sys.stderr)
        if getattr(args, "json", False):
            # A script reading --json still gets one document: the error, as the API gives it.
            print_json({"error": {"code": getattr(exc, "code", None) or "no_connection", "message": str(exc)}})
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
