"""``distexec submit``: a program (or one per line of arguments) to the cluster, its output to
the terminal, the job's exit code as the command's."""
from __future__ import annotations

import os
import sys

from . import display, languages as L, protocol as P
from .cli_base import cluster_of, show, write_output

# Exit codes of `distexec submit` for jobs that have no exit code of their own,
# following the shell's conventions (timeout(1) uses 124).
EXIT_FOR_ERROR = {P.TIMEOUT: 124, P.CANCELLED_CODE: 130, P.SYNTAX_ERROR: 2, P.UNSUPPORTED_LANGUAGE: 2,
                  P.COMPILE_ERROR: 1}


def _read_text(path: str, what: str) -> str:
    """A text file the user named (``-``: this command's stdin), or exit with why it cannot be sent."""
    try:
        if path == "-":
            return sys.stdin.buffer.read().decode()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise SystemExit(f"distexec: cannot read {path}: {exc.strerror}")
    except UnicodeDecodeError as exc:
        # The protocol carries a program and its stdin as text; files (--file) may be bytes.
        raise SystemExit(f"distexec: {what} {'(stdin)' if path == '-' else path} is not UTF-8 text "
                         f"(byte {exc.start}); send binary data with --file")


def cmd_submit(args) -> int:
    dashes = [what for what, path in (("the program", args.file), ("--stdin-file", args.stdin_file),
                                      ("--each", args.each)) if path == "-"]
    if len(dashes) > 1:
        raise SystemExit(f"distexec: only one of {' and '.join(dashes)} can be read from stdin (-)")
    if args.file == "-" and not args.lang:
        raise SystemExit("distexec: a program read from stdin (-) needs --lang")
    source = _read_text(args.file, "the program")
    language = args.lang or L.from_filename(args.file)
    if not language:
        raise SystemExit(f"distexec: cannot tell the language of {args.file}; give --lang")
    stdin = _read_text(args.stdin_file, "the stdin file") if args.stdin_file else None
    from .files import FilesError, read_paths
    try:
        files = read_paths(args.file_) if args.file_ else None
    except FilesError as exc:
        raise SystemExit(f"distexec: {exc}")
    if args.each:
        return _submit_each(args, source, language, stdin, files)
    with cluster_of(args, events=not args.no_wait) as c:
        job = c.submit(source, language=language, args=program_args(args) or None, stdin=stdin, timeout=args.timeout,
                       name=_job_name(args), retries=args.retries, files=files,
                       collect=args.collect or None)
        if args.no_wait:
            print(job.id)
            return 0
        line_open = False  # the last text shown left its line unfinished, on a terminal
        try:
            for stream, text in job.iter_output():
                out = sys.stdout if stream == "stdout" else sys.stderr
                write_output(text, out, args.raw)
                out.flush()
                if text:
                    line_open = not text.endswith("\n") and out.isatty()
        except KeyboardInterrupt:
            job.cancel()
            print(f"\ndistexec: cancelled job {job.id}", file=sys.stderr)
            return 130
        record = job.record
    if line_open and sys.stderr.isatty():
        print(file=sys.stderr)  # the status line on a line of its own, as a shell's prompt would be
    for meta in record.get("artifacts") or []:
        show(f"collected {meta['name']} ({meta['size']} bytes): distexec get {record['id']} -o DIR", args.raw,
              sys.stderr)
    show(display.status_line(record), args.raw, sys.stderr)
    err = record.get("error")
    if err and err.get("code") == P.SYNTAX_ERROR:
        caret = display.syntax_caret(err)
        if caret:
            show(caret, args.raw, sys.stderr)
    return _exit_code(record)


def program_args(args) -> list[str]:
    """The program's arguments: the ``--arg`` ones, then those after ``--`` (which may start with -)."""
    return [*args.arg, *args.program_args]


def _job_name(args) -> str:
    return args.name or ("stdin" if args.file == "-" else os.path.basename(args.file))


def _exit_code(record: dict) -> int:
    """The shell's exit code for a job: its own, 128+N for signal N, else one for its error code."""
    if record["status"] == P.SUCCEEDED:
        return 0
    if record.get("exit_code") is not None and record["exit_code"] > 0:
        return record["exit_code"]
    if record.get("exit_code") is not None and record["exit_code"] < 0:
        return 128 - record["exit_code"]
    return EXIT_FOR_ERROR.get((record.get("error") or {}).get("code"), 1)


def _each_args(path: str) -> list[list[str]]:
    """One job's arguments per line of ``path``, split as a shell would; blank lines and # comments skipped."""
    import shlex
    lines = _read_text(path, "the arguments file").splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        try:
            words = shlex.split(_uncommented(line))
        except ValueError as exc:
            raise SystemExit(f"distexec: {path}, line {number}: {exc}")
        if words:
            out.append(words)
    return out


def _uncommented(line: str) -> str:
    """``line`` without its comment: as in a shell, a ``#`` starts one only at the start of a word,
    outside quotes (shlex's ``comments=True`` takes ``a#b`` for ``a`` and a comment)."""
    quote, escaped, word_start = None, False, True
    for i, ch in enumerate(line):
        if escaped:
            escaped = word_start = False
        elif quote == "'":
            quote = None if ch == "'" else quote
        elif quote == '"':
            escaped, quote = ch == "\\", None if ch == '"' else quote
        elif ch == "\\":
            escaped = True
            word_start = False
        elif ch in "'\"":
            quote, word_start = ch, False
        elif ch == "#" and word_start:
            return line[:i]
        else:
            word_start = ch in " \t"
    return line


def _submit_each(args, source: str, language: str, stdin: str | None, files: dict | None = None) -> int:
    """``submit FILE --each ARGS_FILE``: one job per line, a progress bar, outputs in order.

    Exits 0 if every job succeeded, else with the exit code of the first
    failure in input order (as ``submit`` would for that job alone); 2 (a
    usage error) if the file holds no line of arguments, submitting nothing.
    """
    each = _each_args(args.each)
    if not each:
        # An empty input is almost surely a mistake (a wrong path, a generator that failed): "0 jobs"
        # and success would hide it. A usage error, as argparse's, before the master is asked anything.
        where = "stdin (-)" if args.each == "-" else args.each
        print(f"distexec: --each {where} has no line of arguments (only blank lines and # comments, or none): "
              "no job submitted", file=sys.stderr)
        return 2
    name = _job_name(args)
    subs = [dict(source=source, language=language, args=[*program_args(args), *words], stdin=stdin,
                 timeout=args.timeout, name=name, retries=args.retries, files=files, collect=args.collect or None)
            for words in each]
    with cluster_of(args, events=not args.no_wait) as c:
        group = c.submit_many(subs)
        if args.no_wait:
            # This process's end would end the parts not sent yet: they go first (queue's room).
            try:
                if any(job.pending for job in group):
                    print(f"distexec: sending the rest of the {len(group)} jobs as the queue has room",
                          file=sys.stderr)
                group.wait_sent()
            except KeyboardInterrupt:
                group.stop_sending()
                sent = sum(job.id is not None for job in group)
                print(f"\ndistexec: stopped sending: {sent} of {len(group)} jobs sent, in group {group.id}",
                      file=sys.stderr)
                return 130
            print(group.id or "")
            return 0
        try:
            group.wait(progress=sys.stderr.isatty() or args.progress)
        except KeyboardInterrupt:
            group.cancel()
            print(f"\ndistexec: cancelled group {group.id}", file=sys.stderr)
            return 130
    for job in group:
        write_output(job.stdout or "", sys.stdout, args.raw)
        if job.stderr:
            write_output(job.stderr, sys.stderr, args.raw)
    sys.stdout.flush()
    print(group.summary(), file=sys.stderr)
    for job in group.failed:
        show(display.status_line(job.record), args.raw, sys.stderr)
    return _exit_code(group.failed[0].record) if group.failed else 0
