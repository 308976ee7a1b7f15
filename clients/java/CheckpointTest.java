// Relay.checkpoint() against a scripted Aeterna on a real unix socket: what the
// conformance suite cannot express (threads, callbacks, a connection that ends).
// Compiled with Aeterna.java and ConformanceTest.java (whose wire helpers it
// uses); prints one line per case and exits 1 if any failed.
//   java -cp out dev.aeterna.CheckpointTest
package dev.aeterna;

import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.channels.ServerSocketChannel;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;

public final class CheckpointTest {
  private CheckpointTest() {}

  private static int failed;

  /** Aeterna's side: the connection, its frames as JSON objects. */
  static final class ScriptedAeterna implements AutoCloseable {
    final ServerSocketChannel server;
    final Path dir;
    SocketChannel conn;

    ScriptedAeterna() throws Exception {
      dir = Files.createTempDirectory("aeterna-java-ckpt-");
      server = ServerSocketChannel.open(StandardProtocolFamily.UNIX);
      server.bind(UnixDomainSocketAddress.of(dir.resolve("state.sock")));
    }

    /** Connect a client (welcome with "checkpoint": true) and take its initial empty load. */
    Aeterna.Relay connected(boolean load) throws Exception {
      CompletableFuture<Aeterna.Relay> client = CompletableFuture.supplyAsync(() -> {
        try {
          return Aeterna.connect(dir.resolve("state.sock").toString(), Duration.ofSeconds(10));
        } catch (Exception e) {
          throw new IllegalStateException(e);
        }
      });
      conn = server.accept();
      expect("hello");
      send("{\"op\":\"welcome\",\"v\":1,\"generation\":2,\"max_frame\":16777216,\"checkpoint\":true}");
      Aeterna.Relay relay = client.get(10, TimeUnit.SECONDS);
      if (load) {
        send("{\"op\":\"load\",\"size\":0}");
        relay.load();
        expect("ack");
      }
      return relay;
    }

    void send(String json) throws Exception {
      ConformanceTest.write(conn, ConformanceTest.frame(json.getBytes(StandardCharsets.UTF_8)));
    }

    Map<String, Object> expect(String op) throws Exception {
      byte[] frame = ConformanceTest.readFrame(conn);
      ConformanceTest.check(frame != null, "expected " + op + ", the client closed");
      Map<String, Object> m = ConformanceTest.map(Aeterna.Json.parse(new String(frame, StandardCharsets.UTF_8)));
      ConformanceTest.check(op.equals(m.get("op")), "expected " + op + ", got " + Aeterna.Json.write(m));
      return m;
    }

    /** A streamed checkpoint: header, data frames, trailer; returns its text. */
    String expectCheckpoint() throws Exception {
      Map<String, Object> m = expect("checkpoint");
      StringBuilder text = new StringBuilder();
      while (text.length() < (Long) m.get("size")) text.append(new String(ConformanceTest.readFrame(conn), StandardCharsets.UTF_8));
      expect("trailer");
      return text.toString();
    }

    @Override
    public void close() throws java.io.IOException {
      if (conn != null) conn.close();
      server.close();
      Files.deleteIfExists(dir.resolve("state.sock"));
      Files.deleteIfExists(dir);
    }
  }

  interface Case {
    void run(ScriptedAeterna a) throws Exception;
  }

  private static void run(String name, Case c) {
    try (ScriptedAeterna a = new ScriptedAeterna()) {
      CompletableFuture<Void> ran = CompletableFuture.runAsync(() -> {
        try {
          c.run(a);
        } catch (Exception e) {
          throw new java.util.concurrent.CompletionException(e);
        }
      });
      try {
        ran.get(20, TimeUnit.SECONDS); // a hang guard: a stalled exchange is a failure
      } catch (java.util.concurrent.TimeoutException e) {
        throw new AssertionError("stalled for 20 s");
      } catch (java.util.concurrent.ExecutionException e) {
        throw e.getCause();
      }
      System.out.println("ok   " + name);
    } catch (Throwable e) {
      failed++;
      System.out.println("FAIL " + name + ": " + e);
    }
  }

  public static void main(String[] args) {
    run("two checkpoints at once get the answers in the order they went out, a refusal included", (a) -> {
      Aeterna.Relay relay = a.connected(true);
      CompletableFuture<Object> one = CompletableFuture.supplyAsync(() -> result(relay, "one"));
      CompletableFuture<Object> two = CompletableFuture.supplyAsync(() -> result(relay, "two"));
      String first = a.expectCheckpoint();
      String second = a.expectCheckpoint();
      a.send("{\"op\":\"checkpointed\",\"seq\":41}");
      a.send("{\"op\":\"checkpointed\",\"code\":\"too_large\",\"message\":\"above max_size\"}");
      Map<String, CompletableFuture<Object>> byText = Map.of("\"one\"", one, "\"two\"", two);
      ConformanceTest.check(Long.valueOf(41).equals(byText.get(first).get(10, TimeUnit.SECONDS)), "the first sent got " + byText.get(first).get());
      ConformanceTest.check("too_large".equals(byText.get(second).get(10, TimeUnit.SECONDS)), "the second sent got " + byText.get(second).get());
    });
    run("a checkpoint still waiting when the connection ends fails with closed, and so does the next", (a) -> {
      Aeterna.Relay relay = a.connected(true);
      CompletableFuture<Object> pending = CompletableFuture.supplyAsync(() -> result(relay, "lost"));
      a.expectCheckpoint();
      a.conn.close();
      ConformanceTest.check("closed".equals(pending.get(10, TimeUnit.SECONDS)), "got " + pending.get());
      ConformanceTest.check("closed".equals(result(relay, "after the end")), "after the end");
    });
    run("checkpoint() before load() is a usage error", (a) -> {
      Aeterna.Relay relay = a.connected(false);
      ConformanceTest.check("usage".equals(result(relay, "too early")), "before load");
    });
    run("checkpoint() from a dump callback is a usage error (only that thread reads the answer): the dump is declined", (a) -> {
      Aeterna.Relay relay = a.connected(false);
      relay.onDump((isFinal) -> {
        relay.checkpoint(Aeterna.State.text("from the callback"));
        return null;
      });
      a.send("{\"op\":\"load\",\"size\":0}");
      relay.load();
      a.expect("ack");
      a.send("{\"op\":\"dump\",\"final\":false}");
      Map<String, Object> ack = a.expect("ack");
      ConformanceTest.check(Boolean.FALSE.equals(ack.get("ok")) && String.valueOf(ack.get("error")).startsWith("dump_failed: ") && String.valueOf(ack.get("error")).contains("usage"), "got " + Aeterna.Json.write(ack));
    });
    run("outside Aeterna checkpoint() does nothing and returns 0", (a) -> {
      ConformanceTest.check(new Aeterna.Relay(null, Aeterna.DEFAULT_MAX_FRAME).checkpoint(Aeterna.State.text("x")) == 0, "not 0");
    });
    System.out.println(failed == 0 ? "all passed" : failed + " failed");
    System.exit(failed == 0 ? 0 : 1);
  }

  /** What checkpoint(text as JSON) gives: the seq, or the refusal's code. */
  private static Object result(Aeterna.Relay relay, String text) {
    try {
      return relay.checkpoint(Aeterna.State.json("\"" + text + "\""));
    } catch (Aeterna.RelayError e) {
      return e.code;
    } catch (Exception e) {
      return e.toString();
    }
  }
}
