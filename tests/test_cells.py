"""Reading a kernel cell: options, kept files, completeness, completion (plain functions, no cluster)."""
from __future__ import annotations

import pytest

from distexec_kernel import cells


def test_options_are_read_and_blanked_so_lines_keep_their_numbers():
    cell = cells.parse("%timeout 2.5\n%arg 1 'a b'\n%arg 3\n%stdin x y\n\n%stdin z\n%no-wait\nint main;\n%arg 9\n", "c")
    assert cell.timeout == 2.5 and cell.args == ["1", "a b", "3"] and cell.stdin == "x y\nz\n" and cell.no_wait
    lines = cell.source.split("\n")
    assert lines[7] == "int main;" and not any(lines[:7])
    assert lines[8] == "%arg 9"  # only leading lines are options


def test_python_leaves_unknown_percent_lines_to_the_session():
    cell = cells.parse("%session s\n%matplotlib inline\nx = 1\n", "python")
    assert cell.session == "s" and cell.source == "\n%matplotlib inline\nx = 1\n"
    with pytest.raises(cells.OptionError, match="unknown option %matplotlib"):
        cells.parse("%matplotlib inline\nint x;", "c")


@pytest.mark.parametrize("code, says", [
    ("%timeout -1\nx", "positive"), ("%arg 'open\nx", "cannot split"), ("%no-wait now\nx", "takes no value"),
    ("%file\nx", "needs a value"), ("%%file\nbody", "%%file NAME"), ("%%file ../up.h\nbody", "bad file name"),
])
def test_bad_options_say_what_to_write(code, says):
    with pytest.raises(cells.OptionError, match=says):
        cells.parse(code, "c")


def test_file_cell_keeps_its_body_or_forgets_it():
    kept = cells.parse("%%file util.h\nint f(void);\n", "c")
    assert isinstance(kept, cells.FileCell) and kept.name == "util.h" and kept.text == "int f(void);\n"
    assert cells.parse("%%file util.h\n  \n", "c").text is None
    assert isinstance(cells.parse("%%filex\nint x;", "python"), cells.Cell)


@pytest.mark.parametrize("code, status", [
    ('puts("}");', "complete"), ("char c = '{';", "complete"), ("fn f<'a>(x: &'a str) { }", "complete"),
    ("const s = `a\n{`;", "complete"), ("/* } */ {", "incomplete"), ('s = "abc', "incomplete"),
    ("f(a[1)]", "invalid"), ("%stdin {\nint x;", "complete"), ("c = '\\''; {", "incomplete"),
    ("c = '\\\\'; }", "invalid"),
])
def test_braces(code, status):
    assert cells.is_complete(code, "rust" if "fn" in code else "c")["status"] == status


def test_incomplete_gives_an_indent_and_unknown_languages_say_unknown():
    assert cells.is_complete("int main(void) {\n  if (x) {", "c") == {"status": "incomplete", "indent": "        "}
    assert cells.is_complete("for i in 1 2; do", "bash") == {"status": "unknown"}
    assert cells.is_complete("for i in x:", "python")["status"] == "incomplete"


def test_completion_replaces_the_word_before_the_cursor():
    reply = cells.complete("int total = 0;\nto", 17, "c")
    assert reply["matches"] == ["total"] and (reply["cursor_start"], reply["cursor_end"]) == (15, 17)
    reply = cells.complete("%s", 2, "python")
    assert reply["matches"] == ["%session", "%stdin"] and reply["cursor_start"] == 0
    assert cells.complete("x = (", 5, "c")["matches"] == []
