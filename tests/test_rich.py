"""Rich results: a session cell's MIME bundles (HTML, JSON, figures, tables) and IPython syntax,
and what ``%%remote`` shows of them and of collected files, against a real cluster."""
from __future__ import annotations

import base64
import uuid

import pytest
from IPython.utils.capture import capture_output

from distexec_kernel import Cluster, protocol as P
from distexec_kernel.cluster import DistexecError

from conftest import SHOWN_IN_PLACE, magic_shell, module_cluster, visible_outputs

T = 120  # a session's first cell starts a kernel; importing matplotlib there takes seconds more
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


lc = module_cluster("rich", 1, slots=2, languages="python")


@pytest.fixture(scope="module")
def c(lc):
    with Cluster(lc.url, token=lc.token) as client:
        yield client


@pytest.fixture(autouse=True)
def sessions_end(c):
    """Each test's sessions end with it: a user keeps only a few at once (--max-sessions-per-user)."""
    yield
    for s in c.sessions():
        try:
            c.end_session(s["name"])
        except DistexecError as exc:  # it ended by itself meanwhile
            assert exc.status == 404


@pytest.fixture(scope="module")
def shell(lc):
    with magic_shell() as sh:
        yield sh


def session() -> str:
    return f"rich-{uuid.uuid4().hex[:6]}"


def test_each_mime_type_arrives_whole_and_in_order(c):
    big_html = "<table>" + "<tr><td>x</td></tr>" * 20000 + "</table>"  # ~400 KB: more than one output chunk
    src = ("from IPython.display import display, HTML, JSON, Markdown, SVG, Latex\n"
           f"display(HTML({big_html!r}))\n"
           "display(JSON({'a': [1, 2, {'b': None}]}))\n"
           "display(Markdown('**bold**'))\n"
           "display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"4\" height=\"4\"/>'))\n"
           "display(Latex(r'$x^2$'))\n"
           "display({'application/vnd.custom+json': {'k': 1}, 'text/plain': 'custom'}, raw=True)\n"
           "print('between')\n"
           "{'last': 'value'}\n")
    job = c.submit(src, session=session()).wait(T)
    assert job.status == P.SUCCEEDED, job.stderr
    kinds = [(o["output_type"], sorted(o["data"])) for o in job.outputs]
    assert kinds == [
        ("display_data", ["text/html", "text/plain"]),
        ("display_data", ["application/json", "text/plain"]),
        ("display_data", ["text/markdown", "text/plain"]),
        ("display_data", ["image/svg+xml", "text/plain"]),
        ("display_data", ["text/latex", "text/plain"]),
        ("display_data", ["application/vnd.custom+json", "text/plain"]),
        ("execute_result", ["text/plain"]),
    ], kinds
    assert job.outputs[0]["data"]["text/html"] == big_html
    assert job.outputs[1]["data"]["application/json"] == {"a": [1, 2, {"b": None}]}
    assert job.outputs[5]["data"]["application/vnd.custom+json"] == {"k": 1}
    # Terminals read the plain text in stdout, but for a default repr standing in for the rich types
    # (a local notebook cell shows no such line).
    assert job.stdout == "custom\nbetween\n{'last': 'value'}\n", job.stdout
    assert "IPython.core.display" not in job.stdout, job.stdout
    assert job.stdout.rstrip().endswith("{'last': 'value'}")
    # The bulky outputs are not in a history page's summaries.
    records, _ = c.jobs_page(limit=5, summary=True)
    assert all("outputs" not in r for r in records)


def test_a_matplotlib_figure_and_a_dataframe_come_back_as_png_and_html(c):
    name = session()
    job = c.submit("%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')\n"
                   "plt.show()", session=name).wait(T)
    assert job.status == P.SUCCEEDED, job.stderr
    pngs = [o for o in job.outputs if "image/png" in o["data"]]
    assert len(pngs) == 1, job.outputs
    png = base64.b64decode(pngs[0]["data"]["image/png"])
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    assert "Figure size" in pngs[0]["data"]["text/plain"] and "Figure size" not in job.stdout
    job = c.submit("import pandas as pd\npd.DataFrame({'n': [1, 2], 'sq': [1, 4]})", session=name).wait(T)
    assert job.status == P.SUCCEEDED, job.stderr
    [table] = job.outputs
    assert table["output_type"] == "execute_result" and "<table" in table["data"]["text/html"]
    assert "sq" in table["data"]["text/plain"]


def test_a_widget_comes_back_as_its_text_and_an_exit_message_is_said(c):
    """A widget's view names a model that lives in the session's kernel: no notebook could draw it."""
    name = session()
    job = c.submit("import ipywidgets as w\nw.IntSlider(value=3)", session=name).wait(T)
    assert job.status == P.SUCCEEDED, job.stderr
    assert [sorted(o["data"]) for o in job.outputs] == [["text/plain"]], job.outputs
    assert "IntSlider(value=3)" in job.stdout
    # sys.exit("message") says its message on stderr, as Python (and a fresh job) does.
    job = c.submit("import sys\nsys.exit('custom exit message')", session=name).wait(T)
    assert (job.status, job.exit_code, job.stderr) == (P.FAILED, 1, "custom exit message\n"), job.record
    job = c.submit("import sys\nsys.exit(3)", session=name).wait(T)
    assert (job.exit_code, job.stderr) == (3, ""), job.record


def test_ipython_syntax_is_accepted_in_sessions_and_refused_in_plain_jobs(c):
    name = session()
    job = c.submit("%matplotlib inline\n!echo hi from the shell\nfiles = !ls\nx = 5\nx?\n%time y = x * 2\nprint(y)",
                   session=name).wait(T)
    assert job.status == P.SUCCEEDED, (job.error, job.stderr)
    assert "hi from the shell" in job.stdout and "10" in job.stdout
    # A syntax error in a session cell is still refused before it runs, pointing at its line.
    bad = c.submit("%matplotlib inline\n!ls\nx = (1,\n", session=name).wait(T)
    assert bad.status == P.REJECTED and bad.error["code"] == P.SYNTAX_ERROR
    assert bad.error["line"] == 3 and bad.error["text"] == "x = (1,", bad.error
    bad = c.submit("x = 1\n!echo fine\nif x\n    pass\n", session=name).wait(T)
    assert bad.error["code"] == P.SYNTAX_ERROR and bad.error["line"] == 3 and bad.error["text"] == "if x"
    # A plain Python job is plain Python: the magic line is its syntax error.
    plain = c.submit("x = 1\n!echo hi\n").wait(T)
    assert plain.status == P.REJECTED and plain.error["line"] == 2 and plain.error["text"] == "!echo hi"


def test_rich_outputs_count_against_the_output_limit(make_cluster):
    lc = make_cluster(1, slots=1, languages="python", slave_args=["--output-limit", "1"])
    with Cluster(lc.url, token=lc.token) as c:
        # 2 MB of HTML, with a plain text of a few bytes: over the 1 MiB limit all the same.
        job = c.submit("from IPython.display import HTML, display\ndisplay(HTML('x' * 2_000_000))",
                       session="big").wait(T)
        assert job.status == P.FAILED and job.error["code"] == P.OUTPUT_LIMIT, (job.error, job.stderr)
        assert job.outputs == []


def test_remote_magic_shows_a_session_figure_and_html_as_jupyter_would(shell, lc):
    name = session()
    with capture_output() as cap:
        result = shell.run_cell(f"%%remote --session {name}\n%matplotlib inline\nimport matplotlib.pyplot as plt\n"
                                "from IPython.display import HTML, display\ndisplay(HTML('<b>bold</b>'))\n"
                                "plt.plot([1, 2]); plt.show()\n")
    assert result.success, cap.stdout + cap.stderr
    shown = [o.data for o in cap.outputs]
    assert shown[0]["text/html"] == "<b>bold</b>"
    assert base64.b64decode(shown[1]["image/png"]).startswith(PNG_MAGIC)
    assert shown[-1]["text/plain"].startswith("✅ job")  # the status line comes last
    assert "Figure size" not in cap.stdout and "HTML object" not in cap.stdout, cap.stdout
    # Text-only results are in the streamed stdout, not shown twice.
    with capture_output() as cap:
        result = shell.run_cell(f"%%remote --session {name}\n6 * 7\n")
    assert result.success and "42" in cap.stdout
    assert [o.data["text/plain"][:1] for o in cap.outputs] == ["✅"]


def test_remote_magic_collect_shows_images_and_lists_other_files(shell, lc, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "values.txt").write_text("3\n1\n2\n")
    cell = (f"%%remote --file {tmp_path / 'data'}/ --collect '*.png' --collect 'out/*' -o collected\n"
            "import os, struct, zlib\n"
            "values = [int(v) for v in open('data/values.txt').read().split()]\n"
            "def chunk(kind, body):\n"
            "    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))\n"
            "png = (b'\\x89PNG\\r\\n\\x1a\\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 1, 1, 8, 0, 0, 0, 0))\n"
            "       + chunk(b'IDAT', zlib.compress(b'\\x00\\xff')) + chunk(b'IEND', b''))\n"
            "open('plot.png', 'wb').write(png)\n"
            "os.makedirs('out')\nopen('out/sorted.txt', 'w').write(str(sorted(values)))\nprint('made')\n")
    with capture_output() as cap:
        result = shell.run_cell(cell)
    assert result.success, cap.stdout + cap.stderr
    assert "made" in cap.stdout
    shown = [o.data for o in cap.outputs]
    images = [d for d in shown if "image/png" in d]
    assert len(images) == 1 and base64.b64decode(images[0]["image/png"]).startswith(PNG_MAGIC)
    assert "plot.png" in images[0]["text/plain"]
    listing = next(d for d in shown if "collected file" in d.get("text/plain", ""))
    assert "out/sorted.txt" in listing["text/plain"] and "out/sorted.txt" in listing["text/html"]
    job = shell.user_ns["collected"]
    assert job.artifact("out/sorted.txt") == b"[1, 2, 3]"


def test_the_python_kernel_shows_a_sessions_rich_outputs(lc, tmp_path, monkeypatch):
    from jupyter_client.manager import start_new_kernel

    from distexec_kernel import kernelspec
    kernelspec.install(["python"], prefix=str(tmp_path))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    monkeypatch.setenv("DISTEXEC_URL", lc.url)
    monkeypatch.setenv("DISTEXEC_TOKEN", lc.token)
    km, kc = start_new_kernel(kernel_name="distexec-python", startup_timeout=60)

    def execute(code: str) -> list[dict]:
        """Run a cell; its iopub messages up to idle, once its reply says it went well."""
        msg_id = kc.execute(code)
        reply = kc.get_shell_msg(timeout=T)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=T)
        assert reply["content"]["status"] == "ok", reply["content"]
        got = []
        while True:
            msg = kc.get_iopub_msg(timeout=10)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return got
            got.append(msg)

    try:
        got = execute("from IPython.display import HTML\nHTML('<i>it</i>')")
        results = [m["content"] for m in got if m["msg_type"] == "execute_result"]
        assert [r["data"].get("text/html") for r in results] == ["<i>it</i>"], got

        # A value whose text is not a placeholder (a DataFrame's): shown in place, its text not also.
        got = execute(SHOWN_IN_PLACE)
        shown = [(kind, item if kind == "stdout" else item.get("text/html", "")[:3])
                 for kind, item in visible_outputs(got)]
        assert shown == [("stdout", "before\n"), ("display_data", "<b>"), ("stdout", "after\n"),
                         ("execute_result", "<b>"), ("display_data", "<di")], got
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_session_syntax_check_never_raises():
    from hypothesis import given, settings, strategies as st

    from distexec_kernel import languages as L

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=40))
    def check(source):
        detail = L.check_session_syntax(source)
        assert detail is None or (detail["message"] and (detail["line"] is None or detail["line"] >= 1))

    check()
    assert L.check_session_syntax("%%bash\nls -l\n") is None
    assert L.check_session_syntax("x = 1\ny = (\n")["line"] == 2


def _place(out: dict, at: int) -> dict:
    return {**out, "metadata": {"distexec": {"stdout_at": at}}}


def test_a_redrawn_cell_keeps_what_it_cannot_place():
    from distexec_kernel.outputs import in_place
    table = {"output_type": "execute_result", "data": {"text/plain": "T\n1", "text/html": "<table/>"}}
    figure = {"output_type": "display_data", "data": {"text/plain": "<Figure>", "image/png": "iVBO"}}
    # The text split over chunks, stderr between: each output in its place, its text once.
    written = [("stdout", "a\n"), ("stderr", "warn\n"), ("stdout", "T"), ("stdout", "\n1\nb\n")]
    assert in_place(written, {"outputs": [_place(figure, 2), _place(table, 2)]}) == [
        ("stdout", "a\n"), ("stderr", "warn\n"), ("output", _place(figure, 2)), ("output", _place(table, 2)),
        ("stdout", "b\n")]
    # Stdout cut short (the output limit): the text is not where it should be, so it stays.
    assert in_place([("stdout", "a\nT")], {"outputs": [_place(table, 2)]}) == [
        ("stdout", "a\n"), ("output", _place(table, 2)), ("stdout", "T")]
    # An output that does not say where it came (a job from before): nothing is redrawn.
    assert in_place(written, {"outputs": [table]}) is None
    assert in_place(written, {"outputs": []}) is None


# A cell that sends iopub messages of its own making, as any user code may (the kernel's session key is
# the user's): ``send(kind, content)``, content a dict or already-packed JSON bytes (NaN, escapes...).
CRAFT = ("k = get_ipython().kernel\n"
         "def send(kind, content):\n"
         "    k.session.send(k.iopub_socket, kind, content, parent=k.get_parent())\n")
DROPPED = "distexec: a display output was dropped: "


def slave_log(lc) -> str:
    with open(f"{lc.log_dir}/slave-1.log") as f:
        return f.read()


def test_a_bundle_the_master_could_not_take_is_dropped_and_said_and_the_session_lives_on(c):
    """Before: 200 levels of JSON made a job_finished the master refused; the job stayed running for ever."""
    name = session()
    src = ("from IPython.display import display\nd = 1\nfor i in range(200): d = [d]\n"
           "display({'application/json': d}, raw=True)\n"
           "display({'text/plain': 'deep metadata'}, metadata={'m': d}, raw=True)\n"
           + CRAFT +
           "send('display_data', b'{\"data\": {\"application/json\": [NaN]}, \"metadata\": {}}')\n"
           "send('execute_result', b'{\"data\": {\"text/plain\": \"inf\"}, \"metadata\": {\"x\": -Infinity}}')\n"
           "send('display_data', b'{\"data\": {\"text/html\": \"<b>\\\\ud800</b>\"}, \"metadata\": {}}')\n"
           "display({'text/plain': 'fine', 'application/json': {'ok': [1.5]}}, raw=True)\n"
           "print('after')\n")
    job = c.submit(src, session=name).wait(60)
    assert job.status == P.SUCCEEDED, (job.status, job.error, job.stderr)
    assert [o["data"] for o in job.outputs] == [{"text/plain": "fine", "application/json": {"ok": [1.5]}}]
    # The text of a dropped bundle still reaches stdout (terminals read it there): it is fine text.
    assert job.stdout == "deep metadata\ninf\nfine\nafter\n", job.stdout
    notes = job.stderr.splitlines()
    assert notes == [DROPPED + "arrays and objects nest deeper than 120 levels"] * 2 + [
        DROPPED + "NaN or Infinity is not JSON"] * 2 + [DROPPED + "a string holds a lone UTF-16 surrogate"], notes
    job = c.submit("print(len(str(d)))", session=name).wait(T)
    assert (job.status, job.stdout) == (P.SUCCEEDED, "401\n"), job.record


def test_a_lone_surrogate_in_a_cells_output_arrives_as_a_replacement_character(c):
    """A kernel's JSON may escape a lone surrogate; Python keeps it, UTF-8 cannot.  The slave sends each
    as U+FFFD, in the frame it checked and sent as it was (encoded once, ``agent._frame``)."""
    job = c.submit(CRAFT + "send('stream', b'{\"name\": \"stdout\", \"text\": \"a\\\\ud800b\\\\udc00\"}')\n"
                           "print('é' * 5000)\n", session=session()).wait(T)
    assert job.status == P.SUCCEEDED, (job.error, job.stderr)
    assert job.stdout == "a\ufffdb\ufffd" + "é" * 5000 + "\n", job.stdout[:40]


def test_a_value_a_renderer_cannot_take_is_dropped_and_said(c):
    """Every MIME type's value is text but JSON ones' (``application/json``, ``*+json``), which take any JSON:
    the protocol's one rule (``rich_outputs.clean_mime_data``), applied by the slave, and by the master again.  Before:
    a ``text/html`` of 5 and an ``image/png`` that was an array went to the notebook's renderers as they were."""
    name = session()
    job = c.submit("from IPython.display import display\n"
                   "display({'text/html': 5, 'image/png': ['iVBOR'], 'application/json': [5],\n"
                   "         'application/vnd.custom+json': {'a': None}, 'text/plain': 'kept'}, raw=True)\n"
                   "display({'image/svg+xml': {'svg': 1}}, raw=True)\n"
                   "print('after')", session=name).wait(T)
    assert job.status == P.SUCCEEDED, (job.error, job.stderr)
    assert [o["data"] for o in job.outputs] == [
        {"application/json": [5], "application/vnd.custom+json": {"a": None}, "text/plain": "kept"}], job.outputs
    said = "distexec: a display output's {} was dropped: it is {}, not text"
    assert job.stderr.splitlines() == [said.format("text/html", "a number"), said.format("image/png", "an array"),
                                       said.format("image/svg+xml", "an object")], job.stderr
    assert job.stdout == "kept\nafter\n", job.stdout


def test_a_message_the_slave_cannot_handle_is_skipped_said_and_logged(c, lc):
    """Before: a text/plain of 5 raised inside the session's iopub reader and killed it silently: the
    cell's own print and every later cell of the session came back with empty stdout."""
    name = session()
    job = c.submit("from IPython.display import display\ndisplay({'text/plain': 5}, raw=True)\nprint('after')\n"
                   "display({'text/plain': ['a'], 'text/html': '<i>5</i>'}, raw=True)", session=name).wait(T)
    assert job.status == P.SUCCEEDED, (job.error, job.stderr)
    assert job.stdout == "after\n", job.record
    said = "distexec: a display output's text/plain was dropped: it is {}, not text\n"
    assert job.stderr == said.format("a number") + said.format("an array"), job.stderr
    assert [o["data"] for o in job.outputs] == [{"text/html": "<i>5</i>"}]
    job = c.submit("print(1)", session=name).wait(T)
    assert (job.status, job.stdout, job.stderr) == (P.SUCCEEDED, "1\n", ""), job.record
    # Messages no kernel of ours sends, but a cell may: each is skipped, said, logged; the rest arrive.
    deep = "[" * 5000 + "]" * 5000  # past Python's own recursion limit when the slave parses it
    job = c.submit(CRAFT + "send('stream', {'name': 'stdout', 'text': 5})\n"
                   f"send('display_data', b'{{\"data\": {deep}, \"metadata\": {{}}}}')\n"
                   "send('error', {'ename': ['E'], 'evalue': {'v': [[1]]}, 'traceback': [1, None]})\n"
                   "print('still here')", session=name).wait(T)
    assert job.status == P.FAILED and job.error["code"] == P.NONZERO_EXIT, job.record
    assert job.error["message"] == "['E']: {'v': [[1]]}", job.error
    assert job.stdout == "still here\n", job.record
    notes = [line for line in job.stderr.splitlines() if line.startswith("distexec:")]
    assert len(notes) == 2 and all("was skipped" in n for n in notes), job.stderr
    log = slave_log(lc)
    assert f"job {job.id}" in log and "was skipped" in log, log[-3000:]
    job = c.submit("print(2)", session=name).wait(T)
    assert (job.status, job.stdout) == (P.SUCCEEDED, "2\n"), job.record
