"""python-counter: a stdlib HTTP/1.1 keep-alive server under Aeterna whose count
survives reloads. It serves on the listener Aeterna hands over ("http"), takes
the previous generation's count through the State Relay, and on SIGTERM drains
with the SDK's drain() (no request in flight is dropped, keep-alive connections
included), then hands its final count over (the final sync).

    GET /  counts one visit: {"count":N,"pid":P,"generation":G,"checkpoint":S}

With orchestration.state_handoff.checkpoint.enabled, each visit also stores the
count as a checkpoint (S is its sequence number, 0 otherwise), so a kill -9 of
the counter loses nothing: the generation Aeterna restarts loads it (source
"checkpoint"). Prints LOADED, FINAL_SYNC and SHUTDOWN lines on stdout.
"""

import http.server
import json
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "clients", "python"))
import aeterna_client as aeterna  # noqa: E402


class Counter:
    def __init__(self):
        self.lock = threading.Lock()
        self.count = 0
        # base is the count this generation started from: the final sync adds
        # what the old generation counted after its first dump (count - base).
        self.base = 0
        # Checkpoints go out in the order of their snapshots, so a later count is never overwritten by an earlier one.
        self.checkpointing = threading.Lock()

    def visit(self):
        with self.lock:
            self.count += 1
            return self.count

    def dump(self, final):
        with self.lock:
            return {"count": self.count}

    def checkpoint(self, relay):
        """Store the current count in Aeterna; returns the checkpoint's sequence number."""
        with self.checkpointing:
            return relay.checkpoint(self.dump(False))

    def restore(self, state):
        count = int(state.json()["count"])
        with self.lock:
            self.count = self.base = count
        say("LOADED count=%d source=%s seq=%s" % (count, state.source, state.seq))

    def final_sync(self, state):
        count = int(state.json()["count"])
        with self.lock:
            self.count += count - self.base
            self.base = count
        say("FINAL_SYNC count=%d" % count)


def say(line):
    """One line on stdout in one write: with PYTHONUNBUFFERED, print() writes the newline separately, and another
    generation's line (both share Aeterna's stdout while one drains) can land between the two."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


counter = Counter()
relay = aeterna.connect()  # $LIVERELAY_STATE_SOCK; a no-op client outside Aeterna
generation = os.environ.get("AETERNA_GENERATION", "")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    # Headers and body leave in two writes: with Nagle's algorithm the body waits for the client's delayed ACK
    # (about 40 ms per request on a keep-alive connection).
    disable_nagle_algorithm = True

    def do_GET(self):
        n = counter.visit()
        seq = 0
        if relay.checkpoints:
            try:
                seq = counter.checkpoint(relay)
            except aeterna.RelayError as e:
                print("python-counter: checkpoint: %s" % e, file=sys.stderr, flush=True)  # the count still survives reloads
        body = (json.dumps({"count": n, "pid": os.getpid(), "generation": generation, "checkpoint": seq},
                           separators=(",", ":")) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass  # a line per request would flood Aeterna's log


def main():
    relay.on_dump(counter.dump)
    relay.on_load(counter.final_sync)
    relay.load(apply=counter.restore)  # before serving; acks after restore()
    sock = aeterna.listeners().get("http")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 8080), Handler, bind_and_activate=sock is None)
    if sock is not None:
        server.socket.close()
        # Every generation accepts on this one socket: non-blocking, so an accept another process won is
        # EAGAIN for socketserver (it goes back to waiting), never a block that shutdown() cannot end.
        sock.setblocking(False)
        server.socket = sock
    aeterna.track_connections(server)  # before serving: drain() needs every connection
    stop = lambda *_: threading.Thread(target=server.shutdown).start()  # noqa: E731  (serve_forever returns)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    relay.ready()
    server.serve_forever()
    # Drain: every response now says "Connection: close", idle keep-alive connections are closed once idle
    # for a second, and this returns when all are closed; then the final sync counts every request.
    aeterna.drain(server, timeout=10.0)
    server.server_close()
    handed = relay.shutdown()
    say("SHUTDOWN %d count=%d handed_over=%s" % (os.getpid(), counter.count, handed))


if __name__ == "__main__":
    main()
