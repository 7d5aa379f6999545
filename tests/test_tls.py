"""HTTPS/WSS end to end, and clients and slaves that refuse a certificate they cannot verify."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import stat
import subprocess
import sys

import pytest
from cryptography import x509

from distexec_kernel import Cluster, config, protocol as P
from distexec_kernel.cluster import DistexecError
from distexec_kernel.events import EventStream
from distexec_kernel.local import Child, free_port
from distexec_kernel.tls import ensure_self_signed, make_self_signed



@pytest.fixture
def tls_cluster(make_cluster):
    return make_cluster(1, slots=2, languages="python", tls=True)


@pytest.fixture
def stranger(tmp_path) -> str:
    """A certificate that did not sign the master's: trusting it must not be enough."""
    cert = str(tmp_path / "stranger.pem")
    make_self_signed(cert, str(tmp_path / "stranger-key.pem"))
    return cert


def test_self_signed_certificate_names_the_loopback_and_is_reused(tmp_path):
    directory = str(tmp_path / "tls")
    certfile, keyfile = ensure_self_signed(("localhost", "127.0.0.1"), directory)
    assert stat.S_IMODE(os.stat(keyfile).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(_read(certfile))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # Kept while valid, so slaves that trust it keep trusting a restarted master...
    before = _read(certfile)
    assert ensure_self_signed(("localhost", "127.0.0.1"), directory) == (certfile, keyfile)
    assert _read(certfile) == before
    # ...and made again when a name it must cover is missing.
    ensure_self_signed(("localhost", "127.0.0.1", "10.1.2.3"), directory)
    assert _read(certfile) != before


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_jobs_run_over_https_and_wss(tls_cluster, home):
    assert tls_cluster.url.startswith("https://")
    info = config.read_connection()
    assert info["url"] == tls_cluster.url and info["cafile"] == tls_cluster.cafile
    with Cluster(tls_cluster.url, token=tls_cluster.token) as c:
        assert c.verify == tls_cluster.cafile  # verifying, against the cluster's own certificate
        assert c._events_connected()  # the wss event channel
        chunks = []
        job = c.submit("import sys\nprint('over tls')\nprint('err', file=sys.stderr)")
        job.on_output(lambda stream, text: chunks.append((stream, text)))
        job.wait(30)
        assert job.status == P.SUCCEEDED and job.stdout == "over tls\n" and job.stderr == "err\n"
        # The output also came live, as events over wss.
        assert "".join(text for stream, text in chunks if stream == "stdout") == "over tls\n"
        # The slave registered over wss and ran it.
        assert job.slave_uid == tls_cluster.slaves[0].uid
        assert [s["uid"] for s in c.slaves()] == [tls_cluster.slaves[0].uid]
        assert any(cl["id"] == c.client_id for cl in c.clients())


def test_a_client_refuses_a_certificate_it_cannot_verify(tls_cluster, stranger, tmp_path, monkeypatch):
    with pytest.raises(DistexecError) as err:
        Cluster(tls_cluster.url, token=tls_cluster.token, cafile=stranger)
    message = str(err.value)
    assert "TLS verification failed" in message and "self-signed certificate" in message
    assert "CA file" in message
    # With no CA file at all (no connection file, no DISTEXEC_CAFILE) the system CAs do not know it either.
    empty = tmp_path / "empty-home"
    empty.mkdir()
    monkeypatch.setenv("DISTEXEC_HOME", str(empty))
    monkeypatch.delenv("DISTEXEC_CAFILE", raising=False)
    with pytest.raises(DistexecError, match="TLS verification failed"):
        Cluster(tls_cluster.url, token=tls_cluster.token)


def test_the_event_channel_refuses_a_certificate_it_cannot_verify(tls_cluster, stranger):
    events = []
    stream = EventStream(tls_cluster.url, tls_cluster.token, events.append, cafile=stranger)
    try:
        assert stream.connected.wait(20)
        assert stream.refused and "TLS verification failed" in stream.refused
        assert stream.client_id is None and events == []
    finally:
        stream.close()
    # Given the right CA it connects, as the client it is.
    good = EventStream(tls_cluster.url, tls_cluster.token, events.append, cafile=tls_cluster.cafile)
    try:
        assert good.connected.wait(20) and not good.refused and good.client_id
    finally:
        good.close()


def test_a_slave_refuses_a_certificate_it_cannot_verify(tls_cluster, stranger, home):
    env = dict(os.environ, DISTEXEC_HOME=str(home), DISTEXEC_CAFILE=stranger)
    done = subprocess.run([sys.executable, "-m", "slave", "--master", tls_cluster.url,
                           f"--secret={tls_cluster.secret}", "--languages", "python"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "cannot verify the master's TLS certificate" in done.stderr
    assert "self-signed certificate" in done.stderr


def test_a_plain_http_client_gets_no_answer_from_a_tls_master(tls_cluster):
    with pytest.raises(DistexecError):
        Cluster(tls_cluster.url.replace("https://", "http://"), token=tls_cluster.token, events=False)


def test_distexec_up_tls_writes_what_clients_need(home, tmp_path):
    port = free_port()
    env = dict(os.environ, DISTEXEC_HOME=str(home), PYTHONUNBUFFERED="1")
    for var in ("DISTEXEC_URL", "DISTEXEC_TOKEN", "DISTEXEC_SLAVE_SECRET", "DISTEXEC_CAFILE"):
        env.pop(var, None)
    log = open(tmp_path / "up.log", "w")
    up = Child("up", [sys.executable, "-m", "distexec_kernel.cli", "up", "--tls", "--slaves", "1",
                      "--slots", "1", "--languages", "python", "--port", str(port)], env, log)
    try:
        up.wait_line("distexec cluster ready", 60)
        info = json.loads((home / "connection.json").read_text())
        assert info["url"] == f"https://127.0.0.1:{port}"
        assert info["cafile"] == str(home / "tls" / "master-cert.pem")
        with Cluster() as c:  # everything from the connection file
            assert c.submit("print(6 * 7)").wait(30).stdout == "42\n"
    finally:
        assert up.stop(signal.SIGINT, timeout=30) == 0
        log.close()


def _ca_and_leaf(directory) -> tuple[str, str, str]:
    """A CA (self-signed, CA:TRUE) and a 127.0.0.1 server certificate it signed, as a real CA would."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = [str(directory / n) for n in ("ca.pem", "leaf.pem", "leaf-key.pem")]
    for path, data in zip(paths, (ca.public_bytes(serialization.Encoding.PEM),
                                  leaf.public_bytes(serialization.Encoding.PEM),
                                  leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))):
        with open(path, "wb") as f:
            f.write(data)
    return paths[0], paths[1], paths[2]


def test_a_ca_signed_certificate_puts_its_ca_in_the_connection_file(make_cluster, home, tmp_path):
    ca, leaf, key = _ca_and_leaf(tmp_path)
    lc = make_cluster(0, master_args=["--certfile", leaf, "--keyfile", key, "--cafile", ca])
    info = config.read_connection()
    assert info["cafile"] == ca and info["url"] == lc.url.replace("http://", "https://")
    with Cluster(info["url"], token=lc.token) as c:
        assert c.verify == ca and c.languages() == []  # verified against the CA, not the leaf
    with pytest.raises(DistexecError, match="TLS verification failed"):
        Cluster(info["url"], token=lc.token, cafile=leaf, events=False)  # a CA-signed leaf is no CA file
    # Without --cafile, a CA-signed certificate is not offered as the CA file (the system's CAs apply).
    lc.stop()
    make_cluster(0, master_args=["--certfile", leaf, "--keyfile", key])
    assert "cafile" not in config.read_connection()


def test_a_login_without_a_ca_file_does_not_borrow_another_masters(make_cluster, home, tmp_path):
    """A student logged in to a lab master with a CA-signed certificate (the system's CAs verify it)
    who also runs `distexec up --tls` at home: the home cluster's self-signed certificate is for the
    home master only, not for the lab's."""
    import time

    ca, leaf, key = _ca_and_leaf(tmp_path)
    lab = make_cluster(0, master_args=["--certfile", leaf, "--keyfile", key])
    lab_url = lab.url.replace("http://", "https://")
    at_home = make_cluster(0, tls=True, master_args=["--db", str(tmp_path / "home-master.sqlite3")])  # its own
    assert config.read_connection()["cafile"] == at_home.cafile
    config.write_logins([{"url": lab_url, "user": "admin", "token": lab.token,
                          "expires_epoch": time.time() + 3600}])
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTEXEC_")}
    # The lab's CA stands for the system's CAs: requests reads the one, OpenSSL (tornado) the other.
    env.update(DISTEXEC_HOME=str(home), REQUESTS_CA_BUNDLE=ca, SSL_CERT_FILE=ca)

    def jobs(*url: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "distexec_kernel.cli", "jobs", *url], env=env,
                              capture_output=True, text=True, timeout=60)

    for done in (jobs(), jobs("--url", lab_url)):  # the newest login, then the lab named
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    # The home master is still verified against its own certificate, named by the connection file.
    home_jobs = jobs("--url", at_home.url)
    assert home_jobs.returncode == 0, home_jobs.stderr
    # And a CA file given for the lab's login is used for the lab alone.
    config.write_logins([{"url": lab_url, "user": "admin", "token": lab.token, "cafile": ca,
                          "expires_epoch": time.time() + 3600}])
    assert config.resolve(lab_url).cafile == ca and config.resolve(at_home.url).cafile == at_home.cafile
    assert config.resolve("https://127.0.0.1:1").cafile is None


def test_cafile_options_of_the_cli_the_magic_and_the_slave(tls_cluster, stranger, tmp_path, monkeypatch):
    # A student's machine: no connection file, no DISTEXEC_CAFILE; the master's certificate given by hand.
    empty = tmp_path / "student-home"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTEXEC_")}
    env["DISTEXEC_HOME"] = str(empty)
    cli = [sys.executable, "-m", "distexec_kernel.cli", "jobs", "--url", tls_cluster.url, "--token", tls_cluster.token]
    refused = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "TLS verification failed" in refused.stderr
    done = subprocess.run(cli + ["--cafile", tls_cluster.cafile], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr

    monkeypatch.setenv("DISTEXEC_HOME", str(empty))
    for var in ("DISTEXEC_URL", "DISTEXEC_TOKEN", "DISTEXEC_CAFILE"):
        monkeypatch.delenv(var, raising=False)
    from IPython.utils.capture import capture_output

    from conftest import magic_shell
    with magic_shell() as shell:
        with capture_output() as cap:
            result = shell.run_cell(f"%remote connect {tls_cluster.url} --token {tls_cluster.token} "
                                    f"--cafile {tls_cluster.cafile}")
        assert result.success and f"connected to {tls_cluster.url}" in cap.stdout, cap.stdout

    # The slave's flag wins over DISTEXEC_CAFILE: given a stranger's certificate, it refuses the master.
    slave = subprocess.run([sys.executable, "-m", "slave", "--master", tls_cluster.url, "--languages", "python",
                            "--cafile", stranger],
                           env=dict(env, DISTEXEC_CAFILE=tls_cluster.cafile, DISTEXEC_SLAVE_SECRET=tls_cluster.secret),
                           capture_output=True, text=True, timeout=60)
    assert slave.returncode == 2 and "cannot verify the master's TLS certificate" in slave.stderr, slave.stderr


def test_the_connection_file_names_the_master_as_its_certificate_does(make_cluster, home, tmp_path):
    """A lab master's certificate names the address people use (master.lab), not the one it listens on
    (0.0.0.0): the connection file must carry that name (--url), or the admin's own commands on that
    machine are refused. The master says so at start, and the refusal says what is wrong."""
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    make_self_signed(cert, key, names=("localhost",))  # a name only, as master.lab would be
    lc = make_cluster(0, master_args=["--certfile", cert, "--keyfile", key])
    https = lc.url.replace("http://", "https://")
    log = (tmp_path / "logs" / "master.log").read_text()
    assert f"the connection file names {https}, which the certificate does not (it is for localhost)" in log
    with pytest.raises(DistexecError) as refused:
        Cluster(events=False)  # the connection file's URL, verified with its CA file
    assert "certificate is not valid for '127.0.0.1'" in str(refused.value)  # the name it checked, whole
    assert "a name its certificate was issued for" in str(refused.value) and "--url" in str(refused.value)
    lc.stop()
    log = (tmp_path / "logs" / "master.log").read_text()

    port = free_port()
    named = f"https://localhost:{port}"
    make_cluster(0, port=port, master_args=["--certfile", cert, "--keyfile", key, "--url", named,
                                            "--db", str(tmp_path / "second.sqlite3")])  # one master per history
    assert config.read_connection()["url"] == named
    with Cluster(events=False) as c:
        assert c.url == named and c.languages() == []
    assert "which the certificate does not" not in (tmp_path / "logs" / "master.log").read_text()[len(log):]

    # A --url that does not match what the master serves is refused at start.
    wrong = subprocess.run([sys.executable, "-m", "master", "--port", "0", "--certfile", cert, "--keyfile", key,
                            "--url", "http://localhost:1", "--no-connection-file",
                            "--db", str(tmp_path / "third.sqlite3")],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "DISTEXEC_HOME": str(home)})
    assert wrong.returncode != 0 and "--url http://localhost:1 must be a https:// address" in wrong.stderr
