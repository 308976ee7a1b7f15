"""Unit tests of aeterna_client against a fake Aeterna that speaks docs/srp.md.

Run from the repo root:  python3 -m unittest -v clients/python/test_aeterna_client.py
(stdlib unittest only).
"""

import array
import fcntl
import hashlib
import http.server
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import aeterna_client as aeterna  # noqa: E402

SEALS = aeterna.F_SEAL_WRITE | aeterna.F_SEAL_SHRINK | aeterna.F_SEAL_GROW


def sha(b):
    return hashlib.sha256(b).hexdigest()


def make_memfd(data, seal=True):
    fd = os.memfd_create("fake", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seal:
        fcntl.fcntl(fd, aeterna.F_ADD_SEALS, SEALS)
    return fd


class Fake:
    """One side of the relay, as Aeterna: a listening unix socket in a temp dir; the
    scenario runs in a thread (fake.run(script)); fake.join() re-raises its failures."""

    def __init__(self, max_frame=16 * 1024 * 1024, generation=2):
        self.dir = tempfile.mkdtemp(prefix="aeterna-py-")
        self.path = os.path.join(self.dir, "state.sock")
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(4)
        self.srv.settimeout(10)
        self.max_frame = max_frame
        self.generation = generation
        self.conn = None
        self.error = None
        self.thread = None
        self.events = []  # what the scenario saw, for the test to assert on

    # -- wire
    def send_raw(self, data, fds=None, bytewise=False):
        if bytewise:
            for i in range(len(data)):
                if i == 0 and fds:
                    self.conn.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
                else:
                    self.conn.sendall(data[i:i + 1])
                if i % 7 == 0:
                    time.sleep(0.0005)
            return
        if fds:
            self.conn.sendmsg([data[:4]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
            self.conn.sendall(data[4:])
        else:
            self.conn.sendall(data)

    def send(self, msg, fds=None, bytewise=False):
        body = msg if isinstance(msg, (bytes, bytearray)) else json.dumps(msg).encode()
        self.send_raw(struct.pack(">I", len(body)) + body, fds, bytewise)

    def _recv_exact(self, n, fds):
        buf = b""
        while len(buf) < n:
            data, anc, flags, _ = self.conn.recvmsg(n - len(buf), socket.CMSG_SPACE(253 * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds.extend(a)
            if not data:
                raise EOFError("client closed")
            buf += data
        return buf

    def recv_frame(self):
        """(raw body, fds)."""
        fds = []
        (n,) = struct.unpack(">I", self._recv_exact(4, fds))
        assert n > 0
        late = []
        body = self._recv_exact(n, late)
        assert not late, "fds must ride on the frame's header (docs/srp.md), they came with its body"
        return body, fds

    def recv(self):
        body, fds = self.recv_frame()
        return json.loads(body), fds

    def recv_json(self):
        msg, fds = self.recv()
        assert not fds, "unexpected fds on %r" % msg
        return msg

    def recv_state(self):
        """A state frame and its data: (msg, data bytes, fds, number of data frames)."""
        msg, fds = self.recv()
        assert msg["op"] == "state", msg
        data = b""
        frames = 0
        while len(data) < msg["size"] and msg.get("transport", "stream") == "stream":
            chunk, extra = self.recv_frame()
            assert not extra
            assert len(chunk) <= self.max_frame
            data += chunk
            frames += 1
        return msg, data, fds, frames

    def send_load(self, data, encoding="json", bytewise=False, **extra):
        msg = {"op": "load", "encoding": encoding, "size": len(data), "sha256": sha(data)}
        msg.update(extra)
        self.send(msg, bytewise=bytewise)
        for off in range(0, len(data), 5):
            self.send(data[off:off + 5], bytewise=bytewise)

    def handshake(self, load=None, expect_ack=True):
        self.conn, _ = self.srv.accept()
        self.conn.settimeout(10)
        body, _ = self.recv_frame()
        self.events.append(("hello", struct.pack(">I", len(body)) + body))
        self.send({"op": "welcome", "v": 1, "generation": self.generation, "max_frame": self.max_frame})
        if load is None:
            self.send({"op": "load", "size": 0})
        else:
            load()
        if expect_ack:
            ack = self.recv_json()
            self.events.append(("ack", ack))
            return ack

    # -- scenario thread
    def run(self, script):
        def target():
            try:
                script(self)
            except BaseException as e:  # reported by join()
                self.error = e
        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        return self

    def join(self, timeout=15):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("the fake Aeterna's scenario did not finish")
        if self.error is not None:
            raise self.error

    def close(self):
        for s in (self.conn, self.srv):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        try:
            os.unlink(self.path)
            os.rmdir(self.dir)
        except OSError:
            pass


class RelayTest(unittest.TestCase):
    def fake(self, **kw):
        f = Fake(**kw)
        self.addCleanup(f.close)
        return f

    def client(self, fake, **kw):
        c = aeterna.connect(fake.path, **kw)
        self.addCleanup(c.close)
        return c

    def test_handshake_bytes_and_empty_load(self):
        f = self.fake(generation=7)

        def script(f):
            f.handshake()
            f.events.append(("ready", f.recv_json()))
            f.conn.close()  # end of file: no final dump will be asked

        f.run(script)
        c = self.client(f)
        self.assertTrue(c.enabled)
        self.assertEqual(c.generation, 7)
        self.assertIsNone(c.load())
        c.ready()
        t0 = time.monotonic()
        self.assertFalse(c.shutdown(timeout=10))
        self.assertLess(time.monotonic() - t0, 5, "shutdown returns at end of file, not at its timeout")
        f.join()
        hello = b'{"op":"hello","v":1,"trailer":true,"direct":true,"checksums":["crc32","sha256"],"handoff":true}'
        self.assertEqual(f.events[0], ("hello", len(hello).to_bytes(4, "big") + hello))
        self.assertEqual(f.events[1], ("ack", {"op": "ack", "ok": True}))
        self.assertEqual(f.events[2], ("ready", {"op": "ready"}))

    def test_json_load_is_verified_and_acked(self):
        f = self.fake()
        data = b'{"sessions":[42]}'
        f.run(lambda f: f.handshake(load=lambda: f.send_load(data)))
        c = self.client(f)
        s = c.load()
        f.join()
        self.assertEqual(f.events[-1], ("ack", {"op": "ack", "ok": True}))
        self.assertEqual(s.encoding, "json")
        self.assertEqual(s.json(), {"sessions": [42]})
        self.assertEqual(s.transport, "stream")
        self.assertFalse(s.final)
        with self.assertRaises(aeterna.UsageError) as cm:
            c.load()  # the initial load comes once (docs/srp.md, "The app contract")
        self.assertEqual(cm.exception.code, "usage")

    def test_wrong_sha256_is_refused_naming_the_mismatch(self):
        f = self.fake()
        data = b'{"a":1}'

        def load():
            f.send({"op": "load", "encoding": "json", "size": len(data), "sha256": sha(b"other")})
            f.send(data)

        f.run(lambda f: f.handshake(load=load))
        c = self.client(f)
        with self.assertRaises(aeterna.RelayError) as cm:
            c.load()
        f.join()
        self.assertEqual(cm.exception.code, "checksum_mismatch")
        ack = f.events[-1][1]
        self.assertIs(ack["ok"], False)
        self.assertTrue(ack["error"].startswith("checksum_mismatch: "), ack)
        self.assertIn(sha(b"other"), ack["error"])

    def test_apply_that_raises_nacks_and_propagates(self):
        f = self.fake()
        f.run(lambda f: f.handshake(load=lambda: f.send_load(b'{"v":2}')))
        c = self.client(f)

        def apply(state):
            raise ValueError("schema v2 not supported")

        with self.assertRaises(ValueError):
            c.load(apply=apply)
        f.join()
        self.assertEqual(f.events[-1][1], {"op": "ack", "ok": False, "error": "load_failed: ValueError: schema v2 not supported"})

    def test_memfd_load(self):
        f = self.fake()
        data = os.urandom(300000)

        def load():
            fd = make_memfd(data)
            f.send({"op": "load", "encoding": "raw", "size": len(data), "sha256": sha(data), "transport": "memfd", "fds": ["state"]}, fds=[fd])
            os.close(fd)

        f.run(lambda f: f.handshake(load=load))
        c = self.client(f)
        s = c.load()
        f.join()
        self.assertEqual(f.events[-1][1], {"op": "ack", "ok": True})
        self.assertEqual(s.transport, "memfd")
        self.assertEqual(s.size, len(data))
        self.assertEqual(bytes(s.data), data)
        self.assertEqual(s.fds, {}, "the memfd is the data, not one of the app's fds")
        s.close()

    def test_memfd_load_unsealed_or_wrong_size_or_wrong_sha_is_refused(self):
        data = b"x" * 1000
        cases = [
            (make_memfd, dict(seal=False), {}, "bad_state: the memfd is not sealed"),
            (make_memfd, {}, {"size": 999}, "bad_state: the memfd holds 1000 bytes, 999 announced"),
            (make_memfd, {}, {"sha256": sha(b"y")}, "checksum_mismatch: "),
        ]
        for mk, mkargs, override, needle in cases:
            with self.subTest(needle=needle):
                f = self.fake()

                def load():
                    fd = mk(data, **mkargs)
                    msg = {"op": "load", "encoding": "raw", "size": len(data), "transport": "memfd", "fds": ["state"]}
                    msg.update(override)
                    f.send(msg, fds=[fd])
                    os.close(fd)

                f.run(lambda f: f.handshake(load=load))
                c = self.client(f)
                with self.assertRaises(aeterna.RelayError):
                    c.load()
                f.join()
                ack = f.events[-1][1]
                self.assertIs(ack["ok"], False)
                self.assertIn(needle, ack["error"])

    def test_dump_streams_data_frames_byte_exact(self):
        f = self.fake(max_frame=4096)
        payload = os.urandom(20000)

        def script(f):
            f.handshake()
            f.send({"op": "dump", "final": False})
            msg, data, fds, frames = f.recv_state()
            f.events.append(("state", msg, data, fds, frames))
            f.send({"op": "ack", "ok": True})
            f.send({"op": "dump", "final": False})
            f.events.append(("state2", f.recv_state()))
            f.send({"op": "ack", "ok": False, "error": "nope"})
            f.conn.close()

        called = []
        f.run(script)
        c = self.client(f)
        c.on_dump(lambda final: called.append((final, threading.current_thread().name)) or (payload if len(called) == 1 else {"k": [1, 2]}))
        c.load()
        f.join()
        _, msg, data, fds, frames = f.events[2]
        self.assertEqual(msg, {"op": "state", "encoding": "binary", "size": 20000, "sha256": sha(payload)})
        self.assertEqual(data, payload)
        self.assertEqual(fds, [])
        self.assertGreaterEqual(frames, 5, "cut into frames no larger than max_frame")
        msg2, data2, _, _ = f.events[3][1]
        self.assertEqual(msg2["encoding"], "json")
        self.assertEqual(json.loads(data2), {"k": [1, 2]})
        self.assertEqual([x[0] for x in called], [False, False])
        self.assertNotEqual(called[0][1], threading.current_thread().name, "a non-final dump is answered by the relay thread")
        deadline = time.monotonic() + 5
        while (c.last_ack or {}).get("ok") is not False and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(c.last_ack, {"op": "ack", "ok": False, "error": "nope"})

    def test_dump_without_callback_or_with_none_is_size_0_and_raising_declines(self):
        f = self.fake()

        def script(f):
            f.handshake()
            f.send({"op": "dump", "final": False})
            f.events.append(f.recv_json())
            f.send({"op": "dump", "final": False})
            f.events.append(f.recv_json())

        f.run(script)
        c = self.client(f)
        calls = []

        def cb(final):
            calls.append(final)
            if len(calls) == 2:
                raise RuntimeError("busy")
            return None

        c.on_dump(cb)
        c.load()
        f.join()
        self.assertEqual(f.events[2], {"op": "state", "size": 0})
        self.assertEqual(f.events[3], {"op": "ack", "ok": False, "error": "dump_failed: RuntimeError: busy"})

    def test_dump_answered_with_a_sealed_memfd(self):
        f = self.fake()
        payload = os.urandom(100000)

        def script(f):
            f.handshake()
            f.send({"op": "dump", "final": False})
            msg, fds = f.recv()
            f.events.append((msg, fds))
            fd = fds[0]
            f.events.append((fcntl.fcntl(fd, aeterna.F_GET_SEALS), os.fstat(fd).st_size, os.pread(fd, len(payload) + 10, 0)))
            os.close(fd)

        f.run(script)
        c = self.client(f)
        c.on_dump(lambda final: aeterna.DumpResult(encoding="pickle", memfd=aeterna.memfd_state(payload)))
        c.load()
        f.join()
        msg, fds = f.events[2]
        self.assertEqual(len(fds), 1)
        self.assertEqual(msg, {"op": "state", "encoding": "pickle", "size": len(payload), "transport": "memfd", "fds": ["state"]})
        seals, size, content = f.events[3]
        self.assertEqual(seals & SEALS, SEALS)
        self.assertEqual(size, len(payload))
        self.assertEqual(content, payload)

    def test_live_connection_fds_both_ways(self):
        f = self.fake()
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        x, y = socket.socketpair()
        self.addCleanup(y.close)

        def script(f):
            def load():
                data = b'{"conns":["conn:9"]}'
                f.send({"op": "load", "encoding": "json", "size": len(data), "sha256": sha(data), "fds": ["conn:9"]}, fds=[x.fileno()])
                f.send(data)
                x.close()
            f.handshake(load=load)
            f.send({"op": "dump", "final": False})
            msg, data, fds, _ = f.recv_state()
            f.events.append((msg, data, len(fds)))
            with socket.socket(fileno=fds[0]) as conn:
                conn.sendall(b"ping from the new generation")

        f.run(script)
        c = self.client(f)
        c.on_dump(lambda final: aeterna.DumpResult(encoding="json", data={"conns": ["conn:1"]}, fds={"conn:1": a.fileno()}))
        s = c.load()
        self.assertEqual(list(s.fds), ["conn:9"])
        with socket.socket(fileno=s.fds["conn:9"]) as conn:
            conn.sendall(b"hi")
            self.assertEqual(y.recv(10), b"hi")
        f.join()
        msg, data, nfds = f.events[2]
        self.assertEqual(msg["fds"], ["conn:1"])
        self.assertEqual(nfds, 1)
        self.assertEqual(json.loads(data), {"conns": ["conn:1"]})
        b.settimeout(5)
        self.assertEqual(b.recv(100), b"ping from the new generation")

    def test_frames_split_across_reads_byte_by_byte(self):
        f = self.fake()
        data = json.dumps({"k": "v" * 300}).encode()
        x, y = socket.socketpair()
        self.addCleanup(y.close)

        def load():
            f.send({"op": "load", "encoding": "json", "size": len(data), "sha256": sha(data), "fds": ["conn:1"]}, fds=[x.fileno()], bytewise=True)
            x.close()
            for off in range(0, len(data), 100):
                f.send(data[off:off + 100], bytewise=True)

        def script(f):
            f.conn, _ = f.srv.accept()
            f.conn.settimeout(10)
            f.recv_json()
            f.send({"op": "welcome", "v": 1, "generation": 3, "max_frame": f.max_frame}, bytewise=True)
            load()
            f.events.append(f.recv_json())

        f.run(script)
        c = self.client(f)
        s = c.load()
        f.join()
        self.assertEqual(c.generation, 3)
        self.assertEqual(f.events[0], {"op": "ack", "ok": True})
        self.assertEqual(s.json(), {"k": "v" * 300})
        with socket.socket(fileno=s.fds["conn:1"]) as conn:
            conn.sendall(b"ok")
        self.assertEqual(y.recv(2), b"ok")

    def test_a_frame_above_max_frame_is_refused_before_allocating(self):
        f = self.fake(max_frame=1024)

        def script(f):
            f.conn, _ = f.srv.accept()
            f.conn.settimeout(10)
            f.recv_json()
            f.send({"op": "welcome", "v": 1, "generation": 2, "max_frame": 1024})
            f.send_raw(struct.pack(">I", 512 * 1024 * 1024))  # a 512 MiB frame, header only
            f.events.append(f.recv_json())

        f.run(script)
        c = self.client(f)
        tracemalloc.start()
        try:
            with self.assertRaises(aeterna.RelayError) as cm:
                c.load()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        f.join()
        self.assertEqual(cm.exception.code, "too_large")
        self.assertLess(peak, 1024 * 1024, "nothing the size of the frame was allocated")
        self.assertEqual(f.events[0]["op"], "error")
        self.assertEqual(f.events[0]["code"], "too_large")

    def test_more_data_than_announced_and_fd_count_mismatch_are_bad_frame(self):
        def over():
            f.send({"op": "load", "encoding": "json", "size": 3, "sha256": sha(b"abc")})
            f.send(b"abcd")

        def fds_mismatch():
            x, y = socket.socketpair()
            f.send({"op": "load", "encoding": "json", "size": 2, "sha256": sha(b"{}"), "fds": ["conn:1", "conn:2"]}, fds=[x.fileno()])
            f.send(b"{}")
            x.close()
            y.close()

        def fds_unannounced():
            x, y = socket.socketpair()
            f.send({"op": "load", "size": 0}, fds=[x.fileno()])
            x.close()
            y.close()

        def tolerant(case):
            def load():
                try:
                    case()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up at the header, as it should
            return load

        for case in (over, fds_mismatch, fds_unannounced):
            with self.subTest(case=case.__name__):
                f = self.fake()
                f.run(lambda f: f.handshake(load=tolerant(case)))
                c = self.client(f)
                with self.assertRaises(aeterna.RelayError) as cm:
                    c.load()
                f.join()
                self.assertEqual(cm.exception.code, "bad_frame")
                self.assertEqual(f.events[-1][1]["op"], "error")
                self.assertEqual(f.events[-1][1]["code"], "bad_frame")

    def test_handshake_refused(self):
        f = self.fake()

        def script(f):
            f.conn, _ = f.srv.accept()
            f.recv_json()
            f.send({"op": "error", "code": "forbidden", "message": "pid 1234 is not a process of a generation"})

        f.run(script)
        with self.assertRaises(aeterna.RelayError) as cm:
            aeterna.connect(f.path)
        f.join()
        self.assertEqual(cm.exception.code, "forbidden")

    def test_final_sync_old_side_shutdown_answers_the_pending_final_dump(self):
        for dump_first in (True, False):
            with self.subTest(dump_first=dump_first):
                f = self.fake()
                go = threading.Event()

                def script(f):
                    f.handshake()
                    f.recv_json()  # ready
                    if not dump_first:
                        go.wait(5)
                        time.sleep(0.2)  # shutdown() is already waiting
                    f.send({"op": "dump", "final": True})
                    msg, data, _, _ = f.recv_state()
                    f.events.append((msg, data))
                    f.send({"op": "ack", "ok": True})
                    time.sleep(0.1)
                    f.conn.close()

                f.run(script)
                c = self.client(f)
                sessions = {"s1": ["a"]}
                calls = []
                c.on_dump(lambda final: calls.append((final, threading.current_thread() is threading.main_thread())) or sessions)
                c.load()
                c.ready()
                if dump_first:
                    deadline = time.monotonic() + 5
                    while not c._final_pending and time.monotonic() < deadline:
                        time.sleep(0.01)
                    self.assertEqual(calls, [], "a final dump waits for shutdown()")
                sessions["s1"].append("b")  # changed while draining: included
                go.set()
                self.assertTrue(c.shutdown(timeout=10))
                f.join()
                self.assertEqual(calls, [(True, True)], "the final dump is answered by shutdown() in the caller's thread")
                self.assertEqual(json.loads(f.events[-1][1]), {"s1": ["a", "b"]})

    def test_final_sync_longer_than_shutdown_timeout_waits_as_long_as_aeterna_said(self):
        # A large final state takes longer to hand over than shutdown()'s timeout: the wait after the
        # final dump comes from Aeterna (the dump's timeout_ms, its state_handoff.timeout), not from
        # that default. Without timeout_ms (an older Aeterna) the timeout still bounds it all.
        payload = os.urandom(4 * 1024 * 1024)
        for timeout_ms, acked in ((30000, True), (None, False)):
            with self.subTest(timeout_ms=timeout_ms):
                f = self.fake()
                state_in = threading.Event()

                def script(f):
                    f.handshake()
                    dump = {"op": "dump", "final": True}
                    if timeout_ms is not None:
                        dump["timeout_ms"] = timeout_ms
                    f.send(dump)
                    msg, data, _, _ = f.recv_state()
                    f.events.append((msg, data))
                    state_in.set()
                    time.sleep(1.0)  # the relay and the new generation's load outlast shutdown(timeout=0.2)
                    try:
                        f.send({"op": "ack", "ok": True})
                    except OSError:
                        pass  # the client gave up and closed
                    try:
                        f.recv_frame()
                    except (EOFError, OSError):
                        pass

                f.run(script)
                c = self.client(f)
                c.on_dump(lambda final: payload)
                c.load()
                self.assertEqual(c.shutdown(timeout=0.2), acked)
                f.join()
                self.assertTrue(state_in.is_set())
                self.assertEqual(f.events[-1][1], payload, "the whole final state arrived")

    def test_final_sync_new_side_on_load(self):
        f = self.fake()
        data = b'{"s1":["a","b","c"]}'

        def script(f):
            f.handshake(load=lambda: f.send_load(b'{"s1":["a"]}'))
            f.send_load(data, final=True)
            f.events.append(("ack1", f.recv_json()))
            f.send_load(data, final=True)
            f.events.append(("ack2", f.recv_json()))

        got = []
        sessions = {}
        f.run(script)
        c = self.client(f)

        def on_load(state):
            got.append(state.final)
            if len(got) == 2:
                raise ValueError("cannot merge")
            sessions.update(state.json())

        c.on_load(on_load)
        # apply= restores before the relay thread starts: a later load cannot race with it
        c.load(apply=lambda s: sessions.update(s.json()))
        f.join()
        self.assertEqual(got, [True, True])
        self.assertEqual(sessions, {"s1": ["a", "b", "c"]})
        self.assertEqual(f.events[-2][1], {"op": "ack", "ok": True})
        self.assertEqual(f.events[-1][1], {"op": "ack", "ok": False, "error": "load_failed: ValueError: cannot merge"})

    def test_error_from_aeterna_closes_and_unknown_op_is_unexpected(self):
        f = self.fake()

        def script(f):
            f.handshake()
            f.send({"op": "frobnicate"})
            f.events.append(f.recv_json())

        f.run(script)
        c = self.client(f)
        c.load()
        f.join()
        self.assertEqual(f.events[-1]["code"], "unexpected_op")
        self.assertFalse(c.shutdown(timeout=5))

    def test_ready_before_load_is_refused_locally(self):
        f = self.fake()
        f.run(lambda f: f.handshake())
        c = self.client(f)
        with self.assertRaises(RuntimeError):
            c.ready()
        c.load()
        f.join()


class NoRelayTest(unittest.TestCase):
    def test_no_env_is_a_no_op_client(self):
        saved = os.environ.pop("LIVERELAY_STATE_SOCK", None)
        try:
            c = aeterna.connect()
            self.assertFalse(c.enabled)
            self.assertIsNone(c.generation)
            self.assertIsNone(c.load())
            c.on_dump(lambda final: {"x": 1})
            c.on_load(lambda s: None)
            c.ready()
            self.assertFalse(c.shutdown(timeout=1))
            c.close()
        finally:
            if saved is not None:
                os.environ["LIVERELAY_STATE_SOCK"] = saved

    def test_memfd_state_is_sealed(self):
        fd = aeterna.memfd_state(b"hello")
        try:
            self.assertEqual(fcntl.fcntl(fd, aeterna.F_GET_SEALS) & SEALS, SEALS)
            self.assertEqual(os.pread(fd, 10, 0), b"hello")
            with self.assertRaises(OSError):
                os.pwrite(fd, b"x", 0)
        finally:
            os.close(fd)


CHILD = r"""
import json, os, sys
sys.path.insert(0, %r)
import aeterna_client as aeterna
ls = aeterna.listeners()
assert aeterna.listeners().keys() == ls.keys()
out = {name: [s.fileno(), s.family == __import__('socket').AF_INET, s.type == __import__('socket').SOCK_STREAM] for name, s in ls.items()}
print(json.dumps(out), flush=True)
if 'http' in ls:
    conn, _ = ls['http'].accept()
    conn.sendall(b'served by the child')
    conn.close()
""" % HERE

WRAPPER = r"""
import os, sys
fds = [int(x) for x in sys.argv[1].split(',')]
high = [os.dup(fd) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
os.environ['LISTEN_FDS'] = str(len(fds))
if sys.argv[2] == 'mine':
    os.environ['LISTEN_PID'] = str(os.getpid())
else:
    os.environ['LISTEN_PID'] = '1'
os.execv(sys.executable, [sys.executable, '-c', sys.argv[3]])
"""


class ListenersTest(unittest.TestCase):
    def spawn(self, socks, pid="mine", names=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        if names is not None:
            env["LISTEN_FDNAMES"] = names
        fds = [s.fileno() for s in socks]
        return subprocess.Popen([sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), pid, CHILD],
                                pass_fds=fds, env=env, stdout=subprocess.PIPE)

    def test_listeners_from_listen_fds(self):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(8)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(tcp.close)
        self.addCleanup(unix.close)
        p = self.spawn([tcp, unix], names="http:admin")
        line = p.stdout.readline()
        got = json.loads(line)
        self.assertEqual(got, {"http": [3, True, True], "admin": [4, False, True]})
        with socket.create_connection(tcp.getsockname(), timeout=10) as c:
            self.assertEqual(c.recv(100), b"served by the child")
        self.assertEqual(p.wait(10), 0)
        p.stdout.close()

    def test_default_names_and_foreign_listen_pid(self):
        a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        p = self.spawn([a, b])
        self.assertEqual(json.loads(p.stdout.readline()), {"fd3": [3, False, True], "fd4": [4, False, True]})
        self.assertEqual(p.wait(10), 0)
        p.stdout.close()
        p = self.spawn([a, b], pid="other", names="x:y")
        self.assertEqual(json.loads(p.stdout.readline()), {})
        self.assertEqual(p.wait(10), 0)
        p.stdout.close()


class DrainHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    release = None  # a threading.Event /slow waits for

    def do_GET(self):
        if self.path == "/slow":
            self.release.wait(30)
        body = b"ok " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if self.path == "/keep":
            self.send_header("Connection", "keep-alive")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def raw_request(sock, path):
    sock.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path).encode())


def read_response(f):
    """(status line, {header: value}, body) from a file over a keep-alive connection; None at end of file."""
    status = f.readline()
    if not status:
        return None
    headers = {}
    while True:
        line = f.readline().decode().strip()
        if not line:
            break
        k, v = line.split(":", 1)
        headers[k.strip().lower()] = v.strip()
    return status.decode().strip(), headers, f.read(int(headers.get("content-length", "0")))


class DrainTest(unittest.TestCase):
    def serve(self):
        DrainHandler.release = threading.Event()
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DrainHandler)
        aeterna.track_connections(server)
        serving = threading.Thread(target=server.serve_forever, daemon=True)
        serving.start()
        self.addCleanup(server.server_close)
        self.addCleanup(DrainHandler.release.set)
        return server, serving

    def connect(self, server):
        c = socket.create_connection(server.server_address, timeout=30)
        self.addCleanup(c.close)
        return c, c.makefile("rb")

    def start_drain(self, server, **kw):
        result = []
        t = threading.Thread(target=lambda: result.append(aeterna.drain(server, **kw)), daemon=True)
        t.start()
        return t, result

    def wait(self, predicate):
        deadline = time.monotonic() + 30
        while not predicate():
            self.assertLess(time.monotonic(), deadline, "condition not reached in time")
            time.sleep(0.01)

    def test_responses_after_the_drain_say_connection_close_and_the_drain_waits_for_every_connection(self):
        server, serving = self.serve()
        c, f = self.connect(server)
        raw_request(c, "/a")
        self.assertNotIn("connection", read_response(f)[1])  # keep-alive before the drain
        raw_request(c, "/slow")
        self.wait(lambda: any(e.busy for e in server._aeterna_tracker.conns.values()))
        t, result = self.start_drain(server, idle=0.05)
        serving.join(30)
        self.assertFalse(serving.is_alive(), "drain() stopped serve_forever()")
        self.assertEqual(result, [], "a request in flight: the drain waits")
        DrainHandler.release.set()
        status, headers, body = read_response(f)
        self.assertEqual((status, headers.get("connection"), body), ("HTTP/1.1 200 OK", "close", b"ok /slow"))
        self.assertIsNone(read_response(f), "the connection ends after that response")
        t.join(30)
        self.assertEqual(result, [True])
        self.assertEqual(server._aeterna_tracker.conns, {})

    def test_an_app_connection_header_becomes_close_during_the_drain(self):
        server, _ = self.serve()
        c, f = self.connect(server)
        raw_request(c, "/keep")
        self.assertEqual(read_response(f)[1].get("connection"), "keep-alive")
        server._aeterna_tracker.draining = True  # as drain() sets it, without closing the idle connection yet
        raw_request(c, "/keep")
        self.assertEqual(read_response(f)[1].get("connection"), "close")
        self.assertIsNone(read_response(f))

    def test_an_idle_keep_alive_connection_is_closed_and_a_request_that_arrived_is_answered(self):
        server, _ = self.serve()
        idle, fi = self.connect(server)
        raw_request(idle, "/one")
        read_response(fi)
        waiting, fw = self.connect(server)
        raw_request(waiting, "/two")
        read_response(fw)
        # A request that has arrived (in the kernel, not yet read) on a connection idle far longer than `idle`:
        # hold the handler between requests so it cannot read it before the drain looks. Both handlers must first be
        # done with their request: a client can read the response before its handler marks the connection idle.
        tracker = server._aeterna_tracker

        def both_idle():
            with tracker.cond:
                return len(tracker.conns) == 2 and not any(e.busy for e in tracker.conns.values())

        self.wait(both_idle)
        with tracker.cond:
            raw_request(waiting, "/three")
            entry = [e for r, e in tracker.conns.items() if r.getpeername() == waiting.getsockname()][0]
            entry.last -= 60
            [e for r, e in tracker.conns.items() if r.getpeername() == idle.getsockname()][0].last -= 60
            self.wait(lambda: aeterna._readable([r for r, e in tracker.conns.items() if e is entry][0]))
            tracker.draining = True
            tracker.close_idle(1.0)
            self.assertFalse(entry.closing, "a request is arriving on it: not closed")
        self.assertIsNone(read_response(fi), "the idle connection was closed")
        status, headers, body = read_response(fw)
        self.assertEqual((body, headers.get("connection")), (b"ok /three", "close"))
        t, result = self.start_drain(server, idle=0.05)
        t.join(30)
        self.assertEqual(result, [True])

    def test_pipelined_requests_are_all_answered(self):
        server, _ = self.serve()
        c, f = self.connect(server)
        c.sendall(b"".join(("GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i).encode() for i in range(5)))
        self.assertEqual([read_response(f)[2] for _ in range(5)], [b"ok /p%d" % i for i in range(5)])

    def test_timeout_returns_false_and_drain_from_the_serving_thread_is_refused(self):
        server, _ = self.serve()
        c, f = self.connect(server)
        raw_request(c, "/slow")
        self.wait(lambda: any(e.busy for e in server._aeterna_tracker.conns.values()))
        self.assertFalse(aeterna.drain(server, idle=0.05, timeout=0.2))
        DrainHandler.release.set()
        self.assertEqual(read_response(f)[1].get("connection"), "close")
        self.assertTrue(aeterna.drain(server, idle=0.05))
        other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DrainHandler)
        self.addCleanup(other.server_close)
        with self.assertRaises(aeterna.UsageError):
            aeterna.drain(other)  # not tracked
        aeterna.track_connections(other)
        other._aeterna_tracker.serving = threading.get_ident()  # as inside serve_forever() on this thread
        with self.assertRaises(aeterna.UsageError):
            aeterna.drain(other)


def frame(body):
    body = body if isinstance(body, (bytes, bytearray)) else json.dumps(body).encode()
    return struct.pack(">I", len(body)) + body


def send_with_fds(chan, data, fds):
    chan.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])


def open_fds():
    return len(os.listdir("/proc/self/fd"))


class HandoffTest(unittest.TestCase):
    """Connection handoff (docs/srp.md, "Connection handoff"): Handoff (the old generation's
    side) and the receiver (the new one's) over a plain socket pair, real TCP connections."""

    def setUp(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.addCleanup(self.listener.close)
        self.fds_before = open_fds()

    def tcp(self):
        """(client socket, the accepted socket the old generation serves)."""
        client = socket.create_connection(self.listener.getsockname(), timeout=30)
        accepted, _ = self.listener.accept()
        self.addCleanup(client.close)
        self.addCleanup(accepted.close)
        return client, accepted

    def channel(self, max_frame=aeterna.DEFAULT_MAX_FRAME, callback=None):
        """(the old generation's end, the adopted connections, the receiver's thread and its result)."""
        old_end, new_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(old_end.close)
        adopted, result = [], []
        cb = callback if callback is not None else adopted.append
        t = threading.Thread(target=lambda: result.append(aeterna._receive_connections(new_end.detach(), max_frame, lambda: cb)),
                             daemon=True)
        t.start()
        return old_end, adopted, t, result

    def finish(self, t, result):
        t.join(30)
        self.assertFalse(t.is_alive(), "the receiver reads to end of file")
        return result[0]

    def recv_exactly(self, sock, n):
        data = b""
        while len(data) < n:
            piece = sock.recv(n - len(data))
            self.assertTrue(piece, "end of file after %r" % data)
            data += piece
        return data

    def assertClosed(self, client):
        """Every copy of the connection's other end was closed: the client reads end of file."""
        client.settimeout(30)
        try:
            self.assertEqual(client.recv(100), b"")
        except ConnectionResetError:
            pass

    def test_connections_move_and_work_as_tcp_connections_unread_bytes_first(self):
        old_end, adopted, t, result = self.channel()
        handoff = aeterna.Handoff(old_end)
        clients = []
        for i in range(3):
            client, accepted = self.tcp()
            client.sendall(b"hello-%d " % i)
            read = self.recv_exactly(accepted, 8)  # read by the old generation, not processed
            handoff.send(accepted, "c%d" % i, meta={"n": i, "path": "/x"}, unread=read)
            self.assertEqual(accepted.fileno(), -1, "the app's socket object is closed once sent")
            client.sendall(b"world-%d" % i)  # sent after the move: waits in the kernel for the new generation
            clients.append(client)
        self.assertEqual(handoff.end(), 3)
        self.assertEqual(self.finish(t, result), 3)
        self.assertEqual([(c.id, c.meta, c.unread) for c in adopted],
                         [("c%d" % i, {"n": i, "path": "/x"}, b"hello-%d " % i) for i in range(3)])
        for i, (conn, client) in enumerate(zip(adopted, clients)):
            self.assertFalse(os.get_inheritable(conn.socket.fileno()), "close-on-exec")
            self.assertIsNone(conn.socket.gettimeout(), "blocking")
            self.assertEqual(conn.socket.type, socket.SOCK_STREAM)
            self.assertEqual(conn.socket.getpeername(), client.getsockname(), "the same TCP connection")
            self.assertEqual(self.recv_exactly(conn.socket, 7), b"world-%d" % i)
            conn.socket.sendall(b"answer-%d" % i)
            self.assertEqual(self.recv_exactly(client, 8), b"answer-%d" % i)
            conn.socket.close()
        self.assertEqual(handoff.end(), 3, "a second end() only returns the count")
        with self.assertRaises(aeterna.UsageError):
            handoff.send(self.tcp()[1], "late")

    def test_a_client_sending_while_its_connection_moves_loses_nothing(self):
        old_end, adopted, t, result = self.channel()
        client, accepted = self.tcp()
        stream = b"".join(b"%08d" % i for i in range(256 * 1024))  # 2 MiB, every byte accounted for
        def write():
            for off in range(0, len(stream), 1024):
                client.sendall(stream[off:off + 1024])
            client.shutdown(socket.SHUT_WR)
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        read = b""
        while len(read) < 100 * 1024:  # the old generation reads part of it, then stops reading
            read += accepted.recv(64 * 1024)
        handoff = aeterna.Handoff(old_end)
        handoff.send(accepted, "streaming", unread=read)
        handoff.end()
        self.assertEqual(self.finish(t, result), 1)
        conn = adopted[0]
        rest = b""
        while True:
            piece = conn.socket.recv(1 << 20)
            if not piece:
                break
            rest += piece
        writer.join(30)
        conn.socket.close()
        self.assertEqual(conn.unread, read)
        self.assertEqual(len(conn.unread) + len(rest), len(stream))
        self.assertTrue(conn.unread + rest == stream, "the client's bytes arrive once each, in order")

    def test_1000_connections_move(self):
        n = 1000
        old_end, adopted, t, result = self.channel()
        handoff = aeterna.Handoff(old_end)
        clients = []
        for i in range(n):
            client, accepted = self.tcp()
            clients.append(client)
            handoff.send(accepted, "conn-%d" % i, meta={"i": i}, unread=b"u%d" % i)
        self.assertEqual(handoff.end(), n)
        self.assertEqual(self.finish(t, result), n)
        self.assertEqual([c.id for c in adopted], ["conn-%d" % i for i in range(n)])
        self.assertEqual([(c.meta, c.unread) for c in adopted], [({"i": i}, b"u%d" % i) for i in range(n)])
        for i, (conn, client) in enumerate(zip(adopted, clients)):
            conn.socket.sendall(b"%06d" % i)
            self.assertEqual(self.recv_exactly(client, 6), b"%06d" % i)
            conn.socket.close()
            client.close()
        self.assertEqual(open_fds(), self.fds_before, "no fd leaked on either side")

    def test_malformed_frames_close_that_frames_fds_and_end_the_channel(self):
        good = lambda i: {"op": "conn", "id": "good-%d" % i, "meta": None, "unread": 0, "fds": ["conn"]}
        cases = {
            "two fds": lambda chan, a, b: send_with_fds(chan, frame(good(9)), [a, b]),
            "no fd": lambda chan, a, b: chan.sendall(frame(good(9))),
            "empty id": lambda chan, a, b: send_with_fds(chan, frame(dict(good(9), id="")), [a]),
            "id above 256 characters": lambda chan, a, b: send_with_fds(chan, frame(dict(good(9), id="x" * 257)), [a]),
            "fds not [conn]": lambda chan, a, b: send_with_fds(chan, frame(dict(good(9), fds=["x"])), [a]),
            "negative unread": lambda chan, a, b: send_with_fds(chan, frame(dict(good(9), unread=-1)), [a]),
            "fds on a data frame": lambda chan, a, b: (send_with_fds(chan, frame(dict(good(9), unread=4)), [a]),
                                                       send_with_fds(chan, frame(b"abcd"), [b])),
            "data frames above unread": lambda chan, a, b: (send_with_fds(chan, frame(dict(good(9), unread=2)), [a]),
                                                            chan.sendall(frame(b"abcd"))),
            "unknown op": lambda chan, a, b: send_with_fds(chan, frame({"op": "conns", "fds": ["conn"]}), [a]),
            "not JSON": lambda chan, a, b: send_with_fds(chan, frame(b"{conn"), [a]),
            "a JSON array": lambda chan, a, b: send_with_fds(chan, frame(b"[1]"), [a]),
            "length 0": lambda chan, a, b: send_with_fds(chan, b"\x00\x00\x00\x00", [a]),
            "above max_frame": lambda chan, a, b: send_with_fds(chan, frame(dict(good(9), meta="m" * 2000)), [a]),
            "fds on end": lambda chan, a, b: send_with_fds(chan, frame({"op": "end", "count": 1}), [a]),
        }
        for name, malformed in cases.items():
            with self.subTest(name):
                old_end, adopted, t, result = self.channel(max_frame=1024)
                handoff = aeterna.Handoff(old_end)
                first, first_accepted = self.tcp()
                handoff.send(first_accepted, "good-0")
                (a_client, a), (b_client, b) = self.tcp(), self.tcp()
                malformed(old_end, a.fileno(), b.fileno())
                a.close()
                b.close()
                after, after_accepted = self.tcp()
                try:
                    handoff.send(after_accepted, "good-1")  # not read: the channel ended at the malformed frame
                except aeterna.RelayError:
                    self.assertNotEqual(after_accepted.fileno(), -1, "not sent: still the app's")
                    after_accepted.close()  # the receiver had closed its end already
                self.assertEqual(self.finish(t, result), 1)
                handoff.close()
                self.assertEqual([c.id for c in adopted], ["good-0"])
                for which, client in (("a", a_client), ("b", b_client), ("after", after)):
                    with self.subTest(which):
                        self.assertClosed(client)
                adopted[0].socket.close()
                self.assertClosed(first)

    def test_end_of_file_without_end_adopts_what_arrived_whole(self):
        old_end, adopted, t, result = self.channel()
        handoff = aeterna.Handoff(old_end)
        clients = []
        for i in range(2):
            client, accepted = self.tcp()
            clients.append(client)
            handoff.send(accepted, "whole-%d" % i, unread=b"x")
        cut, cut_accepted = self.tcp()
        send_with_fds(old_end, frame({"op": "conn", "id": "cut", "unread": 10, "fds": ["conn"]}), [cut_accepted.fileno()])
        old_end.sendall(frame(b"12345"))  # 5 of the 10 unread bytes, then the old generation dies
        cut_accepted.close()
        handoff.close()
        self.assertEqual(self.finish(t, result), 2)
        self.assertEqual([(c.id, c.unread) for c in adopted], [("whole-0", b"x"), ("whole-1", b"x")])
        self.assertClosed(cut)
        for conn, client in zip(adopted, clients):
            conn.socket.sendall(b"ok")
            self.assertEqual(self.recv_exactly(client, 2), b"ok")
            conn.socket.close()

    def test_send_refuses_a_bad_id_or_meta_and_keeps_the_socket(self):
        old_end, _, t, result = self.channel()
        handoff = aeterna.Handoff(old_end, max_frame=1024)
        _, accepted = self.tcp()
        for id_, meta in (("", None), ("x" * 257, None), (7, None), ("ok", object()), ("ok", "m" * 2000)):
            with self.assertRaises(ValueError):
                handoff.send(accepted, id_, meta)
            self.assertNotEqual(accepted.fileno(), -1, "nothing sent: the socket is still the app's")
        self.assertEqual(handoff.end(), 0)
        self.assertEqual(self.finish(t, result), 0)

    def test_a_raising_callback_closes_that_connection_and_the_next_ones_still_arrive(self):
        adopted = []
        def cb(conn):
            if conn.id == "refused":
                raise RuntimeError("no room")
            adopted.append(conn)
        old_end, _, t, result = self.channel(callback=cb)
        handoff = aeterna.Handoff(old_end)
        refused, accepted = self.tcp()
        handoff.send(accepted, "refused")
        taken, accepted2 = self.tcp()
        handoff.send(accepted2, "taken")
        handoff.end()
        self.assertEqual(self.finish(t, result), 1)
        self.assertClosed(refused)
        self.assertEqual([c.id for c in adopted], ["taken"])
        adopted[0].socket.close()


class HandoffRelayTest(unittest.TestCase):
    """Connection handoff through the relay connection, Aeterna played by the fake."""

    def setUp(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(self.listener.close)

    def tcp(self):
        client = socket.create_connection(self.listener.getsockname(), timeout=30)
        accepted, _ = self.listener.accept()
        self.addCleanup(client.close)
        self.addCleanup(accepted.close)
        return client, accepted

    def fake(self):
        f = Fake()
        self.addCleanup(f.close)
        return f

    def test_the_new_generation_adopts_what_arrives_on_the_handoff_channel(self):
        f = self.fake()
        old_end, new_end = socket.socketpair()
        self.addCleanup(old_end.close)

        def script(f):
            f.handshake()
            f.recv_json()  # ready
            f.send({"op": "handoff", "fds": ["handoff"]}, fds=[new_end.fileno()])
            new_end.close()  # Aeterna keeps no copy
            f.events.append(f.recv_json())  # the app's goodbye: end of file below
        f.run(script)
        c = aeterna.connect(f.path)
        self.addCleanup(c.close)
        adopted = []
        arrived = threading.Event()
        c.on_connection(lambda conn: (adopted.append(conn), arrived.set()))
        c.load()
        c.ready()
        client, accepted = self.tcp()
        client.sendall(b"GET / HTTP/1.1\r\n")
        self.assertEqual(accepted.recv(100), b"GET / HTTP/1.1\r\n")  # read by the old generation, not processed
        handoff = aeterna.Handoff(old_end)
        handoff.send(accepted, "http-1", meta={"stream": 3}, unread=b"GET / HTTP/1.1\r\n")
        handoff.end()
        self.assertTrue(arrived.wait(30))
        conn = adopted[0]
        self.assertEqual((conn.id, conn.meta, conn.unread), ("http-1", {"stream": 3}, b"GET / HTTP/1.1\r\n"))
        client.sendall(b"Host: x\r\n\r\n")
        self.assertEqual(conn.socket.recv(100), b"Host: x\r\n\r\n")
        conn.socket.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(client.recv(100), b"HTTP/1.1 204 No Content\r\n\r\n")
        conn.socket.close()
        c._send_control({"op": "ready"})  # lets the scenario finish
        f.join()

    def test_a_connection_without_a_callback_is_closed(self):
        f = self.fake()
        old_end, new_end = socket.socketpair()
        self.addCleanup(old_end.close)

        def script(f):
            f.handshake()
            f.send({"op": "handoff", "fds": ["handoff"]}, fds=[new_end.fileno()])
            new_end.close()
        f.run(script)
        c = aeterna.connect(f.path)
        self.addCleanup(c.close)
        c.load()
        f.join()
        client, accepted = self.tcp()
        handoff = aeterna.Handoff(old_end)
        handoff.send(accepted, "orphan")
        handoff.end()
        client.settimeout(30)
        self.assertEqual(client.recv(10), b"", "closed: nobody can serve it")

    def test_the_old_generation_hands_over_on_the_final_dump_then_shutdown_answers_it(self):
        f = self.fake()
        old_end, new_end = socket.socketpair()
        received = []

        def script(f):
            f.handshake()
            f.recv_json()  # ready
            f.send({"op": "dump", "final": True, "timeout_ms": 10000, "handoff": True, "fds": ["handoff"]},
                   fds=[old_end.fileno()])
            old_end.close()
            received.append(aeterna._receive_connections(new_end.detach(), 1 << 24, lambda: received.append))
            msg, data, _, _ = f.recv_state()
            f.events.append((msg["op"], json.loads(data)))
            f.send({"op": "ack", "ok": True})
        f.run(script)
        c = aeterna.connect(f.path)
        self.addCleanup(c.close)
        self.assertTrue(c.handoff_offered is False)  # this fake's welcome does not say it; the dump decides
        c.on_dump(lambda final: {"final": final})
        c.load()
        c.ready()
        handoff = c.handoff(timeout=10)
        self.assertIsInstance(handoff, aeterna.Handoff)
        self.assertIsNone(c.handoff(timeout=0.1), "taken once")
        client, accepted = self.tcp()
        handoff.send(accepted, "ws-7", meta={"room": "a"}, unread=b"\x81\x02hi")
        self.assertEqual(handoff.end(), 1)
        self.assertTrue(c.shutdown(timeout=10), "the final dump is answered after the handoff, as always")
        f.join()
        self.assertEqual(f.events[-1], ("state", {"final": True}))
        conn, count = received[0], received[1]
        self.assertEqual((count, conn.id, conn.meta, conn.unread), (1, "ws-7", {"room": "a"}, b"\x81\x02hi"))
        client.sendall(b"more")
        self.assertEqual(conn.socket.recv(10), b"more")
        conn.socket.close()

    def test_handoff_is_none_for_a_final_dump_without_it_at_end_of_file_and_without_a_relay(self):
        f = self.fake()

        def script(f):
            f.handshake()
            f.send({"op": "dump", "final": True, "timeout_ms": 10000})
            f.recv_state()
            f.send({"op": "ack", "ok": True})
        f.run(script)
        c = aeterna.connect(f.path)
        self.addCleanup(c.close)
        c.load()
        self.assertIsNone(c.handoff(timeout=10))
        self.assertTrue(c.shutdown(timeout=10))
        f.join()

        f = self.fake()
        f.run(lambda f: (f.handshake(), f.conn.close()))
        c = aeterna.connect(f.path)
        self.addCleanup(c.close)
        c.load()
        self.assertIsNone(c.handoff(timeout=10), "end of file: no final dump will come")
        f.join()
        self.assertIsNone(aeterna.StateClient(None).handoff(), "no relay")

    def test_a_handoff_channel_nobody_takes_is_ended_and_closed_by_shutdown(self):
        f = self.fake()
        old_end, new_end = socket.socketpair()
        self.addCleanup(new_end.close)

        def script(f):
            f.handshake()
            f.send({"op": "dump", "final": True, "timeout_ms": 10000, "handoff": True, "fds": ["handoff"]},
                   fds=[old_end.fileno()])
            old_end.close()
            f.recv_state()
            f.send({"op": "ack", "ok": True})
        f.run(script)
        c = aeterna.connect(f.path)
        self.addCleanup(c.close)
        c.load()
        self.assertTrue(c.shutdown(timeout=10))
        f.join()
        new_end.settimeout(30)
        got = b""
        while True:
            chunk = new_end.recv(64)
            if not chunk:
                break
            got += chunk
        body = b'{"op":"end","count":0}'
        self.assertEqual(got, len(body).to_bytes(4, "big") + body, "the new generation reads: no connections, then end of file")

    def test_handoff_frames_from_aeterna_are_checked(self):
        self.assertEqual(aeterna._parse_message(b'{"op":"handoff","fds":["handoff"]}'), {"op": "handoff", "fds": ["handoff"]})
        self.assertEqual(aeterna._parse_message(b'{"op":"dump","final":true,"handoff":true,"fds":["handoff"]}')["fds"], ["handoff"])
        for bad in (b'{"op":"handoff"}', b'{"op":"handoff","fds":["conn"]}',
                    b'{"op":"dump","final":false,"handoff":true,"fds":["handoff"]}',
                    b'{"op":"dump","final":true,"handoff":true}',
                    b'{"op":"dump","final":true,"fds":["handoff"]}',
                    b'{"op":"dump","final":true,"handoff":1,"fds":["handoff"]}'):
            with self.subTest(bad):
                with self.assertRaises(aeterna._ProtocolError) as e:
                    aeterna._parse_message(bad)
                self.assertEqual(e.exception.code, "bad_json")


if __name__ == "__main__":
    unittest.main()
