package client

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// connected is a client past the handshake and an empty initial load, and the peer that plays Aeterna.
func connected(t *testing.T) (*Client, *peer) {
	t.Helper()
	return connectedTo(t, newPeer(t))
}

// connectedTo is connected with a peer set up by the caller.
func connectedTo(t *testing.T, p *peer) (*Client, *peer) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		p.welcome(3)
		p.send(map[string]any{"op": "load", "size": 0}, nil)
		p.expect(map[string]any{"op": "ack", "ok": true})
	}()
	relay, err := Connect(Options{Path: p.path})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { relay.Close() })
	if st, err := relay.Load(nil); st != nil || err != nil {
		t.Fatalf("load: %v %v", st, err)
	}
	<-done
	if relay.Generation != 3 {
		t.Fatalf("generation %d", relay.Generation)
	}
	return relay, p
}

func TestOutsideAeternaEveryCallIsANoOp(t *testing.T) {
	t.Setenv("LIVERELAY_STATE_SOCK", "")
	relay, err := Connect(Options{})
	if err != nil || relay.Enabled() {
		t.Fatalf("%v %v", relay, err)
	}
	relay.OnDump(func(bool) (*Dump, error) { t.Fatal("dump asked outside Aeterna"); return nil, nil })
	if st, err := relay.Load(nil); st != nil || err != nil {
		t.Fatalf("load: %v %v", st, err)
	}
	if err := relay.Ready(); err != nil {
		t.Fatal(err)
	}
	if seq, err := relay.Checkpoint(TextDump("kept nowhere")); seq != 0 || err != nil {
		t.Fatalf("checkpoint: %d %v", seq, err)
	}
	if relay.Shutdown(time.Second) {
		t.Fatal("shutdown reported a handed-over state")
	}
}

func TestReadyBeforeLoadIsAUsageError(t *testing.T) {
	p := newPeer(t)
	go p.welcome(1)
	relay, err := Connect(Options{Path: p.path})
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	var re *RelayError
	if err := relay.Ready(); !errors.As(err, &re) || re.Code != CodeUsage {
		t.Fatalf("ready before load: %v", err)
	}
}

func TestShutdownAnswersTheFinalDumpWithTheLatestStateAndReportsTheAck(t *testing.T) {
	relay, p := connected(t)
	var count atomic.Int64 // served while the relay's goroutine dumps
	count.Store(1)
	relay.OnDump(func(final bool) (*Dump, error) {
		return JSONDump(map[string]any{"count": count.Load(), "final": final})
	})
	p.send(map[string]any{"op": "dump", "final": false}, nil)
	p.expect(map[string]any{"op": "state", "encoding": "json", "size": 25.0})
	if got := string(p.expectData(25)); got != `{"count":1,"final":false}` {
		t.Fatalf("first dump %q", got)
	}
	count.Store(2) // served meanwhile: the final state must include it
	p.send(map[string]any{"op": "dump", "final": true, "timeout_ms": 30000}, nil)
	result := make(chan bool)
	go func() { result <- relay.Shutdown(5 * time.Second) }()
	p.expect(map[string]any{"op": "state", "encoding": "json", "size": 24.0})
	if got := string(p.expectData(24)); got != `{"count":2,"final":true}` {
		t.Fatalf("final dump %q", got)
	}
	p.send(map[string]any{"op": "ack", "ok": true}, nil)
	if !<-result {
		t.Fatal("Shutdown did not report the final ack")
	}
}

func TestShutdownReturnsAtEndOfFileWithoutAFinalDump(t *testing.T) {
	relay, p := connected(t)
	var asked atomic.Bool
	relay.OnDump(func(bool) (*Dump, error) { asked.Store(true); return nil, nil })
	p.c.uc.Close() // Aeterna stops this generation with no one to hand over to
	if relay.Shutdown(time.Hour) || asked.Load() {
		t.Fatalf("shutdown handed over a state (asked %v)", asked.Load())
	}
}

func TestTheFinalAckIsAwaitedAsLongAsTheDumpsTimeoutMs(t *testing.T) {
	relay, p := connected(t)
	relay.OnDump(func(bool) (*Dump, error) { return TextDump("x"), nil })
	p.send(map[string]any{"op": "dump", "final": true, "timeout_ms": 60000}, nil)
	result := make(chan bool)
	go func() { result <- relay.Shutdown(time.Millisecond) }() // far below the dump's timeout_ms
	p.expect(map[string]any{"op": "state", "size": 1.0})
	p.expectData(1)
	time.Sleep(50 * time.Millisecond) // longer than Shutdown's own timeout: the ack must still count
	p.send(map[string]any{"op": "ack", "ok": true}, nil)
	if !<-result {
		t.Fatal("the ack after Shutdown's timeout but within timeout_ms was not awaited")
	}
}

func TestAMemfdDumpIsSentSealedWithItsSizeAndClosedAfterwards(t *testing.T) {
	relay, p := connected(t)
	payload := []byte("a state in a memfd")
	memfd, err := MemfdState(payload, "sent-state")
	if err != nil {
		t.Fatal(err)
	}
	relay.OnDump(func(bool) (*Dump, error) { return &Dump{Encoding: "binary", Memfd: memfd}, nil })
	p.send(map[string]any{"op": "dump", "final": false}, nil)
	_, files := p.expect(map[string]any{"op": "state", "transport": "memfd", "size": float64(len(payload)), "fds": []any{"state"}})
	if len(files) != 1 {
		t.Fatalf("%d fds with the state", len(files))
	}
	data, problem := mapMemfd(files[0], int64(len(payload)), "")
	if problem != nil || string(data) != string(payload) {
		t.Fatalf("%q %v", data, problem)
	}
	// The SDK closes it right after the send returns: then only the received copy is open here
	// (wait for that: a hang guard, not a timing assertion).
	for deadline := time.Now().Add(5 * time.Second); openMemfds(t, "sent-state") != 1; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the SDK kept the memfd it sent: %d open", openMemfds(t, "sent-state"))
		}
	}
}

func TestAnUnsealedMemfdDumpIsDeclinedWithDumpFailed(t *testing.T) {
	relay, p := connected(t)
	relay.OnDump(func(bool) (*Dump, error) { return &Dump{Memfd: sealedMemfd(t, "x", false)}, nil })
	p.send(map[string]any{"op": "dump", "final": false}, nil)
	p.expect(map[string]any{"op": "ack", "ok": false, "error": map[string]any{"prefix": "dump_failed: "}})
}

func TestLiveConnectionsTravelAsNamedFdsBothWays(t *testing.T) {
	relay, p := connected(t)
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	sock, _ := ln.(*net.TCPListener).File()
	defer sock.Close()
	relay.OnDump(func(bool) (*Dump, error) {
		return &Dump{Encoding: "text", Data: []byte("s"), FDs: map[string]*os.File{"conn:1": sock}}, nil
	})
	p.send(map[string]any{"op": "dump", "final": false}, nil)
	_, files := p.expect(map[string]any{"op": "state", "fds": []any{"conn:1"}, "size": 1.0})
	p.expectData(1)
	if len(files) != 1 {
		t.Fatalf("%d fds with the state", len(files))
	}
	// And back: a later load carrying that fd reaches OnLoad under its name.
	got := make(chan *State, 1)
	relay.OnLoad(func(s *State) error { got <- s; return nil })
	sum := sha256.Sum256([]byte("s"))
	p.send(map[string]any{"op": "load", "final": true, "encoding": "text", "size": 1, "sha256": hex.EncodeToString(sum[:]), "fds": []string{"conn:1"}}, files, []byte("s"))
	p.expect(map[string]any{"op": "ack", "ok": true})
	s := <-got
	f := s.FDs["conn:1"]
	if f == nil || !s.Final || s.Text() != "s" {
		t.Fatalf("later load %+v", s)
	}
	adopted, err := net.FileListener(f)
	if err != nil {
		t.Fatalf("the received fd is not the listener: %v", err)
	}
	adopted.Close()
	f.Close()
}

// loadStreamed: the peer welcomes, sends the initial load (header and data frames) and expects an ack; the
// client's Load gives what it gives.
func loadStreamed(t *testing.T, p *peer, header map[string]any, frames ...[]byte) (*State, error) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		p.welcome(2)
		p.send(header, nil, frames...)
		p.expect(map[string]any{"op": "ack", "ok": true})
	}()
	relay, err := Connect(Options{Path: p.path})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { relay.Close() })
	st, err := relay.Load(nil)
	<-done
	return st, err
}

func TestAStreamedStateAcrossManyDataFramesIsVerified(t *testing.T) {
	p := newPeer(t)
	big := make([]byte, 3<<20+5)
	for i := range big {
		big[i] = byte(i * 7)
	}
	sum := sha256.Sum256(big)
	var frames [][]byte
	for off := 0; off < len(big); off += 1 << 20 {
		end := off + 1<<20
		if end > len(big) {
			end = len(big)
		}
		frames = append(frames, big[off:end])
	}
	st, err := loadStreamed(t, p, map[string]any{"op": "load", "encoding": "binary", "size": len(big), "sha256": hex.EncodeToString(sum[:])}, frames...)
	if err != nil || st == nil || len(st.Data) != len(big) || sha256.Sum256(st.Data) != sum {
		t.Fatalf("load: %v", err)
	}
	if st.Source != "relay" || st.Seq != 0 { // a load without "source" is a live generation's dump
		t.Fatalf("source %q seq %d", st.Source, st.Seq)
	}
}

// openMemfds counts this process's fds on memfds called name.
func openMemfds(t *testing.T, name string) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range entries {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(target, "/memfd:"+name+" ") {
			n++
		}
	}
	return n
}
