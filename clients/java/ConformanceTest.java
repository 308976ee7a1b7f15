// The language-neutral conformance suite (test/conformance/*.json, format in its
// README.md) run against the Java SDK, with Aeterna played by a scripted peer on
// a real unix socket. Plain Java, no dependencies: prints one line per case and
// exits 1 if any failed.
//   javac -d out clients/java/Aeterna.java clients/java/ConformanceTest.java
//   java -cp out dev.aeterna.ConformanceTest test/conformance
//
// Skipped: an exchange whose peer attaches a memfd (the JDK cannot receive fds,
// so this SDK's hello says "fds": false and Aeterna never sends it one:
// docs/srp.md, "Clients that cannot receive fds"). The cases that require the
// digest trailer run (this SDK declares it in its hello), and so do those that
// require checkpoints (relay.checkpoint()), but for the memfd one. Skipped too: the
// cases and vectors that require "direct" or "crc32" (this SDK declares neither in
// its hello, so Aeterna never offers them). listeners.json does not apply: the JDK
// adopts an inherited socket only at stdin (Aeterna.listener()), never from LISTEN_FDS.
package dev.aeterna;

import java.io.IOException;
import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.ByteBuffer;
import java.nio.channels.ServerSocketChannel;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.concurrent.CopyOnWriteArrayList;

public final class ConformanceTest {
  private ConformanceTest() {}

  /** The optional capabilities this SDK does not declare in its hello, and why (README.md, "Optional capabilities"). */
  static final Map<String, String> NOT_DECLARED = Map.of(
      "direct", "requires direct: this SDK cannot receive fds, its hello says \"fds\": false and not \"direct\": true, so Aeterna never offers it a socket pair",
      "crc32", "requires crc32: this SDK does not implement crc32, its hello lists no \"checksums\", so Aeterna never offers it one");

  /** Why a frame vector or case needs a capability this SDK does not declare, or null. */
  static String undeclared(Map<String, Object> v) {
    for (Object r : list(v.getOrDefault("requires", List.of()))) {
      if (NOT_DECLARED.containsKey(r)) return NOT_DECLARED.get(r);
    }
    return null;
  }

  /** Why a case does not apply to this SDK, or null when it does. */
  static String skipReason(Map<String, Object> exchange) {
    if (undeclared(exchange) != null) return undeclared(exchange);
    for (Object step : list(exchange.get("steps"))) {
      if (map(step).containsKey("memfd")) return "needs a memfd: this client said \"fds\": false, so Aeterna never sends it fds";
    }
    return null;
  }

  private static int passed;
  private static int skipped;
  private static int failed;
  private static Path dir;

  public static void main(String[] args) throws Exception {
    Path suite = Path.of(args.length > 0 ? args[0] : "test/conformance");
    dir = Files.createTempDirectory("aeterna-java-conformance-");
    try {
      Map<String, Object> frames = map(Aeterna.Json.parse(Files.readString(suite.resolve("frames.json"))));
      for (Object v : list(frames.get("decode"))) {
        String name = "decode: " + map(v).get("name");
        if (undeclared(map(v)) != null) {
          skipped++;
          System.out.println("skip " + name + " (" + undeclared(map(v)) + ")");
        } else {
          run(name, () -> decode(map(v)));
        }
      }
      for (Object v : list(frames.get("encode"))) run("encode: " + map(v).get("name"), () -> encode(map(v)));
      Map<String, Object> exchanges = map(Aeterna.Json.parse(Files.readString(suite.resolve("exchanges.json"))));
      for (Object c : list(exchanges.get("cases"))) {
        String reason = skipReason(map(c));
        if (reason != null) {
          skipped++;
          System.out.println("skip " + map(c).get("name") + " (" + reason + ")");
        } else {
          run(String.valueOf(map(c).get("name")), () -> exchange(map(c)));
        }
      }
      System.out.println("skip listeners.json (the JDK takes its listener from stdin, System.inheritedChannel(), not LISTEN_FDS)");
    } finally {
      try (var files = Files.list(dir)) {
        for (Path p : (Iterable<Path>) files::iterator) Files.deleteIfExists(p);
      }
      Files.deleteIfExists(dir);
    }
    System.out.println("passed " + passed + ", skipped " + skipped + ", failed " + failed);
    System.exit(failed == 0 ? 0 : 1);
  }

  interface Case {
    void run() throws Exception;
  }

  private static void run(String name, Case c) {
    try {
      c.run();
      passed++;
      System.out.println("ok   " + name);
    } catch (Throwable e) {
      failed++;
      System.out.println("FAIL " + name + ": " + e);
    }
  }

  // ---- frames.json -------------------------------------------------------------------------------

  private static void decode(Map<String, Object> v) throws Exception {
    int maxFrame = v.containsKey("max_frame") ? ((Long) v.get("max_frame")).intValue() : Aeterna.DEFAULT_MAX_FRAME;
    try (Pair pair = new Pair()) {
      write(pair.peer, bytes(v.get("bytes")));
      pair.peer.close();
      Aeterna.Relay relay = new Aeterna.Relay(pair.mine, maxFrame);
      Map<String, Object> m;
      try {
        m = relay.readControl();
      } catch (Aeterna.RelayError e) {
        check(Objects.equals(v.get("error"), e.code), "expected " + v.get("error") + ", got " + e.getMessage());
        return;
      }
      check(!v.containsKey("error"), "expected " + v.get("error") + ", decoded " + Aeterna.Json.write(m));
      check(matches(map(v.get("message")), m), "decoded " + Aeterna.Json.write(m));
    }
  }

  private static void encode(Map<String, Object> v) throws Exception {
    byte[] want = bytes(v.get("bytes"));
    try (Pair pair = new Pair()) {
      new Aeterna.Relay(pair.mine, Aeterna.DEFAULT_MAX_FRAME).send(map(v.get("message")));
      pair.mine.close();
      ByteBuffer got = ByteBuffer.allocate(want.length + 1);
      while (pair.peer.read(got) >= 0 && got.hasRemaining()) continue;
      byte[] sent = java.util.Arrays.copyOf(got.array(), got.position());
      check(java.util.Arrays.equals(sent, want), "sent " + HexFormat.of().formatHex(sent));
    }
  }

  // ---- exchanges.json ----------------------------------------------------------------------------

  /** Thrown by the app's apply: load() must rethrow it as is. */
  static final class AppError extends Exception {
    private static final long serialVersionUID = 1L;

    AppError() { super("the app cannot use it"); }
  }

  private static void exchange(Map<String, Object> c) throws Exception {
    Map<String, Object> app = map(c.getOrDefault("app", Map.of()));
    Map<String, Object> expect = map(c.get("expect"));
    Path path = dir.resolve("state.sock");
    Files.deleteIfExists(path);
    try (ServerSocketChannel server = ServerSocketChannel.open(StandardProtocolFamily.UNIX)) {
      server.bind(UnixDomainSocketAddress.of(path));
      Peer peer = new Peer(server, list(c.get("steps")));
      peer.start();
      Aeterna.Relay client;
      try {
        client = Aeterna.connect(path.toString(), Duration.ofSeconds(10));
      } catch (Aeterna.RelayError e) {
        check(expect.containsKey("connect") && Objects.equals(map(expect.get("connect")).get("error"), e.code), "connect failed: " + e.getMessage());
        peer.finish();
        return;
      }
      check(!expect.containsKey("connect"), "connect should have failed");
      List<Object> later = new CopyOnWriteArrayList<>();
      Map<String, Object> dump = map(app.getOrDefault("dump", Map.of("none", true)));
      client.onDump((isFinal) -> {
        if (dump.containsKey("throws")) throw new IllegalStateException("the app cannot dump");
        if (dump.containsKey("text")) return Aeterna.State.text((String) dump.get("text"));
        if (dump.containsKey("json")) return Aeterna.State.json(Aeterna.Json.write(dump.get("json")));
        return null;
      });
      if (app.containsKey("on_load")) {
        client.onLoad((s) -> {
          if ("throws".equals(app.get("on_load"))) throw new IllegalStateException("the app cannot apply it");
          later.add(describe(s));
        });
      }
      Map<String, Object> want = map(expect.get("load"));
      try {
        Aeterna.State state = client.load((s) -> {
          if ("throws".equals(app.get("apply"))) throw new AppError();
        });
        check(want.containsKey("state") && Objects.equals(want.get("state"), describe(state)), "load gave " + Aeterna.Json.write(describe(state)));
        if (expect.containsKey("load_source")) check(state != null && expect.get("load_source").equals(state.source), "load's source: " + (state == null ? null : state.source));
      } catch (Aeterna.RelayError e) {
        check(Objects.equals(want.get("error"), e.code), "load failed: " + e.getMessage());
      } catch (AppError e) {
        check(Boolean.TRUE.equals(want.get("app_error")), "load rethrew the app's error");
      }
      if (Boolean.TRUE.equals(app.get("ready"))) client.ready();
      if (app.containsKey("checkpoint")) checkCheckpoint(client, map(app.get("checkpoint")), map(expect.get("checkpoint")));
      peer.finish();
      check(later.equals(expect.getOrDefault("later_loads", List.of())), "later loads: " + Aeterna.Json.write(new ArrayList<>(later)));
      client.close();
    }
  }

  /** The app calls checkpoint() with the case's JSON: it must give the expected seq, or fail with the expected code. */
  private static void checkCheckpoint(Aeterna.Relay client, Map<String, Object> checkpoint, Map<String, Object> want) throws IOException {
    check(want != null, "the case has app.checkpoint but no expect.checkpoint");
    try {
      long seq = client.checkpoint(Aeterna.State.json(Aeterna.Json.write(checkpoint.get("json"))));
      check(Objects.equals(want.get("seq"), seq), "checkpoint gave seq " + seq + ", expected " + Aeterna.Json.write(want));
    } catch (Aeterna.RelayError e) {
      check(Objects.equals(want.get("error"), e.code), "checkpoint failed: " + e.getMessage() + ", expected " + Aeterna.Json.write(want));
    }
  }

  private static Map<String, Object> describe(Aeterna.State s) {
    if (s == null) return null;
    Map<String, Object> m = new LinkedHashMap<>();
    m.put("encoding", s.encoding);
    m.put("text", s.text());
    m.put("final", s.isFinal);
    return m;
  }

  /** Aeterna's side of one exchange: accepts the connection and plays the steps in order, on its own thread. */
  static final class Peer extends Thread {
    private final ServerSocketChannel server;
    private final List<Object> steps;
    private volatile SocketChannel conn;
    private volatile Throwable failure;

    Peer(ServerSocketChannel server, List<Object> steps) {
      this.server = server;
      this.steps = steps;
      setDaemon(true);
    }

    @Override
    public void run() {
      try {
        conn = server.accept();
        for (Object s : steps) play(map(s));
      } catch (Throwable e) {
        failure = e;
      } finally {
        try {
          if (conn != null) conn.close();
        } catch (IOException e) {
          // closed already
        }
      }
    }

    /** Wait for the script (10 s at most: a stalled client is a failure, not a hang), then report how it went. */
    void finish() throws Exception {
      join(10_000);
      if (isAlive()) {
        server.close();
        if (conn != null) conn.close();
        join();
        throw new AssertionError("the exchange stalled (the peer waited 10 s)", failure);
      }
      if (failure instanceof Exception) throw (Exception) failure;
      if (failure != null) throw new AssertionError(failure);
    }

    private void play(Map<String, Object> step) throws Exception {
      if (step.containsKey("client_sends")) {
        Map<String, Object> want = map(step.get("client_sends"));
        byte[] frame = readFrame(conn);
        check(frame != null, "expected " + Aeterna.Json.write(want) + ", the client closed");
        Map<String, Object> got = map(Aeterna.Json.parse(new String(frame, StandardCharsets.UTF_8)));
        check(matches(want, got), "expected " + Aeterna.Json.write(want) + ", got " + Aeterna.Json.write(got));
      } else if (step.containsKey("client_sends_data")) {
        byte[] want = ((String) step.get("client_sends_data")).getBytes(StandardCharsets.UTF_8);
        java.io.ByteArrayOutputStream got = new java.io.ByteArrayOutputStream();
        while (got.size() < want.length) {
          byte[] frame = readFrame(conn);
          check(frame != null, "expected data, the client closed");
          got.write(frame);
        }
        check(java.util.Arrays.equals(got.toByteArray(), want), "data: " + got.toString(StandardCharsets.UTF_8));
      } else if (step.containsKey("client_closes")) {
        byte[] frame;
        do {
          frame = readFrame(conn); // an error frame before the close was asserted by the step before
        } while (frame != null && "error".equals(map(Aeterna.Json.parse(new String(frame, StandardCharsets.UTF_8))).get("op")));
        check(frame == null, "expected the client to close, got " + new String(frame == null ? new byte[0] : frame, StandardCharsets.UTF_8));
      } else if (step.containsKey("peer_sends")) {
        write(conn, frame(Aeterna.Json.write(step.get("peer_sends")).getBytes(StandardCharsets.UTF_8)));
        for (Object part : list(step.getOrDefault("data", List.of()))) write(conn, frame(((String) part).getBytes(StandardCharsets.UTF_8)));
      } else {
        throw new AssertionError("unknown step " + Aeterna.Json.write(step));
      }
    }
  }

  // ---- wire and JSON helpers ---------------------------------------------------------------------

  /** A connected pair of unix stream sockets: the peer's end and the SDK's. */
  static final class Pair implements AutoCloseable {
    final SocketChannel peer;
    final SocketChannel mine;

    Pair() throws IOException {
      Path path = dir.resolve("pair.sock");
      Files.deleteIfExists(path);
      try (ServerSocketChannel server = ServerSocketChannel.open(StandardProtocolFamily.UNIX)) {
        server.bind(UnixDomainSocketAddress.of(path));
        mine = SocketChannel.open(UnixDomainSocketAddress.of(path));
        peer = server.accept();
      }
    }

    @Override
    public void close() throws IOException {
      peer.close();
      mine.close();
    }
  }

  /** The next frame's payload, or null at the end of the connection (a reset after a refused frame is one too). */
  static byte[] readFrame(SocketChannel channel) throws IOException {
    ByteBuffer header = ByteBuffer.allocate(4);
    if (!readFully(channel, header)) return null;
    ByteBuffer payload = ByteBuffer.allocate(header.flip().getInt());
    if (!readFully(channel, payload)) throw new AssertionError("the client closed inside a frame");
    return payload.array();
  }

  private static boolean readFully(SocketChannel channel, ByteBuffer buffer) throws IOException {
    while (buffer.hasRemaining()) {
      int n;
      try {
        n = channel.read(buffer);
      } catch (IOException e) {
        if (String.valueOf(e.getMessage()).contains("reset")) return false;
        throw e;
      }
      if (n < 0) return false;
    }
    return true;
  }

  static void write(SocketChannel channel, byte[] data) throws IOException {
    ByteBuffer b = ByteBuffer.wrap(data);
    while (b.hasRemaining()) channel.write(b);
  }

  static byte[] frame(byte[] payload) {
    return ByteBuffer.allocate(4 + payload.length).putInt(payload.length).put(payload).array();
  }

  /** A vector's "bytes": hex, raw text, or a whole frame (length header + UTF-8 text). */
  static byte[] bytes(Object parts) {
    java.io.ByteArrayOutputStream out = new java.io.ByteArrayOutputStream();
    for (Object p : list(parts)) {
      Map<String, Object> part = map(p);
      if (part.containsKey("hex")) out.writeBytes(HexFormat.of().parseHex((String) part.get("hex")));
      else if (part.containsKey("text")) out.writeBytes(((String) part.get("text")).getBytes(StandardCharsets.UTF_8));
      else out.writeBytes(frame(((String) part.get("frame")).getBytes(StandardCharsets.UTF_8)));
    }
    return out.toByteArray();
  }

  /** Every expected field is in actual; {"prefix": s} matches a string starting with s. */
  static boolean matches(Map<String, Object> expected, Map<String, Object> actual) {
    for (Map.Entry<String, Object> e : expected.entrySet()) {
      Object want = e.getValue();
      Object got = actual.get(e.getKey());
      if (want instanceof Map && map(want).keySet().equals(java.util.Set.of("prefix"))) {
        if (!(got instanceof String && ((String) got).startsWith((String) map(want).get("prefix")))) return false;
      } else if (!actual.containsKey(e.getKey()) || !Objects.equals(want, got)) {
        return false;
      }
    }
    return true;
  }

  static void check(boolean ok, String message) {
    if (!ok) throw new AssertionError(message);
  }

  @SuppressWarnings("unchecked")
  static Map<String, Object> map(Object o) {
    return (Map<String, Object>) o;
  }

  @SuppressWarnings("unchecked")
  static List<Object> list(Object o) {
    return (List<Object>) o;
  }
}
