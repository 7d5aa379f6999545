"""The README's main job: a local cluster, the quickstart notebook run against it."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading

import nbformat
from nbclient import NotebookClient

from distexec_kernel import config
from distexec_kernel.local import LocalCluster


def show_outputs(nb) -> None:
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        print(f"\n\033[1mIn:\033[0m {cell.source.strip()}")
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                print(out.text, end="")
            elif "data" in out:
                print(out.data.get("text/plain", ""))
            elif out.output_type == "error":
                print("\n".join(out.traceback))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--notebook", default="notebooks/quickstart.ipynb")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--lab", action="store_true", help="open JupyterLab on notebooks/ afterwards")
    p.add_argument("--exit", action="store_true", help="stop the cluster after the notebook ran")
    args = p.parse_args()

    lc = LocalCluster(2, port=args.port)
    lc.start()
    print(f"cluster up: master {lc.url}, slaves {', '.join(s.uid for s in lc.slaves)}", flush=True)
    print(f"connection file: {config.connection_path()}")
    # The notebook and JupyterLab run against this cluster, also for an account logged in elsewhere.
    os.environ.update(DISTEXEC_URL=lc.url, DISTEXEC_TOKEN=lc.token)
    lab = None
    try:
        nb = nbformat.read(args.notebook, as_version=4)
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": os.path.dirname(args.notebook)}}).execute()
        show_outputs(nb)
        print(f"\n{args.notebook} ran top to bottom against the cluster.")
        if args.exit:
            return 0
        if args.lab:
            lab = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
                                    "--ServerApp.root_dir=notebooks"])
        print("The cluster keeps running: try `.venv/bin/distexec jobs` in another terminal. Ctrl-C stops it.")
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
    finally:
        if lab is not None:
            lab.terminate()
            lab.wait()
        lc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
