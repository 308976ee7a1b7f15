//go:build linux

package client

// Graceful HTTP drain for an *http.Server under Aeterna: on SIGTERM, stop
// accepting, finish in-flight requests, and close keep-alive connections
// without racing a request on the wire (the Go counterpart of the TypeScript
// SDK's drain).
//
// Why not just Server.Shutdown: it closes every idle keep-alive connection at
// once, and a client may be writing its next request on such a connection at
// that very moment; it then sees a reset (Go's own http.Client retries such a
// request, most clients do not). Instead, every response from now on says
// `Connection: close` (the client opens its next connection, which the new
// generation accepts on the shared socket), only connections that have had no
// request in flight for DrainOptions.Idle are closed, and Shutdown runs once
// no connection is left for it to cut.

import (
	"bytes"
	"context"
	"errors"
	"log"
	"net"
	"net/http"
	"sync"
	"time"
)

// DrainOptions tunes Drain.
type DrainOptions struct {
	// Idle: a connection that has had no request in flight for this long is
	// closed. Zero means 1 s.
	Idle time.Duration
}

// trackedConn is what Drain knows of one connection.
type trackedConn struct {
	active     bool // a request is in flight (between StateActive and StateIdle)
	lastActive time.Time
}

// connTracker follows one server's connections, listeners and drain.
type connTracker struct {
	mu        sync.Mutex
	conns     map[net.Conn]*trackedConn
	listeners []net.Listener
	draining  bool
	// gone wakes Drain when a connection leaves, so it sees the last one go at once.
	gone chan struct{}
}

var (
	trackersMu sync.Mutex
	trackers   = map[*http.Server]*connTracker{}
)

func trackerOf(srv *http.Server) *connTracker {
	trackersMu.Lock()
	defer trackersMu.Unlock()
	return trackers[srv]
}

// TrackConnections prepares srv for Drain: it chains a ConnState hook (which
// connections are idle, since when), wraps the Handler (after Drain starts,
// every response says `Connection: close`), a BaseContext (the listeners
// Serve is given, so Drain can stop accepting) and an ErrorLog filter (Serve's
// "Accept error: i/o timeout" lines while Drain has stopped accepting). Call it
// once, before serving; a second call does nothing. HTTP/1.x only: an HTTP/2
// connection has no `Connection: close`.
func TrackConnections(srv *http.Server) {
	trackersMu.Lock()
	if trackers[srv] != nil {
		trackersMu.Unlock()
		return
	}
	t := &connTracker{conns: map[net.Conn]*trackedConn{}, gone: make(chan struct{}, 1)}
	trackers[srv] = t
	trackersMu.Unlock()

	prevState := srv.ConnState
	srv.ConnState = func(c net.Conn, s http.ConnState) {
		t.setState(c, s)
		if prevState != nil {
			prevState(c, s)
		}
	}
	inner := srv.Handler
	if inner == nil {
		inner = http.DefaultServeMux
	}
	srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if t.isDraining() {
			// net/http closes the connection once this response is sent.
			w.Header().Set("Connection", "close")
		}
		inner.ServeHTTP(w, r)
	})
	prevBase := srv.BaseContext
	srv.BaseContext = func(ln net.Listener) context.Context {
		t.mu.Lock()
		t.listeners = append(t.listeners, ln)
		stop := t.draining
		t.mu.Unlock()
		if stop {
			stopAccepting(ln)
		}
		if prevBase != nil {
			return prevBase(ln)
		}
		return context.Background()
	}
	srv.ErrorLog = log.New(&acceptTimeoutFilter{t: t, next: srv.ErrorLog}, "", 0)
}

func (t *connTracker) isDraining() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.draining
}

func (t *connTracker) setState(c net.Conn, s http.ConnState) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch s {
	case http.StateNew:
		t.conns[c] = &trackedConn{lastActive: time.Now()}
	case http.StateActive:
		if e := t.conns[c]; e != nil {
			e.active = true
		}
	case http.StateIdle:
		if e := t.conns[c]; e != nil {
			e.active = false
			e.lastActive = time.Now()
		}
	case http.StateHijacked, http.StateClosed:
		// A hijacked connection is the app's (Handoff can move it); Drain does not wait for it.
		delete(t.conns, c)
		select {
		case t.gone <- struct{}{}:
		default:
		}
	}
}

// deadliner is a listener whose Accept can be made to return at once (TCP, Unix).
type deadliner interface{ SetDeadline(time.Time) error }

// stopAccepting makes ln's pending and future Accept calls time out without
// closing it: new connections wait in the listening socket's backlog, which
// Aeterna shares with the new generation, and Serve keeps retrying until
// Shutdown closes ln (then Serve returns http.ErrServerClosed, as usual).
func stopAccepting(ln net.Listener) bool {
	d, ok := ln.(deadliner)
	return ok && d.SetDeadline(time.Unix(1, 0)) == nil
}

// Drain stops srv gracefully: it stops accepting; every response from now on
// says `Connection: close`; connections that have had no request in flight for
// o.Idle are closed; once no connection is left, srv.Shutdown(ctx) closes the
// listeners. It returns Shutdown's result, or ctx.Err() when ctx ends first
// (Shutdown is then still called, with ctx: it closes the listeners and idle
// connections and leaves active ones, as Shutdown does on its own deadline).
// After Drain, Serve returns http.ErrServerClosed.
//
// It needs TrackConnections before Serve; without it, Drain logs that and
// falls back to srv.Shutdown(ctx). Connections hijacked from srv (WebSocket,
// Handoff) are not waited for. A listener without SetDeadline (a wrapper such
// as tls.NewListener's) keeps accepting until Shutdown: Drain then ends when
// the connections it accepted meanwhile have closed, or at ctx's end.
func Drain(ctx context.Context, srv *http.Server, o DrainOptions) error {
	t := trackerOf(srv)
	if t == nil {
		logf("Drain without TrackConnections: falling back to Server.Shutdown, which may cut a request racing an idle keep-alive connection")
		return srv.Shutdown(ctx)
	}
	idle := o.Idle
	if idle <= 0 {
		idle = time.Second
	}
	t.mu.Lock()
	t.draining = true
	for _, ln := range t.listeners {
		if !stopAccepting(ln) {
			logf("Drain: the listener %s has no SetDeadline: it keeps accepting until Shutdown", ln.Addr())
		}
	}
	t.mu.Unlock()
	tick := idle / 4
	if tick < 10*time.Millisecond {
		tick = 10 * time.Millisecond
	}
	ticker := time.NewTicker(tick)
	defer ticker.Stop()
	for !t.closeIdle(idle) {
		select {
		case <-ctx.Done():
			srv.Shutdown(ctx)
			return ctx.Err()
		case <-ticker.C:
		case <-t.gone:
		}
	}
	err := srv.Shutdown(ctx)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// closeIdle closes the connections idle for at least idle; it reports whether none is left.
func (t *connTracker) closeIdle(idle time.Duration) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now()
	for c, e := range t.conns {
		if !e.active && now.Sub(e.lastActive) >= idle {
			// Under t.mu: a request that becomes active now waits for this
			// decision in the ConnState hook, so an active one is never cut.
			c.Close()
		}
	}
	return len(t.conns) == 0
}

// acceptTimeoutFilter drops Serve's "http: Accept error: ... i/o timeout;
// retrying" lines once Drain has stopped accepting (they are its doing) and
// passes every other line to the server's own ErrorLog, or to the log
// package's standard logger when it had none.
type acceptTimeoutFilter struct {
	t    *connTracker
	next *log.Logger
}

func (f *acceptTimeoutFilter) Write(p []byte) (int, error) {
	if f.t.isDraining() && bytes.Contains(p, []byte("Accept error")) && bytes.Contains(p, []byte("i/o timeout")) {
		return len(p), nil
	}
	out := f.next
	if out == nil {
		out = log.Default()
	}
	return len(p), out.Output(3, string(p))
}
