// The Aeterna SDK for Java (JDK 17+, no dependencies, one file): the listener
// Aeterna places at stdin (service.stdin_listener), and the State Relay
// Protocol (docs/srp.md) over a unix stream socket for JSON, text and binary
// states. The JDK cannot receive fds, so this client's hello says "fds": false
// and Aeterna never sends it a memfd state or fds (docs/srp.md, "Clients that
// cannot receive fds"). Checkpoints (docs/srp.md, "Checkpoints") go out as
// streamed bytes: relay.checkpoint(state) returns the seq once Aeterna has
// stored it, and a generation started with no live predecessor may load it.
package dev.aeterna;

import java.io.IOException;
import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.ByteBuffer;
import java.nio.channels.Channel;
import java.nio.channels.ServerSocketChannel;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.function.Consumer;

public final class Aeterna {
  private Aeterna() {}

  /** Frame limit before welcome (docs/srp.md, Framing). */
  static final int DEFAULT_MAX_FRAME = 16 << 20;

  /**
   * The listener Aeterna placed at stdin (service.stdin_listener), or null when stdin is not a listening socket.
   * The JDK adopts an inherited socket only there: LISTEN_FDS sockets at fd 3.. are out of its reach.
   */
  public static ServerSocketChannel listener() throws IOException {
    Channel channel = System.inheritedChannel();
    return channel instanceof ServerSocketChannel ? (ServerSocketChannel) channel : null;
  }

  /** Every failure carries a code: the protocol's (docs/srp.md, Errors) or the SDK's (bad_state, load_failed, dump_failed, closed, usage). */
  public static final class RelayError extends IOException {
    private static final long serialVersionUID = 1L;
    public final String code;

    public RelayError(String code, String message) {
      super(code + ": " + message);
      this.code = code;
    }

    public RelayError(String code, String message, Throwable cause) {
      super(code + ": " + message, cause);
      this.code = code;
    }
  }

  /**
   * A state: its encoding (the app's own name) and its bytes. `isFinal`: the final sync of a promotion. `source`:
   * "relay" (a live generation's dump) or "checkpoint" (the latest checkpoint, for a generation started with no live
   * predecessor), with the checkpoint's `seq` and `ageMs` when Aeterna sent it (0 otherwise).
   */
  public static final class State {
    public final String encoding;
    public final byte[] data;
    public final boolean isFinal;
    public final String source;
    public final long seq;
    public final long ageMs;

    public State(String encoding, byte[] data, boolean isFinal) {
      this(encoding, data, isFinal, "relay", 0, 0);
    }

    State(String encoding, byte[] data, boolean isFinal, String source, long seq, long ageMs) {
      this.encoding = encoding;
      this.data = data;
      this.isFinal = isFinal;
      this.source = source;
      this.seq = seq;
      this.ageMs = ageMs;
    }

    public static State json(String json) { return new State("json", json.getBytes(StandardCharsets.UTF_8), false); }
    public static State text(String text) { return new State("text", text.getBytes(StandardCharsets.UTF_8), false); }
    public static State binary(byte[] data) { return new State("binary", data, false); }

    public String text() { return new String(data, StandardCharsets.UTF_8); }
  }

  /** What the app hands over when asked: a State, or null for nothing. */
  @FunctionalInterface
  public interface Dump {
    State dump(boolean isFinal) throws Exception;
  }

  /** Apply a state (the initial load's apply, or a later load): throwing refuses it (load_failed). */
  @FunctionalInterface
  public interface Apply {
    void apply(State state) throws Exception;
  }

  /** Connect to the relay of LIVERELAY_STATE_SOCK; outside Aeterna (no variable) a Relay whose calls do nothing. */
  public static Relay connect() throws IOException {
    String path = System.getenv("LIVERELAY_STATE_SOCK");
    if (path == null || path.isEmpty()) return new Relay(null, DEFAULT_MAX_FRAME);
    return connect(path, Duration.ofSeconds(10));
  }

  /** Connect to the relay at `path` and wait up to `timeout` for welcome. */
  static Relay connect(String path, Duration timeout) throws IOException {
    SocketChannel channel = SocketChannel.open(StandardProtocolFamily.UNIX);
    try {
      channel.connect(UnixDomainSocketAddress.of(path));
    } catch (IOException e) {
      channel.close();
      throw new RelayError("closed", "cannot connect to the state relay at " + path + ": " + e.getMessage(), e);
    }
    Relay relay = new Relay(channel, DEFAULT_MAX_FRAME);
    relay.handshake(timeout);
    return relay;
  }

  public static final class Relay {
    private final SocketChannel channel;
    private final Object writeLock = new Object();
    private final Object lock = new Object();
    private int maxFrame;
    private boolean loaded;
    private boolean readySent;
    private volatile Dump dump;
    private volatile Apply onLoad;
    /** Set by the reader thread: the final dump was asked, its ack arrived, or the connection ended. */
    private boolean finalDumpAsked;
    private boolean finalAcked;
    /** The last dump offered a digest trailer (read and used on the reader thread only). */
    private boolean trailerOffered;
    private boolean ended;
    private long finalTimeoutMs;
    public int generation;
    /** Aeterna's welcome announced that it stores checkpoints (checkpoint() fails with disabled otherwise). */
    public boolean checkpoints;
    /** Checkpoints sent and not answered yet, oldest first (Aeterna answers in order). Guarded by lock; added to under writeLock, so their order is the wire's. */
    private final java.util.ArrayDeque<CompletableFuture<Long>> checkpointWaiters = new java.util.ArrayDeque<>();
    private Thread reader;

    Relay(SocketChannel channel, int maxFrame) {
      this.channel = channel;
      this.maxFrame = maxFrame;
    }

    /** hello with "fds": false and "trailer": true, then welcome within `timeout` (timeout otherwise). */
    void handshake(Duration timeout) throws IOException {
      send(object("op", "hello", "v", 1, "fds", false, "trailer", true));
      Thread watchdog = new Thread(() -> {
        try {
          Thread.sleep(timeout.toMillis());
          channel.close();
        } catch (InterruptedException | IOException e) {
          // welcome came in time
        }
      });
      watchdog.setDaemon(true);
      watchdog.start();
      Map<String, Object> m;
      try {
        m = readControl();
      } catch (RelayError e) {
        if (!channel.isOpen()) throw new RelayError("timeout", "no welcome within " + timeout.toMillis() + " ms", e);
        throw e;
      } finally {
        watchdog.interrupt();
      }
      if ("error".equals(m.get("op"))) throw refused(m);
      if (!"welcome".equals(m.get("op"))) throw protocolError("unexpected_op", "expected welcome, got \"" + m.get("op") + "\"");
      if (!Long.valueOf(1).equals(m.get("v"))) throw protocolError("unsupported_version", "welcome with version " + m.get("v") + "; this SDK speaks 1");
      generation = ((Long) m.getOrDefault("generation", 0L)).intValue();
      checkpoints = Boolean.TRUE.equals(m.get("checkpoint"));
      Object max = m.get("max_frame");
      if (max instanceof Long && (Long) max > 0) maxFrame = (int) Math.min((Long) max, Integer.MAX_VALUE);
    }

    /** Register what to hand over at each dump (before load(), so no dump finds none). */
    public void onDump(Dump dump) { this.dump = dump; }

    /** Register where later loads (the final sync) go; without one they are refused (load_failed). */
    public void onLoad(Apply apply) { this.onLoad = apply; }

    /**
     * Connection handoff (docs/srp.md, "Connection handoff") moves a live socket to the next generation with
     * SCM_RIGHTS, which the JDK cannot send or receive: this SDK's hello does not offer it, so a Java generation's
     * connections drain as before. Always throws RelayError "unsupported", saying so.
     */
    public Object handoff() throws RelayError {
      throw new RelayError(
          "unsupported",
          "connection handoff passes sockets as fds (SCM_RIGHTS), which the JDK cannot; drain the connections instead");
    }

    /** The initial load: the previous generation's state, or null. Verified and acked; then dumps are served. */
    public State load() throws IOException {
      try {
        return load(null);
      } catch (IOException | RuntimeException e) {
        throw e;
      } catch (Exception e) {
        throw new IllegalStateException("no apply callback, so nothing else can throw", e);
      }
    }

    /**
     * As load(), with `apply` run before the ack. A state it refuses throws RelayError (an IOException); if `apply`
     * throws, the state is refused (load_failed) and the app's own exception is rethrown.
     */
    public State load(Apply apply) throws Exception {
      if (channel == null) return null;
      synchronized (lock) {
        if (loaded) throw new RelayError("usage", "load() was already called");
        loaded = true;
      }
      Map<String, Object> m = readControl();
      if ("error".equals(m.get("op"))) throw refused(m);
      if (!"load".equals(m.get("op"))) throw protocolError("unexpected_op", "expected load, got \"" + m.get("op") + "\"");
      try {
        return applyThenAck(m, apply, false);
      } finally {
        if (channel.isOpen()) startReader(); // a refused state leaves the connection open: dumps are still served
      }
    }

    /** Tell Aeterna this generation serves (counts for readiness in every mode). Once; after load(). */
    public void ready() throws IOException {
      if (channel == null) return;
      synchronized (lock) {
        if (!loaded) throw new RelayError("usage", "ready() before load()");
        if (readySent) return;
        readySent = true;
      }
      send(object("op", "ready"));
    }

    /**
     * Store `state` (what a dump may return; null for an empty one) in Aeterna as the app's latest checkpoint: a
     * generation started with no live predecessor (after a crash, kill -9, the watchdog) loads it, with source
     * "checkpoint". Returns its sequence number once Aeterna has stored it (on disk, with
     * state_handoff.checkpoint.path). A refusal throws RelayError with Aeterna's code (disabled, too_large,
     * checksum_mismatch, bad_state, write_failed); the previous checkpoint then stays. Call it after load(), from any
     * thread but the dump and load callbacks' (it reads Aeterna's answer). Outside Aeterna it does nothing and returns 0.
     */
    public long checkpoint(State state) throws IOException {
      if (channel == null) return 0;
      if (!checkpoints) throw new RelayError("disabled", "this Aeterna does not store checkpoints (orchestration.state_handoff.checkpoint.enabled is off)");
      CompletableFuture<Long> answer = new CompletableFuture<>();
      synchronized (writeLock) { // its place among the waiters is its place on the wire
        synchronized (lock) {
          if (reader == null) throw new RelayError("usage", "call load() before checkpoint(): Aeterna's answers are read once the initial load is taken");
          if (Thread.currentThread() == reader) throw new RelayError("usage", "checkpoint() from a dump or load callback would wait for an answer only that thread can read");
          if (ended) throw new RelayError("closed", "the relay connection is closed");
          checkpointWaiters.add(answer);
        }
        try {
          sendState("checkpoint", state, true);
        } catch (IOException e) {
          synchronized (lock) {
            checkpointWaiters.remove(answer);
          }
          throw e;
        }
      }
      try {
        return answer.get();
      } catch (ExecutionException e) {
        throw (RelayError) e.getCause();
      } catch (InterruptedException e) {
        Thread.currentThread().interrupt();
        throw new RelayError("closed", "interrupted while waiting for Aeterna to store the checkpoint", e);
      }
    }

    /**
     * After SIGTERM: wait up to `timeout` for the final dump (or the end of the connection), then as long as its
     * timeout_ms for the new generation's ack. Returns whether the state was handed over and accepted.
     */
    public boolean shutdown(Duration timeout) throws InterruptedException {
      if (channel == null) return false;
      long deadline = System.currentTimeMillis() + timeout.toMillis();
      synchronized (lock) {
        while (!finalDumpAsked && !ended && System.currentTimeMillis() < deadline) lock.wait(Math.max(1, deadline - System.currentTimeMillis()));
        if (finalDumpAsked) {
          long ackDeadline = System.currentTimeMillis() + finalTimeoutMs;
          while (!finalAcked && !ended && System.currentTimeMillis() < ackDeadline) lock.wait(Math.max(1, ackDeadline - System.currentTimeMillis()));
        }
        return finalAcked;
      }
    }

    public void close() throws IOException {
      if (channel != null) channel.close();
    }

    // ---- the reader: dumps, later loads, acks --------------------------------------------------

    private void startReader() {
      Thread thread = new Thread(this::readLoop, "aeterna-relay");
      thread.setDaemon(true);
      synchronized (lock) {
        reader = thread;
      }
      thread.start();
    }

    /** Aeterna's checkpointed: the oldest checkpoint waiting gets its seq, or the refusal. */
    private void checkpointed(Map<String, Object> m) {
      CompletableFuture<Long> waiter;
      synchronized (lock) {
        waiter = checkpointWaiters.poll();
      }
      if (waiter == null) return; // nobody asked: nothing to answer
      if (m.get("seq") instanceof Long) waiter.complete((Long) m.get("seq"));
      else waiter.completeExceptionally(new RelayError(m.get("code") instanceof String ? (String) m.get("code") : "bad_state", "Aeterna refused the checkpoint: " + m.get("message")));
    }

    private void readLoop() {
      try {
        for (;;) {
          Map<String, Object> m = readControl();
          Object op = m.get("op");
          if ("dump".equals(op)) {
            boolean isFinal = Boolean.TRUE.equals(m.get("final"));
            trailerOffered = Boolean.TRUE.equals(m.get("trailer"));
            if (isFinal) {
              synchronized (lock) {
                finalDumpAsked = true;
                finalTimeoutMs = m.get("timeout_ms") instanceof Long ? (Long) m.get("timeout_ms") : 10000;
                lock.notifyAll();
              }
            }
            answerDump(isFinal);
          } else if ("load".equals(op)) {
            laterLoad(m);
          } else if ("checkpointed".equals(op)) {
            checkpointed(m);
          } else if ("ack".equals(op)) {
            synchronized (lock) {
              if (finalDumpAsked && Boolean.TRUE.equals(m.get("ok"))) finalAcked = true;
              lock.notifyAll();
            }
          } else if ("error".equals(op)) {
            return;
          } else {
            throw protocolError("unexpected_op", "\"" + op + "\" is not valid now");
          }
        }
      } catch (IOException e) {
        // the connection ended (EOF: no final dump will be asked) or was refused: nothing more to serve
      } finally {
        synchronized (lock) {
          ended = true;
          for (CompletableFuture<Long> waiter : checkpointWaiters) waiter.completeExceptionally(new RelayError("closed", "the relay connection ended before Aeterna answered the checkpoint"));
          checkpointWaiters.clear();
          lock.notifyAll();
        }
        try {
          channel.close();
        } catch (IOException e) {
          // closed already
        }
      }
    }

    private void answerDump(boolean isFinal) throws IOException {
      State state;
      try {
        Dump d = dump;
        state = d == null ? null : d.dump(isFinal);
      } catch (Exception e) {
        send(object("op", "ack", "ok", false, "error", "dump_failed: " + e));
        return;
      }
      sendState("state", state, trailerOffered);
    }

    /**
     * A state (op "state") or a checkpoint: the header, the data frames, and with `trailer` (a dump offered it; a
     * checkpoint needs no offer) the digest after the data, hashed as each frame is sent.
     */
    private void sendState(String op, State state, boolean trailer) throws IOException {
      if (state == null || state.data.length == 0) {
        send(object("op", op, "size", 0));
        return;
      }
      synchronized (writeLock) {
        if (!trailer) {
          send(object("op", op, "encoding", state.encoding, "size", state.data.length, "sha256", sha256(state.data)));
          for (int off = 0; off < state.data.length; off += maxFrame) writeFrame(ByteBuffer.wrap(state.data, off, Math.min(maxFrame, state.data.length - off)));
          return;
        }
        send(object("op", op, "encoding", state.encoding, "size", state.data.length, "trailer", true));
        MessageDigest digest = sha256Digest();
        for (int off = 0; off < state.data.length; off += maxFrame) {
          int length = Math.min(maxFrame, state.data.length - off);
          digest.update(state.data, off, length);
          writeFrame(ByteBuffer.wrap(state.data, off, length));
        }
        send(object("op", "trailer", "sha256", HexFormat.of().formatHex(digest.digest())));
      }
    }

    /** A later load (the final sync): to the load callback; a refusal was acked, and the connection goes on. */
    private void laterLoad(Map<String, Object> m) throws IOException {
      try {
        applyThenAck(m, onLoad, true);
      } catch (Exception e) {
        if (!channel.isOpen()) throw e instanceof IOException ? (IOException) e : new RelayError("closed", e.toString(), e);
      }
    }

    /**
     * Receive the state `m` announces, hand it to `apply`, and ack. A state that fails verification is refused with
     * its code; a throwing `apply`, or none when `required`, with load_failed. Either way it then throws.
     */
    private State applyThenAck(Map<String, Object> m, Apply apply, boolean required) throws Exception {
      State state;
      try {
        state = receiveState(m);
      } catch (RelayError e) {
        if (!e.code.equals("checksum_mismatch") && !e.code.equals("bad_state")) throw e;
        send(object("op", "ack", "ok", false, "error", e.getMessage()));
        throw e;
      }
      if (apply == null && required) {
        send(object("op", "ack", "ok", false, "error", "load_failed: no load callback for a later load"));
        throw new RelayError("load_failed", "no load callback for a later load");
      }
      if (state != null && apply != null) {
        try {
          apply.apply(state);
        } catch (Exception e) {
          send(object("op", "ack", "ok", false, "error", "load_failed: " + e));
          throw e;
        }
      }
      send(object("op", "ack", "ok", true));
      return state;
    }

    /** The state a load announces, its data frames read and verified; null for size 0. */
    private State receiveState(Map<String, Object> m) throws IOException {
      long size = (Long) m.get("size"); // its shape, sha256 and the absence of fds were checked by readControl
      if (size > Integer.MAX_VALUE - 8) throw protocolError("too_large", "a state of " + size + " bytes does not fit a Java array");
      Object sha = m.get("sha256");
      byte[] data = new byte[(int) size];
      MessageDigest digest = sha256Digest(); // hashed as the bytes arrive
      int got = 0;
      while (got < size) {
        byte[] part = readFrame();
        if (got + part.length > size) throw protocolError("bad_frame", "more data than the " + size + " bytes announced");
        System.arraycopy(part, 0, data, got, part.length);
        digest.update(part);
        got += part.length;
      }
      if (Boolean.TRUE.equals(m.get("trailer"))) {
        Map<String, Object> trailer = readControl();
        if (!"trailer".equals(trailer.get("op"))) throw protocolError("unexpected_op", "\"" + trailer.get("op") + "\" where the announced digest trailer was due");
        sha = trailer.get("sha256");
      }
      boolean isFinal = Boolean.TRUE.equals(m.get("final"));
      if (sha instanceof String && !HexFormat.of().formatHex(digest.digest()).equals(sha)) {
        throw new RelayError("checksum_mismatch", "the sha256 of the " + size + " bytes received is not the announced " + sha);
      }
      if (size == 0) return null;
      Object encoding = m.get("encoding");
      boolean fromCheckpoint = "checkpoint".equals(m.get("source"));
      return new State(encoding instanceof String ? (String) encoding : "binary", data, isFinal, fromCheckpoint ? "checkpoint" : "relay",
          fromCheckpoint && m.get("seq") instanceof Long ? (Long) m.get("seq") : 0, fromCheckpoint && m.get("age_ms") instanceof Long ? (Long) m.get("age_ms") : 0);
    }

    // ---- framing ---------------------------------------------------------------------------------

    private RelayError protocolError(String code, String message) {
      try {
        send(object("op", "error", "code", code, "message", message));
        channel.close();
      } catch (IOException e) {
        // the peer is gone already
      }
      return new RelayError(code, message);
    }

    void send(Map<String, Object> message) throws IOException {
      writeFrame(ByteBuffer.wrap(Json.write(message).getBytes(StandardCharsets.UTF_8)));
    }

    private void writeFrame(ByteBuffer payload) throws IOException {
      synchronized (writeLock) {
        ByteBuffer header = ByteBuffer.allocate(4).putInt(payload.remaining()).flip();
        try {
          while (header.hasRemaining() || payload.hasRemaining()) channel.write(new ByteBuffer[] {header, payload});
        } catch (IOException e) {
          throw new RelayError("closed", "the relay connection ended: " + e.getMessage(), e);
        }
      }
    }

    private byte[] readFrame() throws IOException {
      ByteBuffer header = ByteBuffer.allocate(4);
      readFully(header);
      long length = Integer.toUnsignedLong(header.flip().getInt());
      if (length == 0) throw protocolError("bad_frame", "a frame of length 0");
      if (length > maxFrame) throw protocolError("too_large", "a frame of " + length + " bytes, above max_frame " + maxFrame);
      ByteBuffer payload = ByteBuffer.allocate((int) length);
      readFully(payload);
      return payload.array();
    }

    /** The next control frame, checked as Aeterna checks it (docs/srp.md, "The app contract"). */
    Map<String, Object> readControl() throws IOException {
      byte[] payload = readFrame();
      Object value;
      try {
        value = Json.parse(StandardCharsets.UTF_8.newDecoder().decode(ByteBuffer.wrap(payload)).toString());
      } catch (IllegalArgumentException | java.nio.charset.CharacterCodingException e) {
        throw protocolError("bad_json", "control frame is not a UTF-8 JSON object: " + e.getMessage());
      }
      if (!(value instanceof Map) || !(((Map<?, ?>) value).get("op") instanceof String)) throw protocolError("bad_json", "control frame has no string \"op\"");
      @SuppressWarnings("unchecked")
      Map<String, Object> m = (Map<String, Object>) value;
      String problem = Messages.problem(m);
      if (problem != null) throw protocolError(Messages.OPS.contains(m.get("op")) ? "bad_json" : "unexpected_op", problem);
      if (m.get("fds") instanceof List && !((List<?>) m.get("fds")).isEmpty()) {
        throw protocolError("bad_frame", m.get("op") + " names fds, but none arrive: this client said it cannot receive them (\"fds\": false)");
      }
      return m;
    }

    /** An error frame from Aeterna: it closes after it, so do we, without answering. */
    private RelayError refused(Map<String, Object> m) throws IOException {
      channel.close();
      return new RelayError(String.valueOf(m.getOrDefault("code", "unknown")), "Aeterna refused: " + m.get("message"));
    }

    private void readFully(ByteBuffer buffer) throws IOException {
      while (buffer.hasRemaining()) {
        int n;
        try {
          n = channel.read(buffer);
        } catch (IOException e) {
          throw new RelayError("closed", "the relay connection ended: " + e.getMessage(), e);
        }
        if (n < 0) throw new RelayError("closed", "the relay connection ended (EOF)");
      }
    }
  }

  static String sha256(byte[] data) {
    return HexFormat.of().formatHex(sha256Digest().digest(data));
  }

  static MessageDigest sha256Digest() {
    try {
      return MessageDigest.getInstance("SHA-256");
    } catch (NoSuchAlgorithmException e) {
      throw new IllegalStateException(e);
    }
  }

  private static Map<String, Object> object(Object... pairs) {
    Map<String, Object> m = new LinkedHashMap<>();
    for (int i = 0; i < pairs.length; i += 2) m.put((String) pairs[i], pairs[i + 1]);
    return m;
  }

  /** The shape of each control message (docs/srp.md, "Messages"), as Aeterna checks it (src/srp/messages.ts). */
  static final class Messages {
    private Messages() {}

    static final java.util.Set<String> OPS = java.util.Set.of("hello", "welcome", "load", "state", "ack", "ready", "dump", "trailer", "error", "checkpoint", "checkpointed");
    /** As Aeterna's limit on fds in one frame. */
    private static final int MAX_FDS = 253;

    /** What is wrong with `m` (op a string already), or null; normalizes dump's "final" to a boolean. */
    static String problem(Map<String, Object> m) {
      String op = (String) m.get("op");
      if (!OPS.contains(op)) return "unknown op \"" + op.substring(0, Math.min(40, op.length())) + "\"";
      switch (op) {
        case "hello":
          if (!(m.get("v") instanceof Number)) return "hello: \"v\" must be a number";
          if (m.containsKey("fds") && !(m.get("fds") instanceof Boolean)) return "hello: \"fds\" must be true or false";
          return null;
        case "trailer":
          if (!(m.get("sha256") instanceof String) || !((String) m.get("sha256")).matches("[0-9a-f]{64}")) return "trailer: \"sha256\" must be 64 lowercase hex digits";
          return null;
        case "load": case "state": case "checkpoint": return headerProblem(m, op);
        case "ack":
          if (!(m.get("ok") instanceof Boolean)) return "ack: \"ok\" must be true or false";
          return stringProblem(m, "ack", "error", 4096);
        case "dump":
          m.put("final", Boolean.TRUE.equals(m.get("final")));
          if (!(m.get("timeout_ms") instanceof Long) || (Long) m.get("timeout_ms") <= 0) m.remove("timeout_ms");
          return null;
        default: return null;
      }
    }

    private static String stringProblem(Map<String, Object> m, String op, String key, int max) {
      Object v = m.get(key);
      if (v == null && !m.containsKey(key)) return null;
      return v instanceof String && ((String) v).length() <= max ? null : op + ": \"" + key + "\" must be a string of at most " + max + " characters";
    }

    private static String headerProblem(Map<String, Object> m, String op) {
      if (!(m.get("size") instanceof Long) || (Long) m.get("size") < 0) return op + ": \"size\" must be a whole number >= 0";
      String problem = stringProblem(m, op, "encoding", 64);
      if (problem == null) problem = stringProblem(m, op, "sha256", 64);
      if (problem != null) return problem;
      if (m.containsKey("sha256") && !((String) m.get("sha256")).matches("[0-9a-f]{64}")) return op + ": \"sha256\" must be 64 lowercase hex digits";
      Object transport = m.get("transport");
      if (m.containsKey("transport") && !"stream".equals(transport) && !"memfd".equals(transport)) return op + ": \"transport\" must be \"stream\" or \"memfd\"";
      List<?> fds = List.of();
      if (m.containsKey("fds")) {
        if (!(m.get("fds") instanceof List)) return op + ": \"fds\" must be a list of at most " + MAX_FDS + " names";
        fds = (List<?>) m.get("fds");
        for (Object name : fds) {
          if (!(name instanceof String) || ((String) name).isEmpty() || ((String) name).length() > 128 || fds.size() > MAX_FDS) {
            return op + ": \"fds\" must be a list of at most " + MAX_FDS + " names";
          }
        }
        if (new java.util.HashSet<>(fds).size() != fds.size()) return op + ": \"fds\" names must be unique";
      }
      boolean memfd = "memfd".equals(transport);
      if (memfd && !fds.contains("state")) return op + ": transport \"memfd\" needs an fd named \"state\"";
      if (m.containsKey("trailer")) {
        if (!Boolean.TRUE.equals(m.get("trailer"))) return op + ": \"trailer\" must be true when present";
        if (m.containsKey("sha256") || memfd || (Long) m.get("size") == 0) return op + ": \"trailer\" is only for a streamed state of at least 1 byte without \"sha256\"";
      }
      if ((Long) m.get("size") > 0 && !memfd && !m.containsKey("sha256") && !m.containsKey("trailer")) {
        return op + ": \"sha256\" (or \"trailer\": true) is required for a streamed state";
      }
      return null;
    }
  }

  /** Just enough JSON for control frames: objects, arrays, strings, integers (as Long), other numbers (Double), booleans, null. */
  static final class Json {
    private final String s;
    private int i;

    private Json(String s) { this.s = s; }

    static Object parse(String text) {
      Json p = new Json(text);
      Object v = p.value(0);
      p.space();
      if (p.i != text.length()) throw new IllegalArgumentException("trailing characters at " + p.i);
      return v;
    }

    static String write(Object v) {
      StringBuilder b = new StringBuilder();
      write(b, v);
      return b.toString();
    }

    private static void write(StringBuilder b, Object v) {
      if (v == null) b.append("null");
      else if (v instanceof String) quote(b, (String) v);
      else if (v instanceof Number || v instanceof Boolean) b.append(v);
      else if (v instanceof Map) {
        b.append('{');
        boolean first = true;
        for (Map.Entry<?, ?> e : ((Map<?, ?>) v).entrySet()) {
          if (!first) b.append(',');
          first = false;
          quote(b, (String) e.getKey());
          b.append(':');
          write(b, e.getValue());
        }
        b.append('}');
      } else if (v instanceof List) {
        b.append('[');
        boolean first = true;
        for (Object o : (List<?>) v) {
          if (!first) b.append(',');
          first = false;
          write(b, o);
        }
        b.append(']');
      } else throw new IllegalArgumentException("cannot write " + v.getClass());
    }

    private static void quote(StringBuilder b, String s) {
      b.append('"');
      for (int k = 0; k < s.length(); k++) {
        char c = s.charAt(k);
        if (c == '"' || c == '\\') b.append('\\').append(c);
        else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
        else b.append(c);
      }
      b.append('"');
    }

    private void space() {
      while (i < s.length() && " \t\r\n".indexOf(s.charAt(i)) >= 0) i++;
    }

    private Object value(int depth) {
      if (depth > 64) throw new IllegalArgumentException("nested deeper than 64");
      space();
      if (i >= s.length()) throw new IllegalArgumentException("unexpected end");
      char c = s.charAt(i);
      if (c == '{') {
        i++;
        Map<String, Object> m = new LinkedHashMap<>();
        space();
        if (peek('}')) return m;
        do {
          space();
          if (i >= s.length() || s.charAt(i) != '"') throw new IllegalArgumentException("expected a key at " + i);
          String key = string();
          space();
          expect(':');
          m.put(key, value(depth + 1));
          space();
        } while (peek(','));
        expect('}');
        return m;
      }
      if (c == '[') {
        i++;
        List<Object> l = new ArrayList<>();
        space();
        if (peek(']')) return l;
        do l.add(value(depth + 1)); while (skipSpaceThen(','));
        space();
        expect(']');
        return l;
      }
      if (c == '"') return string();
      if (s.startsWith("true", i)) { i += 4; return true; }
      if (s.startsWith("false", i)) { i += 5; return false; }
      if (s.startsWith("null", i)) { i += 4; return null; }
      int start = i;
      while (i < s.length() && "+-0123456789.eE".indexOf(s.charAt(i)) >= 0) i++;
      String n = s.substring(start, i);
      if (n.isEmpty()) throw new IllegalArgumentException("unexpected character at " + start);
      try {
        return n.matches("-?\\d{1,18}") ? (Object) Long.parseLong(n) : (Object) Double.parseDouble(n);
      } catch (NumberFormatException e) {
        throw new IllegalArgumentException("bad number at " + start);
      }
    }

    private boolean skipSpaceThen(char c) {
      space();
      return peek(c);
    }

    private boolean peek(char c) {
      if (i < s.length() && s.charAt(i) == c) {
        i++;
        return true;
      }
      return false;
    }

    private void expect(char c) {
      if (!peek(c)) throw new IllegalArgumentException("expected '" + c + "' at " + i);
    }

    private String string() {
      i++; // the opening quote
      StringBuilder b = new StringBuilder();
      while (true) {
        if (i >= s.length()) throw new IllegalArgumentException("unterminated string");
        char c = s.charAt(i++);
        if (c == '"') return b.toString();
        if (c < 0x20) throw new IllegalArgumentException("control character in a string");
        if (c != '\\') {
          b.append(c);
          continue;
        }
        if (i >= s.length()) throw new IllegalArgumentException("unterminated escape");
        char e = s.charAt(i++);
        switch (e) {
          case '"': case '\\': case '/': b.append(e); break;
          case 'b': b.append('\b'); break;
          case 'f': b.append('\f'); break;
          case 'n': b.append('\n'); break;
          case 'r': b.append('\r'); break;
          case 't': b.append('\t'); break;
          case 'u':
            if (i + 4 > s.length()) throw new IllegalArgumentException("short \\u escape");
            b.append((char) Integer.parseInt(s.substring(i, i + 4), 16));
            i += 4;
            break;
          default: throw new IllegalArgumentException("bad escape \\" + e);
        }
      }
    }
  }
}
