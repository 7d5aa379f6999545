import os
import signal
import sys

# While the server's modules import, a Ctrl-C ends the process at once.  Python's KeyboardInterrupt can
# land in a callback of the import machinery, which swallows it ("Exception ignored in
# _get_module_lock"): the server then started as if no Ctrl-C had come (a fresh CI's run of
# test_servers_stopped_while_starting_exit_quietly waited for it 60 s).  Nothing has started yet.
signal.signal(signal.SIGINT, lambda *_: os._exit(130))
try:
    from .server import main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
except KeyboardInterrupt:
    # Stopped before its own handlers were set (while importing or starting): `distexec up`
    # stops the rest so when one part cannot start.  Nothing to report but the exit code.
    sys.exit(130)
