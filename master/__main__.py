import sys

try:
    from .server import main

    sys.exit(main())
except KeyboardInterrupt:
    # Stopped before its own handlers were set (while importing or starting): `distexec up`
    # stops the rest so when one part cannot start.  Nothing to report but the exit code.
    sys.exit(130)
