"""distexec: run programs on a pool of machines from a notebook.

Importing the package is cheap: ``Cluster``, ``JobPanel`` and the IPython
extension load their dependencies (requests, ipywidgets) only when used, so
the master and slaves can import ``distexec_kernel.protocol`` alone.
"""
__version__ = "0.1.0"

__all__ = ["Cluster", "DistexecError", "Job", "JobGroup", "JobPanel", "RemoteError", "load_ipython_extension"]


def __getattr__(name):
    if name in ("DistexecError", "RemoteError"):
        # From errors.py alone: catching them needs neither requests nor the client.
        from . import errors
        return getattr(errors, name)
    if name in ("Cluster", "Job", "JobGroup"):
        from . import cluster
        return getattr(cluster, name)
    if name == "JobPanel":
        from .panel import JobPanel
        return JobPanel
    raise AttributeError(name)


def load_ipython_extension(ipython):
    from .magic import load_ipython_extension as load
    load(ipython)


def unload_ipython_extension(ipython):
    from .magic import unload_ipython_extension as unload
    unload(ipython)
