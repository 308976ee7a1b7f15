package client

// Connection handoff over a real socket pair, with real TCP connections: the
// old side's Handoff.Send and End, the new side's readHandoff, and through the
// relay (the scripted peer playing Aeterna) Handoff and OnConnection.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// channelEnds is a fresh socket pair: the old side's Handoff on one end, the new side's *conn on the other.
func channelEnds(t *testing.T, maxFrame int) (*Handoff, *conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	old, err := channelConn(os.NewFile(uintptr(fds[0]), "old"), maxFrame)
	if err != nil {
		t.Fatal(err)
	}
	next, err := channelConn(os.NewFile(uintptr(fds[1]), "new"), maxFrame)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { old.uc.Close(); next.uc.Close() })
	return &Handoff{c: old}, next
}

// adopting runs readHandoff on ch in a goroutine; adopted connections arrive on the channel it returns.
func adopting(ch *conn) (<-chan AdoptedConn, <-chan handoffResult) {
	adopted := make(chan AdoptedConn, 2000)
	done := make(chan handoffResult, 1)
	go func() { done <- readHandoff(ch, func(a AdoptedConn) { adopted <- a }) }()
	return adopted, done
}

// tcpConns opens n TCP connections to a fresh listener: the client ends and the server's accepted ends.
func tcpConns(t *testing.T, n int) (clients, servers []net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(60 * time.Second)) // hang guards, not timing assertions
		clients, servers = append(clients, c), append(servers, s)
	}
	t.Cleanup(func() {
		for i := range clients {
			clients[i].Close()
			servers[i].Close()
		}
	})
	return clients, servers
}

func result(t *testing.T, done <-chan handoffResult) handoffResult {
	t.Helper()
	select {
	case r := <-done:
		return r
	case <-time.After(60 * time.Second): // a hang guard
		t.Fatal("the new side did not finish reading the channel")
		return handoffResult{}
	}
}

// expectEOF: the connection's other end was closed by its last holder.
func expectEOF(t *testing.T, c net.Conn, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	n, err := c.Read(make([]byte, 1))
	if n != 0 || (err != io.EOF && !isReset(err)) {
		t.Fatalf("%s: read %d bytes, %v; want end of file (its fd closed)", what, n, err)
	}
}

func isReset(err error) bool { return err != nil && strings.Contains(err.Error(), "connection reset") }

func TestHandoffMovesTCPConnectionsThatKeepWorking(t *testing.T) {
	h, next := channelEnds(t, DefaultMaxFrame)
	adopted, done := adopting(next)
	clients, servers := tcpConns(t, 3)
	for i, s := range servers {
		fmt.Fprintf(clients[i], "hello %d\n", i)
		line, err := bufio.NewReader(s).ReadString('\n') // served by the old side
		if err != nil || line != fmt.Sprintf("hello %d\n", i) {
			t.Fatalf("%q %v", line, err)
		}
		if err := h.Send(s, fmt.Sprintf("c%d", i), map[string]int{"n": i}, nil); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Write([]byte("x")); err == nil {
			t.Fatal("the old side's copy is still open after Send")
		}
	}
	if n, err := h.End(); n != 3 || err != nil {
		t.Fatalf("End: %d %v", n, err)
	}
	r := result(t, done)
	if r.err != nil || !r.ended || r.count != 3 || r.adopted != 3 {
		t.Fatalf("the new side: %+v", r)
	}
	for i := 0; i < 3; i++ {
		a := <-adopted
		defer a.Conn.Close()
		if a.ID != fmt.Sprintf("c%d", i) || string(a.Meta) != fmt.Sprintf(`{"n":%d}`, i) || len(a.Unread) != 0 {
			t.Fatalf("adopted %d: %q %s %q", i, a.ID, a.Meta, a.Unread)
		}
		// Both directions on the same TCP connection, now served by the new side.
		fmt.Fprintf(a.Conn, "pong %d\n", i)
		if line, err := bufio.NewReader(clients[i]).ReadString('\n'); err != nil || line != fmt.Sprintf("pong %d\n", i) {
			t.Fatalf("client %d read %q %v", i, line, err)
		}
		fmt.Fprintf(clients[i], "ping %d\n", i)
		if line, err := bufio.NewReader(a.Conn).ReadString('\n'); err != nil || line != fmt.Sprintf("ping %d\n", i) {
			t.Fatalf("adopted %d read %q %v", i, line, err)
		}
	}
}

func TestHandoffUnreadBytesComeFirst(t *testing.T) {
	h, next := channelEnds(t, 256) // a small max_frame: the unread bytes go as several data frames
	adopted, done := adopting(next)
	clients, servers := tcpConns(t, 1)
	unread := bytes.Repeat([]byte("0123456789"), 100) // read by the old side, not processed
	clients[0].Write(unread)
	got := make([]byte, len(unread))
	if _, err := io.ReadFull(servers[0], got); err != nil {
		t.Fatal(err)
	}
	if err := h.Send(servers[0], "c", nil, got); err != nil {
		t.Fatal(err)
	}
	clients[0].Write([]byte("after the move")) // waits in the kernel for the new side
	h.End()
	if r := result(t, done); r.adopted != 1 || !r.ended || r.err != nil {
		t.Fatalf("%+v", r)
	}
	a := <-adopted
	defer a.Conn.Close()
	if !bytes.Equal(a.Unread, unread) || string(a.Meta) != "null" {
		t.Fatalf("unread %d bytes, meta %s", len(a.Unread), a.Meta)
	}
	rest := make([]byte, len("after the move"))
	if _, err := io.ReadFull(a.Conn, rest); err != nil || string(rest) != "after the move" {
		t.Fatalf("%q %v", rest, err)
	}
}

func TestHandoffClientWritingDuringTheMoveLosesNothing(t *testing.T) {
	h, next := channelEnds(t, DefaultMaxFrame)
	adopted, done := adopting(next)
	clients, servers := tcpConns(t, 1)
	var sent bytes.Buffer
	for i := 0; sent.Len() < 4<<20; i++ {
		fmt.Fprintf(&sent, "line %d\n", i)
	}
	writing := make(chan error, 1)
	go func() { // the client writes the whole time, in small pieces
		data := sent.Bytes()
		for off := 0; off < len(data); off += 1000 {
			end := off + 1000
			if end > len(data) {
				end = len(data)
			}
			if _, err := clients[0].Write(data[off:end]); err != nil {
				writing <- err
				return
			}
		}
		writing <- clients[0].(*net.TCPConn).CloseWrite()
	}()
	// The old side processes lines until it has some, with more in its reader's buffer.
	rd := bufio.NewReaderSize(servers[0], 64<<10)
	var processed bytes.Buffer
	for processed.Len() < 1<<20 {
		line, err := rd.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		processed.WriteString(line)
	}
	unread, _ := rd.Peek(rd.Buffered())
	if err := h.Send(servers[0], "stream", map[string]int{"processed": processed.Len()}, unread); err != nil {
		t.Fatal(err)
	}
	h.End()
	a := <-adopted
	defer a.Conn.Close()
	rest, err := io.ReadAll(a.Conn)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-writing; err != nil {
		t.Fatal(err)
	}
	whole := append(append(processed.Bytes(), a.Unread...), rest...)
	if !bytes.Equal(whole, sent.Bytes()) {
		t.Fatalf("the new side has %d bytes after the %d processed (%d unread), the client sent %d: not the same stream",
			len(whole)-processed.Len(), processed.Len(), len(a.Unread), sent.Len())
	}
	if r := result(t, done); r.adopted != 1 || r.err != nil {
		t.Fatalf("%+v", r)
	}
}

func TestHandoff1000ConnectionsMove(t *testing.T) {
	const n = 1000
	h, next := channelEnds(t, DefaultMaxFrame)
	adopted, done := adopting(next)
	clients, servers := tcpConns(t, n)
	sending := make(chan error, 1)
	go func() { // the pair's buffer fills up long before 1000 fds: Send waits for the reader
		for i, s := range servers {
			if err := h.Send(s, fmt.Sprint(i), map[string]int{"i": i}, []byte(fmt.Sprintf("unread %d", i))); err != nil {
				sending <- err
				return
			}
		}
		_, err := h.End()
		sending <- err
	}()
	seen := map[string]bool{}
	for i := 0; i < n; i++ {
		a := <-adopted
		defer a.Conn.Close()
		var meta struct{ I int }
		json.Unmarshal(a.Meta, &meta)
		if seen[a.ID] || a.ID != fmt.Sprint(meta.I) || string(a.Unread) != "unread "+a.ID {
			t.Fatalf("adopted %q (meta %s, unread %q)", a.ID, a.Meta, a.Unread)
		}
		seen[a.ID] = true
		fmt.Fprintf(a.Conn, "%s\n", a.ID)
	}
	if err := <-sending; err != nil {
		t.Fatal(err)
	}
	r := result(t, done)
	if r.adopted != n || !r.ended || r.count != n || r.err != nil {
		t.Fatalf("%+v", r)
	}
	for i, c := range clients { // every client is answered by the new side on its own connection
		if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || line != fmt.Sprintf("%d\n", i) {
			t.Fatalf("client %d: %q %v", i, line, err)
		}
	}
}

// rawFrame writes one frame (a payload, or a bare length when payload is nil) with fds on its sendmsg.
func rawFrame(t *testing.T, uc *net.UnixConn, length int, payload []byte, fds ...net.Conn) {
	t.Helper()
	frame := make([]byte, 4, 4+len(payload))
	binary.BigEndian.PutUint32(frame, uint32(length))
	frame = append(frame, payload...)
	var rights []byte
	if len(fds) > 0 {
		ints := make([]int, len(fds))
		for i, c := range fds {
			f, err := c.(*net.TCPConn).File() // a dup, closed below: the sent copy stays in flight
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			ints[i] = int(f.Fd())
		}
		rights = syscall.UnixRights(ints...)
	}
	if _, _, err := uc.WriteMsgUnix(frame, rights, nil); err != nil {
		t.Fatal(err)
	}
}

func TestHandoffMalformedFrameClosesItsFdsAndEndsTheChannel(t *testing.T) {
	const maxFrame = 4096
	good := func(id string) []byte {
		return []byte(`{"op":"conn","id":"` + id + `","meta":null,"unread":0,"fds":["conn"]}`)
	}
	cases := []struct {
		name string
		// send writes the malformed frame(s) carrying b (the connection whose fd must be closed).
		send func(t *testing.T, uc *net.UnixConn, b net.Conn)
	}{
		{"two fds on a conn frame", func(t *testing.T, uc *net.UnixConn, b net.Conn) {
			p := good("b")
			rawFrame(t, uc, len(p), p, b, b)
		}},
		{"no fd on a conn frame", func(t *testing.T, uc *net.UnixConn, b net.Conn) {
			p := good("b")
			rawFrame(t, uc, len(p), p)
		}},
		{"an empty id", func(t *testing.T, uc *net.UnixConn, b net.Conn) {
			p := good("")
			rawFrame(t, uc, len(p), p, b)
		}},
		{"an id of 257 characters", func(t *testing.T, uc *net.UnixConn, b net.Conn) {
			p := good(strings.Repeat("i", 257))
			rawFrame(t, uc, len(p), p, b)
		}},
		{"a negative unread", func(t *testing.T, uc *net.UnixConn, b net.Conn) {
			p := []byte(`{"op":"conn","id":"b","unread":-1,"fds":["conn"]}`)
			rawFrame(t, uc, len(p), p, b)
		}},
		{"an fd not named conn", func(t *testing.T, uc *net.UnixConn, b net.Conn) {
			p := []byte(`{"op":"conn","id":"b","unread":0,"fds":["state"]}`)
			rawFrame(t, uc, len(p), p, b)
		}},
		{"an unknown op", func(t *testing.T, uc *net.UnixConn, b net.Conn) {
			p := []byte(`{"op":"conns","id":"b","unread":0,"fds":["conn"]}`)
			rawFrame(t, uc, len(p), p, b)
		}},
		{"not JSON", func(t *testing.T, uc *net.UnixConn, b net.Conn) {
			p := []byte(`{"op":"conn",`)
			rawFrame(t, uc, len(p), p, b)
		}},
		{"a frame above max_frame", func(t *testing.T, uc *net.UnixConn, b net.Conn) {
			rawFrame(t, uc, maxFrame+1, nil, b)
		}},
		{"a frame of length 0", func(t *testing.T, uc *net.UnixConn, b net.Conn) {
			rawFrame(t, uc, 0, nil, b)
		}},
		{"fds on a data frame", func(t *testing.T, uc *net.UnixConn, b net.Conn) {
			p := []byte(`{"op":"conn","id":"b","unread":2,"fds":["conn"]}`)
			rawFrame(t, uc, len(p), p, b)
			rawFrame(t, uc, 2, []byte("xy"), b)
		}},
		{"data frames beyond unread", func(t *testing.T, uc *net.UnixConn, b net.Conn) {
			p := []byte(`{"op":"conn","id":"b","unread":2,"fds":["conn"]}`)
			rawFrame(t, uc, len(p), p, b)
			rawFrame(t, uc, 3, []byte("xyz"))
		}},
		{"a conn frame after end", func(t *testing.T, uc *net.UnixConn, b net.Conn) {
			rawFrame(t, uc, len(`{"op":"end","count":1}`), []byte(`{"op":"end","count":1}`))
			p := good("b")
			rawFrame(t, uc, len(p), p, b)
		}},
	}
	for _, tc := range cases {
		tc := tc
		t.Run(tc.name, func(t *testing.T) {
			h, next := channelEnds(t, maxFrame)
			adopted, done := adopting(next)
			clients, servers := tcpConns(t, 3)
			if err := h.Send(servers[0], "a", nil, nil); err != nil { // a well-formed one first: adopted
				t.Fatal(err)
			}
			tc.send(t, h.c.uc, servers[1])
			servers[1].Close() // the channel holds the only other copy of b
			// After the bad frame: never adopted (the reader may have closed the channel already: EPIPE).
			if f, err := servers[2].(*net.TCPConn).File(); err == nil {
				p := good("c")
				h.c.uc.WriteMsgUnix(append([]byte{0, 0, 0, byte(len(p))}, p...), syscall.UnixRights(int(f.Fd())), nil)
				f.Close()
			}
			servers[2].Close()
			r := result(t, done)
			if r.err == nil || r.adopted != 1 {
				t.Fatalf("the channel did not end at the bad frame: %+v (%v)", r, r.err)
			}
			if a := <-adopted; a.ID != "a" {
				t.Fatalf("adopted %q", a.ID)
			} else {
				a.Conn.Close()
			}
			select {
			case a := <-adopted:
				t.Fatalf("adopted %q after the bad frame", a.ID)
			default:
			}
			// b's fd (on the bad frame) and c's (unread in the channel the reader closed) are closed.
			expectEOF(t, clients[1], "the connection on the bad frame")
			expectEOF(t, clients[2], "the connection after the bad frame")
		})
	}
}

func TestHandoffEndOfFileWithoutEndAdoptsWhatArrivedWhole(t *testing.T) {
	h, next := channelEnds(t, DefaultMaxFrame)
	adopted, done := adopting(next)
	clients, servers := tcpConns(t, 3)
	for i := 0; i < 2; i++ {
		if err := h.Send(servers[i], fmt.Sprint(i), nil, []byte("ab")); err != nil {
			t.Fatal(err)
		}
	}
	// The third is cut: 10 unread bytes announced, 4 sent, then the old side dies (its end closes).
	p := []byte(`{"op":"conn","id":"2","unread":10,"fds":["conn"]}`)
	rawFrame(t, h.c.uc, len(p), p, servers[2])
	rawFrame(t, h.c.uc, 4, []byte("abcd"))
	servers[2].Close()
	h.c.uc.Close()
	r := result(t, done)
	if r.err != nil || r.ended || r.adopted != 2 {
		t.Fatalf("%+v (%v)", r, r.err)
	}
	for i := 0; i < 2; i++ {
		a := <-adopted
		defer a.Conn.Close()
		if string(a.Unread) != "ab" {
			t.Fatalf("%q: unread %q", a.ID, a.Unread)
		}
		fmt.Fprintf(a.Conn, "%s\n", a.ID)
		if line, err := bufio.NewReader(clients[i]).ReadString('\n'); err != nil || line != fmt.Sprintf("%d\n", i) {
			t.Fatalf("client %d: %q %v", i, line, err)
		}
	}
	expectEOF(t, clients[2], "the connection that did not arrive whole")
}

// Through the relay: the hello says handoff, Aeterna's handoff frame brings
// the new side's channel, and each connection reaches OnConnection (or is
// closed when there is none).
func TestHandoffNewGenerationAdoptsThroughTheRelay(t *testing.T) {
	p := newPeer(t)
	p.handoffs = true
	done := make(chan struct{})
	go func() {
		defer close(done)
		p.accept()
		p.expect(map[string]any{"op": "hello", "v": 1.0, "handoff": true})
		p.send(map[string]any{"op": "welcome", "v": 1, "generation": 2, "max_frame": DefaultMaxFrame, "handoff": true}, nil)
		p.send(map[string]any{"op": "load", "size": 0}, nil)
		p.expect(map[string]any{"op": "ack", "ok": true})
	}()
	relay, err := Connect(Options{Path: p.path})
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	got := make(chan AdoptedConn, 1)
	relay.OnConnection(func(a AdoptedConn) { got <- a })
	if _, err := relay.Load(nil); err != nil {
		t.Fatal(err)
	}
	<-done
	if !relay.Handoffs {
		t.Fatal("the welcome's handoff offer is not reported")
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	theirs := os.NewFile(uintptr(fds[1]), "new end")
	p.send(map[string]any{"op": "handoff", "fds": []string{"handoff"}}, []*os.File{theirs})
	theirs.Close() // Aeterna keeps no copy
	old, err := channelConn(os.NewFile(uintptr(fds[0]), "old end"), DefaultMaxFrame)
	if err != nil {
		t.Fatal(err)
	}
	h := &Handoff{c: old}
	clients, servers := tcpConns(t, 2)
	if err := h.Send(servers[0], "ws-1", map[string]string{"room": "a"}, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	a := <-got
	defer a.Conn.Close()
	if a.ID != "ws-1" || string(a.Meta) != `{"room":"a"}` || string(a.Unread) != "hi" {
		t.Fatalf("%q %s %q", a.ID, a.Meta, a.Unread)
	}
	fmt.Fprint(a.Conn, "adopted\n")
	if line, _ := bufio.NewReader(clients[0]).ReadString('\n'); line != "adopted\n" {
		t.Fatalf("%q", line)
	}
	relay.OnConnection(nil) // from now on a connection that arrives is closed
	if err := h.Send(servers[1], "ws-2", nil, nil); err != nil {
		t.Fatal(err)
	}
	expectEOF(t, clients[1], "a connection with no OnConnection callback")
	if n, err := h.End(); n != 2 || err != nil {
		t.Fatalf("End: %d %v", n, err)
	}
}

// The old side: Handoff returns the channel of a final dump that carries one
// (and nil for one that does not); Shutdown answers the final dump as always.
func TestHandoffOldGenerationGetsTheChannelFromTheFinalDump(t *testing.T) {
	for _, offered := range []bool{true, false} {
		offered := offered
		t.Run(fmt.Sprintf("handoff %v", offered), func(t *testing.T) {
			relay, p := connected(t)
			relay.OnDump(func(bool) (*Dump, error) { return TextDump("final"), nil })
			fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			mine := os.NewFile(uintptr(fds[1]), "new end")
			theirs := os.NewFile(uintptr(fds[0]), "old end")
			if offered {
				p.send(map[string]any{"op": "dump", "final": true, "timeout_ms": 10000, "handoff": true, "fds": []string{"handoff"}}, []*os.File{theirs})
			} else {
				p.send(map[string]any{"op": "dump", "final": true, "timeout_ms": 10000}, nil)
			}
			theirs.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			h, err := relay.Handoff(ctx)
			if err != nil || (h != nil) != offered {
				t.Fatalf("Handoff: %v %v", h, err)
			}
			next, err := channelConn(mine, DefaultMaxFrame)
			if err != nil {
				t.Fatal(err)
			}
			adopted, done := adopting(next)
			if offered {
				clients, servers := tcpConns(t, 1)
				if err := h.Send(servers[0], "x", nil, nil); err != nil {
					t.Fatal(err)
				}
				if n, err := h.End(); n != 1 || err != nil {
					t.Fatalf("End: %d %v", n, err)
				}
				a := <-adopted
				fmt.Fprint(a.Conn, "moved\n")
				a.Conn.Close()
				if line, _ := bufio.NewReader(clients[0]).ReadString('\n'); line != "moved\n" {
					t.Fatalf("%q", line)
				}
			}
			answered := make(chan bool, 1)
			go func() { answered <- relay.Shutdown(10 * time.Second) }()
			p.expect(map[string]any{"op": "state", "size": 5.0})
			p.expectData(5)
			p.send(map[string]any{"op": "ack", "ok": true}, nil)
			if !<-answered {
				t.Fatal("the final dump was not answered and acked")
			}
			// The channel ends with end after a handoff; when none was offered this test holds the new end of a
			// pair whose old end was never sent, closed with this test's copy: end of file without end.
			r := result(t, done)
			if r.err != nil || r.ended != offered {
				t.Fatalf("%+v", r)
			}
		})
	}
}

// An old generation that never calls Handoff hands nothing over: Shutdown ends
// the channel with {"op":"end","count":0}, a clean end for the new side.
func TestHandoffUntakenChannelIsEndedByShutdown(t *testing.T) {
	relay, p := connected(t)
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	theirs := os.NewFile(uintptr(fds[0]), "old end")
	p.send(map[string]any{"op": "dump", "final": true, "timeout_ms": 10000, "handoff": true, "fds": []string{"handoff"}}, []*os.File{theirs})
	theirs.Close()
	next, err := channelConn(os.NewFile(uintptr(fds[1]), "new end"), DefaultMaxFrame)
	if err != nil {
		t.Fatal(err)
	}
	_, done := adopting(next)
	answered := make(chan bool, 1)
	go func() { answered <- relay.Shutdown(10 * time.Second) }()
	p.expect(map[string]any{"op": "state", "size": 0.0}) // no dump callback: nothing handed over
	p.send(map[string]any{"op": "ack", "ok": true}, nil)
	if !<-answered {
		t.Fatal("the final dump was not answered and acked")
	}
	if r := result(t, done); r.err != nil || !r.ended || r.count != 0 || r.adopted != 0 {
		t.Fatalf("%+v", r)
	}
}
