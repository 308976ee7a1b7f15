//go:build linux

package client

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"net"
	"os"
	"sort"
	"sync"
	"time"
)

// Options for Connect.
type Options struct {
	// Path is the relay socket; empty means $LIVERELAY_STATE_SOCK. Without
	// either, Connect returns a client whose calls do nothing.
	Path string
	// Timeout bounds the connect and the handshake; zero means 10 s.
	Timeout time.Duration
}

// Client is a relay connection, or a no-op stand-in outside Aeterna (Enabled false).
type Client struct {
	// Generation is this process's generation, from Aeterna's welcome (0 outside Aeterna).
	Generation int64
	// MaxFrame is the frame limit Aeterna announced.
	MaxFrame int
	// Checkpoints: Aeterna's welcome announced that it stores checkpoints (Checkpoint is refused otherwise).
	Checkpoints bool
	// Handoffs: Aeterna's welcome announced connection handoff (see Handoff and OnConnection).
	Handoffs bool

	c *conn

	mu         sync.Mutex
	dumpCB     func(final bool) (*Dump, error)
	loadCB     func(*State) error
	loadTaken  bool
	loaded     bool // the initial load was answered: the reader runs
	readySent  bool
	closed     bool
	finalSeen  bool
	finalAsked chan struct{} // closed when Aeterna asks for the final dump
	finalAt    time.Time
	finalWait  time.Duration // the final dump's timeout_ms: how long Aeterna waits for the answer
	finalSent  bool
	// trailerOffered: the last dump offered a digest trailer, so a streamed state is hashed as it is sent.
	trailerOffered bool
	finalAck       chan bool     // the ack that answers our final state
	eof            chan struct{} // closed when the connection has ended
	lastAck        *message
	// checkpointWaiters get Aeterna's checkpointed answers, which come in the order the checkpoints were sent.
	checkpointWaiters []chan checkpointAnswer
	// checkpointSend keeps a checkpoint's place among the waiters the same as its place on the wire.
	checkpointSend sync.Mutex
	// handoffFile is the old generation's end of the connection handoff channel, from the final dump,
	// until Handoff takes it (as handoff); Close closes it when nobody did.
	handoffFile *os.File
	handoff     *Handoff
	// connCB adopts the connections the previous generation hands over.
	connCB func(AdoptedConn)
}

// checkpointAnswer is Aeterna's checkpointed: the seq, or the refusal.
type checkpointAnswer struct {
	seq uint64
	err *RelayError
}

// Connect connects to Aeterna's State Relay and does the handshake. Without a
// socket path it returns a no-op client: Load gives nil, everything else does
// nothing, so the app runs the same outside Aeterna. A refusal is a
// *RelayError carrying Aeterna's code (forbidden, busy, ...).
func Connect(o Options) (*Client, error) {
	path := o.Path
	if path == "" {
		path = os.Getenv("LIVERELAY_STATE_SOCK")
	}
	timeout := o.Timeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	cl := &Client{MaxFrame: DefaultMaxFrame, finalAsked: make(chan struct{}), finalAck: make(chan bool, 1), eof: make(chan struct{})}
	if path == "" {
		close(cl.eof)
		return cl, nil
	}
	raw, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		return nil, relayErr(CodeClosed, "cannot connect to the state relay at %s: %v", path, err)
	}
	cl.c = &conn{uc: raw.(*net.UnixConn), maxFrame: DefaultMaxFrame}
	cl.c.uc.SetDeadline(time.Now().Add(timeout))
	if err := cl.handshake(); err != nil {
		return nil, err
	}
	cl.c.uc.SetDeadline(time.Time{})
	return cl, nil
}

func (cl *Client) handshake() error {
	v := ProtocolVersion
	if err := cl.c.send(message{Op: "hello", V: &v, Trailer: true, Handoff: true}); err != nil {
		return cl.fail(err)
	}
	m, files, err := cl.c.readMessage()
	if err != nil {
		return cl.fail(err)
	}
	closeFiles(files)
	switch {
	case m.Op == "error":
		cl.Close()
		return relayErr(m.Code, "Aeterna refused the relay connection: %s", m.Message)
	case m.Op != "welcome":
		return cl.fail(relayErr(CodeUnexpectedOp, "expected welcome, got %q", m.Op))
	case m.V == nil || *m.V != ProtocolVersion:
		return cl.fail(relayErr(CodeUnsupportedVersion, "welcome of protocol version %v, this SDK speaks %d", derefInt(m.V), ProtocolVersion))
	}
	cl.Generation = m.Generation
	cl.Checkpoints = m.Checkpoint
	cl.Handoffs = m.Handoff
	if m.MaxFrame > 0 {
		cl.MaxFrame = int(m.MaxFrame)
		cl.c.maxFrame = int(m.MaxFrame)
	}
	return nil
}

func derefInt(p *int) any {
	if p == nil {
		return "none"
	}
	return *p
}

// Enabled reports whether this process talks to Aeterna's relay.
func (cl *Client) Enabled() bool { return cl.c != nil }

// OnDump sets the callback that hands this generation's state over when
// Aeterna asks: at every reload (final false, called from the relay's
// goroutine while the app serves) and once at promotion (final true, called
// from Shutdown). An error declines the dump (dump_failed: the reload rolls back).
func (cl *Client) OnDump(cb func(final bool) (*Dump, error)) {
	cl.mu.Lock()
	cl.dumpCB = cb
	cl.mu.Unlock()
}

// OnLoad sets the callback for states that arrive later, while serving: the
// final sync after promotion (State.Final true). An error refuses it (load_failed).
// Without a callback such a state is refused.
func (cl *Client) OnLoad(cb func(*State) error) {
	cl.mu.Lock()
	cl.loadCB = cb
	cl.mu.Unlock()
}

// Load receives the previous generation's state (exactly once, at start-up),
// verifies it (size, sha256; a memfd's seals and size), calls apply when
// given, and acknowledges it. It returns nil when there is no previous state
// (or outside Aeterna). A state that fails verification is refused and
// returned as a *RelayError (checksum_mismatch, bad_state); an error from
// apply refuses it (load_failed: the reload rolls back) and is returned as is.
// It waits as long as the state takes to arrive.
func (cl *Client) Load(apply func(*State) error) (*State, error) {
	if cl.c == nil {
		return nil, nil
	}
	cl.mu.Lock()
	taken, closed := cl.loadTaken, cl.closed
	cl.loadTaken = true
	cl.mu.Unlock()
	if taken {
		return nil, relayErr(CodeUsage, "Load was already called")
	}
	if closed {
		return nil, relayErr(CodeClosed, "the relay connection is closed")
	}
	m, files, err := cl.c.readMessage()
	if err != nil {
		return nil, cl.fail(err)
	}
	switch m.Op {
	case "error":
		cl.Close()
		return nil, relayErr(m.Code, "Aeterna ended the relay connection: %s", m.Message)
	case "load":
	default:
		closeFiles(files)
		return nil, cl.fail(relayErr(CodeUnexpectedOp, "expected the initial load, got %q", m.Op))
	}
	state, problem, err := cl.receiveLoad(m, files)
	if err != nil {
		return nil, cl.fail(err)
	}
	if problem != nil {
		cl.answerInitial(false, refusal(problem))
		return nil, problem
	}
	if state != nil && apply != nil {
		if err := apply(state); err != nil {
			closeFiles(filesOf(state.FDs)) // refused: nobody else will use them
			state.Close()
			cl.answerInitial(false, refusal(relayErr(CodeLoadFailed, "the app could not load the state: %v", err)))
			return nil, err
		}
	}
	if err := cl.answerInitial(true, ""); err != nil {
		return nil, err
	}
	return state, nil
}

// answerInitial acks (or refuses) the initial load, then starts reading what Aeterna sends later.
func (cl *Client) answerInitial(ok bool, why string) error {
	if err := cl.c.send(ackMessage(ok, why)); err != nil {
		return cl.fail(err)
	}
	cl.mu.Lock()
	cl.loaded = true
	cl.mu.Unlock()
	go cl.read()
	return nil
}

// Ready tells Aeterna this generation serves (counts like sd_notify READY=1).
// Call it after Load; later calls do nothing.
func (cl *Client) Ready() error {
	if cl.c == nil {
		return nil
	}
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if !cl.loaded {
		return relayErr(CodeUsage, "call Load before Ready: the new generation must take (or refuse) the state first")
	}
	if cl.readySent || cl.closed {
		return nil
	}
	cl.readySent = true
	if err := cl.c.send(message{Op: "ready"}); err != nil {
		return relayErr(CodeClosed, "sending ready: %v", err)
	}
	return nil
}

// Checkpoint stores d (what a dump callback may return: JSON, text, bytes, or a
// sealed memfd, which the SDK closes once sent) in Aeterna as the app's latest
// checkpoint: a generation started with no live predecessor (after a crash,
// kill -9, the watchdog) loads it, with State.Source "checkpoint". It returns
// the checkpoint's sequence number once Aeterna has stored it (on disk, with
// state_handoff.checkpoint.path). A refusal is a *RelayError with Aeterna's
// code (CodeDisabled, CodeTooLarge, CodeChecksumMismatch, CodeBadState,
// CodeWriteFailed); the previous checkpoint then stays. d.FDs are not sent: a
// checkpoint keeps the state only. Call it after Load, from any goroutine but
// the dump and load callbacks (their goroutine reads Aeterna's answer).
// Outside Aeterna it does nothing and returns 0, nil.
func (cl *Client) Checkpoint(d *Dump) (uint64, error) {
	if cl.c == nil {
		return 0, nil
	}
	if d != nil && d.Memfd != nil {
		defer d.Memfd.Close() // the SDK's once handed over, sent or not
	}
	if !cl.Checkpoints {
		return 0, relayErr(CodeDisabled, "this Aeterna does not store checkpoints (orchestration.state_handoff.checkpoint.enabled is off)")
	}
	var stateOnly *Dump
	if d != nil {
		copied := *d
		copied.FDs = nil
		stateOnly = &copied
	}
	m, fds, data, err := stateMessage("checkpoint", stateOnly, true)
	if err != nil {
		return 0, relayErr(CodeUsage, "the checkpoint cannot be sent: %v", err)
	}
	answer := make(chan checkpointAnswer, 1)
	cl.checkpointSend.Lock()
	cl.mu.Lock()
	loaded, closed := cl.loaded, cl.closed
	if loaded && !closed {
		cl.checkpointWaiters = append(cl.checkpointWaiters, answer)
	}
	cl.mu.Unlock()
	if !loaded || closed {
		cl.checkpointSend.Unlock()
		if closed {
			return 0, relayErr(CodeClosed, "the relay connection is closed")
		}
		return 0, relayErr(CodeUsage, "call Load before Checkpoint: Aeterna's answers are read once the initial load is taken")
	}
	err = cl.c.writeFrames(m, fds, data)
	cl.checkpointSend.Unlock()
	if err != nil {
		cl.mu.Lock()
		for i, w := range cl.checkpointWaiters {
			if w == answer {
				cl.checkpointWaiters = append(cl.checkpointWaiters[:i], cl.checkpointWaiters[i+1:]...)
				break
			}
		}
		cl.mu.Unlock()
		return 0, relayErr(CodeClosed, "sending the checkpoint: %v", err)
	}
	a := <-answer // the reader answers every waiter, with an error when the connection ends
	if a.err != nil {
		return 0, a.err
	}
	return a.seq, nil
}

// answerCheckpoint hands Aeterna's checkpointed to the oldest checkpoint waiting for it.
func (cl *Client) answerCheckpoint(m message) {
	cl.mu.Lock()
	var w chan checkpointAnswer
	if len(cl.checkpointWaiters) > 0 {
		w = cl.checkpointWaiters[0]
		cl.checkpointWaiters = cl.checkpointWaiters[1:]
	}
	cl.mu.Unlock()
	if w == nil {
		logf("a checkpointed answer with no checkpoint waiting for it")
		return
	}
	switch {
	case m.Seq != nil && *m.Seq >= 0:
		w <- checkpointAnswer{seq: uint64(*m.Seq)}
	case m.Code != "":
		w <- checkpointAnswer{err: relayErr(m.Code, "Aeterna refused the checkpoint: %s", m.Message)}
	default:
		w <- checkpointAnswer{err: relayErr(CodeBadState, "Aeterna refused the checkpoint without a reason")}
	}
}

// endCheckpoints answers every checkpoint still waiting once the connection has ended.
func (cl *Client) endCheckpoints() {
	cl.mu.Lock()
	waiting := cl.checkpointWaiters
	cl.checkpointWaiters = nil
	cl.mu.Unlock()
	for _, w := range waiting {
		w <- checkpointAnswer{err: relayErr(CodeClosed, "the relay connection ended before Aeterna answered the checkpoint")}
	}
}

// Shutdown is the SIGTERM path, once the app has drained: it answers the
// final dump if Aeterna asks for one (calling the dump callback now, so the
// state includes the last requests), waits for Aeterna's ack or end of file,
// and closes. It reports whether a final state was handed over and acked.
//
// timeout bounds the wait for the final dump (Aeterna sends it, or closes the
// connection, right after its SIGTERM). Once it has arrived, sending the state
// and waiting for the ack take as long as Aeterna said it waits (the dump's
// timeout_ms, its state_handoff.timeout), however large the state.
func (cl *Client) Shutdown(timeout time.Duration) bool {
	if cl.c == nil {
		return false
	}
	defer cl.Close()
	cl.mu.Lock()
	loaded := cl.loaded
	cl.mu.Unlock()
	if !loaded { // nobody read the initial load: nothing can be asked of us
		return false
	}
	deadline := time.Now().Add(timeout)
	wait := time.NewTimer(timeout)
	defer wait.Stop()
	select {
	case <-cl.finalAsked:
	case <-cl.eof:
	case <-wait.C:
	}
	cl.endUntakenHandoff()
	select {
	case <-cl.eof:
		return false // Aeterna closed: no final dump is wanted
	default:
	}
	cl.mu.Lock()
	answer := cl.finalSeen && !cl.closed
	if answer && cl.finalWait > 0 {
		deadline = cl.finalAt.Add(cl.finalWait)
	}
	cl.mu.Unlock()
	if !answer || !cl.answerDump(true) {
		return false
	}
	ackWait := time.NewTimer(time.Until(deadline))
	defer ackWait.Stop()
	select {
	case ok := <-cl.finalAck:
		return ok
	case <-cl.eof:
		logf("no ack for the final state before end of file")
	case <-ackWait.C:
		logf("no ack for the final state within the time Aeterna waits for it")
	}
	return false
}

// Close closes the relay connection (idempotent).
func (cl *Client) Close() error {
	if cl.c == nil {
		return nil
	}
	cl.mu.Lock()
	if cl.closed {
		cl.mu.Unlock()
		return nil
	}
	cl.closed = true
	if cl.handoffFile != nil { // nobody took the channel: the new generation sees its end of file
		cl.handoffFile.Close()
		cl.handoffFile = nil
	}
	cl.mu.Unlock()
	return cl.c.uc.Close()
}

// LastAck is Aeterna's last relayed verdict on this generation's state: ok, and the refusal's text.
func (cl *Client) LastAck() (ok bool, why string, seen bool) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.lastAck == nil {
		return false, "", false
	}
	return *cl.lastAck.OK, cl.lastAck.Error, true
}

// fail ends the connection after err and returns it as a *RelayError. A
// protocol error of Aeterna's is answered with an error frame first.
func (cl *Client) fail(err error) *RelayError {
	var re *RelayError
	var ne net.Error
	switch {
	case errors.As(err, &re):
		logf("protocol error from Aeterna (%s): %s", re.Code, re.Message)
		cl.c.send(message{Op: "error", Code: re.Code, Message: re.Message})
	case errors.As(err, &ne) && ne.Timeout():
		re = relayErr(CodeTimeout, "no answer from Aeterna in time")
	default:
		re = relayErr(CodeClosed, "the relay connection ended: %v", err)
	}
	cl.Close()
	return re
}

// receiveLoad reads a load's data (or maps its memfd) and verifies it. It
// returns the state (nil for "no state"), or the problem that refuses it
// (ack ok:false), or an error that ends the connection.
func (cl *Client) receiveLoad(m message, files []*os.File) (st *State, problem *RelayError, err error) {
	named := make(map[string]*os.File, len(files))
	for i, name := range m.FDs {
		named[name] = files[i]
	}
	defer func() {
		if st == nil {
			for _, f := range named {
				f.Close()
			}
		}
	}()
	size := *m.Size
	if m.Transport == "memfd" {
		f := named["state"]
		delete(named, "state")
		data, problem := mapMemfd(f, size, m.SHA256)
		f.Close()
		if problem != nil {
			return nil, problem, nil
		}
		return loadedState(m, data, named, data != nil), nil, nil
	}
	if size > int64(^uint(0)>>1) {
		return nil, nil, relayErr(CodeTooLarge, "a state of %d bytes cannot be held in memory", size)
	}
	data := make([]byte, size)
	var h hash.Hash = sha256.New()
	for got := int64(0); got < size; {
		n, fds, err := cl.c.readHeader()
		if err != nil {
			return nil, nil, err
		}
		if len(fds) > 0 {
			closeFiles(fds)
			return nil, nil, relayErr(CodeBadFrame, "fds on a data frame")
		}
		if int64(n) > size-got {
			return nil, nil, relayErr(CodeBadFrame, "data frames exceed the announced size %d", size)
		}
		chunk := data[got : got+int64(n)]
		if _, err := cl.c.readFull(chunk, false); err != nil {
			return nil, nil, err
		}
		h.Write(chunk)
		got += int64(n)
	}
	want := m.SHA256
	if m.Trailer {
		t, fds, err := cl.c.readMessage()
		closeFiles(fds)
		if err != nil {
			return nil, nil, err
		}
		if t.Op != "trailer" {
			return nil, nil, relayErr(CodeUnexpectedOp, "%q where the announced digest trailer was due", t.Op)
		}
		want = t.SHA256
	}
	if size > 0 {
		if sum := hex.EncodeToString(h.Sum(nil)); sum != want {
			return nil, relayErr(CodeChecksumMismatch, "sha256 of the %d bytes received is %s, %s announced", size, sum, want), nil
		}
	}
	if size == 0 && len(named) == 0 {
		return nil, nil, nil
	}
	return loadedState(m, data, named, false), nil, nil
}

// loadedState is the State a verified load gives, with where it comes from.
func loadedState(m message, data []byte, named map[string]*os.File, mapped bool) *State {
	st := &State{Encoding: m.Encoding, Data: data, FDs: named, Final: m.Final, Transport: "stream", Source: "relay", mapped: mapped}
	if m.Transport == "memfd" {
		st.Transport = "memfd"
	}
	if m.Source == "checkpoint" {
		st.Source = "checkpoint"
		if m.Seq != nil && *m.Seq > 0 {
			st.Seq = uint64(*m.Seq)
		}
		if m.AgeMS > 0 {
			st.Age = time.Duration(m.AgeMS) * time.Millisecond
		}
	}
	return st
}

// read handles what Aeterna sends after the initial ack, until the connection ends.
func (cl *Client) read() {
	defer func() {
		close(cl.eof)
		cl.Close()
		cl.endCheckpoints()
	}()
	for {
		m, files, err := cl.c.readMessage()
		if err != nil {
			cl.mu.Lock()
			closed := cl.closed
			cl.mu.Unlock()
			if !closed {
				var re *RelayError
				if errors.As(err, &re) {
					cl.fail(re)
				}
			}
			return
		}
		switch m.Op {
		case "dump":
			channel := takeNamed(m.FDs, files, "handoff")
			closeFiles(files) // no other fd is for this SDK (it does not declare "direct")
			cl.mu.Lock()
			cl.trailerOffered = m.Trailer
			cl.mu.Unlock()
			if !m.Final {
				if channel != nil {
					channel.Close()
				}
				cl.answerDump(false)
				continue
			}
			cl.mu.Lock()
			if channel != nil && m.Handoff && !cl.finalSeen && !cl.closed {
				cl.handoffFile, channel = channel, nil
			}
			if channel != nil {
				channel.Close()
			}
			if !cl.finalSeen {
				cl.finalSeen = true
				cl.finalAt = time.Now()
				cl.finalWait = time.Duration(m.TimeoutMS) * time.Millisecond
				close(cl.finalAsked)
			}
			cl.mu.Unlock()
		case "load":
			st, problem, err := cl.receiveLoad(m, files)
			if err != nil {
				cl.fail(err)
				return
			}
			if problem != nil {
				logf("refused a load: %s", refusal(problem))
				cl.c.send(ackMessage(false, refusal(problem)))
				continue
			}
			cl.deliverLoad(st)
		case "handoff":
			channel := takeNamed(m.FDs, files, "handoff")
			closeFiles(files)
			if channel == nil {
				logf(`a handoff frame without its fd named "handoff"`)
				continue
			}
			go cl.adoptFrom(channel)
		case "checkpointed":
			cl.answerCheckpoint(m)
		case "ack":
			cl.mu.Lock()
			cl.lastAck = &m
			final := cl.finalSent
			cl.mu.Unlock()
			if final {
				select {
				case cl.finalAck <- *m.OK:
				default:
				}
			}
			if !*m.OK {
				logf("the new generation refused this state: %s", m.Error)
			}
		case "error":
			logf("Aeterna ended the relay connection: %s: %s", m.Code, m.Message)
			return
		default:
			closeFiles(files)
			cl.fail(relayErr(CodeUnexpectedOp, "unexpected op %q from Aeterna", m.Op))
			return
		}
	}
}

// deliverLoad hands a later load (the final sync) to the load callback and answers it.
func (cl *Client) deliverLoad(st *State) {
	if st == nil {
		cl.c.send(ackMessage(true, ""))
		return
	}
	cl.mu.Lock()
	cb := cl.loadCB
	cl.mu.Unlock()
	var why *RelayError
	if cb == nil {
		why = relayErr(CodeLoadFailed, "no OnLoad callback for a later load")
	} else if err := cb(st); err != nil {
		why = relayErr(CodeLoadFailed, "the app could not apply the state: %v", err)
	}
	if why != nil {
		logf("refused a later load: %s", refusal(why))
		if cb == nil {
			closeFiles(filesOf(st.FDs))
			st.Close()
		}
		cl.c.send(ackMessage(false, refusal(why)))
		return
	}
	cl.c.send(ackMessage(true, ""))
}

func filesOf(named map[string]*os.File) []*os.File {
	out := make([]*os.File, 0, len(named))
	for _, f := range named {
		out = append(out, f)
	}
	return out
}

// answerDump calls the dump callback and sends its state, or declines the
// dump (dump_failed). It reports whether a state was sent.
func (cl *Client) answerDump(final bool) bool {
	cl.mu.Lock()
	cb, trailer := cl.dumpCB, cl.trailerOffered
	cl.mu.Unlock()
	var d *Dump
	var err error
	if cb != nil {
		d, err = cb(final)
	}
	var m message
	var fds []*os.File
	var data []byte
	if err == nil {
		m, fds, data, err = stateMessage("state", d, trailer)
	}
	if d != nil && d.Memfd != nil {
		defer d.Memfd.Close() // the SDK's once handed over, sent or not
	}
	if err != nil {
		logf("the dump is declined: %v", err)
		if serr := cl.c.send(ackMessage(false, refusal(relayErr(CodeDumpFailed, "%v", err)))); serr != nil {
			logf("could not decline the dump: %v", serr)
		}
		return false
	}
	if final { // before sending: Aeterna's ack may come back before writeFrames returns
		cl.mu.Lock()
		cl.finalSent = true
		cl.mu.Unlock()
	}
	if err := cl.c.writeFrames(m, fds, data); err != nil {
		logf("could not send the state: %v", err)
		return false
	}
	return true
}

// stateMessage is the frame (op "state" or "checkpoint"), its fds and its data for a dump callback's answer.
// With trailer (the dump offered one, or a checkpoint, which needs no offer) and no sha256 from the app,
// a streamed state's digest is left to the trailer frame writeFrames sends after the data.
func stateMessage(op string, d *Dump, trailer bool) (message, []*os.File, []byte, error) {
	if d == nil {
		return message{Op: op, Size: sizeOf(0)}, nil, nil, nil
	}
	names := make([]string, 0, len(d.FDs))
	for name := range d.FDs {
		if name == "state" {
			return message{}, nil, nil, fmt.Errorf(`the fd name "state" is reserved for the memfd transport`)
		}
		names = append(names, name)
	}
	sort.Strings(names)
	var fds []*os.File
	for _, name := range names {
		fds = append(fds, d.FDs[name])
	}
	encoding := d.Encoding
	if encoding == "" {
		encoding = "binary"
	}
	if d.Memfd != nil {
		if len(fds)+1 > maxFDsPerFrame {
			return message{}, nil, nil, fmt.Errorf("more than %d fds on one frame", maxFDsPerFrame)
		}
		size, err := checkMemfd(d.Memfd)
		if err != nil {
			return message{}, nil, nil, err
		}
		m := message{Op: op, Encoding: encoding, Size: sizeOf(size), SHA256: d.SHA256, Transport: "memfd", FDs: append([]string{"state"}, names...)}
		return m, append([]*os.File{d.Memfd}, fds...), nil, nil
	}
	if len(fds) > maxFDsPerFrame {
		return message{}, nil, nil, fmt.Errorf("more than %d fds on one frame", maxFDsPerFrame)
	}
	if len(d.Data) == 0 && len(fds) == 0 {
		return message{Op: op, Size: sizeOf(0)}, nil, nil, nil
	}
	m := message{Op: op, Encoding: encoding, Size: sizeOf(int64(len(d.Data))), FDs: names}
	if len(d.Data) > 0 {
		m.SHA256 = d.SHA256
		if m.SHA256 == "" && trailer {
			m.Trailer = true
		} else if m.SHA256 == "" {
			sum := sha256.Sum256(d.Data)
			m.SHA256 = hex.EncodeToString(sum[:])
		}
	}
	return m, fds, d.Data, nil
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "aeterna client: "+format+"\n", args...)
}
