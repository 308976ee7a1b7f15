"""Aeterna's Python SDK: inherited listeners and the State Relay Protocol (SRP) v1.

One stdlib-only file for Python 3.9+ on Linux. The protocol is described in
docs/srp.md; this module is its client side:

    import aeterna_client as aeterna

    relay = aeterna.connect()              # a no-op client outside Aeterna
    state = relay.load()                   # the previous generation's state, or None
    sessions = state.json() if state else {}
    relay.on_dump(lambda final: dict(sessions))          # JSON; called from a background thread
    relay.on_load(lambda s: sessions.update(s.json()))   # the final sync, while serving
    sock = aeterna.listeners()["http"]
    ...serve on sock, then relay.ready()...
    # on SIGTERM: stop accepting, finish in-flight requests, then
    relay.shutdown()

Threads: load() runs in the caller's thread. After the initial ack a daemon
thread reads Aeterna's frames: it answers a non-final dump at once (your dump
callback runs in that thread, so it must be safe to call while you serve) and
applies the final sync (your load callback, same thread). A final dump
(Aeterna's SIGTERM path) is left pending for shutdown(), which your SIGTERM
handling must call once the app has drained: that is what makes the final sync
include everything the in-flight requests changed. An app that never calls
shutdown() never answers the final dump; Aeterna then logs the loss after
state_handoff.timeout and the promotion stands.

Also here: track_connections()/drain(), the graceful drain of a stdlib
http.server for that SIGTERM path, and connection handoff (on_connection(),
handoff(), Handoff, AdoptedConnection), which moves live client connections
to the next generation at promotion.
"""

import array
import errno
import fcntl
import hashlib
import json
import mmap
import os
import select
import socket
import struct
import sys
import threading
import time
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

# The SDK's version is Aeterna's (pyproject.toml and package.json say the same; a test checks it).
__version__ = "0.1.0"

__all__ = [
    "listeners",
    "connect",
    "memfd_state",
    "StateClient",
    "State",
    "DumpResult",
    "RelayError",
    "PROTOCOL_VERSION",
    "track_connections",
    "drain",
    "AdoptedConnection",
    "Handoff",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
DATA_CHUNK = 1024 * 1024
MAX_FDS_PER_FRAME = 253
_HEADER = struct.Struct(">I")

# fcntl constants (Linux); the fcntl module has them since 3.8/3.9, numbers as a fallback.
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1024 + 9)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1024 + 10)
F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)
F_SEAL_WRITE = getattr(fcntl, "F_SEAL_WRITE", 0x0008)
_REQUIRED_SEALS = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW
MFD_CLOEXEC = getattr(os, "MFD_CLOEXEC", 0x0001)
MFD_ALLOW_SEALING = getattr(os, "MFD_ALLOW_SEALING", 0x0002)
_MSG_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000)
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0x4000)
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * array.array("i").itemsize)
# Socket buffers asked for on the relay connection (the kernel caps them at net.core.[rw]mem_max): fewer,
# larger reads and writes for a streamed state.
_SOCKET_BUFFER = 4 * 1024 * 1024
# States smaller than this are hashed inline; larger ones on a thread of their own, overlapping the socket.
_HASH_THREAD_MIN = 4 * 1024 * 1024
# Bytes per write on a direct socket pair (each piece is then hashed while the next one is written).
_DIRECT_CHUNK = 4 * 1024 * 1024
# Trailer checks besides SHA-256 (docs/srp.md, "Checksums"): used only where a dump offers one.
_CHECKSUMS = ("crc32",)


class RelayError(Exception):
    """A relay failure; `code` says which (docs/srp.md, "The app contract"): the
    protocol's codes (forbidden, busy, bad_frame, too_large, bad_json,
    unexpected_op, unsupported_version, timeout) and the SDK's own
    (checksum_mismatch, bad_state, load_failed, dump_failed, closed, usage)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class UsageError(RelayError, RuntimeError):
    """SDK calls out of order (code "usage"), e.g. ready() before load()."""

    def __init__(self, message: str):
        super().__init__(message, "usage")


class _Refusal(Exception):
    """A state this side must refuse with an ack ok:false ("<code>: <message>")."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def ack_error(self) -> str:
        return "%s: %s" % (self.code, self)


def _log(message: str) -> None:
    try:
        sys.stderr.write("aeterna_client: %s\n" % message)
        sys.stderr.flush()
    except Exception:  # stderr closed: nothing to do
        pass


def _close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --------------------------------------------------------------------------- listeners

_listeners_cache: Optional[Dict[str, socket.socket]] = None
_listeners_lock = threading.Lock()


def listeners() -> Dict[str, socket.socket]:
    """The sockets Aeterna passed (systemd's LISTEN_FDS protocol), by name.

    {} when LISTEN_FDS is absent or LISTEN_PID is not this process. Names come
    from LISTEN_FDNAMES (":"-separated), "fd3", "fd4", ... where it is missing
    or has too few entries. The fds are made close-on-exec, as sd_listen_fds
    does. The result is cached: every call returns the same socket objects (two
    socket objects on one fd would close it twice).
    """
    global _listeners_cache
    with _listeners_lock:
        if _listeners_cache is not None:
            return dict(_listeners_cache)
        result: Dict[str, socket.socket] = {}
        pid = os.environ.get("LISTEN_PID", "")
        count = os.environ.get("LISTEN_FDS", "")
        if not (_is_decimal(pid) and _is_decimal(count) and int(pid) == os.getpid()):
            return {}
        n = int(count)
        names = os.environ.get("LISTEN_FDNAMES")
        name_list = names.split(":") if names else []
        for i in range(n):
            fd = 3 + i
            name = name_list[i] if i < len(name_list) and name_list[i] else "fd%d" % fd
            if name in result:
                name = "fd%d" % fd
            try:
                sock = socket.socket(fileno=fd)
            except OSError as e:
                _log("LISTEN_FDS: fd %d is not a socket; left out (%s)" % (fd, e))
                continue
            os.set_inheritable(fd, False)
            result[name] = sock
        _listeners_cache = result
        return dict(result)


def _is_decimal(text: str) -> bool:
    """Only ASCII digits (int() would also take " 12", "+12" and "1_2")."""
    return text != "" and all("0" <= c <= "9" for c in text)


# --------------------------------------------------------------------------- memfd


def memfd_state(data: Union[bytes, bytearray, memoryview], name: str = "aeterna-state") -> int:
    """A new memfd holding `data`, sealed with F_SEAL_WRITE, F_SEAL_SHRINK,
    F_SEAL_GROW (and F_SEAL_SEAL). Returns the fd (close-on-exec); hand it to
    DumpResult(memfd=fd), which closes it once sent."""
    fd = os.memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING)
    try:
        view = memoryview(data).cast("B")
        off = 0
        while off < len(view):
            off += os.write(fd, view[off:off + 64 * 1024 * 1024])
        fcntl.fcntl(fd, F_ADD_SEALS, _REQUIRED_SEALS | F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sha256_fd(fd: int, size: int) -> str:
    h = hashlib.sha256()
    if size > 0:
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
            view = memoryview(m)
            try:
                for off in range(0, size, 16 * 1024 * 1024):
                    h.update(view[off:off + 16 * 1024 * 1024])
            finally:
                view.release()
    return h.hexdigest()


# --------------------------------------------------------------------------- values


class State:
    """A state received from the previous generation.

    encoding: the encoding the sender announced (None for an empty state)
    data:     a writable anonymous mmap (stream transport, as received: no copy, no
              up-front zero-fill), or a read-only mmap of the memfd (memfd
              transport); b"" when empty. Both are bytes-like (len, slices, memoryview).
    fds:      the other fds that came with it, by name (e.g. "conn:1"); they are
              yours to use and close
    final:    True for the final sync (the second load, delivered to on_load)
    source:   "relay" (a live generation's dump) or "checkpoint" (the latest
              checkpoint, for a generation started with no live predecessor)
    seq, age_ms: the checkpoint's sequence number and age (source "checkpoint"), else None
    """

    def __init__(self, encoding: Optional[str], data: Any, fds: Dict[str, int], final: bool, transport: str = "stream",
                 source: str = "relay", seq: Optional[int] = None, age_ms: Optional[int] = None):
        self.encoding = encoding
        self.data = data
        self.fds = fds
        self.final = final
        self.transport = transport
        self.source = source
        self.seq = seq
        self.age_ms = age_ms

    @property
    def size(self) -> int:
        return len(self.data)

    def bytes(self) -> bytes:
        return bytes(self.data)

    def text(self, encoding: str = "utf-8") -> str:
        return bytes(self.data).decode(encoding)

    def json(self) -> Any:
        data = self.data if isinstance(self.data, (bytes, bytearray)) else bytes(self.data)
        return json.loads(data.decode("utf-8"))

    def close(self) -> None:
        """Unmap a memfd state (the fds in .fds stay yours)."""
        if isinstance(self.data, mmap.mmap):
            self.data.close()
            self.data = b""

    def __repr__(self) -> str:
        return "State(encoding=%r, size=%d, transport=%s, fds=%r, final=%r, source=%s)" % (
            self.encoding, self.size, self.transport, sorted(self.fds), self.final, self.source)


class DumpResult:
    """What a dump callback may return, for full control.

    encoding: the state's encoding (the app's business; "json", "protobuf", ...)
    data:     bytes-like, str (UTF-8) or a JSON-able value (dict/list)
    fds:      {name: fd} sent along (e.g. {"conn:1": sock.fileno()}); not closed
              by the SDK: close them yourself once the dump is answered
    memfd:    an fd from memfd_state(): the memfd transport, no copy; the SDK
              closes it once sent
    transport:"memfd" with `data` makes the SDK put data in a memfd for you
    sha256:   for memfd: a hex string is sent as is, True computes it (reads the
              memfd once); None or False omit it (the seals guarantee the content)
    """

    def __init__(self, encoding: Optional[str] = None, data: Any = None, fds: Optional[Dict[str, int]] = None,
                 memfd: Optional[int] = None, transport: Optional[str] = None, sha256: Union[None, str, bool] = None):
        self.encoding = encoding
        self.data = data
        self.fds = dict(fds or {})
        self.memfd = memfd
        self.transport = transport
        self.sha256 = sha256


def _to_bytes(value: Any, encoding: Optional[str]) -> Tuple[Any, str]:
    """(bytes-like, encoding) for a dump callback's value."""
    if isinstance(value, (bytes, bytearray, memoryview, mmap.mmap)):
        return value, encoding or "binary"
    if isinstance(value, str):
        return value.encode("utf-8"), encoding or "text"
    return json.dumps(value, separators=(",", ":")).encode("utf-8"), encoding or "json"


# --------------------------------------------------------------------------- messages

_OPS = ("hello", "welcome", "load", "state", "ack", "ready", "dump", "trailer", "error", "checkpoint", "checkpointed",
        "handoff")
_SHA256_HEX = frozenset("0123456789abcdef")


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad_json(message: str) -> "_ProtocolError":
    return _ProtocolError("bad_json", message)


def _optional_string(o: dict, key: str, limit: int) -> Optional[str]:
    v = o.get(key)
    if v is None and key not in o:
        return None
    if not isinstance(v, str) or len(v) > limit:
        raise _bad_json('"%s" must be a string of at most %d characters' % (key, limit))
    return v


def _optional_sha256(o: dict, op: str) -> Optional[str]:
    sha = _optional_string(o, "sha256", 64)
    if sha is not None and (len(sha) != 64 or not set(sha) <= _SHA256_HEX):
        raise _bad_json('%s: "sha256" must be 64 lowercase hex digits' % op)
    return sha


def _state_header(o: dict, op: str) -> dict:
    """The fields of a load or state frame, checked as docs/srp.md says (bad_json otherwise)."""
    size = o.get("size")
    if not _is_whole(size) or size < 0:
        raise _bad_json('%s: "size" must be a whole number >= 0' % op)
    h: Dict[str, Any] = {"op": op, "size": size}
    encoding = _optional_string(o, "encoding", 64)
    if encoding is not None:
        h["encoding"] = encoding
    sha = _optional_sha256(o, op)
    if sha is not None:
        h["sha256"] = sha
    if "transport" in o:
        if o["transport"] not in ("stream", "memfd", "direct"):
            raise _bad_json('%s: "transport" must be "stream", "memfd" or "direct"' % op)
        h["transport"] = o["transport"]
    if "fds" in o:
        names = o["fds"]
        if (not isinstance(names, list) or len(names) > MAX_FDS_PER_FRAME
                or not all(isinstance(n, str) and 0 < len(n) <= 128 for n in names)):
            raise _bad_json('%s: "fds" must be a list of at most %d names' % (op, MAX_FDS_PER_FRAME))
        if len(set(names)) != len(names):
            raise _bad_json('%s: "fds" names must be unique' % op)
        h["fds"] = names
    if h.get("transport") == "memfd" and "state" not in h.get("fds", []):
        raise _bad_json('%s: transport "memfd" needs an fd named "state"' % op)
    if "trailer" in o:
        if o["trailer"] is not True:
            raise _bad_json('%s: "trailer" must be true when present' % op)
        if "sha256" in h or h.get("transport") == "memfd" or size == 0:
            raise _bad_json('%s: "trailer" is only for a streamed state of at least 1 byte without "sha256"' % op)
        h["trailer"] = True
    if h.get("transport") == "direct":
        # The digest always follows the bytes on the pair; the pair end rides on the load.
        if "trailer" not in h or size == 0:
            raise _bad_json('%s: transport "direct" needs "trailer": true and a size of at least 1 byte' % op)
        if ("direct" in h.get("fds", [])) != (op == "load"):
            raise _bad_json('%s: the fd name "direct" is %s for the direct transport' % (op, "required" if op == "load" else "reserved"))
    elif "direct" in h.get("fds", []) and op != "load":
        raise _bad_json('%s: the fd name "direct" is reserved for the direct transport' % op)
    if "checksum" in o:
        if o["checksum"] not in _CHECKSUMS:
            raise _bad_json('%s: "checksum" must be one of %s when present' % (op, ", ".join(_CHECKSUMS)))
        if "trailer" not in h or op == "checkpoint":
            raise _bad_json('%s: "checksum" is only for a relayed state with "trailer": true' % op)
        h["checksum"] = o["checksum"]
    if size > 0 and h.get("transport") != "memfd" and "sha256" not in h and "trailer" not in h:
        raise _bad_json('%s: "sha256" (or "trailer": true) is required for a streamed state' % op)
    return h


def _parse_message(body: bytes) -> dict:
    """A control frame's payload as a checked message (the same rules as Aeterna's
    parser, src/srp/messages.ts). Raises _ProtocolError (bad_json, unexpected_op)."""
    try:
        o = json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError:
        raise _bad_json("control frame is not valid UTF-8")
    except ValueError as e:
        raise _bad_json("control frame is not JSON: %s" % e)
    if not isinstance(o, dict):
        raise _bad_json("control frame is not a JSON object")
    op = o.get("op")
    if not isinstance(op, str):
        raise _bad_json('control frame has no string "op"')
    if op not in _OPS:
        raise _ProtocolError("unexpected_op", 'unknown op "%s"' % op[:40])
    if op == "hello":
        if not isinstance(o.get("v"), (int, float)) or isinstance(o.get("v"), bool):
            raise _bad_json('hello: "v" must be a number')
        msg = {"op": op, "v": o["v"]}
        for key in ("trailer", "direct", "handoff"):
            if o.get(key) is True:
                msg[key] = True
        return msg
    if op == "welcome":
        msg = {"op": op, "v": o.get("v"), "generation": o.get("generation"), "max_frame": o.get("max_frame")}
        for key in ("checkpoint", "direct", "handoff"):
            if o.get(key) is True:
                msg[key] = True
        return msg
    if op in ("load", "state", "checkpoint"):
        h = _state_header(o, op)
        if op == "load" and o.get("final") is True:
            h["final"] = True
        if op == "load" and o.get("source") in ("relay", "checkpoint"):
            h["source"] = o["source"]
        for key in ("seq", "age_ms") if op == "load" else ():
            if _is_whole(o.get(key)):
                h[key] = o[key]
        return h
    if op == "checkpointed":
        msg = {"op": op}
        if _is_whole(o.get("seq")):
            msg["seq"] = o["seq"]
        for key, limit in (("code", 64), ("message", 4096)):
            if isinstance(o.get(key), str):
                msg[key] = o[key][:limit]
        return msg
    if op == "ack":
        if not isinstance(o.get("ok"), bool):
            raise _bad_json('ack: "ok" must be true or false')
        error = _optional_string(o, "error", 4096)
        return {"op": op, "ok": o["ok"]} if error is None else {"op": op, "ok": o["ok"], "error": error}
    if op == "dump":
        msg = {"op": op, "final": o.get("final") is True}
        if _is_whole(o.get("timeout_ms")) and o["timeout_ms"] > 0:
            msg["timeout_ms"] = o["timeout_ms"]
        if o.get("trailer") is True:
            msg["trailer"] = True
        if "direct" in o and (o["direct"] is not True or o.get("trailer") is not True or o.get("final") is True):
            raise _bad_json('dump: "direct" must be true, and only with "trailer": true on a non-final dump')
        if "handoff" in o and (o["handoff"] is not True or o.get("final") is not True):
            raise _bad_json('dump: "handoff" must be true, and only on a final dump')
        # The one fd a dump may carry: the direct transport's pair end, or the connection handoff channel's.
        fd_name = "direct" if o.get("direct") is True else "handoff" if o.get("handoff") is True else None
        if ("fds" in o or fd_name is not None) and o.get("fds") != [fd_name]:
            raise _bad_json('dump: "fds" must be ["direct"] exactly when "direct" is true, ["handoff"] exactly when "handoff" is true')
        if fd_name is not None:
            msg[fd_name] = True
            msg["fds"] = [fd_name]
        if "checksum" in o:
            if o["checksum"] not in _CHECKSUMS or o.get("trailer") is not True:
                raise _bad_json('dump: "checksum" must be one of %s, and only with "trailer": true' % ", ".join(_CHECKSUMS))
            msg["checksum"] = o["checksum"]
        return msg
    if op == "trailer":
        sha = _optional_sha256(o, op)
        crc = _optional_string(o, "crc32", 8)
        if crc is not None and not (len(crc) == 8 and all(c in "0123456789abcdef" for c in crc)):
            raise _bad_json('trailer: "crc32" must be 8 lowercase hex digits')
        if (sha is None) == (crc is None):
            raise _bad_json('trailer: exactly one of "sha256" and "crc32" is required')
        return {"op": op, "sha256": sha} if sha is not None else {"op": op, "crc32": crc}
    if op == "error":
        return {"op": op, "code": str(o.get("code", "unknown"))[:64], "message": str(o.get("message", ""))[:4096]}
    if op == "handoff":
        if o.get("fds") != ["handoff"]:
            raise _bad_json('handoff: "fds" must be ["handoff"]')
        return {"op": op, "fds": ["handoff"]}
    return {"op": op}


# --------------------------------------------------------------------------- client


class _ProtocolError(Exception):
    """The peer broke the protocol: we send error `code` and close."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class StateClient:
    """A relay connection (or a no-op stand-in outside Aeterna, when `enabled` is False)."""

    def __init__(self, sock: Optional[socket.socket] = None, generation: Optional[int] = None,
                 max_frame: int = DEFAULT_MAX_FRAME):
        self._sock = sock
        self.generation = generation
        self.max_frame = max_frame
        self._wlock = threading.Lock()
        self._cond = threading.Condition()
        self._dump_cb: Optional[Callable[[bool], Any]] = None
        self._load_cb: Optional[Callable[[State], Any]] = None
        self._loaded = sock is None
        self._initial: Optional[State] = None
        self._reader: Optional[threading.Thread] = None
        self._final_pending = False
        # The last dump offered a digest trailer: a streamed state is hashed as it is sent.
        self._trailer_offered = False
        # The last dump offered a cheaper check than SHA-256 for the trailer (docs/srp.md, "Checksums").
        self._checksum_offered: Optional[str] = None
        # The last dump offered the direct transport: our end of its socket pair (docs/srp.md, "Direct transport").
        self._direct_pair: Optional[int] = None
        # When the final dump arrived (monotonic) and how long Aeterna waits for its answer (the dump's timeout_ms).
        self._final_asked: Optional[Tuple[float, Optional[float]]] = None
        self._final_sent = False
        self._final_ack: Optional[dict] = None
        self._last_ack: Optional[dict] = None
        self._eof = sock is None
        self._closed = sock is None
        self._ready_sent = False
        # Aeterna's welcome said it stores checkpoints.
        self.checkpoints = False
        # Aeterna's welcome said it offers connection handoff (docs/srp.md, "Connection handoff").
        self.handoff_offered = False
        self._connection_cb: Optional[Callable[["AdoptedConnection"], Any]] = None
        # Our end of the handoff channel, from the final dump, until handoff() takes it (closed otherwise).
        self._handoff_fd: Optional[int] = None
        self._handoff_taken = False
        # Checkpoints sent and answers received, counted: Aeterna answers them in order.
        self._checkpoint_lock = threading.Lock()
        self._checkpoints_sent = 0
        self._checkpoint_answers: Dict[int, dict] = {}
        self._checkpoints_answered = 0

    @property
    def enabled(self) -> bool:
        """True when connected to Aeterna's relay."""
        return self._sock is not None

    @property
    def last_ack(self) -> Optional[dict]:
        """The last ack Aeterna relayed for our own state (the new generation's verdict)."""
        return self._last_ack

    # ------------------------------------------------------------------ public API

    def on_dump(self, callback: Callable[[bool], Any]) -> None:
        """callback(final) -> bytes | str | JSON-able | DumpResult | None (nothing to hand over).
        Raising declines the dump (ack ok:false with the message: the reload rolls back).
        A non-final dump calls it from the relay's thread while the app serves."""
        self._dump_cb = callback

    def checkpoint(self, value: Any, timeout: Optional[float] = None) -> Optional[int]:
        """Store `value` (anything a dump callback may return) in Aeterna as the latest
        checkpoint: a generation started after a crash loads it (state.source "checkpoint").
        Returns its sequence number once Aeterna has stored it; raises RelayError on
        refusal (code "disabled", "too_large", "checksum_mismatch", "bad_state") or when
        the connection ends first. Call it after load(). Outside Aeterna: returns None."""
        if self._sock is None:
            return None
        if not self.checkpoints:
            raise RelayError("this Aeterna does not store checkpoints (orchestration.state_handoff.checkpoint.enabled is off)", "disabled")
        if not self._loaded:
            raise UsageError("call load() before checkpoint()")
        msg, fds, data, memfd = _prepare_state(value, True)
        msg["op"] = "checkpoint"
        with self._checkpoint_lock:  # the answers come in the order the checkpoints went out
            with self._cond:
                self._checkpoints_sent += 1
                ticket = self._checkpoints_sent
            try:
                self._send_frames(json.dumps(msg, separators=(",", ":")).encode("utf-8"), fds, data, msg.get("trailer") is True)
            except OSError as e:
                raise RelayError("could not send the checkpoint: %s" % e, "closed")
            finally:
                if memfd is not None:
                    os.close(memfd)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while ticket not in self._checkpoint_answers:
                if self._eof:
                    raise RelayError("the relay connection closed before the checkpoint was stored", "closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise RelayError("no answer to the checkpoint within %ss" % timeout, "timeout")
                self._cond.wait(left)
            answer = self._checkpoint_answers.pop(ticket)
        if "seq" in answer:
            return answer["seq"]
        code = answer.get("code", "bad_state")
        raise RelayError("aeterna refused the checkpoint: %s" % answer.get("message", code), code)

    def on_connection(self, callback: Callable[["AdoptedConnection"], Any]) -> None:
        """callback(AdoptedConnection) for each client connection the previous generation
        hands over at promotion (docs/srp.md, "Connection handoff"), called from the SDK's
        handoff thread, one connection after the other: hand the connection to a thread of
        your own and return. The socket is yours; raising closes it. Register it before
        ready(): a connection that arrives without a callback is closed (with a warning)."""
        self._connection_cb = callback

    def handoff(self, timeout: float = 10.0) -> Optional["Handoff"]:
        """The old generation's side of connection handoff, on the SIGTERM path before
        shutdown(): wait (up to `timeout` seconds) for the final dump, and return a Handoff
        when it carried the channel ("handoff": true), to send connections on. None when it
        did not (the new generation cannot adopt them, or Aeterna does not offer it), when
        the relay ended first, without a relay, or once taken. Drain what you do not hand
        over as usual; shutdown() then answers the final dump."""
        if self._sock is None:
            return None
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self._final_pending or self._eof or self._closed or self._handoff_taken):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            fd, self._handoff_fd = self._handoff_fd, None
            if fd is None:
                return None
            self._handoff_taken = True
        return Handoff(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd), self.max_frame)

    def on_load(self, callback: Callable[[State], Any]) -> None:
        """callback(State) for later loads (the final sync, state.final True), from the
        relay's thread while serving. Returning acks ok; raising acks ok:false with the message."""
        self._load_cb = callback

    def load(self, apply: Optional[Callable[[State], Any]] = None, timeout: Optional[float] = None) -> Optional[State]:
        """Receive the initial load (exactly once, at start-up), verify it and ack it.

        Returns None when there is no previous state (size 0 and no fds) or no relay.
        With `apply`, apply(state) runs before the ack: if it raises, the state is
        refused (ack ok:false with the message, the reload rolls back) and the
        exception propagates. Without it the state is acked as soon as verified.
        A state that fails verification (size, sha256, seals) is refused and
        RelayError is raised. timeout=None waits as long as it takes (a reload's
        state arrives as the old generation produces it).
        """
        if self._sock is None:
            return None
        if self._loaded:
            raise UsageError("load() was already called")
        sock = self._sock
        assert sock is not None
        sock.settimeout(timeout)
        try:
            try:
                msg, fds = self._recv_control()
            except socket.timeout:
                raise RelayError("no initial load within %ss" % timeout, "timeout")
            if msg["op"] == "error":
                self._eof = True
                self.close()
                raise RelayError("aeterna: %s: %s" % (msg["code"], msg["message"]), msg["code"])
            if msg["op"] != "load":
                _close_fds(fds)
                raise _ProtocolError("unexpected_op", "expected the initial load, got %r" % msg["op"])
            problem = None
            try:
                state = self._receive_load(msg, fds)
            except _Refusal as e:
                problem = e
        except _ProtocolError as e:
            self._fail(e)
            raise RelayError(str(e), e.code)
        except (OSError, EOFError) as e:
            self._eof = True
            self.close()
            raise RelayError("relay connection lost: %s" % e, "closed")
        finally:
            if self._sock is not None:
                try:
                    sock.settimeout(None)
                except OSError:
                    pass
        if problem is not None:
            try:
                self._send_control({"op": "ack", "ok": False, "error": problem.ack_error()})
            except OSError:
                pass
            self._loaded = True
            self._start_reader()
            raise RelayError(str(problem), problem.code)
        if apply is not None and state is not None:
            try:
                apply(state)
            except BaseException as e:
                try:
                    self._send_control({"op": "ack", "ok": False, "error": "load_failed: %s" % _reason(e)})
                except OSError:
                    pass
                self._loaded = True
                self._start_reader()
                raise
        try:
            self._send_control({"op": "ack", "ok": True})
        except OSError as e:
            self._eof = True
            self.close()
            raise RelayError("relay connection lost: %s" % e, "closed")
        self._initial = state
        self._loaded = True
        self._start_reader()
        return state

    def ready(self) -> None:
        """Tell Aeterna this generation serves ({"op":"ready"}; counts as READY=1).
        Call it after load(). A no-op without a relay, and after the first call."""
        if self._sock is None or self._ready_sent or self._closed:
            return
        if not self._loaded:
            raise UsageError("call load() before ready(): the new generation must take (or refuse) the state first")
        self._ready_sent = True
        try:
            self._send_control({"op": "ready"})
        except OSError as e:
            _log("could not send ready: %s" % e)

    def shutdown(self, timeout: float = 10.0) -> bool:
        """The SIGTERM path, once the app has drained: answer the final dump if one is
        pending or arrives before Aeterna closes the connection (calling the dump
        callback now, in this thread), wait for Aeterna's ack or end of file, then
        close. Returns True when a final state was handed over and acked ok, False
        otherwise. A no-op without a relay.

        `timeout` bounds the wait for the final dump (Aeterna sends it, or closes the
        connection, right after its SIGTERM). Once it has arrived, sending the state
        and waiting for the ack take as long as Aeterna said it waits (the dump's
        timeout_ms, its state_handoff.timeout), however large the state: a 1 GiB
        final sync is not cut at 10 s. Without timeout_ms, `timeout` bounds it all."""
        if self._sock is None:
            return False
        if not self._loaded:  # nobody read the initial load: nothing can be asked of us
            self.close()
            return False
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self._final_pending or self._eof or self._closed):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            answer = self._final_pending and not self._eof and not self._closed
            self._final_pending = False
            untaken, self._handoff_fd = self._handoff_fd, None
        if untaken is not None:
            _end_untaken_channel(untaken)  # handoff() was not called: the new generation adopts nothing
        with self._cond:
            if answer and self._final_asked is not None and self._final_asked[1] is not None:
                deadline = self._final_asked[0] + self._final_asked[1]  # as long as Aeterna waits for the answer
        acked = False
        if answer:
            sent_state = self._answer_dump(True)
            if sent_state:
                with self._cond:
                    while self._final_ack is None and not self._eof and not self._closed:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    acked = bool(self._final_ack and self._final_ack.get("ok") is True)
                    if self._final_ack is None:
                        _log("no ack for the final state before %s" % ("end of file" if self._eof else "the timeout"))
        self.close()
        return acked

    def close(self) -> None:
        """Close the relay connection (idempotent)."""
        with self._cond:
            handoff_fd, self._handoff_fd = self._handoff_fd, None
            if handoff_fd is not None:
                _end_untaken_channel(handoff_fd)  # never taken by handoff(): the new generation adopts nothing
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        sock = self._sock
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(5.0)
        with self._wlock:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> "StateClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ frames

    def _recv_exact_into(self, view: memoryview, fds_out: Optional[List[int]]) -> None:
        """Fill view from the socket. fds that arrive go to fds_out (None: not allowed)."""
        sock = self._sock
        assert sock is not None
        try:
            _recv_exact_into(sock, view, fds_out)
        except _ChannelEnd:
            raise EOFError("end of file") from None

    def _recv_header(self, limit: Optional[int] = None) -> Tuple[int, List[int]]:
        """Read one frame header; (length, fds that came with the frame's first bytes).
        Reads exactly 4 bytes, so a frame's fds can only arrive here (Linux stops a
        read after the message that carries them)."""
        header = bytearray(4)
        fds: List[int] = []
        try:
            self._recv_exact_into(memoryview(header), fds)
        except BaseException:
            _close_fds(fds)
            raise
        (length,) = _HEADER.unpack(header)
        try:
            if length == 0:
                raise _ProtocolError("bad_frame", "a frame of length 0")
            max_frame = self.max_frame if limit is None else limit
            if length > max_frame:
                raise _ProtocolError("too_large", "a frame of %d bytes, above max_frame %d" % (length, max_frame))
        except _ProtocolError:
            _close_fds(fds)
            raise
        return length, fds

    def _recv_control(self) -> Tuple[dict, List[int]]:
        length, fds = self._recv_header()
        try:
            body = bytearray(length)
            self._recv_exact_into(memoryview(body), None)
            msg = _parse_message(body)
            named = len(msg.get("fds", [])) if msg["op"] in ("load", "state", "dump", "handoff") else 0
            if len(fds) != named:
                raise _ProtocolError("bad_frame", "%s: %d fds named, %d received" % (msg["op"], named, len(fds)))
        except BaseException:
            _close_fds(fds)
            raise
        return msg, fds

    def _receive_load(self, msg: dict, fds: List[int]) -> Optional[State]:
        """Read a load's data (or map its memfd) and verify it. Returns the state (None
        for "no previous state"). Raises _Refusal when it must be refused with an ack
        ok:false, _ProtocolError for a malformed stream (error + close). The fields
        were checked by _parse_message, the fd count by _recv_control."""
        names = msg.get("fds", [])
        owned = list(fds)
        try:
            size = msg["size"]
            transport = msg.get("transport", "stream")
            named = dict(zip(names, fds))
            final = msg.get("final") is True
            encoding = msg.get("encoding")
            sha = msg.get("sha256")
            if transport == "memfd":
                memfd = named.pop("state")
                try:
                    data = _map_memfd(memfd, size, sha)
                finally:
                    os.close(memfd)
                    owned.remove(memfd)
            else:
                # An anonymous mapping is zero without a memset: its pages are touched as the bytes land.
                data = mmap.mmap(-1, size) if size else b""
                hasher = _Hasher(size, msg.get("checksum"))
                short = None  # a direct state that was not exactly `size` bytes (refused once its trailer is in)
                if transport == "direct":
                    pair = named.pop("direct")
                    owned.remove(pair)
                    try:
                        short = _receive_direct(pair, memoryview(data), hasher)
                    finally:
                        actual = hasher.hexdigest()
                elif size:
                    view = memoryview(data)
                    got = 0
                    try:
                        while got < size:
                            length, extra = self._recv_header()
                            if extra:
                                _close_fds(extra)
                                raise _ProtocolError("bad_frame", "fds on a data frame")
                            if length > size - got:
                                raise _ProtocolError("bad_frame", "data frames exceed the announced size %d" % size)
                            self._recv_exact_into(view[got:got + length], None)
                            hasher.update(view[got:got + length])
                            got += length
                    finally:
                        actual = hasher.hexdigest()  # also ends the hashing thread, whatever happened
                        view.release()
                else:
                    actual = hasher.hexdigest()
                if msg.get("trailer"):
                    trailer, extra = self._recv_control()
                    _close_fds(extra)
                    if trailer["op"] != "trailer":
                        raise _ProtocolError("unexpected_op", "%r where the announced digest trailer was due" % trailer["op"])
                    # A trailer of the other kind than the header announced matches nothing (Aeterna never relays one).
                    sha = trailer.get(hasher.name) or "none"
                if short is not None:
                    raise _Refusal("bad_state", short)
                if sha is not None and actual != sha:
                    raise _Refusal("checksum_mismatch", "announced %s %s, received %s (%d bytes)" % (hasher.name, sha, actual, size))
                # the mapping as received (no copy of a large state)
            owned = []  # the named fds now belong to the State
            if size == 0 and not named and transport == "stream":
                return None
            return State(encoding, data, named, final, transport, msg.get("source", "relay"), msg.get("seq"), msg.get("age_ms"))
        finally:
            _close_fds(owned)

    def _send_frames(self, first: bytes, fds: Optional[List[int]] = None, data: Any = None, trailer: bool = False,
                     direct: Optional[int] = None, checksum: Optional[str] = None) -> None:
        """Send one control frame (fds attached to its header, in a sendmsg of its own)
        and then `data` as data frames, without another frame in between; with
        `trailer`, hash the data as it goes and send its digest in a trailer frame.
        With `direct` (the fd of a direct state's socket pair, closed here), the data
        goes on that pair instead of as data frames. `checksum`: the trailer's check
        when not SHA-256 (the header said so)."""
        pair = socket.socket(fileno=direct) if direct is not None else None  # ours: closed here, whatever happens
        try:
            self._send_frames_locked(first, fds, data, trailer, pair, checksum)
        finally:
            if pair is not None:
                pair.close()

    def _send_frames_locked(self, first: bytes, fds: Optional[List[int]], data: Any, trailer: bool,
                            pair: Optional[socket.socket], checksum: Optional[str]) -> None:
        sock = self._sock
        if sock is None:
            return
        with self._wlock:
            header = _HEADER.pack(len(first))
            if fds:
                sent = sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
                if sent < len(header):
                    sock.sendall(header[sent:])
                sock.sendall(first)
            else:
                sock.sendall(header + first)
            if pair is not None:
                hasher = _Hasher(len(data), checksum)
                _send_direct(pair, memoryview(data).cast("B"), hasher)
                body = json.dumps(hasher.trailer(), separators=(",", ":")).encode("utf-8")
                sock.sendall(_HEADER.pack(len(body)) + body)
            elif data is not None:
                view = memoryview(data).cast("B")
                hasher = _Hasher(len(view), checksum) if trailer else None
                chunk = max(1, min(DATA_CHUNK, self.max_frame))
                try:
                    for off in range(0, len(view), chunk):
                        piece = view[off:off + chunk]
                        if hasher is not None:
                            hasher.update(piece)
                        sock.sendall(_HEADER.pack(len(piece)))
                        sock.sendall(piece)
                finally:
                    ended = hasher.trailer() if hasher is not None else None
                if ended is not None:
                    body = json.dumps(ended, separators=(",", ":")).encode("utf-8")
                    sock.sendall(_HEADER.pack(len(body)) + body)

    def _send_control(self, msg: dict, fds: Optional[List[int]] = None) -> None:
        self._send_frames(json.dumps(msg, separators=(",", ":")).encode("utf-8"), fds)

    def _fail(self, e: _ProtocolError) -> None:
        _log("protocol error from aeterna (%s): %s" % (e.code, e))
        try:
            self._send_control({"op": "error", "code": e.code, "message": str(e)})
        except OSError:
            pass
        self._eof = True
        self.close()

    # ------------------------------------------------------------------ dump

    def _answer_dump(self, final: bool) -> bool:
        """Call the dump callback and send its state (or the decline). True when a state was sent."""
        cb = self._dump_cb
        pair, self._direct_pair = (None, self._direct_pair) if final else (self._direct_pair, None)
        try:
            value = cb(final) if cb is not None else None
            msg, fds, data, memfd = _prepare_state(value, self._trailer_offered, pair is not None, self._checksum_offered)
        except BaseException as e:
            _close_fds([pair] if pair is not None else [])
            _log("no state to hand over, the dump is declined: %s" % _reason(e))
            try:
                self._send_control({"op": "ack", "ok": False, "error": "dump_failed: %s" % _reason(e)})
            except OSError as e2:
                _log("could not decline the dump: %s" % e2)
            return False
        if final:
            with self._cond:  # before sending: Aeterna's ack may come back before _send_frames returns
                self._final_sent = True
        direct = pair if msg.get("transport") == "direct" else None
        if pair is not None and direct is None:
            os.close(pair)  # offered, not taken (no bytes to stream)
        try:
            self._send_frames(json.dumps(msg, separators=(",", ":")).encode("utf-8"), fds, data, msg.get("trailer") is True, direct,
                              msg.get("checksum"))
        except OSError as e:
            _log("could not send the state: %s" % e)
            return False
        finally:
            if memfd is not None:
                os.close(memfd)
        return True

    # ------------------------------------------------------------------ reader thread

    def _start_reader(self) -> None:
        if self._reader is not None or self._closed:
            return
        self._reader = threading.Thread(target=self._read_loop, name="aeterna-relay", daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        try:
            while not self._closed:
                msg, fds = self._recv_control()
                op = msg.get("op")
                if op == "dump":
                    self._trailer_offered = msg.get("trailer") is True
                    self._checksum_offered = msg.get("checksum")
                    if self._direct_pair is not None:
                        _close_fds([self._direct_pair])  # an earlier offer nobody answered
                    self._direct_pair = fds[0] if msg.get("direct") else None
                    if msg.get("final") is True:
                        wait_ms = msg.get("timeout_ms")
                        valid = isinstance(wait_ms, int) and not isinstance(wait_ms, bool) and wait_ms > 0
                        with self._cond:
                            if self._handoff_fd is not None:
                                _end_untaken_channel(self._handoff_fd)  # an earlier channel nobody took
                            self._handoff_fd = fds[0] if msg.get("handoff") else None
                            if self._closed and self._handoff_fd is not None:  # close() already ran: nobody takes it
                                _end_untaken_channel(self._handoff_fd)
                                self._handoff_fd = None
                            self._final_asked = (time.monotonic(), wait_ms / 1000.0 if valid else None)
                            self._final_pending = True
                            self._cond.notify_all()
                    else:
                        self._answer_dump(False)
                elif op == "load":
                    try:
                        state = self._receive_load(msg, fds)
                    except _Refusal as e:
                        _log("refused a load: %s" % e.ack_error())
                        self._send_control({"op": "ack", "ok": False, "error": e.ack_error()})
                        continue
                    self._deliver_load(state)
                elif op == "ack":
                    _close_fds(fds)
                    if fds:
                        raise _ProtocolError("bad_frame", "fds on an ack frame")
                    with self._cond:
                        self._last_ack = msg
                        if self._final_sent:
                            self._final_ack = msg
                        self._cond.notify_all()
                    if msg.get("ok") is not True:
                        _log("the new generation refused our state: %s" % msg.get("error"))
                elif op == "handoff":
                    # The new generation's end of the channel: read on a thread of its own, so the relay (the
                    # final load arrives meanwhile) is never held up by the app's connection callback.
                    threading.Thread(target=_receive_connections, args=(fds[0], self.max_frame, lambda: self._connection_cb),
                                     name="aeterna-handoff", daemon=True).start()
                elif op == "checkpointed":
                    _close_fds(fds)
                    with self._cond:
                        self._checkpoints_answered += 1
                        self._checkpoint_answers[self._checkpoints_answered] = msg
                        self._cond.notify_all()
                elif op == "error":
                    _close_fds(fds)
                    _log("aeterna closed the relay: %s: %s" % (msg.get("code"), msg.get("message")))
                    break
                else:
                    _close_fds(fds)
                    raise _ProtocolError("unexpected_op", "unexpected op %r" % op)
        except _ProtocolError as e:
            if not self._closed:
                self._fail(e)
        except (OSError, EOFError, ValueError):
            pass  # end of file, or close() shut the socket down
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()
            if not self._closed:
                # Aeterna closed: nothing more will be asked. Keep the object usable as a no-op.
                self.close()

    def _deliver_load(self, state: Optional[State]) -> None:
        if state is None:
            self._send_control({"op": "ack", "ok": True})
            return
        cb = self._load_cb
        if cb is None:
            _close_fds(state.fds.values())
            state.close()
            self._send_control({"op": "ack", "ok": False, "error": "load_failed: no on_load() callback for a later load"})
            return
        try:
            cb(state)
        except BaseException as e:
            _log("the load callback failed: %s" % _reason(e))
            self._send_control({"op": "ack", "ok": False, "error": "load_failed: %s" % _reason(e)})
            return
        self._send_control({"op": "ack", "ok": True})


class _Hasher:
    """SHA-256 of bytes fed in order. Large inputs are hashed on a thread of their
    own (hashlib releases the GIL), so hashing overlaps the socket instead of
    following it; the pieces must stay valid and unchanged until hexdigest()."""

    def __init__(self, total: int, checksum: Optional[str] = None):
        # CRC-32 where the dump offered it (docs/srp.md, "Checksums"); zlib releases the GIL as hashlib does.
        self.name = "crc32" if checksum == "crc32" else "sha256"
        self._hash = hashlib.sha256() if self.name == "sha256" else _Crc32()
        self._queue: Any = None
        self._thread: Optional[threading.Thread] = None
        if total >= _HASH_THREAD_MIN:
            import queue
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="aeterna-sha256", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            piece = self._queue.get()
            if piece is None:
                return
            self._hash.update(piece)

    def update(self, piece: Any) -> None:
        if self._queue is None:
            self._hash.update(piece)
        else:
            self._queue.put(piece)

    def hexdigest(self) -> str:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        return self._hash.hexdigest()

    def trailer(self) -> dict:
        return {"op": "trailer", self.name: self.hexdigest()}


class _Crc32:
    """zlib's CRC-32 with hashlib's update/hexdigest."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, piece: Any) -> None:
        self._value = zlib.crc32(piece, self._value)

    def hexdigest(self) -> str:
        return "%08x" % (self._value & 0xFFFFFFFF)


def _receive_direct(fd: int, view: memoryview, hasher: "_Hasher") -> Optional[str]:
    """Read a direct state's bytes from its socket pair into `view` (hashed as they
    land) up to the sender's end of file, and close the pair. None when exactly
    len(view) bytes came; else what was wrong."""
    size = len(view)
    got = 0
    pair = socket.socket(fileno=fd)
    try:
        pair.setblocking(True)
        while got < size:
            n = pair.recv_into(view[got:], min(size - got, _DIRECT_CHUNK))
            if n == 0:
                return "the direct socket pair ended after %d of %d bytes" % (got, size)
            hasher.update(view[got:got + n])
            got += n
        extra = pair.recv(1)  # the sender closes its end after the last byte
        if extra:
            return "more bytes than the %d announced on the direct socket pair" % size
        return None
    except OSError as e:
        return "the direct socket pair failed after %d of %d bytes: %s" % (got, size, e)
    finally:
        pair.close()
        view.release()


def _send_direct(pair: socket.socket, view: memoryview, hasher: "_Hasher") -> None:
    """Write a direct state's bytes on its socket pair, hashing them as they go, and
    close our end (the receiver's end of file). A receiver that went away ends the
    writing: the digest then matches nothing, and the trailer still goes out, so the
    connection stays in step."""
    try:
        pair.setblocking(True)
        for off in range(0, len(view), _DIRECT_CHUNK):
            piece = view[off:off + _DIRECT_CHUNK]
            hasher.update(piece)
            pair.sendall(piece, _MSG_NOSIGNAL)  # a receiver gone is EPIPE here, never a SIGPIPE for the app
    except OSError as e:
        _log("the direct transport ended early: %s" % e)
    finally:
        pair.close()


def _prepare_state(value: Any, trailer: bool = False, direct: bool = False,
                   checksum: Optional[str] = None) -> Tuple[dict, List[int], Any, Optional[int]]:
    """(state message, fds for its header, data for data frames or None, memfd to close
    once sent) for a dump callback's value. With `trailer` (the dump offered one), a
    streamed state's digest is left to the trailer frame; with `direct` too, its bytes
    go on the dump's socket pair, and `checksum` (offered by the dump) is the
    trailer's check instead of SHA-256. Raises when the value cannot be sent."""
    if value is None:
        return {"op": "state", "size": 0}, [], None, None
    if not isinstance(value, DumpResult):
        value = DumpResult(data=value)
    names = list(value.fds.keys())
    fds = [value.fds[n] for n in names]
    if "state" in names:
        if value.memfd is not None:
            os.close(value.memfd)
        raise ValueError('the fd name "state" is reserved for the memfd transport')
    memfd = value.memfd
    encoding = value.encoding
    if memfd is None and value.transport == "memfd":
        data, encoding = _to_bytes(value.data if value.data is not None else b"", value.encoding)
        memfd = memfd_state(data)
    if memfd is not None:
        try:
            size = os.fstat(memfd).st_size
            seals = fcntl.fcntl(memfd, F_GET_SEALS)
            if seals & _REQUIRED_SEALS != _REQUIRED_SEALS:
                raise ValueError("the memfd is not sealed with F_SEAL_WRITE, F_SEAL_SHRINK and F_SEAL_GROW (use memfd_state())")
            if len(fds) + 1 > MAX_FDS_PER_FRAME:
                raise ValueError("more than %d fds on one frame" % MAX_FDS_PER_FRAME)
            msg: Dict[str, Any] = {"op": "state", "encoding": encoding or "binary", "size": size, "transport": "memfd"}
            if value.sha256 is True:
                msg["sha256"] = _sha256_fd(memfd, size)
            elif isinstance(value.sha256, str):
                msg["sha256"] = value.sha256.lower()
            msg["fds"] = ["state"] + names
        except BaseException:
            os.close(memfd)  # the SDK owns a memfd handed to it, sent or not
            raise
        return msg, [memfd] + fds, None, memfd
    data, encoding = _to_bytes(value.data if value.data is not None else b"", value.encoding)
    if len(fds) > MAX_FDS_PER_FRAME:
        raise ValueError("more than %d fds on one frame" % MAX_FDS_PER_FRAME)
    view = memoryview(data).cast("B")
    if len(view) == 0 and not fds:
        return {"op": "state", "size": 0}, [], None, None
    msg = {"op": "state", "encoding": encoding, "size": len(view)}
    if trailer and len(view):
        msg["trailer"] = True  # hashed as it is sent (_send_frames)
        if direct:
            msg["transport"] = "direct"
        if checksum in _CHECKSUMS:
            msg["checksum"] = checksum
    else:
        msg["sha256"] = hashlib.sha256(view).hexdigest()
    if names:
        msg["fds"] = names
    return msg, fds, (view if len(view) else None), None


def _reason(e: BaseException) -> str:
    text = str(e)
    return "%s: %s" % (type(e).__name__, text) if text else type(e).__name__


def _fds_from_ancillary(anc) -> List[int]:
    fds: List[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - (len(data) % a.itemsize)])
            fds.extend(a)
    return fds


def _map_memfd(fd: int, size: int, sha: Optional[str]) -> Any:
    """A read-only mapping of a received memfd (b"" when empty); _Refusal when it must be refused."""
    try:
        actual_size = os.fstat(fd).st_size
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError as e:
        raise _Refusal("bad_state", "the memfd cannot be inspected: %s" % e)
    if seals & _REQUIRED_SEALS != _REQUIRED_SEALS:
        raise _Refusal("bad_state", "the memfd is not sealed with F_SEAL_WRITE, F_SEAL_SHRINK and F_SEAL_GROW")
    if actual_size != size:
        raise _Refusal("bad_state", "the memfd holds %d bytes, %d announced" % (actual_size, size))
    data: Any = b""
    if size:
        data = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    if sha is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            if size:
                data.close()
            raise _Refusal("checksum_mismatch", "announced sha256 %s, the memfd holds %s (%d bytes)" % (sha, actual, size))
    return data


def connect(path: Optional[str] = None, timeout: float = 10.0, handoff: bool = True) -> StateClient:
    """Connect to Aeterna's state relay and do the handshake.

    path defaults to $LIVERELAY_STATE_SOCK; without either, returns a no-op client
    (load() -> None, everything else does nothing), so the app runs the same outside
    Aeterna. Raises RelayError when the relay is configured but the handshake fails
    (e.g. code "forbidden" or "busy"); `timeout` bounds the connect and handshake.
    `handoff`: say in the hello that this app takes part in connection handoff (it can
    receive fds, so by default yes); False keeps every connection with its generation.
    """
    if path is None:
        path = os.environ.get("LIVERELAY_STATE_SOCK") or None
    if not path:
        return StateClient(None)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client = StateClient(sock)
    try:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
            except OSError:
                pass  # a smaller buffer only costs more reads
        sock.settimeout(timeout)
        sock.connect(path)
        # trailer: this SDK verifies a digest that follows the data (Aeterna then lets senders hash as they send)
        # direct: it can also send and receive a state on a socket pair of its own (docs/srp.md, "Direct transport")
        # checksums: besides SHA-256 it computes and verifies CRC-32 (docs/srp.md, "Checksums")
        # handoff: it can hand its client connections over and adopt the previous generation's ("Connection handoff")
        hello = {"op": "hello", "v": PROTOCOL_VERSION, "trailer": True, "direct": True, "checksums": ["crc32", "sha256"]}
        if handoff:
            hello["handoff"] = True
        client._send_control(hello)
        msg, fds = client._recv_control()
        _close_fds(fds)
        if fds:
            raise _ProtocolError("bad_frame", "fds on a welcome frame")
        if msg.get("op") == "error":
            raise RelayError("aeterna refused the relay connection: %s: %s" % (msg.get("code"), msg.get("message")), msg.get("code"))
        if msg.get("op") != "welcome":
            raise _ProtocolError("unexpected_op", "expected welcome, got %r" % msg.get("op"))
        if msg.get("v") != PROTOCOL_VERSION:
            raise _ProtocolError("unsupported_version", "welcome with v=%r" % msg.get("v"))
        generation = msg.get("generation")
        max_frame = msg.get("max_frame")
        client.generation = generation if isinstance(generation, int) else None
        client.checkpoints = msg.get("checkpoint") is True
        client.handoff_offered = msg.get("handoff") is True
        if isinstance(max_frame, int) and max_frame > 0:
            client.max_frame = max_frame
        sock.settimeout(None)
        return client
    except _ProtocolError as e:
        client._fail(e)
        raise RelayError(str(e), e.code)
    except socket.timeout:
        client.close()
        raise RelayError("no welcome from %s within %ss" % (path, timeout), "timeout")
    except (OSError, EOFError) as e:
        client.close()
        raise RelayError("cannot connect to the state relay at %s: %s" % (path, e), "closed")
    except BaseException:
        client.close()
        raise


# --------------------------------------------------------------------------- connection handoff
#
# docs/srp.md, "Connection handoff": at promotion Aeterna gives the two generations
# a socket pair of their own. The old one sends each client connection it hands
# over as one `conn` frame carrying the socket (one fd, on the sendmsg of the
# frame's first byte), then the bytes it had read but not processed as data
# frames, and ends with {"op":"end","count":N}. The new one reads the channel to
# end of file and adopts each connection as it arrives. SRP's framing.

MAX_CONNECTION_ID = 256


class AdoptedConnection:
    """A client connection handed over by the previous generation.

    id:     the old generation's name for it (a string)
    meta:   its per-connection state, the JSON value the old generation sent (None if none)
    unread: bytes the client had sent that the old generation read but did not process:
            process them before anything you read from the socket
    socket: the connected socket (close-on-exec, blocking); yours to use and close
    """

    def __init__(self, id: str, meta: Any, unread: bytes, sock: socket.socket):
        self.id = id
        self.meta = meta
        self.unread = unread
        self.socket = sock

    def __repr__(self) -> str:
        return "AdoptedConnection(id=%r, unread=%d bytes, fd=%d)" % (self.id, len(self.unread), self.socket.fileno())


class Handoff:
    """The old generation's end of the handoff channel (from StateClient.handoff()).

    send() hands over one connection, end() says how many went and closes the channel.
    Safe to call from several threads (each frame and its data go out together)."""

    def __init__(self, channel: socket.socket, max_frame: int = DEFAULT_MAX_FRAME):
        self._channel = channel
        self._max_frame = max_frame
        self._lock = threading.Lock()
        self._count = 0
        self._ended = False
        channel.setblocking(True)  # a full pair makes the sender wait, as the protocol says

    @property
    def count(self) -> int:
        """The connections sent so far."""
        return self._count

    def send(self, sock: socket.socket, id: str, meta: Any = None, unread: Union[bytes, bytearray, memoryview] = b"") -> None:
        """Hand `sock` (a connected socket you have stopped reading from) to the new
        generation as connection `id` (1 to 256 characters), with `meta` (any JSON value:
        what the new generation needs to continue it) and `unread` (bytes read from it but
        not processed). Then closes your socket object without shutdown(): the connection
        lives on in the new generation. ValueError (nothing sent, the socket still yours)
        for a bad id, meta that is not JSON, or a frame above max_frame; RelayError
        ("closed") when the channel is gone: if that happened before the socket went out
        it is still yours (keep serving or drain it), else it was closed."""
        if not isinstance(id, str) or not 0 < len(id) <= MAX_CONNECTION_ID:
            raise ValueError("a connection id is a string of 1 to %d characters" % MAX_CONNECTION_ID)
        view = memoryview(unread).cast("B")
        try:
            body = json.dumps({"op": "conn", "id": id, "meta": meta, "unread": len(view), "fds": ["conn"]},
                              separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise ValueError("meta must be a JSON value: %s" % e)
        if len(body) > self._max_frame:
            raise ValueError("the conn frame (%d bytes) is above max_frame %d: make meta smaller" % (len(body), self._max_frame))
        frame = _HEADER.pack(len(body)) + body
        with self._lock:
            if self._ended:
                raise UsageError("end() was called: no connection can follow")
            try:
                sent = self._channel.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]).tobytes())],
                                           _MSG_NOSIGNAL)
            except OSError as e:
                raise RelayError("the handoff channel is closed: %s (the connection is still yours)" % e, "closed")
            try:
                if sent < len(frame):
                    self._channel.sendall(frame[sent:], _MSG_NOSIGNAL)
                chunk = max(1, min(DATA_CHUNK, self._max_frame))
                for off in range(0, len(view), chunk):
                    piece = view[off:off + chunk]
                    self._channel.sendall(_HEADER.pack(len(piece)) + bytes(piece), _MSG_NOSIGNAL)
            except OSError as e:
                raise RelayError("the handoff channel closed while connection %r went over: %s" % (id, e), "closed")
            else:
                self._count += 1
            finally:
                sock.close()  # the kernel holds the connection for the new generation (or, cut short, ends it)

    def end(self) -> int:
        """Send {"op":"end","count":N}, close the channel and return N (the connections
        sent). A second call only returns N."""
        with self._lock:
            if not self._ended:
                self._ended = True
                body = json.dumps({"op": "end", "count": self._count}, separators=(",", ":")).encode("utf-8")
                try:
                    self._channel.sendall(_HEADER.pack(len(body)) + body, _MSG_NOSIGNAL)
                except OSError as e:
                    _log("could not end the handoff channel: %s" % e)
                finally:
                    self._channel.close()
            return self._count

    def close(self) -> None:
        """Close the channel without `end` (the new generation adopts what arrived whole)."""
        with self._lock:
            self._ended = True
            self._channel.close()


def _end_untaken_channel(fd: int) -> None:
    """Close a handoff channel the app never took, after saying "no connections" ({"op":"end","count":0}), so
    the new generation reads a clean end rather than an old generation that died mid-handoff. Best effort: a few
    bytes on an empty socket, sent without blocking."""
    body = json.dumps({"op": "end", "count": 0}, separators=(",", ":")).encode("utf-8")
    channel = socket.socket(fileno=fd)
    try:
        channel.setblocking(False)
        channel.send(_HEADER.pack(len(body)) + body, _MSG_NOSIGNAL)
    except OSError:
        pass
    finally:
        channel.close()


class _ChannelEnd(Exception):
    """End of file on the handoff channel: at a frame boundary (whole=True) or within one."""

    def __init__(self, whole: bool):
        super().__init__("end of file")
        self.whole = whole


def _recv_exact_into(sock: socket.socket, view: memoryview, fds_out: Optional[List[int]]) -> None:
    """Fill view from sock. fds that arrive go to fds_out (None: not allowed, bad_frame);
    _ChannelEnd(whole=False) at end of file."""
    got = 0
    while got < len(view):
        n, anc, flags, _ = sock.recvmsg_into([view[got:]], _ANC_SPACE, _MSG_CMSG_CLOEXEC)
        received = _fds_from_ancillary(anc)
        if received:
            if fds_out is None:
                _close_fds(received)
                raise _ProtocolError("bad_frame", "file descriptors on bytes that are not the start of a frame")
            fds_out.extend(received)
        if flags & socket.MSG_CTRUNC:
            raise _ProtocolError("bad_frame", "more file descriptors than %d on one frame" % MAX_FDS_PER_FRAME)
        if n == 0:
            raise _ChannelEnd(False)
        got += n


def _read_channel_frame(sock: socket.socket, max_frame: int, fds: List[int], data: bool) -> bytes:
    """One frame of the handoff channel; the fds on its first bytes land in `fds` (a data
    frame may carry none). _ChannelEnd(whole=True) at end of file before its first byte."""
    header = bytearray(4)
    n, anc, flags, _ = sock.recvmsg_into([memoryview(header)], _ANC_SPACE, _MSG_CMSG_CLOEXEC)
    fds.extend(_fds_from_ancillary(anc))
    if n == 0:
        raise _ChannelEnd(True)
    if flags & socket.MSG_CTRUNC:
        raise _ProtocolError("bad_frame", "more file descriptors than %d on one frame" % MAX_FDS_PER_FRAME)
    _recv_exact_into(sock, memoryview(header)[n:], fds)
    if data and fds:
        raise _ProtocolError("bad_frame", "fds on a data frame")
    (length,) = _HEADER.unpack(header)
    if length == 0:
        raise _ProtocolError("bad_frame", "a frame of length 0")
    if length > max_frame:
        raise _ProtocolError("too_large", "a frame of %d bytes, above max_frame %d" % (length, max_frame))
    body = bytearray(length)
    _recv_exact_into(sock, memoryview(body), None)
    return bytes(body)


def _parse_channel_message(body: bytes, fds: List[int]) -> dict:
    """A conn or end frame, checked as docs/srp.md says; _ProtocolError otherwise."""
    try:
        o = json.loads(body.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError included
        raise _bad_json("a handoff frame is not JSON: %s" % e)
    if not isinstance(o, dict) or not isinstance(o.get("op"), str):
        raise _bad_json('a handoff frame is not a JSON object with a string "op"')
    op = o["op"]
    if op == "end":
        if fds:
            raise _ProtocolError("bad_frame", "fds on an end frame")
        if not _is_whole(o.get("count")) or o["count"] < 0:
            raise _bad_json('end: "count" must be a whole number >= 0')
        return {"op": op, "count": o["count"]}
    if op != "conn":
        raise _ProtocolError("unexpected_op", 'unexpected op "%s" on the handoff channel' % op[:40])
    cid = o.get("id")
    if not isinstance(cid, str) or not 0 < len(cid) <= MAX_CONNECTION_ID:
        raise _bad_json('conn: "id" must be a string of 1 to %d characters' % MAX_CONNECTION_ID)
    if not _is_whole(o.get("unread")) or o["unread"] < 0:
        raise _bad_json('conn: "unread" must be a whole number >= 0')
    if o.get("fds") != ["conn"]:
        raise _bad_json('conn: "fds" must be ["conn"]')
    if len(fds) != 1:
        raise _ProtocolError("bad_frame", "conn: %d fds received, 1 named" % len(fds))
    return {"op": op, "id": cid, "meta": o.get("meta"), "unread": o["unread"]}


def _receive_connections(fd: int, max_frame: int, callback: Callable[[], Optional[Callable[[AdoptedConnection], Any]]]) -> int:
    """The new generation's side: read the handoff channel `fd` to end of file, adopting
    each connection as its frame and unread bytes arrive (callback() gives the app's
    callback at that moment). A frame that breaks the rules ends the channel: its fds
    are closed and nothing further is read. Closes the channel; returns how many
    connections were adopted."""
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd)
    adopted = 0
    try:
        channel.setblocking(True)
        while True:
            fds: List[int] = []
            try:
                msg = _parse_channel_message(_read_channel_frame(channel, max_frame, fds, False), fds)
                if msg["op"] == "end":
                    if msg["count"] != adopted:
                        _log("the handoff ended with count %d, %d connections arrived" % (msg["count"], adopted))
                    return adopted
                unread = bytearray()
                while len(unread) < msg["unread"]:
                    extra: List[int] = []  # fds on a data frame: the frame is malformed, closed with the conn's
                    try:
                        piece = _read_channel_frame(channel, max_frame, extra, True)
                    finally:
                        fds.extend(extra)
                    if len(piece) > msg["unread"] - len(unread):
                        raise _ProtocolError("bad_frame", "data frames exceed the announced unread %d" % msg["unread"])
                    unread += piece
            except _ChannelEnd as e:
                _close_fds(fds)
                if not (e.whole and not fds):
                    _log("the handoff channel ended within a frame: that connection is closed")
                else:
                    _log("the handoff channel ended without its end frame (the old generation died?): %d adopted" % adopted)
                return adopted
            except _ProtocolError as e:
                _close_fds(fds)
                _log("a malformed frame on the handoff channel (%s: %s): its connection is closed, nothing more is read" % (e.code, e))
                return adopted
            if _adopt(fds[0], msg, bytes(unread), callback()):
                adopted += 1
    except OSError as e:
        _log("the handoff channel failed: %s" % e)
        return adopted
    finally:
        channel.close()


def _adopt(fd: int, msg: dict, unread: bytes, callback: Optional[Callable[[AdoptedConnection], Any]]) -> bool:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        _close_fds([fd])
        _log("connection %r: the fd handed over is not a socket (%s): closed" % (msg["id"], e))
        return False
    if callback is None:
        sock.close()
        _log("connection %r handed over, but no on_connection() callback is registered: closed" % msg["id"])
        return False
    try:
        sock.setblocking(True)  # as the socket object says it is (the flag came from the old generation's open file)
        callback(AdoptedConnection(msg["id"], msg["meta"], unread, sock))
        return True
    except BaseException as e:
        sock.close()
        _log("the connection callback failed for %r: %s (connection closed)" % (msg["id"], _reason(e)))
        return False


# --------------------------------------------------------------------------- drain
#
# A graceful HTTP drain for stdlib servers (http.server / socketserver), with the
# TypeScript SDK's semantics (src/client/drain.ts): stop accepting; from now on
# every response says "Connection: close"; close only connections that have had
# no request in flight for `idle`; return once every connection is closed.
#
# Why not server.shutdown() + server_close(): ThreadingHTTPServer's handler threads
# are daemon threads, so server_close() waits for none of them, and the process
# exits with requests in flight; and an idle keep-alive connection cut at that
# moment may be the one a client is writing its next request on (a reset).
#
# How: track_connections() records each accepted connection (the server's
# process_request / shutdown_request) and mixes _DrainingHandler into the
# server's handler class. Between two requests that handler waits for the next
# one with poll() instead of blocking in readline(), and marks the connection
# busy, under the tracker's lock, before it reads a byte. The drain closes a
# connection only under that lock, only when it is not busy, idle for `idle`,
# and the kernel holds no byte of a next request for it (poll() says not
# readable); so a request that has arrived is always answered (with
# "Connection: close"). What no server can see is a request still on the wire:
# after `idle` without one, a client is unlikely to be sending it just then.


class _Tracked:
    """One accepted connection: busy while a request is being read or answered."""

    __slots__ = ("busy", "last", "closing")

    def __init__(self) -> None:
        self.busy = False
        self.last = time.monotonic()
        self.closing = False


class _Tracker:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.conns: Dict[Any, _Tracked] = {}  # the request socket -> its entry
        self.draining = False
        self.serving: Optional[int] = None  # the thread in serve_forever()

    def add(self, request: Any) -> None:
        with self.cond:
            self.conns[request] = _Tracked()

    def remove(self, request: Any) -> None:
        with self.cond:
            if self.conns.pop(request, None) is not None:
                self.cond.notify_all()

    def wait_for_request(self, entry: _Tracked, handler: Any) -> bool:
        """Between two requests: wait until the next one starts arriving (True, the
        connection is then busy) or the drain closes the connection (False)."""
        sock = handler.connection
        timeout = sock.gettimeout()
        with self.cond:
            if entry.closing:
                return False
            if _buffered(handler.rfile, sock, timeout):  # a pipelined request already read
                entry.busy = True
                return True
        if not _wait_readable(sock, timeout):
            return False  # the handler's own timeout, as readline() would have raised
        with self.cond:
            if entry.closing:
                return False
            entry.busy = True
            return True

    def request_done(self, entry: _Tracked) -> None:
        with self.cond:
            entry.busy = False
            entry.last = time.monotonic()

    def close_idle(self, idle: float) -> None:
        """Close (shutdown(2)) every connection idle for `idle` with nothing to read; under the lock."""
        now = time.monotonic()
        for request, entry in self.conns.items():
            if entry.busy or entry.closing or now - entry.last < idle or _readable(request):
                continue
            entry.closing = True
            try:
                request.shutdown(socket.SHUT_RDWR)  # wakes its handler's poll(); the client sees the end
            except OSError:
                pass


def _buffered(rfile: Any, sock: Any, timeout: Optional[float]) -> bool:
    """Whether bytes of a next request are already in the handler's read buffer
    (a pipelining client), or in the kernel: a peek that never blocks."""
    pending = getattr(sock, "pending", None)  # TLS: decrypted bytes held by the ssl module
    if pending is not None and pending():
        return True
    try:
        sock.settimeout(0)
        try:
            return bool(rfile.peek(1))  # b"" when nothing is there (the read would block) or at end of file
        finally:
            sock.settimeout(timeout)
    except (OSError, ValueError):
        return True  # let the handler's own read see the error


def _wait_readable(sock: Any, timeout: Optional[float]) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI | getattr(select, "POLLRDHUP", 0x2000))
    try:
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))
    except (OSError, ValueError):
        return True


def _readable(sock: Any) -> bool:
    """A byte (or the end) waits in the kernel: a request is arriving, or the client closed."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return False


class _DrainingHandler:
    """Mixed into the server's handler class (a BaseHTTPRequestHandler) by
    track_connections(): waits for each request as _Tracker.wait_for_request says,
    and once the drain has started makes every final response "Connection: close"."""

    def _aeterna_entry(self) -> Tuple[Optional[_Tracker], Optional[_Tracked]]:
        tracker = getattr(self.server, "_aeterna_tracker", None)  # type: ignore[attr-defined]
        if tracker is None:
            return None, None
        with tracker.cond:
            return tracker, tracker.conns.get(self.request)  # type: ignore[attr-defined]

    def handle_one_request(self) -> None:
        tracker, entry = self._aeterna_entry()
        if tracker is None or entry is None:
            super().handle_one_request()  # type: ignore[misc]
            return
        if not tracker.wait_for_request(entry, self):
            self.close_connection = True
            return
        try:
            super().handle_one_request()  # type: ignore[misc]
        finally:
            tracker.request_done(entry)

    def send_response_only(self, code: int, message: Any = None) -> None:
        self._aeterna_status = code
        self._aeterna_connection_sent = False
        super().send_response_only(code, message)  # type: ignore[misc]

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "connection":
            tracker = getattr(self.server, "_aeterna_tracker", None)  # type: ignore[attr-defined]
            if tracker is not None and tracker.draining:
                value = "close"  # also sets close_connection
            self._aeterna_connection_sent = True
        super().send_header(keyword, value)  # type: ignore[misc]

    def end_headers(self) -> None:
        tracker = getattr(self.server, "_aeterna_tracker", None)  # type: ignore[attr-defined]
        final = getattr(self, "_aeterna_status", 200) >= 200  # never on a "100 Continue"
        if tracker is not None and tracker.draining and final and not getattr(self, "_aeterna_connection_sent", False):
            self.send_header("Connection", "close")
        super().end_headers()  # type: ignore[misc]


def track_connections(server: Any) -> None:
    """Track the connections of a stdlib server (socketserver.BaseServer, e.g.
    http.server.ThreadingHTTPServer) so that drain() can close them gracefully.
    Call it once, after creating the server and before serve_forever().

    It mixes a small handler into server.RequestHandlerClass (when that is an
    http.server.BaseHTTPRequestHandler: other handler classes are tracked, and drain()
    waits for them, but it cannot say "Connection: close" for them), and wraps the
    server's process_request, shutdown_request and serve_forever on this instance."""
    import http.server

    if getattr(server, "_aeterna_tracker", None) is not None:
        return
    tracker = _Tracker()
    handler = server.RequestHandlerClass
    if issubclass(handler, http.server.BaseHTTPRequestHandler) and not issubclass(handler, _DrainingHandler):
        server.RequestHandlerClass = type(handler.__name__, (_DrainingHandler, handler),
                                          {"__module__": handler.__module__, "__qualname__": handler.__qualname__})
    process_request = server.process_request
    shutdown_request = server.shutdown_request
    serve_forever = server.serve_forever

    def tracked_process_request(request: Any, client_address: Any) -> None:
        tracker.add(request)  # before its thread starts: a connection accepted now is waited for
        process_request(request, client_address)

    def tracked_shutdown_request(request: Any) -> None:
        try:
            shutdown_request(request)  # shutdown(SHUT_WR) and close
        finally:
            tracker.remove(request)

    def tracked_serve_forever(*args: Any, **kwargs: Any) -> None:
        tracker.serving = threading.get_ident()
        try:
            serve_forever(*args, **kwargs)
        finally:
            tracker.serving = None

    server.process_request = tracked_process_request
    server.shutdown_request = tracked_shutdown_request
    server.serve_forever = tracked_serve_forever
    server._aeterna_tracker = tracker


def drain(server: Any, idle: float = 1.0, timeout: Optional[float] = None) -> bool:
    """Drain a server tracked with track_connections(), for the SIGTERM path.

    Stops serve_forever() (server.shutdown(); so call it from another thread than the
    one serving, or once serve_forever() has returned); from then on every response
    says "Connection: close" (the client's next request opens a new connection,
    which the new generation accepts on the shared socket); closes each connection
    that has had no request in flight for `idle` seconds and has no request
    arriving; returns True once every connection is closed, False when `timeout`
    (seconds; None: no limit, Aeterna's stop_timeout ends it) ran out first. Then
    call server.server_close() and relay.shutdown()."""
    tracker: Optional[_Tracker] = getattr(server, "_aeterna_tracker", None)
    if tracker is None:
        raise UsageError("call track_connections(server) before serving: drain() needs to know the connections")
    if tracker.serving == threading.get_ident():
        raise UsageError("drain() from the thread in serve_forever() (e.g. its signal handler) would wait for itself: "
                         "call it from another thread, or once serve_forever() has returned")
    with tracker.cond:
        tracker.draining = True
    if tracker.serving is not None:
        server.shutdown()  # stop accepting; returns once serve_forever() has
    deadline = None if timeout is None else time.monotonic() + timeout
    period = max(0.01, idle / 4)
    with tracker.cond:
        while tracker.conns:
            tracker.close_idle(idle)
            wait = period
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait = min(wait, left)
            tracker.cond.wait(wait)
    return True
