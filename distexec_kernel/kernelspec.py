"""Kernelspecs for the per-language kernels: ``distexec kernel install | list | remove``.

Through jupyter_client's ``KernelSpecManager``, so they land where Jupyter
looks (``--user``, ``--sys-prefix``, ``--prefix P``, else the system
directory) and JupyterLab's launcher shows "C (distexec)", "Java (distexec)", ….
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

from . import languages as L

PREFIX = "distexec-"


def spec_name(language: str) -> str:
    return PREFIX + L.canonical(language)


def display_name(language: str) -> str:
    lang = L.get(language)
    return f"{lang.display_name or lang.name} (distexec)"


def kernel_json(language: str) -> dict:
    """The kernel.json of ``language``'s kernel: this Python runs it, SIGINT interrupts it."""
    name = L.canonical(language)
    return {
        "argv": [sys.executable, "-m", "distexec_kernel.kernel", "--language", name, "-f", "{connection_file}"],
        "display_name": display_name(name),
        "language": name,
        "interrupt_mode": "signal",
        "metadata": {"distexec": {"language": name}},
    }


def _manager(prefix: str | None = None):
    from jupyter_client.kernelspec import KernelSpecManager

    if prefix:
        # Only what is under the prefix the user named, in or out of Jupyter's search path.
        return KernelSpecManager(kernel_dirs=[os.path.join(prefix, "share", "jupyter", "kernels")])
    return KernelSpecManager()


def install(languages_: list[str] | None = None, *, user: bool = False, prefix: str | None = None,
            sys_prefix: bool = False) -> dict[str, str]:
    """Install a kernelspec per language (default: every language of the table); name -> directory."""
    names = [L.canonical(x) for x in (languages_ or L.LANGUAGES)]
    unknown = [x for x in names if x not in L.LANGUAGES]
    if unknown:
        raise ValueError(f"unknown language(s) {', '.join(unknown)}; known: {', '.join(L.LANGUAGES)}")
    if sys_prefix:
        prefix = sys.prefix
    ksm = _manager()
    done = {}
    for name in dict.fromkeys(names):
        with tempfile.TemporaryDirectory() as src:
            with open(os.path.join(src, "kernel.json"), "w") as f:
                json.dump(kernel_json(name), f, indent=2)
            done[spec_name(name)] = ksm.install_kernel_spec(src, kernel_name=spec_name(name), user=user,
                                                            prefix=prefix)
    return done


def installed(prefix: str | None = None) -> dict[str, str]:
    """The distexec kernelspecs Jupyter finds (only those under ``prefix`` if given): name -> directory."""
    return {name: path for name, path in sorted(_manager(prefix).find_kernel_specs().items())
            if name.startswith(PREFIX)}


def remove(languages_: list[str] | None = None, prefix: str | None = None) -> dict[str, str]:
    """Remove the kernelspecs of these languages (default: all of ours); name -> the directory removed.

    A language with no kernelspec installed raises ``KeyError`` naming it,
    before anything is removed.
    """
    found = installed(prefix)
    wanted = [spec_name(x) for x in languages_] if languages_ else list(found)
    missing = [w for w in wanted if w not in found]
    if missing:
        raise KeyError(f"no kernelspec {', '.join(missing)} installed; installed: {', '.join(found) or 'none'}")
    ksm = _manager(prefix)
    return {name: ksm.remove_kernel_spec(name) for name in wanted}
