"""Every language distexec knows, in one table.

The master uses it to turn aliases into main names and to check Python
syntax before queueing; the slave uses it to find toolchains, to build the
compile and run commands and to point at the line a diagnostic names; the
client uses it to guess a language from a file extension.  Standard library
only, like the protocol.

Adding a language is one ``Language(...)`` entry in ``LANGUAGES`` plus its
tests.  Command templates are argv lists with these placeholders (see
``fill``): ``{source}`` the source file name, ``{exe}`` the compiled
artefact name, ``{main}`` what the run step starts (the source's stem; Java's
class declaring main), ``{sources}`` (an argument of its own, several once
filled) the source and the job's other files of the language (``compiled_with``).
"""
from __future__ import annotations

import ast
import builtins
import keyword
import os
import re
from dataclasses import dataclass, field
from typing import Callable

# What a compiled program is called in the job's directory.
EXE = "main.bin"

# Ruby buffers its stdout on a pipe and no environment variable turns that
# off; this wrapper does, and keeps $0 and __FILE__ the script's name.
_RUBY_SYNC = "STDOUT.sync = STDERR.sync = true; $0 = ARGV.shift; load($0)"
# Compiled C/C++ programs block-buffer stdout on a pipe; stdbuf (coreutils)
# makes it line-buffered so the notebook sees lines as they are printed (the
# slave sets stdbuf's variables itself and skips its exec: slave/stdbuf.py).
_LINE_BUFFERED = ("stdbuf", "-oL", "-eL")
# A JVM that starts and compiles fast: one GC thread, the quick JIT tier.
_FAST_JVM = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xshare:auto")

# Diagnostics patterns shared by several entries.  ``{file}`` stands for the
# source file name (escaped); a pattern gives the groups ``line`` and maybe ``col``.
_GCC_LOCATIONS = (r"^(?:\./)?{file}:(?P<line>\d+):(?P<col>\d+): (?:fatal )?error",
                  r"^(?:\./)?{file}:(?P<line>\d+)(?::(?P<col>\d+))?:")


@dataclass(frozen=True)
class Language:
    name: str
    aliases: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()
    # File the program is written to in the job's directory.
    source: str = "main"
    # When set, a function of the source naming (the stem its file must have, the class the run step
    # starts), either None where it cannot tell: javac wants a public class in a file of its name,
    # and the launcher wants the class declaring main, public or not.
    names_from: Callable[[str], tuple[str | None, str | None]] | None = None
    # When set, a regex whose first group is a dotted package (Java's
    # ``package a.b;``): the source then goes to that folder (``a/b/Main.java``).
    package_from: str | None = None
    # argv that prints the toolchain's version; its first word must be on PATH.
    version: tuple[str, ...] = ()
    compile: tuple[str, ...] | None = None
    # Glob patterns of what the compile step makes: what the compile cache keeps.
    artefacts: tuple[str, ...] = (EXE,)
    # The file the run step starts ({main} filled in), which the compile step must have made: when it
    # did not, the job ends compile_error saying ``no_entry``, not with the runtime's stack trace.
    entry: str | None = None
    no_entry: str = ""
    run: tuple[str, ...] = ()
    # Options that tell the run step's runtime the job's memory limit, put after the program's name
    # where the runtime cannot read the limit from the job's cgroup (the warm pool's children do not
    # show the cgroup tree): the JVM and Node size their heaps from it.  {memory_bytes} and
    # {half_memory_mib} are filled in.
    memory_options: tuple[str, ...] = ()
    # Extra environment for compile and run steps.
    env: tuple[tuple[str, str], ...] = ()
    # Seconds the compile step may take, apart from the job's own timeout.
    compile_timeout: float = 60.0
    # Regex picking the version number out of the version command's output.
    version_pattern: str = r"(\d+(?:\.\d+)+)"
    # Where a diagnostic points: patterns tried in order (see ``locate``).
    locations: tuple[str, ...] = ()
    # Python tracebacks list the innermost frame last; everyone else first.
    location_last: bool = False
    # Why a run failed, as its runtime says it on stderr (see ``reason``): a regex with a group ``reason``.
    reason: str | None = None
    # What a Jupyter kernel of this language tells the front end (language_info),
    # so a notebook is highlighted and exported as this language.
    display_name: str = ""
    mimetype: str = "text/plain"
    codemirror_mode: str | None = None
    pygments_lexer: str | None = None
    # Words a kernel offers as completions.
    keywords: tuple[str, ...] = ()
    # How a kernel tells whether a cell is complete: "python" (the compiler
    # decides), "braces" (balanced brackets), or "" (it cannot say).
    blocks: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def source_name(self, source: str) -> str:
        """The file name ``source`` must have in the job's directory."""
        stem = self.names_from(source)[0] if self.names_from else None
        return self._folder(source) + (stem + os.path.splitext(self.source)[1] if stem else self.source)

    def main_name(self, source: str) -> str:
        """``{main}``: what the run step starts, beside the source (Java's ``a/b/Main``)."""
        run = self.names_from(source)[1] if self.names_from else None
        return self._folder(source) + run if run else os.path.splitext(self.source_name(source))[0]

    def _folder(self, source: str) -> str:
        m = re.search(self.package_from, source, re.M) if self.package_from else None
        return re.sub(r"\s+", "", m.group(1)).replace(".", "/") + "/" if m else ""

    def compiled_with(self, source_name: str, names) -> list[str]:
        """``{sources}``: the source, then those of the job's files ``names`` that are of this language
        (by extension) and at the top of its directory, in name order.  The top only: a Go package is
        one folder, and a C file in a folder may well be there to be read, not linked."""
        others = sorted(n for n in names if "/" not in n and n != source_name and n.endswith(self.extensions))
        # "./": a file called "-o.c" is a file to the compiler, not its -o.
        return [source_name] + ["./" + n if n.startswith("-") else n for n in others]


def _python_syntax(source: str) -> dict | None:
    try:
        ast.parse(source, filename="main.py")
    except SyntaxError as exc:
        return {
            "message": f"{type(exc).__name__}: {exc.msg}",
            "line": exc.lineno,
            "column": exc.offset,
            "text": (exc.text or "").rstrip("\n") or None,
        }
    except ValueError as exc:  # source with NUL bytes
        return {"message": f"SyntaxError: {exc}", "line": None, "column": None}
    return None


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Java, blanked before it is read: comments, strings and text blocks, where a brace or a word is nothing.
# One left open runs to the end (of the source, or of its line): each then costs one pass, never one
# pass per quote after it (the master reads every Java submission this way).
_JAVA_NOISE = re.compile(r'//[^\n]*|/\*.*?(?:\*/|\Z)|"""(?:[^"\\]++|\\.|"(?!""))*+(?:"""|\\?\Z)'
                         r'|"(?:[^"\\\n]++|\\.)*+"?|\'(?:[^\'\\\n]++|\\.)*+\'?', re.S)
# A type's name, or the launcher's entry point as JLS 12.1.4 has it: String[] args, String... args,
# String args[].  Each starts with a word of its own, so finding them all is one pass; their modifiers
# are the words just before, and the depth of braces the count between one find and the next.
_JAVA_FINDS = re.compile(
    r"\b(?:class|interface|enum|record)\s+(?P<type>[A-Za-z_$][\w$]*)"
    r"|(?P<main>\bvoid\s+main\s*\(\s*(?:final\s+)?(?:java\.lang\.)?String\s*"
    r"(?:\[\s*\]\s*[\w$]+|\.\.\.\s*[\w$]+|[\w$]+\s*\[\s*\])\s*\))")
_JAVA_MODIFIERS = re.compile(r"(?:\b(?:public|protected|private|static|final|abstract|strictfp|sealed|synchronized|"
                             r"non-sealed)\s+)*\Z")


def _java_names(source: str) -> tuple[str | None, str | None]:
    """The class a Java source's file is named after (the public one, as javac wants; else the one
    declaring main) and the class the launcher runs (the one declaring main, the public one first)."""
    text = _JAVA_NOISE.sub(" ", source)
    types: list[tuple[str, bool]] = []  # the top-level ones, in order: (name, public)
    mains: list[str] = []
    depth = at = 0
    for m in _JAVA_FINDS.finditer(text):
        depth += text.count("{", at, m.start()) - text.count("}", at, m.start())
        at = m.start()
        words = _JAVA_MODIFIERS.search(text, max(0, at - 120), at).group().split()
        if m.group("type") and depth == 0:
            types.append((m.group("type"), "public" in words))
        elif m.group("main") and depth == 1 and types and {"public", "static"} <= set(words):
            mains.append(types[-1][0])  # a member of the last type opened: nested ones are deeper
    public = next((name for name, is_public in types if is_public), None)
    main = public if public in mains else next(iter(mains), None)
    return public or main, main


# Python's keywords and builtins (what a Python kernel offers for completion).
_PYTHON_WORDS = tuple(sorted(set(keyword.kwlist) | {n for n in dir(builtins) if not n.startswith("_")}))

LANGUAGES: dict[str, Language] = {
    lang.name: lang
    for lang in (
        Language(
            name="python",
            aliases=("py", "python3"),
            extensions=(".py",),
            source="main.py",
            version=("python3", "--version"),
            # -u: output reaches the notebook line by line, not at exit.
            run=("python3", "-u", "{source}"),
            locations=(r'File "(?:[^"]*/)?{file}", line (?P<line>\d+)',),
            reason=r"^Traceback \(most recent call last\):\n(?:[ \t].*\n)*(?P<reason>\S.*)",
            location_last=True,
            display_name="Python", mimetype="text/x-python", codemirror_mode="python", pygments_lexer="python3",
            blocks="python",
            keywords=_PYTHON_WORDS,
        ),
        Language(
            name="c",
            extensions=(".c",),
            source="main.c",
            version=("gcc", "--version"),
            compile=("gcc", "-O2", "-std=gnu17", "-fdiagnostics-color=never", "-o", "{exe}", "{sources}", "-lm"),
            run=_LINE_BUFFERED + ("./{exe}",),
            locations=_GCC_LOCATIONS,
            display_name="C", mimetype="text/x-csrc", codemirror_mode="clike", pygments_lexer="c",
            blocks="braces",
            keywords=_words(
                "auto break case char const continue default do double else enum extern float for goto if "
                "inline int long register restrict return short signed sizeof static struct switch typedef "
                "union unsigned void volatile while _Bool bool true false NULL include define ifdef ifndef "
                "endif printf scanf puts putchar getchar fgets fputs fprintf sprintf snprintf malloc calloc "
                "realloc free strlen strcmp strcpy memcpy memset stdin stdout stderr size_t main"),
        ),
        Language(
            name="cpp",
            aliases=("c++", "cxx", "cc"),
            extensions=(".cpp", ".cc", ".cxx", ".c++"),
            source="main.cpp",
            version=("g++", "--version"),
            compile=("g++", "-O2", "-std=gnu++17", "-fdiagnostics-color=never", "-o", "{exe}", "{sources}"),
            run=_LINE_BUFFERED + ("./{exe}",),
            locations=_GCC_LOCATIONS,
            display_name="C++", mimetype="text/x-c++src", codemirror_mode="clike", pygments_lexer="cpp",
            blocks="braces",
            keywords=_words(
                "alignas alignof and auto bool break case catch char class const constexpr const_cast "
                "continue decltype default delete do double dynamic_cast else enum explicit export extern "
                "false float for friend goto if inline int long mutable namespace new noexcept nullptr "
                "operator or private protected public reinterpret_cast return short signed sizeof static "
                "static_assert static_cast struct switch template this throw true try typedef typeid "
                "typename union unsigned using virtual void volatile while include std cout cin cerr endl "
                "string vector map unordered_map set pair size_t main"),
        ),
        Language(
            name="java",
            extensions=(".java",),
            source="Main.java",
            names_from=_java_names,
            # `package a.b;` (before any class): a/b/Main.java, run as a/b/Main (the launcher takes slashes).
            package_from=r"\A(?:\s|//[^\n]*\n|/\*(?s:.*?)\*/)*package\s+([A-Za-z_]\w*(?:\s*\.\s*[A-Za-z_]\w*)*)\s*;",
            version=("javac", *(f"-J{o}" for o in _FAST_JVM), "-version"),
            compile=("javac", *(f"-J{o}" for o in _FAST_JVM), "-encoding", "UTF-8", "{source}"),
            artefacts=("*.class",),
            entry="{main}.class",
            no_entry="no class with a main method found: declare `public static void main(String[] args)` in "
                     "the program's class",
            run=("java", "-XX:+UseSerialGC", "-Xshare:auto", "-cp", ".", "{main}"),
            memory_options=("-XX:MaxRAM={memory_bytes}",),  # the heap it gives itself in the limit's cgroup
            # javac: "Main.java:3: error: ..." then the line and a caret under the column.
            locations=(r"^{file}:(?P<line>\d+): error:", r"^{file}:(?P<line>\d+):",
                       r"\({file}:(?P<line>\d+)\)"),
            reason=r'^Exception in thread "[^"\n]*" (?P<reason>\S.*)',
            display_name="Java", mimetype="text/x-java", codemirror_mode="clike", pygments_lexer="java",
            blocks="braces",
            keywords=_words(
                "abstract assert boolean break byte case catch char class const continue default do double "
                "else enum extends final finally float for goto if implements import instanceof int "
                "interface long native new package private protected public record return short static "
                "strictfp super switch synchronized this throw throws transient try var void volatile while "
                "true false null String System out println printf Integer Math main args"),
        ),
        Language(
            name="javascript",
            aliases=("js", "node", "nodejs"),
            extensions=(".js", ".mjs", ".cjs"),
            source="main.js",
            version=("node", "--version"),
            run=("node", "{source}"),
            memory_options=("--max-old-space-size={half_memory_mib}",),  # about what it takes in the cgroup
            # "/dir/main.js:3" above a syntax error; "(/dir/main.js:3:9)" in a stack.
            locations=(r"(?:^|[\s(/]){file}:(?P<line>\d+)(?::(?P<col>\d+))?",),
            reason=r"^(?P<reason>[A-Za-z_$][\w$.]*(?: \[\w+\])?: .*)\n {4}at ",  # "TypeError: x" over its stack
            display_name="JavaScript", mimetype="text/javascript", codemirror_mode="javascript",
            pygments_lexer="javascript",
            blocks="braces",
            keywords=_words(
                "async await break case catch class const continue debugger default delete do else export "
                "extends false finally for function if import in instanceof let new null return static "
                "super switch this throw true try typeof undefined var void while yield console log process "
                "require Math JSON Promise"),
        ),
        Language(
            name="ruby",
            aliases=("rb",),
            extensions=(".rb",),
            source="main.rb",
            version=("ruby", "--version"),
            run=("ruby", "-e", _RUBY_SYNC, "{source}"),
            locations=(r"(?:^|[\s:]){file}:(?P<line>\d+):",),
            reason=r"^[^\s:]*:\d+:in [`'][^'\n]*': (?P<reason>.+)$",  # "main.rb:1:in `<main>': x (ArgumentError)"
            display_name="Ruby", mimetype="text/x-ruby", codemirror_mode="ruby", pygments_lexer="ruby",
            keywords=_words(
                "BEGIN END alias and begin break case class def defined? do else elsif end ensure false for "
                "if in module next nil not or redo rescue retry return self super then true undef unless "
                "until when while yield puts print require attr_accessor each map"),
        ),
        Language(
            name="bash",
            # The contract stores ``sh`` under bash: POSIX scripts run the same in bash.
            aliases=("shell", "sh"),
            extensions=(".bash", ".sh"),
            source="main.bash",
            version=("bash", "--version"),
            run=("bash", "{source}"),
            locations=(r"{file}: line (?P<line>\d+):",),
            display_name="Bash", mimetype="text/x-sh", codemirror_mode="shell", pygments_lexer="bash",
            keywords=_words(
                "case do done elif else esac fi for function if in local read return select then until "
                "while echo printf export declare set shift test exit"),
        ),
        Language(
            name="go",
            aliases=("golang",),
            extensions=(".go",),
            source="main.go",
            version=("go", "version"),
            # Files named, not the folder: `go build .` wants a go.mod, which a job need not send.
            compile=("go", "build", "-o", "{exe}", "{sources}"),
            run=("./{exe}",),
            # The job's HOME is its own directory, so the build cache
            # ($HOME/.cache/go-build) is private to the job; Debian's Go ships
            # the standard library prebuilt, so a cold build is ~0.2 s.
            # Nothing may be fetched: no module proxy, no toolchain download.
            env=(("GOPROXY", "off"), ("GOTOOLCHAIN", "local")),
            version_pattern=r"go(\d+(?:\.\d+)+)",
            locations=(r"^(?:\./)?{file}:(?P<line>\d+):(?P<col>\d+):",
                       r"{file}:(?P<line>\d+)"),
            display_name="Go", mimetype="text/x-go", codemirror_mode="go", pygments_lexer="go",
            blocks="braces",
            keywords=_words(
                "break case chan const continue default defer else fallthrough for func go goto if import "
                "interface map package range return select struct switch type var bool byte error float64 "
                "int int64 string true false nil append len make fmt Println Printf main"),
        ),
        Language(
            name="rust",
            aliases=("rs",),
            extensions=(".rs",),
            source="main.rs",
            version=("rustc", "--version"),
            compile=("rustc", "-O", "--edition", "2021", "--color", "never", "-o", "{exe}", "{source}"),
            run=("./{exe}",),
            # "error[E0425]: ..." then " --> main.rs:3:5"; warnings come first and point elsewhere.
            locations=(r"^error.*\n\s*--> {file}:(?P<line>\d+):(?P<col>\d+)",
                       r"--> {file}:(?P<line>\d+):(?P<col>\d+)",
                       r"{file}:(?P<line>\d+):(?P<col>\d+)"),
            display_name="Rust", mimetype="text/x-rustsrc", codemirror_mode="rust", pygments_lexer="rust",
            blocks="braces",
            keywords=_words(
                "as async await break const continue crate dyn else enum extern false fn for if impl in let "
                "loop match mod move mut pub ref return self Self static struct super trait true type "
                "unsafe use where while println print format vec String Vec Option Some None Result Ok Err "
                "main"),
        ),
        Language(
            name="powershell",
            aliases=("pwsh", "ps1", "ps"),
            extensions=(".ps1",),
            source="main.ps1",
            version=("pwsh", "--version"),
            run=("pwsh", "-NoLogo", "-NoProfile", "-NonInteractive", "-File", "{source}"),
            locations=(r"{file}:(?P<line>\d+) char:(?P<col>\d+)", r"{file}:(?P<line>\d+)"),
            display_name="PowerShell", mimetype="application/x-powershell", codemirror_mode="powershell",
            pygments_lexer="powershell",
            blocks="braces",
            keywords=_words(
                "begin break catch class continue data do dynamicparam else elseif end exit filter finally "
                "for foreach function if in param process return switch throw trap try until while Write- "
                "Output Write-Host Get-ChildItem"),
        ),
    )
}

# Master-side syntax checks: language -> function(source) -> None | error details.
SYNTAX_CHECKS = {"python": _python_syntax}


def _alias_table() -> dict[str, str]:
    table = {}
    for lang in LANGUAGES.values():
        table[lang.name] = lang.name
        for alias in lang.aliases:
            table[alias] = lang.name
    return table


ALIASES = _alias_table()


def canonical(name: str) -> str:
    """The main name for ``name`` or an alias of it; unknown names are kept (lower case)."""
    key = name.strip().lower()
    return ALIASES.get(key, key)


def get(name: str) -> Language | None:
    return LANGUAGES.get(canonical(name))


def from_filename(path: str) -> str | None:
    """The language of a file, from its extension (``prog.rs`` -> ``rust``)."""
    ext = os.path.splitext(path)[1].lower()
    for lang in LANGUAGES.values():
        if ext in lang.extensions:
            return lang.name
    return None


def check_syntax(language: str, source: str) -> dict | None:
    """None when the program parses (or nothing can check it); else the error details."""
    check = SYNTAX_CHECKS.get(canonical(language))
    return check(source) if check else None


def check_session_syntax(source: str) -> dict | None:
    """``check_syntax`` for a session cell, which is IPython: ``%matplotlib inline``, ``!ls``, ``x?``.

    IPython's own transformer turns the cell into the Python its kernel will
    run (a line stays a line), which is then parsed as any Python program;
    an error points at the cell's line, showing the line as it was written.
    """
    import warnings

    from IPython.core.inputtransformer2 import TransformerManager
    try:
        with warnings.catch_warnings():
            # It warns about odd line endings (a lone \r) it then handles; the kernel would say no more.
            warnings.simplefilter("ignore")
            code = TransformerManager().transform_cell(source)
    except SyntaxError as exc:
        return {"message": f"SyntaxError: {exc.msg}", "line": exc.lineno, "column": exc.offset,
                "text": (exc.text or "").rstrip("\n") or None}
    except Exception:  # a transformer bug: the kernel, which runs the same transformer, will say what it is
        return None
    detail = _python_syntax(code)
    if detail is not None and detail.get("line"):
        lines = source.splitlines()
        if detail["line"] <= len(lines):
            detail["text"] = lines[detail["line"] - 1] or None
    return detail


def parse_version(lang: Language, output: str) -> str:
    match = re.search(lang.version_pattern, output)
    return match.group(1) if match else output.strip().splitlines()[0][:40] if output.strip() else "unknown"


def fill(template: tuple[str, ...] | list[str], fields: dict[str, str | list[str]]) -> list[str]:
    """An argv template with its ``{name}`` placeholders replaced.

    Only the names in ``fields`` are replaced, so braces that belong to a
    program's own text (a ``-e`` snippet) survive, unlike ``str.format``.
    A field whose value is a list (``{sources}``) is an argument of its own
    and becomes as many arguments, none when the list is empty.
    """
    words = {k: v for k, v in fields.items() if isinstance(v, str)}
    pattern = re.compile("|".join(r"\{%s\}" % re.escape(k) for k in words)) if words else None
    argv: list[str] = []
    for arg in template:
        many = fields.get(arg[1:-1]) if arg.startswith("{") and arg.endswith("}") else None
        if isinstance(many, list):
            argv.extend(many)
        else:
            argv.append(pattern.sub(lambda m: words[m.group(0)[1:-1]], arg) if pattern else arg)
    return argv
