// A plain Java HTTP server for Aeterna on its Java SDK (clients/java, the jar that `make java-sdk` builds): it
// serves on the listener Aeterna places at its stdin (service.stdin_listener), which the JDK hands over as
// System.inheritedChannel() (Aeterna.listener()), and hands its count of served requests to the next generation
// over the State Relay (a no-op relay without state_handoff). Every request gets
// {"pid": ..., "generation": ..., "served": ...}. On SIGTERM (a reload draining it, or a stop) it stops accepting,
// answers each open connection's next request with "Connection: close", hands its final count over, and exits
// once they are done: the new generation accepts on the same socket meanwhile, so no request fails.
//
//   make java-sdk
//   javac -cp ../../build/java/aeterna-client.jar -d out Hello.java
//   java -cp out:../../build/java/aeterna-client.jar Hello      (under Aeterna: aeterna.yaml)
import dev.aeterna.Aeterna;
import java.io.BufferedInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.Socket;
import java.nio.channels.ClosedChannelException;
import java.nio.channels.ServerSocketChannel;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.Locale;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicLong;

public final class Hello {
  /** How long open connections get to send their last request once draining. */
  private static final long DRAIN_MS = 5000;

  private static volatile boolean draining = false;
  /** What earlier generations served (their last word: the load, then the final sync), and what this one served. */
  private static volatile long inherited = 0;
  private static final AtomicLong own = new AtomicLong();
  private static Aeterna.Relay relay;
  private static final Set<Socket> open = ConcurrentHashMap.newKeySet();

  public static void main(String[] args) throws Exception {
    ServerSocketChannel listener = Aeterna.listener();
    if (listener == null) {
      System.err.println("Hello: stdin is not a listening socket; run it under Aeterna with service.stdin_listener set");
      System.exit(2);
    }
    relay = Aeterna.connect();
    relay.onDump((isFinal) -> Aeterna.State.json("{\"served\":" + served() + "}"));
    relay.onLoad((state) -> inherited = parseServed(state)); // the final sync: the old generation's last count
    Aeterna.State state = relay.load();
    if (state != null) inherited = parseServed(state);
    relay.ready();
    listener.configureBlocking(true);
    String identity = "{\"pid\":" + ProcessHandle.current().pid() + ",\"generation\":\"" + System.getenv().getOrDefault("AETERNA_GENERATION", "") + "\"";
    Runtime.getRuntime().addShutdownHook(new Thread(() -> drain(listener)));
    System.out.println("java-hello " + ProcessHandle.current().pid() + " serving on " + listener.getLocalAddress());
    while (!draining) {
      SocketChannel channel;
      try {
        channel = listener.accept();
      } catch (ClosedChannelException e) {
        break; // draining closed our copy of the listener; Aeterna's stays open for the next generation
      }
      Socket socket = channel.socket();
      open.add(socket);
      Thread worker = new Thread(() -> serve(socket, identity));
      worker.setDaemon(true);
      worker.start();
    }
    Thread.currentThread().join(); // the shutdown hook ends the JVM
  }

  /** SIGTERM: stop accepting, let each open connection finish its next request, then exit 0 (a drained stop is a clean one). */
  private static void drain(ServerSocketChannel listener) {
    draining = true;
    try {
      listener.close(); // closes this process's fd 0 only, not the socket Aeterna holds
    } catch (IOException e) {
      // already closed
    }
    long deadline = System.currentTimeMillis() + DRAIN_MS;
    while (!open.isEmpty() && System.currentTimeMillis() < deadline) {
      try {
        Thread.sleep(20);
      } catch (InterruptedException e) {
        break;
      }
    }
    try {
      relay.shutdown(Duration.ofSeconds(5)); // answers the final dump: the next generation gets the last count
    } catch (InterruptedException e) {
      // exit anyway
    }
    System.out.flush();
    Runtime.getRuntime().halt(0); // the JVM's own exit status after SIGTERM would be 143
  }

  /** HTTP/1.1 keep-alive: one response per request until the client closes, or draining ends the connection. */
  private static long served() {
    return inherited + own.get();
  }

  private static long parseServed(Aeterna.State state) {
    String digits = state.text().replaceAll("[^0-9]", "");
    return digits.isEmpty() ? 0 : Long.parseLong(digits);
  }

  private static void serve(Socket socket, String identity) {
    try (socket) {
      InputStream in = new BufferedInputStream(socket.getInputStream());
      OutputStream out = socket.getOutputStream();
      while (true) {
        Request request = Request.read(in);
        if (request == null) return; // the client closed
        own.incrementAndGet();
        byte[] payload = (identity + ",\"served\":" + served() + "}\n").getBytes(StandardCharsets.UTF_8);
        boolean close = draining || request.close;
        String head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + payload.length + "\r\n"
            + (close ? "Connection: close\r\n" : "") + "\r\n";
        out.write(head.getBytes(StandardCharsets.US_ASCII));
        out.write(payload);
        out.flush();
        if (close) {
          socket.shutdownOutput(); // FIN after the response, so the client reads all of it
          return;
        }
      }
    } catch (IOException e) {
      // the client went away mid-request: nothing to answer
    } finally {
      open.remove(socket);
    }
  }

  /** The parts of a request this server needs; the body (Content-Length) is read and ignored. */
  private static final class Request {
    boolean close;

    static Request read(InputStream in) throws IOException {
      String line = readLine(in);
      if (line == null) return null;
      if (line.isEmpty()) line = readLine(in); // tolerate a stray CRLF between requests
      if (line == null) return null;
      Request request = new Request();
      request.close = line.endsWith("HTTP/1.0");
      long length = 0;
      for (String header = readLine(in); header != null && !header.isEmpty(); header = readLine(in)) {
        int colon = header.indexOf(':');
        if (colon < 0) continue;
        String name = header.substring(0, colon).trim().toLowerCase(Locale.ROOT);
        String value = header.substring(colon + 1).trim().toLowerCase(Locale.ROOT);
        if (name.equals("connection")) request.close = value.equals("close") || (request.close && !value.equals("keep-alive"));
        if (name.equals("content-length")) length = Long.parseLong(value);
      }
      in.skipNBytes(length);
      return request;
    }

    /** A CRLF- (or LF-) terminated line, or null at EOF before any byte. */
    private static String readLine(InputStream in) throws IOException {
      StringBuilder line = new StringBuilder();
      for (int c = in.read(); ; c = in.read()) {
        if (c < 0) return line.length() == 0 ? null : line.toString();
        if (c == '\n') break;
        if (line.length() > 8192) throw new IOException("header line too long");
        line.append((char) c);
      }
      int end = line.length();
      if (end > 0 && line.charAt(end - 1) == '\r') line.setLength(end - 1);
      return line.toString();
    }
  }
}
