"""What the slave's compile cache saves: compiled jobs run cold vs warm, through a real local cluster.

    .venv/bin/python benchmarks/compile_cache.py [--runs 15] [--langs c,java]

Cold: every job's source differs (a fresh tag in a string), so every job
compiles.  Warm: the same source again and again, after one run that fills
the cache, so no job compiles.  Prints the median submit-to-result time of
each and their ratio.  The machines are shared and noisy: compare the two
numbers of one run, not numbers across runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distexec_kernel import Cluster, protocol as P  # noqa: E402
from distexec_kernel.local import LocalCluster  # noqa: E402

# A program per language that prints TAG; {tag} is replaced per job.
PROGRAMS = {
    "c": '#include <stdio.h>\nint main(void) { printf("%s\\n", "{tag}"); return 0; }\n',
    "cpp": '#include <iostream>\nint main() { std::cout << "{tag}" << "\\n"; }\n',
    "java": 'public class Main {\n  public static void main(String[] a) { System.out.println("{tag}"); }\n}\n',
    "go": 'package main\n\nimport "fmt"\n\nfunc main() { fmt.Println("{tag}") }\n',
    "rust": 'fn main() { println!("{tag}"); }\n',
}


def timed(c: Cluster, lang: str, tag: str) -> float:
    t0 = time.perf_counter()
    job = c.submit(PROGRAMS[lang].replace("{tag}", tag), language=lang).wait(300)
    elapsed = time.perf_counter() - t0
    if job.status != P.SUCCEEDED or job.stdout != f"{tag}\n":
        raise SystemExit(f"{lang} job {job.id} did not run: {job.status} {job.error} {job.stderr[:500]}")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15, help="jobs per measurement (default 15)")
    p.add_argument("--langs", default="c,java", help=f"comma-separated, of {', '.join(PROGRAMS)}")
    args = p.parse_args()
    langs = [x.strip() for x in args.langs.split(",") if x.strip()]
    with tempfile.TemporaryDirectory(prefix="distexec-bench-") as home:
        # One slave, one slot: every job meets the same cache, one at a time.
        with LocalCluster(1, slots=1, home=home, log_dir=os.path.join(home, "logs"), wait_complete=True) as lc:
            with Cluster(lc.url, token=lc.token) as c:
                print(f"{'language':10} {'cold median':>12} {'warm median':>12} {'cold/warm':>10}"
                      f"   ({args.runs} jobs each)")
                for lang in langs:
                    timed(c, lang, "warm-up")  # first JVM/compiler start, page cache
                    cold = [timed(c, lang, uuid.uuid4().hex) for _ in range(args.runs)]
                    tag = uuid.uuid4().hex
                    timed(c, lang, tag)  # fills the cache
                    warm = [timed(c, lang, tag) for _ in range(args.runs)]
                    mc, mw = statistics.median(cold), statistics.median(warm)
                    print(f"{lang:10} {mc * 1000:10.1f} ms {mw * 1000:10.1f} ms {mc / mw:9.1f}x", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
