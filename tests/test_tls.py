"""TLS for clients: black-box over real TLS, and the sans-IO module itself.

Certificates are made at test time with the ``openssl`` command, in a
temporary directory (an ECDSA P-256 pair, a second one for the reload, an
RSA-2048 one). The clients are Python's ``ssl``: a blocking ``SSLSocket``
for chatting, and a sans-IO one (``SSLObject``) where a test decides how the
ciphertext is cut.
"""

import atexit
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import types
import selectors
import unittest

from support import (BROKER, IO_TIMEOUT, ROOT, Client, Server, TestCase,
                     chat_among, example_session, per_start_method, receive)

from chatlib import tls
from scripts import fuzz
from scripts.tlsclient import TlsClient as SansIoTls, client_context as trusting

TLS_LISTENING = r"listening on .*:(\d+) \(TLS\)"


def openssl(*args):
    subprocess.run(["openssl"] + list(args), check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)


def make_pair(directory, name, kind="ec"):
    """A self-signed certificate for CN=localhost and its key: ``(cert, key)``."""
    key = os.path.join(directory, name + ".key")
    cert = os.path.join(directory, name + ".pem")
    if kind == "ec":
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    else:
        openssl("genrsa", "-out", key, "2048")
    openssl("req", "-new", "-x509", "-key", key, "-out", cert, "-days", "2",
            "-subj", "/CN=localhost")
    return cert, key


class _Certificates(dict):
    """name -> (certificate path, key path), made on first use, in a
    temporary directory removed at exit (made lazily rather than in
    setUpModule: the per-start-method classes count as another module's)."""

    def __missing__(self, name):
        global TMP
        TMP = tempfile.mkdtemp(prefix="chat-tls-test-")
        atexit.register(shutil.rmtree, TMP, True)
        for pair, kind in (("a", "ec"), ("b", "ec"), ("rsa", "rsa")):
            self[pair] = make_pair(TMP, pair, kind)
        enc = os.path.join(TMP, "encrypted.key")
        openssl("pkey", "-in", self["a"][1], "-aes128", "-passout", "pass:secret", "-out", enc)
        self["encrypted"] = (self["a"][0], enc)
        return self[name]


CERTS = _Certificates()
TMP = None


def tmpdir():
    """The certificates' directory (removed at exit)."""
    CERTS["a"]
    return TMP


def client_context(*names):
    """A client context trusting the certificates ``names`` (all by default)."""
    return trusting([CERTS[name][0] for name in names or ("a", "b", "rsa")])


def der(name):
    with open(CERTS[name][0]) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


class TlsClient(Client):
    """support's line client, over an ``SSLSocket``."""

    def __init__(self, port, context=None):
        super().__init__(port, tls=context or client_context())

    def certificate(self):
        return self.sock.getpeercert(binary_form=True)


class RawTls:
    """The tools' sans-IO TLS client over a plain socket: the test cuts the
    ciphertext. ``obj`` and ``outgoing`` are its ``SSLObject`` and outgoing
    BIO, for a test that drives them by hand."""

    def __init__(self, port, context=None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tls = SansIoTls(context or client_context())
        self.obj, self.outgoing = self.tls.obj, self.tls.outgoing
        self.plain = b""

    def close(self):
        self.sock.close()

    def handshake(self, send=None):
        """Run the handshake; ``send(ciphertext)`` sends each flight (default:
        whole), the client's Finished last."""
        send = send or self.sock.sendall
        send(self.tls.start())
        while not self.tls.established:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("closed during the handshake")
            plain, flight = self.tls.decrypt(data)
            self.plain += plain
            send(flight)

    def encrypt(self, data):
        return self.tls.encrypt(data)

    def read_until_eof(self, timeout=IO_TIMEOUT):
        """All plaintext until the server closes (close_notify or TCP)."""
        deadline = time.monotonic() + timeout
        while not self.tls.closed:
            data = receive(self.sock, deadline,
                           lambda: "not closed (have %r)" % self.plain[-200:])
            if not data:
                break
            try:
                plain, _ = self.tls.decrypt(data)
            except ssl.SSLEOFError:
                break
            self.plain += plain
        return self.plain


def closed_within(sock, seconds):
    """Read (and forget) until EOF; the time it took. AssertionError if longer."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError("still open after %.1f s" % seconds)
    return time.monotonic() - start


class TlsCase(TestCase):
    workers = 2
    start_method = None

    def tls_server(self, *args, cert="a", **kwargs):
        kwargs.setdefault("workers", self.workers)
        kwargs.setdefault("start_method", self.start_method)
        certfile, keyfile = CERTS[cert]
        s = self.server("--tls-cert", certfile, "--tls-key", keyfile, "--tls-port", 0,
                        *args, **kwargs)
        s.tls_port = int(s.wait_log(TLS_LISTENING).group(1))
        return s

    def tls_client(self, s, name=None, context=None):
        c = TlsClient(s.tls_port, context)
        self.addCleanup(c.close)
        if name is not None:
            c.login(name)
        return c

    def raw(self, s, port=None):
        c = RawTls(port or s.tls_port)
        self.addCleanup(c.close)
        return c

    def wait_stats(self, s, pattern, timeout=IO_TIMEOUT):
        """A statistics line (SIGUSR1) matching ``pattern``. The figures come
        with the workers' heartbeats, a moment late: ask until they match."""
        deadline = time.monotonic() + timeout
        while True:
            start = len(s.log_lines)
            s.proc.send_signal(signal.SIGUSR1)
            line = s.wait_log(r"stats: .*", start=start).group(0)
            if re.search(pattern, line):
                return line
            if time.monotonic() > deadline:
                raise AssertionError("no statistics line matching %r; the last: %s"
                                     % (pattern, line))
            time.sleep(0.1)       # the next heartbeat


# -- the protocol over TLS ------------------------------------------------------

class OverTls(TlsCase):
    """The example session over TLS, and one chat of TLS and plaintext users,
    under every start method."""

    def test_example_session_over_tls(self):
        s = self.tls_server()
        naman = self.tls_client(s, "Naman")
        self.assertEqual(naman.certificate(), der("a"))
        example_session(naman, self.tls_client(s, "Yudi"), self.tls_client(s))

    def test_plaintext_and_tls_users_share_one_chat(self):
        s = self.tls_server()
        users = [self.tls_client(s, "t0"), self.client(s, "p0"),
                 self.tls_client(s, "t1"), self.client(s, "p1")]
        chat_among(users)         # each DM goes to the next: TLS to plaintext and back
        users[0].close()                   # a TLS user leaves: all hear it
        for u in users[1:]:
            u.expect("INFO t0 disconnected")
        users[1].close()                   # a plaintext one
        for u in users[2:]:
            u.expect("INFO p0 disconnected")
            u.expect_nothing_more()

    def test_big_fan_out_and_pipelining_over_tls(self):
        """Many lines at once, both ways: records of 16 KiB, several per read."""
        s = self.tls_server()
        a = self.tls_client(s, "a")
        b = self.tls_client(s, "b")
        lines = ["MSG line %d %s" % (i, "x" * (i % 300 + 1)) for i in range(3000)]
        a.send(*lines)
        for i in range(3000):
            self.assertEqual(b.read_line(), "MSG a line %d %s" % (i, "x" * (i % 300 + 1)))
        a.send(*["PING"] * 500)
        a.expect(*["PONG"] * 500)

    def test_shutdown_tells_tls_clients(self):
        s = self.tls_server()
        c = self.tls_client(s, "x")
        self.assertEqual(s.stop(), 0)
        self.assertEqual(c.expect_closed(), ["ERR server-shutdown"])


per_start_method(globals(), OverTls)


# -- what is not a TLS client, and what is not a plaintext one ----------------------

class WrongPort(TlsCase):

    def test_plaintext_client_on_the_tls_port_is_closed_at_once(self):
        s = self.tls_server("--log-level", "DEBUG")
        raw = socket.create_connection(("127.0.0.1", s.tls_port), timeout=IO_TIMEOUT)
        self.addCleanup(raw.close)
        raw.sendall(b"LOGIN bob\nPING\n")
        self.assertLess(closed_within(raw, 3.0), 3.0)
        s.wait_log(r"DEBUG .*TLS connection from 127\.0\.0\.1 dropped: TLS handshake failed")
        self.wait_stats(s, r"tls-failed=1 ")
        self.client(s, "bob")                         # the name was never taken

    def test_garbage_on_the_tls_port(self):
        s = self.tls_server("--tls-handshake-timeout", "1")
        rng = random.Random(4)
        for n in (1, 5, 100, 3000):
            for first in (b"\x00", b"\x16\x03\x03\x00\x05", b"\x16\x03\x01", b"\x16"):
                raw = socket.create_connection(("127.0.0.1", s.tls_port), timeout=IO_TIMEOUT)
                self.addCleanup(raw.close)
                raw.sendall(first + bytes(rng.getrandbits(8) for _ in range(n)))
                if len(first) + n < 5 or first[:1] == b"\x16" and (len(first) < 5 or n < 5):
                    # Less than a record header, or a header whose length is
                    # random: the server waits for the record, until the
                    # handshake timeout.
                    self.assertLess(closed_within(raw, 3.0), 3.0)
                else:
                    # Not TLS, or a record that is garbage: closed at once.
                    self.assertLess(closed_within(raw, 3.0), 0.5)
        c = self.tls_client(s, "ok")                  # nothing else suffered
        c.send("PING")
        c.expect("PONG")

    def test_failures_are_logged_at_debug_only(self):
        s = self.tls_server()                         # --log-level INFO
        raw = socket.create_connection(("127.0.0.1", s.tls_port), timeout=IO_TIMEOUT)
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n")
        closed_within(raw, 3.0)
        raw.close()
        self.wait_stats(s, r"tls-handshakes=0 tls-failed=1 tls-pending=0 tls-relayed=0$")
        self.assertNotIn("TLS connection", s.log())

    def test_tls_client_on_the_plaintext_port(self):
        s = self.tls_server("--log-level", "DEBUG")
        raw = socket.create_connection(("127.0.0.1", s.port), timeout=IO_TIMEOUT)
        with self.assertRaises((ssl.SSLError, OSError)):
            client_context().wrap_socket(raw, server_hostname="localhost")
        raw.close()
        s.wait_log(r"DEBUG .*disconnected before login \(not a chat client\)")
        # A ClientHello's bytes, with and without a \n in them: the plaintext
        # answer, then the close.
        hello = RawTls(s.tls_port)
        try:
            hello.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello.close()
        record = hello.outgoing.read()
        for data in (record, record.replace(b"\n", b""), b"\x16\x03\x01\x00\x05ab",
                     b"\x16\x03\x01\n"):
            c = self.client(s)
            c.sendraw(data)
            self.assertEqual(c.expect_closed(), ["ERR not-a-chat-client"])
        # After login such a line is nothing special.
        u = self.client(s, "u")
        u.sendraw(b"\x16\x03\x01\x00\x05ab\n")
        u.expect("ERR unknown-command")


# -- timeouts and limits over TLS ------------------------------------------------

class Limits(TlsCase):

    def test_handshake_timeout(self):
        s = self.tls_server("--tls-handshake-timeout", "0.5")
        silent = socket.create_connection(("127.0.0.1", s.tls_port), timeout=IO_TIMEOUT)
        self.addCleanup(silent.close)
        took = closed_within(silent, 3.0)
        self.assertGreater(took, 0.4)
        # A handshake that trickles in, a byte every 50 ms, is cut all the same.
        trickler = self.raw(s)
        try:
            trickler.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = trickler.outgoing.read()
        start = time.monotonic()
        with self.assertRaises(OSError):
            for i in range(len(hello)):
                trickler.sock.sendall(hello[i:i + 1])
                time.sleep(0.05)          # the trickle itself, not a wait for the server
                if time.monotonic() - start > 4:
                    break
        self.assertLess(time.monotonic() - start, 3.0)
        self.wait_stats(s, r"tls-failed=2 tls-pending=0 tls-relayed=0$")
        # One who completes in time is served.
        c = self.tls_client(s, "fast")
        c.send("PING")
        c.expect("PONG")

    def test_max_line_over_tls(self):
        s = self.tls_server("--max-line", "64")
        c = self.tls_client(s, "a")
        c.send("MSG " + "x" * 100, "PING")
        c.expect("ERR line-too-long", "PONG")

    def test_login_and_idle_timeouts_over_tls(self):
        s = self.tls_server("--login-timeout", "0.5", "--idle-timeout", "1")
        late = self.tls_client(s)
        late.send("PING")
        late.expect("PONG")
        self.assertEqual(late.expect_closed(), ["ERR login-timeout"])
        idle = self.tls_client(s, "idle")
        self.assertEqual(idle.expect_closed(3), ["ERR idle-timeout"])

    def test_flood_control_over_tls(self):
        s = self.tls_server("--rate", "200", "--burst", "20")
        c = self.tls_client(s, "f")
        start = time.monotonic()
        c.send(*["PING"] * 120)
        c.expect(*["PONG"] * 120)         # nothing lost, only later
        self.assertGreater(time.monotonic() - start, 0.4)

    def test_slow_consumer_over_tls(self):
        s = self.tls_server("--max-pending", "65536")
        sleeper = self.tls_client(s, "sleeper")
        talker = self.tls_client(s, "talker")
        line = "MSG " + "z" * 1000
        while True:                           # until the sleeper is cut
            talker.send(*[line] * 200)
            talker.send("PING")
            got = talker.lines_until("PONG")
            if "INFO sleeper disconnected" in got:
                break
        lines = sleeper.expect_closed(10)
        self.assertEqual(lines[-1], "ERR slow-consumer")
        self.assertTrue(all(l == "MSG talker " + "z" * 1000 for l in lines[:-1]))

    def test_per_address_cap_over_tls(self):
        s = self.tls_server("--max-per-ip", "2")
        a = self.tls_client(s, "a")
        self.client(s, "p")                   # plaintext and TLS count together
        raw = socket.create_connection(("127.0.0.1", s.tls_port), timeout=IO_TIMEOUT)
        self.addCleanup(raw.close)
        raw.sendall(b"\x16\x03\x01")
        # Refused without a word (a plaintext line would be garbage to it),
        # after the acceptor's wait for a close that does not come.
        self.assertLess(closed_within(raw, 5.0), 5.0)
        a.close()
        c = self.tls_client(s, "c")           # a's slot is free again
        c.send("PING")
        c.expect("PONG")


# -- the certificate: reload, and bad ones -------------------------------------

class Certificates(TlsCase):

    def test_sighup_reloads_the_certificate(self):
        d = tempfile.mkdtemp(dir=tmpdir())
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        shutil.copy(CERTS["a"][0], cert)
        shutil.copy(CERTS["a"][1], key)
        s = self.server("--tls-cert", cert, "--tls-key", key, "--tls-port", 0,
                        "--log-level", "DEBUG", workers=2)
        s.tls_port = int(s.wait_log(TLS_LISTENING).group(1))
        old = self.tls_client(s, "old")
        self.assertEqual(old.certificate(), der("a"))
        # certbot renews: new files in place, then SIGHUP.
        shutil.copy(CERTS["b"][0], cert)
        shutil.copy(CERTS["b"][1], key)
        start = len(s.log_lines)
        s.proc.send_signal(signal.SIGHUP)
        s.wait_log(r"main\[\d+\] TLS certificate reloaded: ", start=start)
        for k in range(2):
            s.wait_log(r"worker-%d\[\d+\] TLS certificate reloaded$" % k, start=start)
        for _ in range(4):                    # whichever worker takes it
            new = self.tls_client(s)
            self.assertEqual(new.certificate(), der("b"))
            new.close()
        new = self.tls_client(s, "new")
        new.send("MSG hello old")
        old.expect("MSG new hello old")       # the old connection carries on
        old.send("DM new hi")
        new.expect("DM old hi")
        # A renewal gone wrong (a key that does not match): the last good one stays.
        shutil.copy(CERTS["a"][1], key)
        start = len(s.log_lines)
        s.proc.send_signal(signal.SIGHUP)
        s.wait_log(r"ERROR .*TLS certificate not reloaded, the previous one stays: "
                   r".*does not match", start=start)
        s.wait_log(r"received SIGHUP: reloading the TLS certificate$", start=start)
        third = self.tls_client(s, "third")
        self.assertEqual(third.certificate(), der("b"))

    def test_rsa_certificate(self):
        s = self.tls_server(cert="rsa")
        c = self.tls_client(s, "r")
        self.assertEqual(c.certificate(), der("rsa"))
        self.assertIn(c.sock.version(), ("TLSv1.2", "TLSv1.3"))

    def test_tls_1_1_is_refused(self):
        s = self.tls_server()
        ctx = client_context()
        try:
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        except (ValueError, AttributeError):
            self.skipTest("this ssl module cannot offer TLS 1.1")
        with self.assertRaises((ssl.SSLError, OSError)):
            TlsClient(s.tls_port, ctx)

    def test_tls_only(self):
        certfile, keyfile = CERTS["a"]
        s = Server("--tls-cert", certfile, "--tls-key", keyfile, "--tls-port", 0,
                   "--tls-only", workers=1)
        i = s.args.index("--port")
        del s.args[i:i + 2]
        self.addCleanup(s.kill)
        s.start()
        m = s.wait_log(r"listening on [^ ]+:(\d+) \(TLS\)$")
        s.tls_port = int(m.group(1))
        self.assertNotIn(" and ", m.group(0))
        c = self.tls_client(s, "only")
        c.send("PING")
        c.expect("PONG")

    def bad(self, *args, expect):
        proc = subprocess.run([sys.executable, BROKER, "--host", "127.0.0.1", "--port", "0",
                               "--workers", "1"] + list(args), cwd=ROOT, timeout=30,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        err = proc.stderr.decode()
        self.assertEqual(proc.returncode, 2, err)
        errors = [line for line in err.splitlines() if line.startswith("broker.py: error")]
        self.assertEqual(len(errors), 1, err)
        self.assertRegex(errors[0], expect)
        self.assertNotIn("listening", err + proc.stdout.decode())
        self.assertNotIn("Traceback", err)

    def test_a_key_of_another_type_does_not_match(self):
        """An RSA key for an EC certificate, or the other way round, is a
        key that does not match, as a wrong key of the same type is."""
        for cert, key in ((CERTS["a"][0], CERTS["rsa"][1]), (CERTS["rsa"][0], CERTS["a"][1])):
            with self.subTest(cert=os.path.basename(cert), key=os.path.basename(key)):
                self.bad("--tls-cert", cert, "--tls-key", key,
                         expect=r"^broker\.py: error: --tls-key %s: the private key does not "
                                r"match the certificate in %s$" % (re.escape(key), re.escape(cert)))

    def test_bad_certificate_or_key_exit_2_before_listening(self):
        cert, key = CERTS["a"]
        missing = os.path.join(tmpdir(), "missing.pem")
        self.bad("--tls-cert", missing, "--tls-key", key, expect=r"missing\.pem: No such file")
        self.bad("--tls-cert", cert, "--tls-key", missing, expect=r"--tls-key .*No such file")
        self.bad("--tls-cert", key, "--tls-key", key, expect=r"no PEM certificate")
        self.bad("--tls-cert", cert, "--tls-key", cert, expect=r"no PEM private key")
        self.bad("--tls-cert", cert, expect=r"no PEM private key .*--tls-key")
        self.bad("--tls-cert", cert, "--tls-key", CERTS["b"][1], expect=r"does not match")
        self.bad("--tls-cert", cert, "--tls-key", CERTS["encrypted"][1], expect=r"encrypted")
        self.bad("--tls-key", key, expect=r"--tls-key needs --tls-cert")
        self.bad("--tls-only", expect=r"--tls-only needs --tls-cert")
        self.bad("--tls-cert", cert, "--tls-key", key, "--tls-only",
                 expect=r"--tls-only serves no plaintext port")
        self.bad("--tls-cert", cert, "--tls-key", key, "--port", "4555", "--tls-port", "4555",
                 expect=r"--tls-port 4555 is the plaintext port too")
        self.bad("--tls-cert", cert, "--tls-key", key, "--tls-handshake-timeout", "0",
                 expect=r"must be more than 0")
        if os.geteuid() != 0:                     # root reads anything
            unreadable = os.path.join(tmpdir(), "unreadable.key")
            shutil.copy(key, unreadable)
            os.chmod(unreadable, 0)
            self.bad("--tls-cert", cert, "--tls-key", unreadable, expect=r"Permission denied")

    def test_macos_acknowledged_handoffs_over_tls(self):
        """Hand-offs tagged plaintext or TLS, acknowledged the macOS way
        (see test_macos_handoff), a restart of the acceptor included."""
        d = tempfile.mkdtemp(dir=tmpdir())
        with open(os.path.join(d, "sitecustomize.py"), "w") as f:
            f.write("import multiprocessing.reduction\n"
                    "multiprocessing.reduction.ACKNOWLEDGE = True\n")
        s = self.tls_server(env={"PYTHONPATH": d})
        a, b = self.tls_client(s, "a"), self.client(s, "b")
        a.send("DM b x")
        b.expect("DM a x")
        old = s.roles()["chat-acceptor"]
        os.kill(old, signal.SIGKILL)
        s.replacement("chat-acceptor", old, 5.0)
        c = self.tls_client(s, "c")
        c.send("DM a y")
        a.expect("DM c y")


# -- the TLS path fuzzed ------------------------------------------------------------

class Fuzz(TlsCase):
    timeout = 120

    def test_records_cut_anywhere_carry_the_same_lines(self):
        """The client's last flight and its first lines, as one byte stream
        cut at every boundary (two sends each): the same answers always."""
        s = self.tls_server()
        probe = self.raw(s)
        sent = []
        probe.handshake(send=lambda data: (sent.append(data), probe.sock.sendall(data)))
        finished = sent[-1]
        records = probe.encrypt(b"LOGIN cut\n") + probe.encrypt(b"WHO\nPING\nQUIT\n")
        probe.sock.sendall(records)
        self.assertEqual(probe.read_until_eof(), b"OK\nUSER cut\nPONG\n")
        stream_len = len(finished) + len(records)
        for cut in range(1, stream_len):
            c = RawTls(s.tls_port)
            try:
                flights = []
                c.handshake(send=lambda data: flights.append(data) or
                            (c.sock.sendall(data) if len(flights) == 1 else None))
                stream = flights[-1] + c.encrypt(b"LOGIN cut%d\n" % cut) + c.encrypt(
                    b"WHO\nPING\nQUIT\n")
                c.sock.sendall(stream[:cut])
                c.sock.sendall(stream[cut:])
                got = c.read_until_eof()
            finally:
                c.close()
            self.assertEqual(got, b"OK\nUSER cut%d\nPONG\n" % cut, "cut at %d" % cut)

    def test_hostile_lines_over_tls_get_the_oracles_answers(self):
        """scripts/fuzz.py's anonymous streams, over TLS, the ciphertext cut at
        random: exactly the answers the sans-IO oracle predicts."""
        s = self.tls_server()
        for seed in range(1, 41):
            gen = fuzz.Gen(seed)
            data = gen.anon_stream(gen.rng.randint(1, 30))
            expected = fuzz.expected_anon_answers(data, fuzz.MAX_LINE)
            c = RawTls(s.tls_port)
            try:
                c.handshake(send=lambda flight: [c.sock.sendall(p) for p in gen.chunks(flight)])
                for record in gen.chunks(data):
                    for piece in gen.chunks(c.encrypt(record)):
                        c.sock.sendall(piece)
                try:
                    c.obj.unwrap()
                except ssl.SSLWantReadError:
                    pass
                c.sock.sendall(c.outgoing.read())     # close_notify: a half-close
                got = c.read_until_eof()
            except (BrokenPipeError, ConnectionResetError):
                # Closed while we were still sending (a QUIT, a hang-up): the
                # reset may take the last answers with it, never change them.
                try:
                    c.read_until_eof()
                except OSError:
                    pass
                self.assertTrue(expected.startswith(c.plain), "seed %d: %r" % (seed, c.plain))
                continue
            finally:
                c.close()
            self.assertEqual(got, expected, "seed %d" % seed)
        c = self.tls_client(s, "still")
        c.send("PING")
        c.expect("PONG")


# -- the sans-IO module, in one process ---------------------------------------------

class Module(TestCase):
    """chatlib.tls over a socket pair, the test playing the worker's loop: each
    piece the client sends is read by the server on its own."""

    def setUp(self):
        super().setUp()
        config = types.SimpleNamespace(tls_cert=CERTS["a"][0], tls_key=CERTS["a"][1],
                                       tls_handshake_timeout=10.0)
        self.sel = selectors.DefaultSelector()
        self.addCleanup(self.sel.close)
        self.ready, self.failed = [], []
        self.server = tls.TlsServer(config, self.sel, lambda hs, st: self.ready.append(st),
                                    self.failed.append)

    def pump(self):
        for key, mask in self.sel.select(0):
            key.data(mask)

    def connect(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        theirs.setblocking(False)
        self.server.accept(ours, "test", time.monotonic())
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context("a").wrap_bio(incoming, outgoing, server_hostname="localhost")
        return theirs, client, incoming, outgoing

    def take(self, sock, incoming):
        """What the server sent, into the client's BIO (its end, at the end)."""
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return
        if data:
            incoming.write(data)
        else:
            incoming.write_eof()

    def plaintext(self, sock, client, incoming):
        """What the server sent that the client can decrypt now; EOFError at
        the end."""
        self.take(sock, incoming)
        data = b""
        try:
            while True:
                chunk = client.read(1 << 20)
                if not chunk:
                    break
                data += chunk
            if not data:
                raise EOFError
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            if not data:
                raise EOFError
        return data

    def handshake(self, sock, client, incoming, outgoing, cut=None):
        """Both sides' handshake; the client's flights cut at ``cut`` (a
        function of the flight's number and bytes, giving the pieces)."""
        n = 0
        while True:
            try:
                client.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            flight = outgoing.read()
            for piece in (cut(n, flight) if cut else [flight]):
                sock.send(piece)
                self.pump()
            n += 1
            self.take(sock, incoming)
            if done:
                return

    def test_every_cut_of_the_client_hello(self):
        sock, client, incoming, outgoing = self.connect()
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello_len = len(outgoing.read())
        for cut in range(1, hello_len):
            conn = self.connect()
            self.handshake(*conn, cut=lambda n, f: [f[:cut], f[cut:]] if n == 0 else [f])
            self.assertEqual(len(self.ready), cut, "cut at %d" % cut)
        self.assertEqual(self.failed, [])
        self.assertEqual(self.server.figures()["tls_handshakes"], hello_len - 1)

    def test_records_byte_by_byte_and_every_cut(self):
        sock, client, incoming, outgoing = self.connect()
        self.handshake(sock, client, incoming, outgoing,
                       cut=lambda n, f: [f[i:i + 1] for i in range(len(f))])
        stream = self.ready[-1]
        client.write(b"LOGIN a\nMSG " + b"m" * 20000 + b"\n")      # two records
        client.write(b"PING\n")
        data = outgoing.read()
        got = b""
        for i in range(len(data)):                  # byte by byte
            sock.send(data[i:i + 1])
            try:
                got += stream.recv(65536)
            except BlockingIOError:
                pass
        self.assertEqual(got, b"LOGIN a\nMSG " + b"m" * 20000 + b"\nPING\n")
        for cut in range(1, 200):                   # every cut of the start of a stream
            client.write(b"PING %d\n" % cut)
            data = outgoing.read()
            got = b""
            for piece in (data[:cut], data[cut:]):
                sock.send(piece)
                try:
                    got += stream.recv(65536)
                except BlockingIOError:
                    pass
            self.assertEqual(got, b"PING %d\n" % cut)

    def test_write_path_one_encryption_per_call_and_backlog(self):
        sock, client, incoming, outgoing = self.connect()
        self.handshake(sock, client, incoming, outgoing)
        stream = self.ready[-1]
        self.take(sock, incoming)                  # the session tickets
        # Fill the socket: what the kernel does not take waits, covering the
        # plaintext it was made of, which the worker keeps meanwhile.
        out = [b"line %d\n" % i for i in range(20000)] * 10
        total = sum(map(len, out))
        done = stream.sendmsg(out)
        self.assertEqual(done, 0)                  # all encrypted, not all in the kernel
        self.assertEqual(stream.covered, total)
        self.assertEqual(stream.sendmsg(out + [b"more\n"]), 0)   # still waiting
        received = b""
        while True:
            received += self.plaintext(sock, client, incoming)
            done = stream.sendmsg(out + [b"more\n"])
            if done:
                break
        self.assertEqual(done, total + len(b"more\n"))   # the rest went at once
        self.assertEqual(stream.covered, 0)
        while len(received) < total + 5:
            received += self.plaintext(sock, client, incoming)
        self.assertEqual(received, b"".join(out) + b"more\n")

    def test_cut_keeps_the_records_in_flight_then_the_last_line(self):
        sock, client, incoming, outgoing = self.connect()
        self.handshake(sock, client, incoming, outgoing)
        stream = self.ready[-1]
        out = [b"x" * 1000 + b"\n"] * 10000
        self.assertEqual(stream.sendmsg(out), 0)
        self.assertFalse(stream.cut(b"".join(out) + b"ERR slow-consumer\n",
                                    b"ERR slow-consumer\n"))
        self.assertEqual(stream.covered, len(b"ERR slow-consumer\n"))
        received = b""
        while stream.sendmsg([b"ERR slow-consumer\n"]) == 0:
            received += self.plaintext(sock, client, incoming)
        stream.close()
        while True:
            try:
                received += self.plaintext(sock, client, incoming)
            except EOFError:
                break
        self.assertTrue(received.endswith(b"\nERR slow-consumer\n"))
        self.assertEqual(received[:-len(b"ERR slow-consumer\n")], b"".join(out))

    def test_close_notify_after_data_is_a_half_close(self):
        sock, client, incoming, outgoing = self.connect()
        self.handshake(sock, client, incoming, outgoing)
        stream = self.ready[-1]
        client.write(b"QUIT\n")
        try:
            client.unwrap()
        except ssl.SSLWantReadError:
            pass
        sock.send(outgoing.read())
        self.assertEqual(stream.recv(65536), b"QUIT\n")
        self.assertEqual(stream.recv(65536), b"")
        self.assertEqual(stream.sendmsg([b"bye\n"]), 4)    # the answers still go
        stream.close()
        self.take(sock, incoming)
        self.assertEqual(client.read(100), b"bye\n")

    def test_garbage_and_timeout_fail_and_are_counted(self):
        sock, *_ = self.connect()
        sock.send(b"hello there\n")
        self.pump()
        self.assertEqual(len(self.failed), 1)
        self.connect()
        self.server.sweep(time.monotonic() + 11)
        self.assertEqual(len(self.failed), 2)
        self.assertEqual(self.server.figures(),
                         {"tls_handshakes": 0, "tls_failed": 2, "tls_pending": 0})

    def test_load_problems(self):
        cert, key = CERTS["a"]
        self.assertIsNone(tls.load_problem(cert, key)[1])
        self.assertIn("does not match", tls.load_problem(cert, CERTS["b"][1])[1])
        self.assertIn("does not match", tls.load_problem(cert, CERTS["rsa"][1])[1])
        self.assertIn("encrypted", tls.load_problem(*CERTS["encrypted"])[1])
        self.assertRegex(tls.fingerprint(cert), r"^([0-9A-F]{2}:){7}[0-9A-F]{2}\.\.\.$")


if __name__ == "__main__":
    unittest.main()
