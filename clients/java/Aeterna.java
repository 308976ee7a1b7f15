// The Aeterna SDK for Java (JDK 17+, no dependencies, one file): the listener
// Aeterna places at stdin (service.stdin_listener), and the State Relay
// Protocol (docs/srp.md) over a unix stream socket for JSON, text and binary
// states. The JDK cannot receive fds, so this client's hello says "fds": false
// and Aeterna never sends it a memfd state or fds (docs/srp.md, "Clients that
// cannot receive fds").
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

  /** A state: its encoding (the app's own name) and its bytes. `isFinal`: the final sync of a promotion. */
  public static final class State {
    public final String encoding;
    public final byte[] data;
    public final boolean isFinal;

    public State(String encoding, byte[] data, boolean isFinal) {
      this.encoding = encoding;
      this.data = data;
      this.isFinal = isFinal;
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
    if (path == null || path.isEmpty()) return new Relay(null);
    SocketChannel channel = SocketChannel.open(StandardProtocolFamily.UNIX);
    try {
      channel.connect(UnixDomainSocketAddress.of(path));
    } catch (IOException e) {
      channel.close();
      throw new RelayError("closed", "cannot connect to the state relay at " + path + ": " + e.getMessage(), e);
    }
    Relay relay = new Relay(channel);
    relay.handshake(Duration.ofSeconds(10));
    return relay;
  }

  public static final class Relay {
    private final SocketChannel channel;
    private final Object writeLock = new Object();
    private final Object lock = new Object();
    private int maxFrame = DEFAULT_MAX_FRAME;
    private boolean loaded;
    private boolean readySent;
    private volatile Dump dump;
    private volatile Apply onLoad;
    /** Set by the reader thread: the final dump was asked, its ack arrived, or the connection ended. */
    private boolean finalDumpAsked;
    private boolean finalAcked;
    private boolean ended;
    private long finalTimeoutMs;
    public int generation;

    Relay(SocketChannel channel) {
      this.channel = channel;
    }

    /** hello with "fds": false, then welcome within `timeout` (timeout otherwise). */
    void handshake(Duration timeout) throws IOException {
      send(object("op", "hello", "v", 1, "fds", false));
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
      if (!"welcome".equals(m.get("op"))) throw protocolError("unexpected_op", "expected welcome, got \"" + m.get("op") + "\"");
      if (!Long.valueOf(1).equals(m.get("v"))) throw protocolError("unsupported_version", "welcome with version " + m.get("v") + "; this SDK speaks 1");
      generation = ((Long) m.getOrDefault("generation", 0L)).intValue();
      Object max = m.get("max_frame");
      if (max instanceof Long && (Long) max > 0) maxFrame = (int) Math.min((Long) max, Integer.MAX_VALUE);
    }

    /** Register what to hand over at each dump (before load(), so no dump finds none). */
    public void onDump(Dump dump) { this.dump = dump; }

    /** Register where later loads (the final sync) go; without one they are refused (load_failed). */
    public void onLoad(Apply apply) { this.onLoad = apply; }

    /** The initial load: the previous generation's state, or null. Verified and acked; then dumps are served. */
    public State load() throws IOException {
      return load(null);
    }

    /** As load(), with `apply` run before the ack: if it throws, the state is refused (load_failed) and its error rethrown. */
    public State load(Apply apply) throws IOException {
      if (channel == null) return null;
      synchronized (lock) {
        if (loaded) throw new RelayError("usage", "load() was already called");
        loaded = true;
      }
      Map<String, Object> m = readControl();
      if (!"load".equals(m.get("op"))) throw protocolError("unexpected_op", "expected load, got \"" + m.get("op") + "\"");
      State state;
      try {
        state = receiveState(m);
      } catch (RelayError e) {
        if (!e.code.equals("checksum_mismatch") && !e.code.equals("bad_state")) throw e;
        send(object("op", "ack", "ok", false, "error", e.getMessage()));
        startReader();
        throw e;
      }
      if (state != null && apply != null) {
        try {
          apply.apply(state);
        } catch (Exception e) {
          send(object("op", "ack", "ok", false, "error", "load_failed: " + e));
          startReader();
          throw new RelayError("load_failed", "the apply callback threw: " + e, e);
        }
      }
      send(object("op", "ack", "ok", true));
      startReader();
      return state;
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
      Thread reader = new Thread(this::readLoop, "aeterna-relay");
      reader.setDaemon(true);
      reader.start();
    }

    private void readLoop() {
      try {
        for (;;) {
          Map<String, Object> m = readControl();
          Object op = m.get("op");
          if ("dump".equals(op)) {
            boolean isFinal = Boolean.TRUE.equals(m.get("final"));
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
      if (state == null || state.data.length == 0) {
        send(object("op", "state", "size", 0));
        return;
      }
      synchronized (writeLock) {
        send(object("op", "state", "encoding", state.encoding, "size", state.data.length, "sha256", sha256(state.data)));
        for (int off = 0; off < state.data.length; off += maxFrame) writeFrame(ByteBuffer.wrap(state.data, off, Math.min(maxFrame, state.data.length - off)));
      }
    }

    private void laterLoad(Map<String, Object> m) throws IOException {
      State state;
      try {
        state = receiveState(m);
      } catch (RelayError e) {
        if (!e.code.equals("checksum_mismatch") && !e.code.equals("bad_state")) throw e;
        send(object("op", "ack", "ok", false, "error", e.getMessage()));
        return;
      }
      Apply apply = onLoad;
      if (apply == null) {
        send(object("op", "ack", "ok", false, "error", "load_failed: no load callback for a later load"));
        return;
      }
      try {
        if (state != null) apply.apply(state);
      } catch (Exception e) {
        send(object("op", "ack", "ok", false, "error", "load_failed: " + e));
        return;
      }
      send(object("op", "ack", "ok", true));
    }

    /** The state a load announces, its data frames read and verified; null for size 0. */
    private State receiveState(Map<String, Object> m) throws IOException {
      if (!(m.get("size") instanceof Long) || (Long) m.get("size") < 0) throw protocolError("bad_json", "load: \"size\" must be a non-negative integer");
      if (m.get("fds") != null || "memfd".equals(m.get("transport"))) {
        throw protocolError("bad_frame", "load announces fds or a memfd, which this client said it cannot receive (\"fds\": false)");
      }
      long size = (Long) m.get("size");
      if (size > Integer.MAX_VALUE - 8) throw protocolError("too_large", "a state of " + size + " bytes does not fit a Java array");
      Object sha = m.get("sha256");
      if (size > 0 && !(sha instanceof String)) throw protocolError("bad_json", "load: \"sha256\" is required for a streamed state");
      byte[] data = new byte[(int) size];
      int got = 0;
      while (got < size) {
        byte[] part = readFrame();
        if (got + part.length > size) throw protocolError("bad_frame", "more data than the " + size + " bytes announced");
        System.arraycopy(part, 0, data, got, part.length);
        got += part.length;
      }
      boolean isFinal = Boolean.TRUE.equals(m.get("final"));
      if (sha instanceof String && !sha256(data).equals(sha)) {
        throw new RelayError("checksum_mismatch", "the sha256 of the " + size + " bytes received is not the announced " + sha);
      }
      if (size == 0) return null;
      Object encoding = m.get("encoding");
      return new State(encoding instanceof String ? (String) encoding : "binary", data, isFinal);
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

    private void send(Map<String, Object> message) throws IOException {
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

    private Map<String, Object> readControl() throws IOException {
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
      return m;
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
    try {
      return HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(data));
    } catch (NoSuchAlgorithmException e) {
      throw new IllegalStateException(e);
    }
  }

  private static Map<String, Object> object(Object... pairs) {
    Map<String, Object> m = new LinkedHashMap<>();
    for (int i = 0; i < pairs.length; i += 2) m.put((String) pairs[i], pairs[i + 1]);
    return m;
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
