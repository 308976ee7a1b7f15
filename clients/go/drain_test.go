package client

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"testing"
	"time"
)

// rawGet sends one keep-alive GET on c and reads the response.
func rawGet(t *testing.T, c net.Conn, r *bufio.Reader) *http.Response {
	t.Helper()
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp
}

// Drain: a request in flight finishes; a request on an idle keep-alive
// connection is answered with Connection: close and the connection closed;
// a connection that stays idle is closed by Drain; then Shutdown, and Serve
// returns http.ErrServerClosed.
func TestDrainFinishesInFlightAnswersWithConnectionCloseAndClosesIdle(t *testing.T) {
	release := make(chan struct{})
	entered := make(chan struct{}, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			entered <- struct{}{}
			<-release
		}
		io.WriteString(w, "ok")
	})}
	TrackConnections(srv)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	dial := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(30 * time.Second)) // a hang guard
		t.Cleanup(func() { c.Close() })
		return c, bufio.NewReader(c)
	}
	slow, slowR := dial()
	keep, keepR := dial()
	idle, _ := dial()
	if resp := rawGet(t, keep, keepR); resp.Close {
		t.Fatal("before Drain a response closes its connection")
	}
	io.WriteString(slow, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
	<-entered

	drained := make(chan error, 1)
	go func() { drained <- Drain(context.Background(), srv, DrainOptions{Idle: 100 * time.Millisecond}) }()
	// The connection that never sends anything is closed by Drain once idle.
	if n, err := idle.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("the idle connection: %d %v, want EOF", n, err)
	}
	close(release)
	resp, err := http.ReadResponse(slowR, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if string(body) != "ok" {
		t.Fatalf("the request in flight: %q", body)
	}
	slow.Close() // the client leaves: nothing is left to drain but the idle keep-alive one
	if err := <-drained; err != nil {
		t.Fatalf("Drain: %v", err)
	}
	if err := <-served; err != http.ErrServerClosed {
		t.Fatalf("Serve returned %v", err)
	}
	if n, err := keep.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("the keep-alive connection is still open after Drain: %d %v", n, err)
	}
}

// After Drain starts, every response says Connection: close and its connection
// closes, and a new connection is not accepted (it waits for the next generation).
func TestDrainAnswersWithConnectionCloseAndLeavesNewConnectionsInTheBacklog(t *testing.T) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })}
	TrackConnections(srv)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(c)
	rawGet(t, c, r)
	drained := make(chan error, 1)
	// Idle of a minute: this connection is not closed for idleness while the test uses it.
	go func() { drained <- Drain(context.Background(), srv, DrainOptions{Idle: time.Minute}) }()
	for !trackerOf(srv).isDraining() {
		time.Sleep(time.Millisecond)
	}
	// A connection that arrives now waits in the backlog (for the next generation): this server never answers it.
	late, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer late.Close()
	late.SetDeadline(time.Now().Add(30 * time.Second))
	io.WriteString(late, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	resp := rawGet(t, c, r)
	if !resp.Close { // (ReadResponse takes "Connection: close" out of the header into Close)
		t.Fatal("a response during Drain does not say Connection: close")
	}
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("after that response: %d %v, want EOF", n, err)
	}
	if err := <-drained; err != nil {
		t.Fatalf("Drain: %v", err)
	}
	// Shutdown closed the listener with the late connection still in its backlog: reset, never served.
	if n, err := late.Read(make([]byte, 1)); n != 0 || err == nil || os.IsTimeout(err) {
		t.Fatalf("the connection that arrived during Drain: %d bytes, %v", n, err)
	}
}
