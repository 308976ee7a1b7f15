//go:build linux

package client

// Connection handoff (docs/srp.md, "Connection handoff"): at promotion Aeterna
// gives the old and the new generation the two ends of a socket pair; the old
// one sends each client connection it hands over as one "conn" frame carrying
// the socket (and the bytes it had read but not processed, as data frames),
// then "end"; the new one adopts them as they arrive. Nothing is
// acknowledged: once sendmsg has returned the socket is in the kernel.

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"unicode/utf8"
)

// maxConnID is the longest connection id the protocol allows (JavaScript characters).
const maxConnID = 256

// AdoptedConn is a client connection the previous generation handed over.
type AdoptedConn struct {
	// ID is the old generation's name for the connection.
	ID string
	// Meta is the old generation's state for this connection (JSON; "null" when it sent none).
	Meta json.RawMessage
	// Unread are bytes the old generation had read from the connection but not
	// processed: process them before anything read from Conn.
	Unread []byte
	// Conn is the connection, close-on-exec; it is the app's from now on.
	Conn net.Conn
}

// OnConnection sets the callback that adopts the connections the previous
// generation hands over at promotion. It runs on the goroutine that reads the
// handoff channel, once per connection as its frame and unread bytes arrive,
// so it should hand the connection to a goroutine of its own and return. A
// connection arriving while no callback is set is closed: set it before Ready.
func (cl *Client) OnConnection(cb func(AdoptedConn)) {
	cl.mu.Lock()
	cl.connCB = cb
	cl.mu.Unlock()
}

// adoptFrom reads the new generation's end of the channel until it ends.
func (cl *Client) adoptFrom(f *os.File) {
	ch, err := channelConn(f, cl.MaxFrame)
	if err != nil {
		logf("the connection handoff channel: %v", err)
		return
	}
	r := readHandoff(ch, func(a AdoptedConn) {
		cl.mu.Lock()
		cb := cl.connCB
		cl.mu.Unlock()
		if cb == nil {
			logf("connection %q handed over with no OnConnection callback: closed", a.ID)
			a.Conn.Close()
			return
		}
		cb(a)
	})
	switch {
	case r.err != nil:
		logf("the connection handoff channel ended after %d connections: %v", r.adopted, r.err)
	case !r.ended:
		logf("the connection handoff channel ended without \"end\" after %d connections (the old generation died?)", r.adopted)
	}
}

// channelConn makes a *conn of a received channel fd (net.FileConn dups it close-on-exec; f is closed).
func channelConn(f *os.File, maxFrame int) (*conn, error) {
	defer f.Close()
	nc, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		nc.Close()
		return nil, fmt.Errorf("not a unix socket but a %T", nc)
	}
	return &conn{uc: uc, maxFrame: maxFrame}, nil
}

// handoffResult is how a channel ended, for the log and the tests.
type handoffResult struct {
	adopted int
	ended   bool  // "end" arrived (then count is its count)
	count   int64 // the old generation's count of conn frames
	err     error // a frame that broke the rules, or a read error; nil at end of file
}

// readHandoff reads conn frames and their unread bytes until end of file,
// calling adopt for each connection once it has arrived whole. A frame that
// breaks the rules ends the channel: its fds are closed and nothing further is
// read. It closes ch when done.
func readHandoff(ch *conn, adopt func(AdoptedConn)) (r handoffResult) {
	defer ch.uc.Close()
	for {
		n, files, err := ch.readHeader()
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return r
		}
		if err != nil {
			r.err = err
			return r
		}
		payload := make([]byte, n)
		if _, err := ch.readFull(payload, false); err != nil {
			closeFiles(files)
			if err != io.EOF && err != io.ErrUnexpectedEOF { // a frame cut by end of file did not arrive whole
				r.err = err
			}
			return r
		}
		f, perr := parseChannelFrame(payload)
		if perr == nil && r.ended {
			perr = relayErr(CodeUnexpectedOp, "%q after end", f.op)
		}
		if perr == nil && len(files) != len(f.fds) {
			perr = relayErr(CodeBadFrame, "%s: %d fds named, %d received", f.op, len(f.fds), len(files))
		}
		if perr != nil {
			closeFiles(files)
			r.err = perr
			return r
		}
		if f.op == "end" {
			r.ended, r.count = true, f.count
			continue // only end of file may follow
		}
		unread, err := readUnread(ch, f.unread)
		if err != nil {
			closeFiles(files)
			if err != io.EOF { // end of file in the middle: this one did not arrive whole
				r.err = err
			}
			return r
		}
		nc, err := net.FileConn(files[0]) // a dup, close-on-exec
		files[0].Close()
		if err != nil {
			logf("connection %q handed over is not a socket: %v", f.id, err)
			continue
		}
		r.adopted++
		adopt(AdoptedConn{ID: f.id, Meta: f.meta, Unread: unread, Conn: nc})
	}
}

// readUnread reads the data frames of a conn frame's u unread bytes (io.EOF when the channel ends first).
func readUnread(ch *conn, u int64) ([]byte, error) {
	out := make([]byte, 0, minInt64(u, 64<<10)) // grown as bytes arrive, never from the announced size alone
	for int64(len(out)) < u {
		n, files, err := ch.readHeader()
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil, io.EOF
		}
		if err != nil {
			return nil, err
		}
		if len(files) > 0 {
			closeFiles(files)
			return nil, relayErr(CodeBadFrame, "fds on a data frame")
		}
		if int64(n) > u-int64(len(out)) {
			return nil, relayErr(CodeBadFrame, "data frames exceed the announced unread %d", u)
		}
		chunk := make([]byte, n)
		if _, err := ch.readFull(chunk, false); err != nil {
			if err == io.ErrUnexpectedEOF {
				return nil, io.EOF
			}
			return nil, err
		}
		out = append(out, chunk...)
	}
	return out, nil
}

func minInt64(a, b int64) int64 {
	if a < b {
		return a
	}
	return b
}

// channelFrame is a control frame of the handoff channel: conn or end.
type channelFrame struct {
	op     string
	id     string
	meta   json.RawMessage
	unread int64
	fds    []string
	count  int64
}

// parseChannelFrame checks a channel control frame: conn with an id of 1 to
// 256 characters, any JSON meta, a whole unread >= 0 and "fds":["conn"]; or
// end with a whole count >= 0.
func parseChannelFrame(payload []byte) (channelFrame, *RelayError) {
	var f channelFrame
	if !utf8.Valid(payload) {
		return f, relayErr(CodeBadJSON, "control frame is not valid UTF-8")
	}
	var o map[string]json.RawMessage
	dec := json.NewDecoder(bytes.NewReader(payload))
	if err := dec.Decode(&o); err != nil || dec.More() || o == nil {
		return f, relayErr(CodeBadJSON, "control frame is not a JSON object")
	}
	if err := json.Unmarshal(o["op"], &f.op); err != nil {
		return f, relayErr(CodeBadJSON, `control frame has no string "op"`)
	}
	whole := func(key string) (int64, *RelayError) {
		var v any
		d := json.NewDecoder(bytes.NewReader(o[key]))
		d.UseNumber()
		if d.Decode(&v) != nil {
			return 0, relayErr(CodeBadJSON, "%s: %q must be a whole number >= 0", f.op, key)
		}
		n, ok := wholeNumber(v)
		if !ok || n < 0 {
			return 0, relayErr(CodeBadJSON, "%s: %q must be a whole number >= 0", f.op, key)
		}
		return n, nil
	}
	var err *RelayError
	switch f.op {
	case "conn":
		if json.Unmarshal(o["id"], &f.id) != nil || f.id == "" || utf16Len(f.id) > maxConnID {
			return f, relayErr(CodeBadJSON, `conn: "id" must be a string of 1 to %d characters`, maxConnID)
		}
		f.meta = o["meta"]
		if f.meta == nil {
			f.meta = json.RawMessage("null")
		}
		if f.unread, err = whole("unread"); err != nil {
			return f, err
		}
		if json.Unmarshal(o["fds"], &f.fds) != nil || len(f.fds) != 1 || f.fds[0] != "conn" {
			return f, relayErr(CodeBadJSON, `conn: "fds" must be ["conn"]`)
		}
	case "end":
		if f.count, err = whole("count"); err != nil {
			return f, err
		}
	default:
		op := f.op
		if len(op) > 40 {
			op = op[:40]
		}
		return f, relayErr(CodeUnexpectedOp, "unknown op %q on the handoff channel", op)
	}
	return f, nil
}

// Handoff is the old generation's end of the connection handoff channel.
// Send and End may be called from any goroutine; frames go out one at a time.
type Handoff struct {
	c     *conn
	mu    sync.Mutex
	count int
	ended bool
}

// Handoff waits for Aeterna's final dump (or ctx's end) and returns the
// connection handoff channel when the dump carried one: the new generation
// said it adopts connections. It returns nil, nil when the final dump came
// without one, when the relay ended without a final dump, and outside
// Aeterna. Call it on SIGTERM before Shutdown (which answers the final dump as
// usual, independently of the channel); a second call returns the same Handoff.
func (cl *Client) Handoff(ctx context.Context) (*Handoff, error) {
	if cl.c == nil {
		return nil, nil
	}
	select {
	case <-cl.finalAsked:
	case <-cl.eof:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.handoff != nil || cl.handoffFile == nil {
		return cl.handoff, nil
	}
	f := cl.handoffFile
	cl.handoffFile = nil
	ch, err := channelConn(f, cl.MaxFrame)
	if err != nil {
		return nil, relayErr(CodeBadFrame, "the connection handoff channel: %v", err)
	}
	cl.handoff = &Handoff{c: ch}
	return cl.handoff, nil
}

// endUntakenHandoff ends a channel the app did not take with Handoff (it
// hands nothing over): {"op":"end","count":0}, so the new generation reads a
// clean end rather than an old generation that died while handing over.
func (cl *Client) endUntakenHandoff() {
	cl.mu.Lock()
	f := cl.handoffFile
	cl.handoffFile = nil
	cl.mu.Unlock()
	if f == nil {
		return
	}
	ch, err := channelConn(f, cl.MaxFrame)
	if err != nil {
		return
	}
	if _, err := (&Handoff{c: ch}).End(); err != nil {
		logf("%v", err)
	}
}

// Send hands conn over to the new generation: one conn frame carrying its
// socket (conn must implement syscall.Conn: *net.TCPConn, *net.UnixConn; not
// a *tls.Conn, whose session cannot move), with id (1 to 256 characters) and
// meta (marshalled to JSON; a json.RawMessage goes as is), then unread (bytes
// read from conn but not processed; for a connection hijacked from net/http,
// the hijack's bufio.Reader may hold some: pass
// `rw.Reader.Peek(rw.Reader.Buffered())`). Stop reading from conn first.
// Once sent, conn is closed here without shutdown: the connection lives on
// in the new generation. On an error conn is still the caller's, open.
func (h *Handoff) Send(conn net.Conn, id string, meta any, unread []byte) error {
	if id == "" || utf16Len(id) > maxConnID {
		return relayErr(CodeUsage, "a connection id must have 1 to %d characters", maxConnID)
	}
	var metaJSON json.RawMessage
	if raw, ok := meta.(json.RawMessage); ok {
		if len(raw) == 0 {
			raw = json.RawMessage("null")
		}
		if !json.Valid(raw) {
			return relayErr(CodeUsage, "meta is not valid JSON")
		}
		metaJSON = raw
	} else {
		b, err := json.Marshal(meta)
		if err != nil {
			return relayErr(CodeUsage, "meta cannot be marshalled: %v", err)
		}
		metaJSON = b
	}
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return relayErr(CodeUsage, "a %T has no file descriptor to hand over", conn)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return relayErr(CodeUsage, "the connection's file descriptor: %v", err)
	}
	frame := encodeConnFrame(id, metaJSON, len(unread))
	if len(frame)-4 > h.c.maxFrame {
		return relayErr(CodeTooLarge, "a conn frame of %d bytes, above max_frame %d (meta too large)", len(frame)-4, h.c.maxFrame)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ended {
		return relayErr(CodeUsage, "Send after End")
	}
	var werr error
	if cerr := raw.Control(func(fd uintptr) {
		h.c.wmu.Lock()
		defer h.c.wmu.Unlock()
		werr = h.c.writeLocked(frame, []int{int(fd)}, unread, false)
	}); cerr != nil {
		return relayErr(CodeUsage, "the connection's file descriptor: %v", cerr)
	}
	if werr != nil {
		return relayErr(CodeClosed, "handing over connection %q: %v", id, werr)
	}
	h.count++
	conn.Close() // close(2) only: the socket lives on in the new generation
	return nil
}

// encodeConnFrame is the conn frame: {"op":"conn","id":...,"meta":...,"unread":U,"fds":["conn"]}.
func encodeConnFrame(id string, meta json.RawMessage, unread int) []byte {
	idJSON, _ := json.Marshal(id)
	var b bytes.Buffer
	b.Write([]byte{0, 0, 0, 0})
	fmt.Fprintf(&b, `{"op":"conn","id":%s,"meta":%s,"unread":%d,"fds":["conn"]}`, idJSON, compact(meta), unread)
	out := b.Bytes()
	binary.BigEndian.PutUint32(out, uint32(len(out)-4))
	return out
}

// compact is meta without insignificant whitespace (valid JSON in, valid JSON out).
func compact(meta json.RawMessage) []byte {
	var b bytes.Buffer
	if json.Compact(&b, meta) != nil {
		return meta
	}
	return b.Bytes()
}

// Count is how many connections Send has handed over.
func (h *Handoff) Count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.count
}

// End sends {"op":"end","count":N} (N: the connections handed over) and
// closes the channel; it returns N. Later calls return N and an error.
func (h *Handoff) End() (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ended {
		return h.count, relayErr(CodeUsage, "End was already called")
	}
	h.ended = true
	h.c.wmu.Lock()
	err := h.c.writeLocked(encodeFrame([]byte(fmt.Sprintf(`{"op":"end","count":%d}`, h.count))), nil, nil, false)
	h.c.wmu.Unlock()
	if cerr := h.c.uc.Close(); err == nil && cerr != nil && !errors.Is(cerr, net.ErrClosed) {
		err = cerr
	}
	if err != nil {
		return h.count, relayErr(CodeClosed, "ending the handoff channel: %v", err)
	}
	return h.count, nil
}
