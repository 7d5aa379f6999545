"""Every language of the registry, end to end, with real toolchains.

The table ``PROGRAMS`` holds, for each language, the same five programs:
hello world, an args-and-stdin echo, a runtime error exiting 3, a program
whose error is on line 3, and one that prints a line and then sleeps (to
see output stream while it runs).  Adding a language to the registry
without adding it here fails ``test_every_language_has_programs``.

The per-language tests share one cluster (module scope) because compilers
are the slow part; the tests about which slave gets what build their own.
"""
from __future__ import annotations

import json
import functools
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid

import pytest

from distexec_kernel import Cluster, diagnostics as D, languages as L, protocol as P
from distexec_kernel.local import LocalCluster
from slave import stdbuf, toolchains
from slave.compile_cache import CompileCache

from conftest import module_cluster, wait_for

JOB_WAIT = 90  # seconds: a cold javac or rustc on a loaded 2-core machine

# language -> hello, echo, fail (exit 3 after "before"/"oops"), bad (error on line 3), stream
PROGRAMS: dict[str, dict[str, str]] = {
    "python": {
        "hello": 'print("hello")\n',
        "echo": 'import sys\nprint("args=" + "|".join(sys.argv[1:]))\nsys.stdout.write(sys.stdin.read())\n',
        "fail": 'import sys\nprint("before")\nprint("oops", file=sys.stderr)\nsys.exit(3)\n',
        "bad": "x = 1\ny = 2\nz = (\n",
        "stream": 'import time\nprint("ready")\ntime.sleep(60)\n',
    },
    "c": {
        "hello": '#include <stdio.h>\nint main(void) { printf("hello\\n"); return 0; }\n',
        "echo": r'''#include <stdio.h>
int main(int argc, char **argv) {
    printf("args=");
    for (int i = 1; i < argc; i++) printf(i > 1 ? "|%s" : "%s", argv[i]);
    printf("\n");
    int ch;
    while ((ch = getchar()) != EOF) putchar(ch);
    return 0;
}
''',
        "fail": '#include <stdio.h>\nint main(void) {\n  printf("before\\n");\n'
                '  fprintf(stderr, "oops\\n");\n  return 3;\n}\n',
        "bad": "#include <stdio.h>\nint main(void) {\n  int x = ;\n  return 0;\n}\n",
        # No fflush: line buffering must come from the slave (stdbuf).
        "stream": '#include <stdio.h>\n#include <unistd.h>\nint main(void) {\n  printf("ready\\n");\n'
                  '  sleep(60);\n  return 0;\n}\n',
    },
    "cpp": {
        "hello": '#include <iostream>\nint main() { std::cout << "hello\\n"; }\n',
        "echo": r'''#include <iostream>
#include <string>
int main(int argc, char **argv) {
    std::cout << "args=";
    for (int i = 1; i < argc; i++) std::cout << (i > 1 ? "|" : "") << argv[i];
    std::cout << "\n";
    std::string line;
    while (std::getline(std::cin, line)) std::cout << line << "\n";
}
''',
        "fail": '#include <iostream>\nint main() {\n  std::cout << "before\\n";\n  std::cerr << "oops\\n";\n'
                '  return 3;\n}\n',
        "bad": "#include <iostream>\nint main() {\n  int x = ;\n}\n",
        "stream": '#include <iostream>\n#include <thread>\n#include <chrono>\nint main() {\n'
                  '  std::cout << "ready\\n";\n  std::this_thread::sleep_for(std::chrono::seconds(60));\n}\n',
    },
    "java": {
        # Public classes not called Main: the slave names the file after them.
        "hello": 'public class Hello {\n  public static void main(String[] args) {\n'
                 '    System.out.println("hello");\n  }\n}\n',
        "echo": r'''import java.io.*;
public class Echo {
  public static void main(String[] args) throws IOException {
    System.out.println("args=" + String.join("|", args));
    BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
    String line;
    while ((line = in.readLine()) != null) System.out.println(line);
  }
}
''',
        "fail": 'public class Main {\n  public static void main(String[] args) {\n'
                '    System.out.println("before");\n    System.err.println("oops");\n    System.exit(3);\n  }\n}\n',
        "bad": 'public class Main {\n  public static void main(String[] args) {\n    System.out.println("x")\n'
               '  }\n}\n',
        "stream": 'public class Main {\n  public static void main(String[] a) throws Exception {\n'
                  '    System.out.println("ready");\n    Thread.sleep(60000);\n  }\n}\n',
    },
    "javascript": {
        "hello": 'console.log("hello");\n',
        "echo": 'const data = require("fs").readFileSync(0, "utf8");\n'
                'console.log("args=" + process.argv.slice(2).join("|"));\nprocess.stdout.write(data);\n',
        "fail": 'console.log("before");\nconsole.error("oops");\nprocess.exit(3);\n',
        "bad": 'console.log("x");\nlet a = 1;\nlet b = ;\n',
        "stream": 'console.log("ready");\nsetTimeout(() => {}, 60000);\n',
    },
    "ruby": {
        "hello": 'puts "hello"\n',
        "echo": 'puts "args=" + ARGV.join("|")\nprint STDIN.read\n',
        "fail": 'puts "before"\nSTDERR.puts "oops"\nexit 3\n',
        "bad": "puts 1\nputs 2\nputs )\n",
        # Ruby block-buffers a pipe by default: the slave must make it line by line.
        "stream": 'puts "ready"\nsleep 60\n',
    },
    "bash": {
        "hello": "echo hello\n",
        "echo": "(IFS='|'; echo \"args=$*\")\ncat\n",
        "fail": "echo before\necho oops >&2\nexit 3\n",
        "bad": "echo x\necho y\nif then\n",
        "stream": "echo ready\nsleep 60\n",
    },
    "go": {
        "hello": 'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("hello")\n}\n',
        "echo": '''package main

import (
\t"fmt"
\t"io"
\t"os"
\t"strings"
)

func main() {
\tfmt.Println("args=" + strings.Join(os.Args[1:], "|"))
\tdata, _ := io.ReadAll(os.Stdin)
\tos.Stdout.Write(data)
}
''',
        "fail": 'package main\n\nimport (\n\t"fmt"\n\t"os"\n)\n\nfunc main() {\n\tfmt.Println("before")\n'
                '\tfmt.Fprintln(os.Stderr, "oops")\n\tos.Exit(3)\n}\n',
        "bad": "package main\nfunc main() {\n\tundefinedFn()\n}\n",
        "stream": 'package main\n\nimport (\n\t"fmt"\n\t"time"\n)\n\nfunc main() {\n\tfmt.Println("ready")\n'
                  '\ttime.Sleep(60 * time.Second)\n}\n',
    },
    "rust": {
        "hello": 'fn main() {\n    println!("hello");\n}\n',
        "echo": '''use std::io::Read;
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("args={}", args.join("|"));
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).unwrap();
    print!("{}", s);
}
''',
        "fail": 'fn main() {\n    println!("before");\n    eprintln!("oops");\n    std::process::exit(3);\n}\n',
        # A warning (unused `a`) may come first and point at line 2: the error is on line 3.
        "bad": "fn main() {\n    let a = 1;\n    let b = c;\n}\n",
        "stream": 'fn main() {\n    println!("ready");\n'
                  '    std::thread::sleep(std::time::Duration::from_secs(60));\n}\n',
    },
    # Run only where pwsh is installed (no package registry here offers it).
    "powershell": {
        "hello": 'Write-Output "hello"\n',
        "echo": 'Write-Output ("args=" + ($args -join "|"))\n[Console]::In.ReadToEnd() | Write-Host -NoNewline\n',
        "fail": 'Write-Output "before"\n[Console]::Error.WriteLine("oops")\nexit 3\n',
        "bad": "Write-Output 1\nWrite-Output 2\nif ( {\n",
        "stream": 'Write-Output "ready"\nStart-Sleep -Seconds 60\n',
    },
}

# Languages whose toolchain a machine may lack: no package registry this
# project installs from offers them.  Every other language must be found.
OPTIONAL = {"powershell": "pwsh"}
LANGS = [name for name in L.LANGUAGES if name not in OPTIONAL or shutil.which(OPTIONAL[name])]
COMPILED = [name for name in LANGS if L.LANGUAGES[name].compile]
# Every language as a test parameter: one whose toolchain is missing shows as skipped, with why.
EVERY_LANG = [name if name in LANGS else pytest.param(name, marks=pytest.mark.skip(
                  reason=f"{OPTIONAL[name]} is not installed on this machine (no package registry offers it)"))
              for name in L.LANGUAGES]


# One master and two slaves with every language, shared by the per-language tests.
lc = module_cluster("languages", 2, slots=2, start_timeout=60)


@pytest.fixture(scope="module")
def lclient(lc):
    with Cluster(lc.url, token=lc.token) as c:
        yield c


def slave_logs(cluster: LocalCluster) -> str:
    out = []
    for name in sorted(os.listdir(cluster.log_dir)):
        if name.startswith("slave"):
            with open(os.path.join(cluster.log_dir, name)) as f:
                out.append(f.read())
    return "\n".join(out)


def cache_entries(cluster: LocalCluster) -> set[str]:
    root = os.path.join(cluster.home, "cache", "compile")
    return {n for n in os.listdir(root) if not n.startswith(".")} if os.path.isdir(root) else set()


# What each per-language test submits; all of it goes in at once (see ``submitted``).
SUBMISSIONS = {
    "hello": {},
    "echo": {"args": ["a", "b c", "-x"], "stdin": "one\ntwo words\n"},
    "fail": {},
    "bad": {},
}


@pytest.fixture(scope="module")
def submitted(lclient):
    """Every per-language job, submitted up front so compiles overlap; each test waits on its own."""
    return {(lang, kind): lclient.submit(PROGRAMS[lang][kind], language=lang, **kwargs)
            for lang in LANGS for kind, kwargs in SUBMISSIONS.items()}


def result(submitted, lang: str, kind: str):
    return submitted[(lang, kind)].wait(JOB_WAIT)


# -- the registry, no cluster ------------------------------------------------

def test_every_language_has_programs():
    assert set(PROGRAMS) == set(L.LANGUAGES)


@pytest.mark.parametrize("alias,name", [
    ("py", "python"), ("python3", "python"), ("c++", "cpp"), ("cpp", "cpp"), ("cxx", "cpp"),
    ("js", "javascript"), ("node", "javascript"), ("sh", "bash"), ("shell", "bash"), ("rs", "rust"),
    ("golang", "go"), ("rb", "ruby"), ("ps1", "powershell"), ("pwsh", "powershell"), ("C", "c"),
    (" Java ", "java"),
])
def test_aliases(alias, name):
    assert L.canonical(alias) == name
    assert L.get(alias) is L.LANGUAGES[name]


def test_unknown_language_kept_lower_case():
    assert L.canonical("COBOL") == "cobol"
    assert L.get("cobol") is None


def test_no_alias_names_two_languages():
    seen: dict[str, str] = {}
    for lang in L.LANGUAGES.values():
        for key in (lang.name, *lang.aliases):
            assert seen.setdefault(key, lang.name) == lang.name, f"{key} names {seen[key]} and {lang.name}"
    exts: dict[str, str] = {}
    for lang in L.LANGUAGES.values():
        for ext in lang.extensions:
            assert exts.setdefault(ext, lang.name) == lang.name, f"{ext} is {exts[ext]} and {lang.name}"


@pytest.mark.parametrize("path,name", [
    ("prog.rs", "rust"), ("a/b/x.cpp", "cpp"), ("x.cc", "cpp"), ("Main.java", "java"), ("app.js", "javascript"),
    ("mod.mjs", "javascript"), ("t.rb", "ruby"), ("main.go", "go"), ("x.c", "c"), ("run.sh", "bash"),
    ("run.bash", "bash"), ("s.ps1", "powershell"), ("nb.PY", "python"), ("notes.txt", None), ("Makefile", None),
])
def test_from_filename(path, name):
    assert L.from_filename(path) == name


@pytest.mark.parametrize("source,file", [
    ("public class Hello {\n}", "Hello.java"),
    ("import java.util.*;\n\npublic final class Solver {}\n", "Solver.java"),
    ("class Helper {}\npublic class App {\n  static class Inner {}\n}\n", "App.java"),
    ("// public class Commented {}\nclass Main {}\n", "Main.java"),
    ("public record Point(int x, int y) {}\n", "Point.java"),
    ("/* public class InAComment {} */\nclass Main {}\n", "Main.java"),
])
def test_java_file_named_after_public_class(source, file):
    assert L.LANGUAGES["java"].source_name(source) == file


@pytest.mark.parametrize("source,file,run", [
    # No public class: the file and the run are the class that declares main.
    ("class Quiet { public static void main(String[] a) {} }\n", "Quiet.java", "Quiet"),
    ("class Helper {}\nfinal class App {\n  static public void main(String... args) {}\n}\n", "App.java", "App"),
    ("class Old { public static void main(final String args[]) {} }\n", "Old.java", "Old"),
    # A public class is the file's name; the run is the class with main, the public one first.
    ("public class Util {}\nclass Runner { public static void main(String[] a) {} }\n", "Util.java", "Runner"),
    ("class A { public static void main(String[] a) {} }\npublic class B { public static void main(String[] a) {} }\n",
     "B.java", "B"),
    ("package a.b;\nclass Tool { public static void main(String[] a) {} }\n", "a/b/Tool.java", "a/b/Tool"),
    # Braces, `class` and main in comments, strings and text blocks are nothing; a nested class's main is
    # not the launcher's, nor is a main that is not public static.
    ('class S {\n  String s = "} class Z { public static void main(String[] a) {";\n'
     '  // } class Y {\n  String t = """\n    } class X {\n    """;\n'
     '  public static void main(String[] a) {}\n}\n', "S.java", "S"),
    ("class Outer { static class Inner { public static void main(String[] a) {} } }\n", "Main.java", "Main"),
    ("class Quiet { static void main(String[] a) {} }\n", "Main.java", "Main"),
    ("/* class C { public static void main(String[] a) {} } */ class D {}\n", "Main.java", "Main"),
])
def test_java_runs_the_class_declaring_main_public_or_not(source, file, run):
    assert (L.LANGUAGES["java"].source_name(source), L.LANGUAGES["java"].main_name(source)) == (file, run)


@pytest.mark.parametrize("source", ["/*" * 500_000, '"\\"' * 350_000, '"""\\' * 250_000,
                                    "public static final " * 50_000, "{" * 1_000_000])
def test_reading_a_java_source_takes_one_pass(source):
    # The master reads each Java submission on its event loop: a source of 1 MiB (the most there is) whose
    # comments, quotes or modifiers would each start a scan to its end would hold it for minutes.
    started = time.monotonic()
    assert L.LANGUAGES["java"].source_name(source) == "Main.java"
    assert time.monotonic() - started < 5


def test_other_languages_use_their_fixed_source_name():
    assert L.LANGUAGES["c"].source_name("public class X {}") == "main.c"
    assert L.LANGUAGES["rust"].source_name("fn main() {}") == "main.rs"


def test_fill_replaces_only_known_placeholders():
    fields = {"source": "Main.java", "main": "Main", "exe": "main.bin"}
    assert L.fill(("javac", "{source}", "-d", "{main}/{exe}", "{other}", "a{b}c"), fields) == \
        ["javac", "Main.java", "-d", "Main/main.bin", "{other}", "a{b}c"]
    assert L.fill(L.LANGUAGES["ruby"].run, fields)[-1] == "Main.java"


def test_fill_makes_a_list_field_as_many_arguments():
    fields = {"exe": "main.bin", "sources": ["main.c", "util.c"]}
    assert L.fill(("gcc", "-o", "{exe}", "{sources}", "-lm", "x{sources}"), fields) == \
        ["gcc", "-o", "main.bin", "main.c", "util.c", "-lm", "x{sources}"]
    assert L.fill(("go", "{sources}"), {"sources": []}) == ["go"]


@pytest.mark.parametrize("lang,files,sources", [
    # The source first, then the others of the language at the top of the job's directory, by name.
    ("c", ["util.c", "a.h", "data/more.c", "notes.txt", "b.c", "x.cpp"], ["main.c", "b.c", "util.c"]),
    ("cpp", ["z.cpp", "u.hpp", "a.cc", "m.cxx", "p.c++", "c.c", "lib/q.cpp"],
     ["main.cpp", "a.cc", "m.cxx", "p.c++", "z.cpp"]),
    ("go", ["helper.go", "go.mod", "sub/other.go"], ["main.go", "helper.go"]),
    # A name the compiler would take for an option is a path to it.
    ("c", ["-o.c"], ["main.c", "./-o.c"]),
])
def test_compiled_with_the_jobs_other_files_of_the_language(lang, files, sources):
    language = L.LANGUAGES[lang]
    assert language.compiled_with(language.source, files) == sources
    argv = L.fill(language.compile, {"source": language.source, "exe": L.EXE, "main": "main", "sources": sources})
    assert argv[argv.index(language.source):][:len(sources)] == sources


def test_java_and_rust_compile_their_source_alone_and_find_the_rest_themselves():
    # javac finds Stats.java beside Main.java; rustc finds util.rs for `mod util;`.
    assert "{source}" in L.LANGUAGES["java"].compile and "{sources}" not in L.LANGUAGES["java"].compile
    assert "{source}" in L.LANGUAGES["rust"].compile and "{sources}" not in L.LANGUAGES["rust"].compile


# Real diagnostics, as each toolchain printed them on this machine.
GCC_WARN_THEN_ERROR = """main.c: In function 'main':
main.c:2:7: warning: unused variable 'y' [-Wunused-variable]
    2 |   int y;
      |       ^
main.c:4:16: error: 'x' undeclared (first use in this function)
    4 |   printf("%d", x);
      |                ^
"""
GPP_ERROR = """main.cpp: In function 'int main()':
main.cpp:3:11: error: expected primary-expression before ';' token
    3 |   int x = ;
      |           ^
"""
JAVAC_ERROR = """Echo.java:3: error: ';' expected
    System.out.println("hi")
                            ^
1 error
"""
GO_ERROR = "# command-line-arguments\n./main.go:4:15: undefined: x\n"
RUSTC_WARN_THEN_ERROR = """warning: unused variable: `a`
 --> main.rs:2:9
  |
2 |     let a = 1;
  |         ^ help: if this is intentional, prefix it with an underscore: `_a`

error[E0425]: cannot find value `x` in this scope
 --> main.rs:3:18
  |
3 |   println!("{}", x);
  |                  ^
"""
PY_TRACEBACK = """Traceback (most recent call last):
  File "/tmp/distexec-job1-abc/main.py", line 5, in <module>
    f()
  File "/tmp/distexec-job1-abc/main.py", line 2, in f
    raise ValueError("boom")
ValueError: boom
"""
NODE_ERROR = """/tmp/distexec-job3-x/main.js:3
let b = ;
        ^

SyntaxError: Unexpected token ';'
    at wrapSafe (node:internal/modules/cjs/loader:1464:18)
"""
RUBY_ERROR = """-e:1:in `load': main.rb:3: syntax error, unexpected ')', expecting end-of-input (SyntaxError)
puts )
     ^
\tfrom -e:1:in `<main>'
"""
BASH_ERROR = "main.bash: line 3: syntax error near unexpected token `then'\nmain.bash: line 3: `if then'\n"
@pytest.mark.parametrize("lang,source,text,where", [
    ("c", "main.c", GCC_WARN_THEN_ERROR, {"line": 4, "column": 16}),
    ("cpp", "main.cpp", GPP_ERROR, {"line": 3, "column": 11}),
    ("java", "Echo.java", JAVAC_ERROR, {"line": 3, "column": 29}),
    ("go", "main.go", GO_ERROR, {"line": 4, "column": 15}),
    ("rust", "main.rs", RUSTC_WARN_THEN_ERROR, {"line": 3, "column": 18}),
    ("python", "main.py", PY_TRACEBACK, {"line": 2}),
    ("javascript", "main.js", NODE_ERROR, {"line": 3, "column": 9}),
    ("ruby", "main.rb", RUBY_ERROR, {"line": 3, "column": 6}),
    ("bash", "main.bash", BASH_ERROR, {"line": 3}),
])
def test_locate_per_toolchain(lang, source, text, where):
    assert D.locate(L.LANGUAGES[lang], text, source) == where


# Uncaught errors, as each runtime printed them on this machine.
PY_CHAINED = """Traceback (most recent call last):
  File "/run/distexec/job1/main.py", line 3, in <module>
    1/0
    ~^~
ZeroDivisionError: division by zero

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/run/distexec/job1/main.py", line 5, in <module>
    raise Bad("bad input\\nsecond line") from e
Bad: bad input
second line
"""
JAVA_UNCAUGHT = 'Exception in thread "main" java.lang.IllegalStateException: bad input 13\n\tat Main.main(Main.java:1)\n'
NODE_UNCAUGHT = """/run/distexec/job2/main.js:1
function f(){ throw new TypeError("bad input 13"); }
              ^

TypeError: bad input 13
    at f (/run/distexec/job2/main.js:1:21)
    at Object.<anonymous> (/run/distexec/job2/main.js:2:1)

Node.js v20.20.2
"""
RUBY_UNCAUGHT = "main.rb:1:in `<main>': bad input 13 (ArgumentError)\n\tfrom -e:1:in `load'\n\tfrom -e:1:in `<main>'\n"


@pytest.mark.parametrize("lang,text,why", [
    ("python", PY_TRACEBACK, "ValueError: boom"),
    ("python", "some output\n" + PY_CHAINED, "Bad: bad input"),  # the last raised, its first line
    ("python", "oops\n", None),  # sys.exit(3) after a print: nothing raised
    ("java", JAVA_UNCAUGHT, "java.lang.IllegalStateException: bad input 13"),
    ("javascript", NODE_UNCAUGHT, "TypeError: bad input 13"),
    ("ruby", RUBY_UNCAUGHT, "bad input 13 (ArgumentError)"),
    ("c", GCC_WARN_THEN_ERROR, None),  # a compiled program's runtime says nothing of the kind
])
def test_reason_is_what_the_runtime_said_it_raised(lang, text, why):
    assert D.reason(L.LANGUAGES[lang], text) == why


def test_reason_is_one_bounded_line():
    long = "Traceback (most recent call last):\n  File \"main.py\", line 1\nValueError: " + "x" * 5000 + "\n"
    why = D.reason(L.LANGUAGES["python"], long)
    assert why.startswith("ValueError: xxx") and len(why) == D.REASON_CHARS + 1 and why.endswith("…")


def test_locate_adds_the_source_line():
    source = "#include <stdio.h>\nint main(void) {\n  int x = ;\n}\n"
    assert D.locate(L.LANGUAGES["cpp"], GPP_ERROR, "main.cpp", source) == \
        {"line": 3, "column": 11, "text": "  int x = ;"}
    # A line past the end of the source (a diagnostic about something else) has no text.
    assert "text" not in D.locate(L.LANGUAGES["c"], GCC_WARN_THEN_ERROR, "main.c", "int main;\n")


def test_locate_finds_nothing_in_plain_text():
    assert D.locate(L.LANGUAGES["c"], "collect2: error: ld returned 1 exit status\n", "main.c") == {}
    # Another file's line is not the program's line.
    assert D.locate(L.LANGUAGES["java"], "Other.java:7: error: x\n", "Main.java") == {}
    assert D.locate(L.LANGUAGES["bash"], "main.sh: line 9: x\n", "main.bash") == {}


# -- toolchain detection, no cluster ------------------------------------------

def run_async(coro):
    import asyncio
    return asyncio.run(coro)


def test_detection_skips_a_missing_toolchain_cleanly(monkeypatch, tmp_path):
    # A PATH with no pwsh on it: PowerShell is simply not offered.
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    found = run_async(toolchains.detect(["powershell", "sh"]))
    assert found.keys() == {"bash"}


def test_detection_restricts_and_rejects_unknown_names():
    assert run_async(toolchains.detect(["py", "c"])).keys() == {"python", "c"}
    with pytest.raises(ValueError, match="cobol"):
        run_async(toolchains.detect(["python", "cobol"]))


def fake_tool(directory, name: str, body: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


def test_version_manager_shims_come_after_real_programs(monkeypatch, tmp_path):
    shims, real = tmp_path / "shims", tmp_path / "bin"
    shims.mkdir()
    real.mkdir()
    shim = fake_tool(str(shims), "python3", "exec /usr/bin/python3 \"$@\"\n")
    direct = fake_tool(str(real), "python3", "exec /usr/bin/python3 \"$@\"\n")
    monkeypatch.setenv("PATH", f"{shims}:{real}")
    assert toolchains.candidates("python3") == [direct, shim]


def test_detection_passes_over_a_toolchain_that_fails_in_a_job_environment(monkeypatch, tmp_path):
    # Like a rustup proxy that needs ~/.rustup: it answers the slave's user, not a job.
    broken = tmp_path / "broken"
    broken.mkdir()
    calls = tmp_path / "calls"
    fake_tool(broken, "ruby", f'echo x >> {calls}\n'
              'test "$HOME" = "%s" && echo "ruby 9.9.9" && exit 0\necho "no toolchain" >&2\nexit 1\n'
              % os.environ.get("HOME", "/root"))
    monkeypatch.setenv("PATH", f"{broken}:{os.environ['PATH']}")
    cache = str(tmp_path / "toolchains.json")
    for _ in range(2):
        chains = run_async(toolchains.detect_toolchains(["ruby"], cache_path=cache))
        assert chains["ruby"].version != "9.9.9"
        assert chains["ruby"].programs["ruby"] == shutil.which("ruby", path=os.environ["PATH"].split(":", 1)[1])
    # Its refusal is remembered: the second start did not ask it again.
    assert len(calls.read_text().splitlines()) == 1


def test_stdbuf_becomes_its_preload_library_in_the_environment_or_stays(tmp_path):
    lib = stdbuf.library("/usr/bin/stdbuf")
    assert lib is not None and os.path.isfile(lib)  # coreutils' own, installed with it
    env = {"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"}
    assert stdbuf.direct(["/usr/bin/stdbuf", "-oL", "-eL", "./main.bin", "x"], env) == ["./main.bin", "x"]
    assert env == {"LD_PRELOAD": f"{lib}:/opt/other.so", "PATH": "/bin", "_STDBUF_O": "L", "_STDBUF_E": "L"}
    # What it cannot say the same way is left to stdbuf itself, the environment untouched.
    for argv in (["/usr/bin/stdbuf", "-o0", "./main.bin"], ["/usr/bin/stdbuf", "-oL"], ["./main.bin"]):
        env = {}
        assert stdbuf.direct(list(argv), env) == argv and env == {}
    lonely = tmp_path / "bin" / "stdbuf"  # a stdbuf with no library installed beside it
    lonely.parent.mkdir()
    lonely.write_text("")
    env = {}
    assert stdbuf.direct([str(lonely), "-oL", "./main.bin"], env) == [str(lonely), "-oL", "./main.bin"] and env == {}


def test_detection_answers_are_cached_by_binary_identity(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    tool = fake_tool(bin_dir, "ruby", f'echo x >> {calls}\necho "ruby 9.9.1"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cache = str(tmp_path / "toolchains.json")

    def count() -> int:
        return len(calls.read_text().splitlines()) if calls.exists() else 0

    assert run_async(toolchains.detect(["ruby"], cache_path=cache)) == {"ruby": "9.9.1"}
    assert count() == 1
    assert run_async(toolchains.detect(["ruby"], cache_path=cache)) == {"ruby": "9.9.1"}
    assert count() == 1  # answered from the cache
    with open(tool, "a") as f:  # a new binary: asked again
        f.write("# upgraded\n")
    assert run_async(toolchains.detect(["ruby"], cache_path=cache)) == {"ruby": "9.9.1"}
    assert count() == 2


# -- the compile cache, no cluster ---------------------------------------------

def test_cache_key_covers_language_version_argv_and_every_file():
    base = CompileCache.key("c", "12.2.0", ["gcc", "-O2", "main.c"], {"main.c": "int main(){}", "a.h": "x"})
    assert base == CompileCache.key("c", "12.2.0", ["gcc", "-O2", "main.c"], {"a.h": "x", "main.c": "int main(){}"})
    assert len({base,
                CompileCache.key("cpp", "12.2.0", ["gcc", "-O2", "main.c"], {"main.c": "int main(){}", "a.h": "x"}),
                CompileCache.key("c", "13.1.0", ["gcc", "-O2", "main.c"], {"main.c": "int main(){}", "a.h": "x"}),
                CompileCache.key("c", "12.2.0", ["gcc", "-O0", "main.c"], {"main.c": "int main(){}", "a.h": "x"}),
                CompileCache.key("c", "12.2.0", ["gcc", "-O2", "main.c"], {"main.c": "int main(){ }", "a.h": "x"}),
                CompileCache.key("c", "12.2.0", ["gcc", "-O2", "main.c"], {"main.c": "int main(){}", "a.h": "y"}),
                CompileCache.key("c", "12.2.0", ["gcc", "-O2", "main.c"], {"main.c": "int main(){}"}),
                CompileCache.key("c", "12.2.0", ["gcc", "-O2", "main.c"], {"main.c": "int main(){}a.h", "": "x"}),
                CompileCache.key("c", "12.2.0", ["gcc", "-O2", "main.c"], {"main.c": "int main(){}", "a.h": "x"},
                                 "alice"),
                }) == 9


def make_artefacts(d, names: dict[str, bytes]) -> str:
    os.makedirs(d, exist_ok=True)
    for name, data in names.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    return str(d)


def test_cache_store_and_fetch_a_set_of_files(tmp_path):
    cache = CompileCache(str(tmp_path / "cache"))
    src = make_artefacts(tmp_path / "job1", {"Main.class": b"A", "Main$Inner.class": b"BB", "Main.java": b"src"})
    assert cache.store("k1", src, ("*.class",))
    dest = make_artefacts(tmp_path / "job2", {})
    assert cache.fetch("k1", dest)
    assert sorted(os.listdir(dest)) == ["Main$Inner.class", "Main.class"]
    assert pathlib.Path(os.path.join(dest, "Main$Inner.class")).read_bytes() == b"BB"
    assert not cache.fetch("other", dest)
    assert (cache.hits, cache.misses) == (1, 1)
    assert not cache.store("k2", src, ("*.bin",))  # nothing made: nothing kept


def test_cache_never_follows_a_planted_symlink(tmp_path):
    secret = tmp_path / "connection.json"
    secret.write_text("the token")
    cache = CompileCache(str(tmp_path / "cache"))
    src = make_artefacts(tmp_path / "job1", {"Main.class": b"A"})
    os.symlink(secret, os.path.join(src, "Evil.class"))
    assert cache.store("k", src, ("*.class",))
    dest = make_artefacts(tmp_path / "job2", {})
    cache.fetch("k", dest)
    assert os.listdir(dest) == ["Main.class"]
    os.unlink(os.path.join(src, "Main.class"))
    assert not cache.store("k2", src, ("*.class",))  # a link alone is nothing to keep


def test_cache_skips_fifos_and_hard_links_and_keeps_no_times(tmp_path):
    """The slave copies as root: a FIFO would hang it, a hard link would copy another file."""
    cache = CompileCache(str(tmp_path / "cache"))
    src = make_artefacts(tmp_path / "job1", {"Main.class": b"A", "Other.txt": b"secret"})
    os.mkfifo(os.path.join(src, "Fifo.class"))
    os.link(os.path.join(src, "Other.txt"), os.path.join(src, "Hard.class"))
    past = time.time() - 10 * 86400
    os.utime(os.path.join(src, "Main.class"), (past, past))
    assert cache.store("k", src, ("*.class",))
    dest = make_artefacts(tmp_path / "job2", {})
    assert cache.fetch("k", dest)
    assert os.listdir(dest) == ["Main.class"]
    # When the program was first compiled does not reach a later job.
    assert os.stat(os.path.join(dest, "Main.class")).st_mtime > past + 86400


def test_cache_keeps_the_executable_bit_and_copies(tmp_path):
    cache = CompileCache(str(tmp_path / "cache"))
    src = make_artefacts(tmp_path / "job1", {"main.bin": b"\x7fELF"})
    os.chmod(os.path.join(src, "main.bin"), 0o755)
    cache.store("k", src, ("main.bin",))
    dest = make_artefacts(tmp_path / "job2", {})
    cache.fetch("k", dest)
    assert os.access(os.path.join(dest, "main.bin"), os.X_OK)
    with open(os.path.join(dest, "main.bin"), "ab") as f:  # a job rewrites its copy...
        f.write(b"tampered")
    again = make_artefacts(tmp_path / "job3", {})
    cache.fetch("k", again)
    assert pathlib.Path(os.path.join(again, "main.bin")).read_bytes() == b"\x7fELF"  # ...not the cache's


def test_cache_evicts_least_recently_used_beyond_its_size(tmp_path):
    cache = CompileCache(str(tmp_path / "cache"), max_bytes=250)
    for i, key in enumerate(["a", "b", "c"]):
        cache.store(key, make_artefacts(tmp_path / f"s{key}", {"main.bin": bytes(100)}), ("main.bin",))
        past = time.time() - 100 + i
        os.utime(os.path.join(cache.root, key), (past, past))
        if key == "b":
            # "a" used after "b" was stored: "b" becomes the oldest.
            assert cache.fetch("a", make_artefacts(tmp_path / "d", {}))
    assert {k for k, _, _ in cache.entries()} == {"a", "c"}
    assert sum(size for _, _, size in cache.entries()) <= 250
    assert not cache.store("huge", make_artefacts(tmp_path / "sh", {"main.bin": bytes(300)}), ("main.bin",))


def test_the_compiled_entry_is_looked_for_without_following_a_link_the_compile_made(tmp_path):
    # Root looks in a folder the compile step (the job's uid) wrote: os.path.lexists followed a folder
    # made a link, and told whether a file of the host existed.
    from slave import safefs
    job, outside = tmp_path / "job", tmp_path / "outside"
    (job / "pkg").mkdir(parents=True)
    outside.mkdir()
    (outside / "Main.class").write_bytes(b"\xca\xfe")
    (job / "pkg" / "Main.class").write_bytes(b"\xca\xfe")
    assert safefs.exists(str(job), "pkg/Main.class") and not safefs.exists(str(job), "pkg/Other.class")
    (job / "link").symlink_to(outside)
    assert os.path.lexists(job / "link" / "Main.class") and not safefs.exists(str(job), "link/Main.class")
    assert not safefs.exists(str(job), "../outside/Main.class")
    # The entry itself as lexists sees it: a link, a FIFO or a hard link is there (looked at, never opened;
    # the cache's copy and the run refuse what is not a regular file of its own).
    (job / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(job / "fifo")
    os.link(outside / "Main.class", job / "hard")
    assert all(safefs.exists(str(job), name) for name in ("dangling", "fifo", "hard"))


def test_one_user_compiling_program_after_program_evicts_their_own_not_anothers(tmp_path):
    cache = CompileCache(str(tmp_path / "cache"), max_bytes=1000)
    key = functools.partial(CompileCache.key, "c", "12.2.0", ["gcc", "main.c"])
    steady = [key({"main.c": f"int main(){{return {i};}}"}, "bob") for i in range(2)]
    flood = [key({"main.c": f"int main(){{return {i};}}"}, "mallory") for i in range(20)]
    assert steady[0] != flood[0]  # the same program, another user: an entry of its own
    for n, k in enumerate(steady + flood):
        assert cache.store(k, make_artefacts(tmp_path / f"s{n}", {"main.bin": bytes(100)}), ("main.bin",))
        past = time.time() - 100 + n  # bob's were stored first: the least recently used
        os.utime(os.path.join(cache.root, k), (past, past))
    kept = {k for k, _, _ in cache.entries()}
    assert set(steady) <= kept, "bob's programs were evicted by mallory's"
    assert len(kept) == 10 and sum(size for _, _, size in cache.entries()) <= 1000
    assert set(flood[-8:]) <= kept  # mallory keeps her newest, up to the rest of the cache
    # No user's name on the disk: the owner's part of an entry's name is a digest.
    assert not any("bob" in name or "mallory" in name for name in os.listdir(cache.root))


def test_cache_concurrent_stores_of_one_key_all_succeed_or_yield(tmp_path):
    cache = CompileCache(str(tmp_path / "cache"))
    srcs = [make_artefacts(tmp_path / f"s{i}", {"main.bin": b"same" * 1000}) for i in range(8)]
    results: list[bool] = []
    barrier = threading.Barrier(len(srcs))

    def store(src):
        barrier.wait()
        results.append(cache.store("k", src, ("main.bin",)))

    threads = [threading.Thread(target=store, args=(s,)) for s in srcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1 and len(results) == 8
    assert os.listdir(cache.root) == ["k"]  # no temporary directory left behind
    dest = make_artefacts(tmp_path / "d", {})
    assert cache.fetch("k", dest) and pathlib.Path(os.path.join(dest, "main.bin")).read_bytes() == b"same" * 1000


# -- every language through a real cluster --------------------------------------

def test_cluster_offers_every_language(lclient):
    langs = {lang["name"]: lang for lang in lclient.languages()}
    assert set(LANGS) <= set(langs), f"missing toolchains: {set(LANGS) - set(langs)}"
    for name in LANGS:
        assert langs[name]["slaves"] == 2 and langs[name]["version"] not in (None, "", "unknown")
    if not shutil.which("pwsh"):
        assert "powershell" not in langs


def test_slaves_command_shows_languages(lc):
    env = dict(os.environ, DISTEXEC_URL=lc.url, DISTEXEC_TOKEN=lc.token)
    out = subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "slaves", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    slaves = json.loads(out.stdout)["slaves"]
    assert len(slaves) == 2
    for s in slaves:
        assert set(LANGS) <= set(s["languages"])


@pytest.mark.parametrize("lang", EVERY_LANG)
def test_hello(submitted, lang):
    job = result(submitted, lang, "hello")
    assert job.status == P.SUCCEEDED, job.record
    assert job.stdout == "hello\n" and job.exit_code == 0 and job.error is None
    assert job.language == lang


@pytest.mark.parametrize("lang", EVERY_LANG)
def test_args_and_stdin(submitted, lang):
    job = result(submitted, lang, "echo")
    assert job.status == P.SUCCEEDED, job.record
    assert job.stdout == "args=a|b c|-x\none\ntwo words\n"


@pytest.mark.parametrize("lang", EVERY_LANG)
def test_runtime_error_exit_code(submitted, lang):
    job = result(submitted, lang, "fail")
    assert job.status == P.FAILED, job.record
    assert job.error["code"] == P.NONZERO_EXIT and job.exit_code == 3
    assert job.error["message"] == "exited with code 3"  # "oops" on stderr is not a reason
    assert job.stdout == "before\n" and "oops" in job.stderr


@pytest.mark.parametrize("lang", EVERY_LANG)
def test_error_names_its_line(submitted, lang):
    job = result(submitted, lang, "bad")
    if lang == "python":
        assert job.status == P.REJECTED and job.error["code"] == P.SYNTAX_ERROR
    elif lang in COMPILED:
        # The run step never happened: no output but the compiler's.
        assert job.status == P.FAILED and job.error["code"] == P.COMPILE_ERROR, job.record
        assert job.exit_code is None and job.stdout == ""
        assert L.LANGUAGES[lang].source_name(PROGRAMS[lang]["bad"]).split(".")[0] in job.stderr
    else:
        assert job.status == P.FAILED and job.error["code"] == P.NONZERO_EXIT, job.record
        assert job.exit_code != 0
    assert job.error["line"] == 3, job.record
    # The line itself comes along, for the notebook to draw its caret under.
    assert job.error["text"].strip() == PROGRAMS[lang]["bad"].splitlines()[2].strip()
    if lang != "python":
        assert "3" in job.stderr


@pytest.mark.parametrize("lang", EVERY_LANG)
def test_output_streams_while_running(lclient, lang):
    # "ready" must reach the master while the program still sleeps: no buffering until exit.
    job = lclient.submit(PROGRAMS[lang]["stream"], language=lang, timeout=120)
    try:
        wait_for(lambda: "ready" in (job.refresh().stdout or ""), timeout=JOB_WAIT,
                 what=f"{lang}'s first line while it runs")
        assert job.status == P.RUNNING
    finally:
        job.cancel()
    assert job.wait(30).status == P.CANCELLED


# -- the compile cache through the cluster --------------------------------------

def unique_c(tag: str) -> str:
    return f'#include <stdio.h>\nint main(void) {{ printf("{tag}\\n"); return 0; }}\n'


def test_second_run_of_a_c_program_skips_the_compile(lc, lclient):
    tag = uuid.uuid4().hex
    before = cache_entries(lc)
    first = lclient.submit(unique_c(tag), language="c").wait(JOB_WAIT)
    assert first.stdout == f"{tag}\n", first.record
    added = cache_entries(lc) - before
    assert len(added) == 1
    second = lclient.submit(unique_c(tag), language="c", args=["ignored"]).wait(JOB_WAIT)
    assert second.status == P.SUCCEEDED and second.stdout == f"{tag}\n"
    assert cache_entries(lc) - before == added  # nothing new compiled and kept
    logs = wait_for(lambda: (lambda text: f"job {second.id}: compile cache hit" in text and text)(slave_logs(lc)),
                    what="the cache hit in the slave's log")
    assert f"job {first.id}: compiled c" in logs
    assert f"job {second.id}: compiled c" not in logs


def test_cache_not_shared_across_different_sources(lc, lclient):
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    before = cache_entries(lc)
    ja = lclient.submit(unique_c(a), language="c").wait(JOB_WAIT)
    jb = lclient.submit(unique_c(b), language="c").wait(JOB_WAIT)
    assert (ja.stdout, jb.stdout) == (f"{a}\n", f"{b}\n")
    assert len(cache_entries(lc) - before) == 2
    logs = slave_logs(lc)
    assert f"job {jb.id}: compiled c" in logs and f"job {jb.id}: compile cache hit" not in logs


def test_cache_key_includes_the_jobs_headers(lc, lclient):
    src = '#include <stdio.h>\n#include "value.h"\nint main(void) { printf("%d\\n", VALUE); return 0; }\n'
    one = lclient.submit(src, language="c", files={"value.h": "#define VALUE 1\n"}).wait(JOB_WAIT)
    two = lclient.submit(src, language="c", files={"value.h": "#define VALUE 2\n"}).wait(JOB_WAIT)
    assert (one.stdout, two.stdout) == ("1\n", "2\n"), (one.record, two.record)


def test_same_source_compiled_by_two_jobs_at_once(lc, lclient):
    tag = uuid.uuid4().hex
    jobs = [lclient.submit(unique_c(tag), language="c") for _ in range(4)]
    for job in jobs:
        assert job.wait(JOB_WAIT).status == P.SUCCEEDED, job.record
        assert job.stdout == f"{tag}\n"
    assert len({j.slave_uid for j in jobs}) >= 1
    root = os.path.join(lc.home, "cache", "compile")
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]


def test_java_cache_keeps_every_class_file(lc, lclient):
    tag = uuid.uuid4().hex
    src = ("public class Outer {\n  static class Inner { String s() { return \"%s\"; } }\n"
           "  public static void main(String[] a) { System.out.println(new Inner().s()); }\n}\n" % tag)
    before = cache_entries(lc)
    first = lclient.submit(src, language="java").wait(JOB_WAIT)
    assert first.stdout == f"{tag}\n", first.record
    (entry,) = cache_entries(lc) - before
    assert sorted(os.listdir(os.path.join(lc.home, "cache", "compile", entry))) == ["Outer$Inner.class", "Outer.class"]
    second = lclient.submit(src, language="java").wait(JOB_WAIT)
    assert second.stdout == f"{tag}\n"
    wait_for(lambda: f"job {second.id}: compile cache hit" in slave_logs(lc), what="the java cache hit")


# -- a program of several files, and Java's class to run --------------------------

# language -> (the program, its other files): the answer, 42, needs them all.  A header is #included, not
# compiled; a file in a folder is not compiled (a Go package is one folder), so its error never shows.
MULTI_FILE = {
    "c": ('#include <stdio.h>\n#include "util.h"\nint main(void) { printf("%d\\n", twice(21)); return 0; }\n',
          {"util.c": '#include "util.h"\nint twice(int x) { return 2 * x; }\n', "util.h": "int twice(int x);\n",
           "data/broken.c": "not C at all\n"}),
    "cpp": ('#include <iostream>\n#include "util.hpp"\nint main() { std::cout << twice(20) + one() << "\\n"; }\n',
            {"util.cpp": '#include "util.hpp"\nint twice(int x) { return 2 * x; }\n',
             "one.cc": "int one() { return 2; }\n", "util.hpp": "int twice(int x);\nint one();\n"}),
    # No go.mod: `go build .` would want one.
    "go": ('package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println(helper(21))\n}\n',
           {"helper.go": "package main\n\nfunc helper(x int) int { return 2 * x }\n",
            "data/other.go": "package other\n"}),
    # rustc finds util.rs for `mod util;` by itself.
    "rust": ('mod util;\nfn main() {\n    println!("{}", util::twice(21));\n}\n',
             {"util.rs": "pub fn twice(x: i32) -> i32 {\n    2 * x\n}\n"}),
}


@pytest.fixture(scope="module")
def multi_file(lclient):
    """Every MULTI_FILE program, submitted up front so the compiles overlap."""
    return {lang: lclient.submit(source, language=lang, files=files) for lang, (source, files) in MULTI_FILE.items()}


@pytest.mark.parametrize("lang", sorted(MULTI_FILE))
def test_a_programs_other_source_files_are_compiled_with_it(multi_file, lang):
    job = multi_file[lang].wait(JOB_WAIT)
    assert job.status == P.SUCCEEDED and job.stdout == "42\n", job.record


USES_UTIL = '#include <stdio.h>\nint twice(int x);\nint main(void) { printf("%d\\n", twice(21)); return 0; }\n'


def test_an_edited_extra_c_file_is_compiled_again_and_an_unchanged_one_runs_warm_from_the_cache(lc, lclient):
    tag = uuid.uuid4().hex  # a program no earlier run has compiled
    util = f"/* {tag} */ int twice(int x) {{ return 2 * x; }}\n"
    first = lclient.submit(USES_UTIL, language="c", files={"util.c": util}).wait(JOB_WAIT)
    assert first.status == P.SUCCEEDED and first.stdout == "42\n", first.record
    second = lclient.submit(USES_UTIL, language="c", files={"util.c": util}).wait(JOB_WAIT)
    assert second.status == P.SUCCEEDED and second.stdout == "42\n", second.record
    edited = lclient.submit(USES_UTIL, language="c", files={"util.c": util.replace("2 * x", "3 * x")}).wait(JOB_WAIT)
    assert edited.status == P.SUCCEEDED and edited.stdout == "63\n", edited.record
    logs = wait_for(lambda: (lambda text: f"job {edited.id}: compiled c" in text and text)(slave_logs(lc)),
                    what="the edited program's compile in the slave's log")
    assert f"job {first.id}: compiled c" in logs
    # The same files: the program the first compile kept, run by the warm pool (slave/warm.py).
    assert re.search(rf"job {second.id}: compile cache hit \(c, \w+\), run warm", logs), logs[-3000:]
    assert f"job {second.id}: compiled c" not in logs


# Java classes without `public`, submitted up front: the file and the run are the class declaring main.
JAVA_MAINS = {
    "package-private": ("class Foo {\n  public static void main(String[] a) {\n"
                        "    System.out.println(\"foo\");\n  }\n}\n"),
    "static public, varargs": ("class Helper { static String s() { return \"bar\"; } }\n"
                               "final class Bar {\n  static public void main(String... args) {\n"
                               "    System.out.println(Helper.s());\n  }\n}\n"),
    "a public class without main": ("public class Util { static String s() { return \"baz\"; } }\n"
                                    "class Baz { public static void main(String args[]) {\n"
                                    "    System.out.println(Util.s());\n  }\n}\n"),
}


@pytest.fixture(scope="module")
def java_mains(lclient):
    return {name: lclient.submit(source, language="java") for name, source in JAVA_MAINS.items()}


@pytest.mark.parametrize("name,out", [("package-private", "foo"), ("static public, varargs", "bar"),
                                      ("a public class without main", "baz")])
def test_a_java_class_without_public_runs(java_mains, name, out):
    job = java_mains[name].wait(JOB_WAIT)
    assert job.status == P.SUCCEEDED and job.stdout == f"{out}\n", job.record


def test_a_java_program_without_a_main_class_says_what_to_do_before_it_runs(lc, lclient):
    job = lclient.submit("class Foo {\n  static void helper() {}\n}\n", language="java").wait(JOB_WAIT)
    assert job.status == P.FAILED and job.error["code"] == P.COMPILE_ERROR, job.record
    assert "public static void main(String[] args)" in job.error["message"], job.record
    assert "Main.class" in job.error["message"] and "ClassNotFoundException" not in job.stderr, job.record
    assert "public static void main(String[] args)" in job.stderr
    # Not kept: an entry in the compile cache always has the class its run starts.
    again = lclient.submit("class Foo {\n  static void helper() {}\n}\n", language="java").wait(JOB_WAIT)
    assert again.error["code"] == P.COMPILE_ERROR, again.record
    logs = wait_for(lambda: (lambda text: f"job {again.id}: compiled java" in text and text)(slave_logs(lc)),
                    what="the second compile in the slave's log")
    assert f"job {again.id}: compile cache hit" not in logs


# -- which slave gets what ------------------------------------------------------

def test_python_only_slave_never_receives_c_jobs(make_cluster):
    lc = make_cluster(1, slots=2)
    py_only = lc.start_slave("--languages", "python")
    with Cluster(lc.url, token=lc.token) as c:
        slaves = {s["uid"]: s for s in c.slaves()}
        assert slaves[py_only.uid]["languages"] == ["python"]
        full = next(uid for uid in slaves if uid != py_only.uid)
        jobs = [c.submit(unique_c(f"c{i}") if i % 2 else 'print("py")', language="c" if i % 2 else "python")
                for i in range(12)]
        for job in jobs:
            assert job.wait(JOB_WAIT).status == P.SUCCEEDED, job.record
        c_uids = {j.slave_uid for j in jobs if j.language == "c"}
        py_uids = {j.slave_uid for j in jobs if j.language == "python"}
        assert c_uids == {full}
        # The python-only slave was there and took work: the C jobs avoided it by choice.
        assert py_only.uid in py_uids


def test_c_rejected_when_only_python_slaves(make_cluster):
    lc = make_cluster(2, slots=1, languages="python")
    with Cluster(lc.url, token=lc.token) as c:
        assert [lang["name"] for lang in c.languages()] == ["python"]
        job = c.submit(unique_c("x"), language="c").wait(10)
        assert job.status == P.REJECTED
        assert job.error["code"] == P.UNSUPPORTED_LANGUAGE
        assert "python" in job.error["message"]
        job = c.submit("puts 1", language="rb").wait(10)
        assert job.error["code"] == P.UNSUPPORTED_LANGUAGE and job.language == "ruby"


def test_unknown_language_in_languages_flag_stops_the_slave(make_cluster):
    lc = make_cluster(0)
    child = lc.spawn_slave("--languages", "python,cobol")
    assert child.proc.wait(30) == 2


# -- the compile step in the slave's runner, no cluster ---------------------------

def make_runner(tmp_path, languages: list[str]):
    """The ProcessRunner a slave builds, with its real sandbox and a compile cache in ``tmp_path``."""
    import asyncio

    from slave.runner import ProcessRunner
    from slave.bwrap import best_sandbox
    from slave.jobdirs import JobDirs
    from slave.sandbox import Limits

    limits = Limits()
    sandbox = best_sandbox(limits)
    chains = asyncio.run(toolchains.detect_toolchains(languages, sandbox=sandbox, limits=limits))
    cache = CompileCache(str(tmp_path / "cache"))
    # Its job folders in tmp_path (a runner built by hand would leave its own in /tmp).
    runner = ProcessRunner(sandbox, limits, {n: t.version for n, t in chains.items()}, compile_cache=cache,
                           programs={n: t.programs for n, t in chains.items()},
                           jobdirs=JobDirs("runner", str(tmp_path)))
    return runner, cache


def run_job(runner, job: dict, cancel_after: float | None = None):
    import asyncio

    async def go():
        cancel = asyncio.Event()
        if cancel_after is not None:
            asyncio.get_running_loop().call_later(cancel_after, cancel.set)
        # As the master sends it: checked, with its defaults (the slave trusts that).
        checked = P.new_job(1, P.check_submission(job), client_id=None, user=None)
        return await runner.run(checked, lambda stream, text: None, cancel)
    return asyncio.run(go())


def test_compile_has_its_own_time_limit(tmp_path, monkeypatch):
    import dataclasses
    # A "compiler" that never finishes, with a half-second limit; the job's own timeout is much longer.
    slow = dataclasses.replace(L.LANGUAGES["c"], compile=("sh", "-c", "sleep 30"), compile_timeout=0.5)
    monkeypatch.setitem(L.LANGUAGES, "c", slow)
    runner, cache = make_runner(tmp_path, ["c"])
    started = time.monotonic()
    outcome = run_job(runner, {"language": "c", "source": unique_c("x"), "timeout": 60})
    assert outcome.error["code"] == P.COMPILE_ERROR and "0.5 s" in outcome.error["message"]
    assert outcome.exit_code is None and outcome.stdout == ""
    assert time.monotonic() - started < 20
    assert cache.entries() == []


def test_cancel_during_compile(tmp_path, monkeypatch):
    import dataclasses
    slow = dataclasses.replace(L.LANGUAGES["c"], compile=("sh", "-c", "sleep 30"))
    monkeypatch.setitem(L.LANGUAGES, "c", slow)
    runner, cache = make_runner(tmp_path, ["c"])
    outcome = run_job(runner, {"language": "c", "source": unique_c("x")}, cancel_after=0.3)
    assert outcome.error["code"] == P.CANCELLED_CODE
    assert cache.entries() == []


def test_refused_program_is_not_cached_and_cached_one_is_reused(tmp_path):
    runner, cache = make_runner(tmp_path, ["c"])
    bad = run_job(runner, {"language": "c", "source": PROGRAMS["c"]["bad"]})
    assert bad.error["code"] == P.COMPILE_ERROR and bad.error["line"] == 3
    assert cache.entries() == [] and cache.stores == 0
    good = {"language": "c", "source": PROGRAMS["c"]["echo"], "args": ["z"], "stdin": "in\n"}
    assert run_job(runner, good).stdout == "args=z\nin\n"
    assert (cache.stores, cache.hits) == (1, 0)
    assert run_job(runner, good).stdout == "args=z\nin\n"
    assert (cache.stores, cache.hits) == (1, 1)
