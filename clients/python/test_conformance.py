"""The language-neutral conformance suite (test/conformance/*.json, format in its
README.md) run against this SDK, with Aeterna played by a scripted peer on a real
unix socket. Run from the repo root:  python3 -m unittest -v clients/python/test_conformance.py
"""

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE = os.path.join(HERE, "..", "..", "test", "conformance")
sys.path.insert(0, HERE)

import aeterna_client as aeterna  # noqa: E402
from test_aeterna_client import Fake, make_memfd  # noqa: E402  (the scripted peer's wire helpers)


# The optional capabilities this SDK declares in its hello (README.md, "Optional capabilities"): it runs every case.
CAPABILITIES = {"trailer", "checkpoint", "direct", "crc32"}


def unsupported(v):
    missing = [r for r in v.get("requires", []) if r not in CAPABILITIES]
    return "this SDK does not declare %s" % ", ".join(missing) if missing else None


def suite(name):
    with open(os.path.join(SUITE, name)) as f:
        return json.load(f)


def to_bytes(parts):
    """A vector's "bytes": hex, raw text, or a whole frame (length header + UTF-8 text)."""
    out = b""
    for p in parts:
        if "hex" in p:
            out += bytes.fromhex(p["hex"])
        elif "text" in p:
            out += p["text"].encode()
        else:
            body = p["frame"].encode()
            out += struct.pack(">I", len(body)) + body
    return out


def matches(expected, actual):
    """Every expected field is in actual; {"prefix": s} matches a string starting with s."""
    for key, want in expected.items():
        got = actual.get(key, matches)  # a sentinel no JSON value equals
        if isinstance(want, dict) and set(want) == {"prefix"}:
            if not (isinstance(got, str) and got.startswith(want["prefix"])):
                return False
        elif got != want:
            return False
    return True


class FramesTest(unittest.TestCase):
    def test_decode(self):
        for v in suite("frames.json")["decode"]:
            with self.subTest(v["name"]):
                if unsupported(v):
                    self.skipTest(unsupported(v))
                peer, mine = socket.socketpair()
                client = aeterna.StateClient(mine, max_frame=v.get("max_frame", aeterna.DEFAULT_MAX_FRAME))
                peer.sendall(to_bytes(v["bytes"]))
                peer.close()
                try:
                    msg, fds = client._recv_control()
                    self.assertNotIn("error", v, "decoded %r" % msg)
                    self.assertTrue(matches(v["message"], msg), msg)
                except aeterna._ProtocolError as e:
                    self.assertEqual(v.get("error"), e.code, str(e))
                finally:
                    client.close()

    def test_encode(self):
        for v in suite("frames.json")["encode"]:
            with self.subTest(v["name"]):
                peer, mine = socket.socketpair()
                client = aeterna.StateClient(mine)
                client._send_control(v["message"])
                client.close()
                want = to_bytes(v["bytes"])
                self.assertEqual(peer.recv(len(want) + 1), want)
                peer.close()


class App:
    """What the app under test does, from a case's "app"."""

    def __init__(self, spec):
        self.spec = spec
        self.later = []

    def dump(self, final):
        d = self.spec.get("dump", {"none": True})
        if "throws" in d:
            raise RuntimeError("the app cannot dump")
        if "json" in d:
            return d["json"]
        if "text" in d:
            return d["text"]
        return None

    def on_load(self, state):
        if self.spec.get("on_load") == "throws":
            raise ValueError("the app cannot apply it")
        self.later.append(describe(state))

    def apply(self, state):
        if self.spec.get("apply") == "throws":
            raise ValueError("the app cannot use it")


def describe(state):
    return None if state is None else {"encoding": state.encoding, "text": state.text(), "final": state.final}


class ExchangesTest(unittest.TestCase):
    def test_exchanges(self):
        for case in suite("exchanges.json")["cases"]:
            with self.subTest(case["name"]):
                if unsupported(case):
                    self.skipTest(unsupported(case))
                self.run_case(case)

    def run_case(self, case):
        fake = Fake()
        self.addCleanup(fake.close)

        def script(f):
            pair = None  # our end of a direct socket pair the client was given
            for step in case["steps"]:
                if "client_sends" in step:
                    msg = f.recv_json()
                    f.events.append(msg)
                    assert matches(step["client_sends"], msg), "expected %r, got %r" % (step["client_sends"], msg)
                elif "client_sends_data" in step:
                    want = step["client_sends_data"].encode()
                    got = b""
                    while len(got) < len(want):
                        body, fds = f.recv_frame()
                        assert not fds
                        got += body
                    assert got == want, got
                elif "client_sends_direct" in step:
                    assert pair is not None, 'client_sends_direct needs a peer_sends with "pair" before it'
                    pair.settimeout(10)
                    got = b""
                    while True:
                        piece = pair.recv(65536)
                        if not piece:
                            break
                        got += piece
                    pair.close()
                    pair = None
                    assert got == step["client_sends_direct"].encode(), got
                elif "client_closes" in step:
                    f.conn.settimeout(10)
                    try:
                        rest = f.conn.recv(1)
                    except ConnectionResetError:
                        rest = b""  # it closed with our bytes unread (the rest of a frame it refused): closed all the same
                    assert rest == b"", "the client should have closed"
                elif "peer_sends" in step:
                    fds = []
                    if "memfd" in step:
                        m = step["memfd"]
                        fds = [make_memfd(m["text"].encode(), seal=m["sealed"])]
                    if "pair" in step:
                        mine, theirs = socket.socketpair()
                        fds.append(theirs.detach())  # sent, then closed below like the memfd
                        if "text" in step["pair"]:
                            mine.sendall(step["pair"]["text"].encode())
                            mine.close()  # the client's end of file
                        else:
                            pair = mine
                    f.send(step["peer_sends"], fds=fds)
                    for fd in fds:
                        os.close(fd)
                    for part in step.get("data", []):
                        f.send(part.encode())

        def run(f):
            f.conn, _ = f.srv.accept()
            f.conn.settimeout(10)
            script(f)

        fake.run(run)
        app = App(case.get("app", {}))
        expect = case["expect"]
        try:
            client = aeterna.connect(fake.path, timeout=10)
        except aeterna.RelayError as e:
            self.assertEqual(expect.get("connect", {}).get("error"), e.code, str(e))
            fake.join()
            return
        self.assertNotIn("connect", expect)
        client.on_dump(app.dump)
        if "on_load" in app.spec:
            client.on_load(app.on_load)
        want = expect["load"]
        try:
            state = client.load(apply=app.apply)
            if "load_source" in expect:
                self.assertEqual(state.source, expect["load_source"])
            self.assertEqual(describe(state), want.get("state", "an error"))
        except aeterna.RelayError as e:
            self.assertEqual(want.get("error"), e.code, str(e))
        except ValueError:
            self.assertTrue(want.get("app_error"), "the app's error")
        if app.spec.get("ready"):
            client.ready()
        if "checkpoint" in app.spec:
            try:
                stored = {"seq": client.checkpoint(app.spec["checkpoint"]["json"], timeout=10)}
            except aeterna.RelayError as e:
                stored = {"error": e.code}
            self.assertEqual(stored, expect["checkpoint"])
        fake.join()
        self.assertEqual(app.later, expect.get("later_loads", []))
        client.close()


class ListenersTest(unittest.TestCase):
    CHILD = r"""
import json, os, socket, sys
sys.path.insert(0, sys.argv[1])
import aeterna_client as aeterna
case = json.loads(sys.argv[2])
keep = []
for i, kind in enumerate(case["fds"]):
    obj = socket.socket() if kind == "socket" else open(os.devnull, "rb")
    keep.append(obj)
    os.dup2(obj.fileno(), 3 + i)  # inheritable, as a process receives it
for k, v in case["env"].items():
    os.environ[k] = v.replace("$PID", str(os.getpid()))
found = aeterna.listeners()
print(json.dumps({"listeners": {n: s.fileno() for n, s in found.items()},
                  "cloexec": all(not os.get_inheritable(s.fileno()) for s in found.values())}))
"""

    def test_listeners(self):
        for case in suite("listeners.json")["cases"]:
            with self.subTest(case["name"]):
                env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
                out = subprocess.run([sys.executable, "-c", self.CHILD, HERE, json.dumps(case)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True, timeout=30)
                got = json.loads(out.stdout)
                self.assertEqual(got["listeners"], case["expect"])
                self.assertTrue(got["cloexec"], "listeners are close-on-exec")


if __name__ == "__main__":
    unittest.main()
