//go:build linux

package client

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"hash"
	"io"
	"net"
	"os"
	"regexp"
	"sync"
	"syscall"
	"unicode/utf8"
)

const (
	// ProtocolVersion is the SRP version this SDK speaks.
	ProtocolVersion = 1
	// DefaultMaxFrame is the frame limit until Aeterna's welcome says otherwise.
	DefaultMaxFrame = 16 << 20
	// maxFDsPerFrame: the protocol's bound on fds riding on one frame.
	maxFDsPerFrame = 253
	dataChunk      = 1 << 20
)

// message is every SRP control message; the field order is the order on the wire.
type message struct {
	Op         string   `json:"op"`
	V          *int     `json:"v,omitempty"`
	Generation int64    `json:"generation,omitempty"`
	MaxFrame   int64    `json:"max_frame,omitempty"`
	OK         *bool    `json:"ok,omitempty"`
	Error      string   `json:"error,omitempty"`
	Final      bool     `json:"final,omitempty"`
	TimeoutMS  int64    `json:"timeout_ms,omitempty"`
	Encoding   string   `json:"encoding,omitempty"`
	Size       *int64   `json:"size,omitempty"`
	SHA256     string   `json:"sha256,omitempty"`
	Transport  string   `json:"transport,omitempty"`
	FDs        []string `json:"fds,omitempty"`
	Trailer    bool     `json:"trailer,omitempty"` // hello: can verify one; dump: one is offered; state/load: the digest follows the data
	Code       string   `json:"code,omitempty"`
	Message    string   `json:"message,omitempty"`
	// Checkpoint: a welcome's announcement that Aeterna stores checkpoints.
	Checkpoint bool `json:"checkpoint,omitempty"`
	// Handoff: a hello's "this client can hand over and adopt connections", a welcome's offer of it,
	// a final dump's channel (its fd named "handoff").
	Handoff bool `json:"handoff,omitempty"`
	// Source, Seq, AgeMS: where a load comes from ("relay" or "checkpoint"); checkpointed's Seq when stored.
	Source string `json:"source,omitempty"`
	Seq    *int64 `json:"seq,omitempty"`
	AgeMS  int64  `json:"age_ms,omitempty"`
}

func ackMessage(ok bool, why string) message {
	return message{Op: "ack", OK: &ok, Error: why}
}

func sizeOf(n int64) *int64 { return &n }

var (
	knownOps = map[string]bool{"hello": true, "welcome": true, "load": true, "state": true, "ack": true, "ready": true, "dump": true, "trailer": true, "error": true, "checkpoint": true, "checkpointed": true, "handoff": true}
	hexSHA   = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// parseMessage checks a control frame's payload with Aeterna's own rules
// (src/srp/messages.ts), so both ends refuse the same frames with the same code.
func parseMessage(payload []byte) (message, *RelayError) {
	var m message
	if !utf8.Valid(payload) {
		return m, relayErr(CodeBadJSON, "control frame is not valid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.UseNumber()
	var o map[string]any
	if err := dec.Decode(&o); err != nil || dec.More() {
		return m, relayErr(CodeBadJSON, "control frame is not a JSON object")
	}
	op, ok := o["op"].(string)
	if !ok {
		return m, relayErr(CodeBadJSON, `control frame has no string "op"`)
	}
	if !knownOps[op] {
		if len(op) > 40 {
			op = op[:40]
		}
		return m, relayErr(CodeUnexpectedOp, "unknown op %q", op)
	}
	m.Op = op
	var err *RelayError
	switch op {
	case "hello":
		v, ok := wholeNumber(o["v"])
		if !ok {
			return m, relayErr(CodeBadJSON, `hello: "v" must be a number`)
		}
		iv := int(v)
		m.V = &iv
		m.Trailer = o["trailer"] == true
	case "welcome":
		v, _ := wholeNumber(o["v"])
		iv := int(v)
		m.V = &iv
		m.Generation, _ = wholeNumber(o["generation"])
		m.MaxFrame, _ = wholeNumber(o["max_frame"])
		m.Checkpoint = o["checkpoint"] == true
		m.Handoff = o["handoff"] == true
	case "load", "state", "checkpoint":
		if err := parseStateHeader(o, &m); err != nil {
			return m, err
		}
		if op == "load" {
			m.Final = o["final"] == true
			if src, _ := o["source"].(string); src == "relay" || src == "checkpoint" {
				m.Source = src
			}
			if seq, ok := wholeNumber(o["seq"]); ok {
				m.Seq = &seq
			}
			m.AgeMS, _ = wholeNumber(o["age_ms"])
		}
	case "checkpointed":
		if seq, ok := wholeNumber(o["seq"]); ok {
			m.Seq = &seq
		}
		m.Code, _ = o["code"].(string)
		m.Message, _ = o["message"].(string)
	case "ack":
		b, ok := o["ok"].(bool)
		if !ok {
			return m, relayErr(CodeBadJSON, `ack: "ok" must be true or false`)
		}
		m.OK = &b
		if m.Error, err = optionalString(o, "error", 4096); err != nil {
			return m, err
		}
	case "dump":
		m.Final = o["final"] == true
		if t, ok := wholeNumber(o["timeout_ms"]); ok && t > 0 {
			m.TimeoutMS = t
		}
		m.Trailer = o["trailer"] == true
		m.Handoff = o["handoff"] == true
		if m.FDs, err = fdNames(o, op); err != nil {
			return m, err
		}
	case "handoff":
		if m.FDs, err = fdNames(o, op); err != nil {
			return m, err
		}
	case "trailer":
		if m.SHA256, err = optionalString(o, "sha256", 64); err != nil {
			return m, err
		}
		if !hexSHA.MatchString(m.SHA256) {
			return m, relayErr(CodeBadJSON, `trailer: "sha256" is required, 64 lowercase hex digits`)
		}
	case "error":
		m.Code, _ = o["code"].(string)
		m.Message, _ = o["message"].(string)
		if m.Code == "" {
			m.Code = "unknown"
		}
	}
	return m, nil
}

// wholeNumber: a JSON number that is a whole number within 2^53 (what Aeterna accepts).
func wholeNumber(v any) (int64, bool) {
	n, ok := v.(json.Number)
	if !ok {
		return 0, false
	}
	i, err := n.Int64()
	if err != nil || i > 1<<53 || i < -(1<<53) {
		return 0, false
	}
	return i, true
}

func optionalString(o map[string]any, key string, max int) (string, *RelayError) {
	v, present := o[key]
	if !present {
		return "", nil
	}
	s, ok := v.(string)
	if !ok || utf16Len(s) > max {
		return "", relayErr(CodeBadJSON, "%q must be a string of at most %d characters", key, max)
	}
	return s, nil
}

// utf16Len counts as JavaScript does, since Aeterna's limits are JavaScript string lengths.
func utf16Len(s string) int {
	n := 0
	for _, r := range s {
		if r >= 0x10000 {
			n += 2
		} else {
			n++
		}
	}
	return n
}

func parseStateHeader(o map[string]any, m *message) *RelayError {
	size, ok := wholeNumber(o["size"])
	if !ok || size < 0 {
		return relayErr(CodeBadJSON, `%s: "size" must be a whole number >= 0`, m.Op)
	}
	m.Size = &size
	var err *RelayError
	if m.Encoding, err = optionalString(o, "encoding", 64); err != nil {
		return err
	}
	if m.SHA256, err = optionalString(o, "sha256", 64); err != nil {
		return err
	}
	if _, present := o["sha256"]; present && !hexSHA.MatchString(m.SHA256) {
		return relayErr(CodeBadJSON, `%s: "sha256" must be 64 lowercase hex digits`, m.Op)
	}
	if t, present := o["transport"]; present {
		if t != "stream" && t != "memfd" {
			return relayErr(CodeBadJSON, `%s: "transport" must be "stream" or "memfd"`, m.Op)
		}
		m.Transport = t.(string)
	}
	if raw, present := o["fds"]; present {
		list, ok := raw.([]any)
		bad := !ok || len(list) > maxFDsPerFrame
		seen := map[string]bool{}
		for _, v := range list {
			name, isString := v.(string)
			if !isString || name == "" || utf16Len(name) > 128 {
				bad = true
				break
			}
			if seen[name] {
				return relayErr(CodeBadJSON, `%s: "fds" names must be unique`, m.Op)
			}
			seen[name] = true
			m.FDs = append(m.FDs, name)
		}
		if bad {
			return relayErr(CodeBadJSON, `%s: "fds" must be a list of at most %d names`, m.Op, maxFDsPerFrame)
		}
	}
	if m.Transport == "memfd" && !contains(m.FDs, "state") {
		return relayErr(CodeBadJSON, `%s: transport "memfd" needs an fd named "state"`, m.Op)
	}
	if t, present := o["trailer"]; present {
		if t != true {
			return relayErr(CodeBadJSON, `%s: "trailer" must be true when present`, m.Op)
		}
		if m.SHA256 != "" || m.Transport == "memfd" || size == 0 {
			return relayErr(CodeBadJSON, `%s: "trailer" is only for a streamed state of at least 1 byte without "sha256"`, m.Op)
		}
		m.Trailer = true
	}
	if size > 0 && m.Transport != "memfd" && m.SHA256 == "" && !m.Trailer {
		return relayErr(CodeBadJSON, `%s: "sha256" (or "trailer": true) is required for a streamed state`, m.Op)
	}
	return nil
}

// fdNames is the "fds" list of a frame from Aeterna that may carry fds of its own (dump, handoff).
func fdNames(o map[string]any, op string) ([]string, *RelayError) {
	raw, present := o["fds"]
	if !present {
		return nil, nil
	}
	list, ok := raw.([]any)
	if !ok || len(list) > maxFDsPerFrame {
		return nil, relayErr(CodeBadJSON, `%s: "fds" must be a list of at most %d names`, op, maxFDsPerFrame)
	}
	names := make([]string, 0, len(list))
	for _, v := range list {
		name, isString := v.(string)
		if !isString || name == "" || utf16Len(name) > 128 {
			return nil, relayErr(CodeBadJSON, `%s: "fds" must be a list of at most %d names`, op, maxFDsPerFrame)
		}
		names = append(names, name)
	}
	return names, nil
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// encodeFrame is a whole frame: the 4-byte big-endian length, then the payload.
func encodeFrame(payload []byte) []byte {
	out := make([]byte, 4+len(payload))
	binary.BigEndian.PutUint32(out, uint32(len(payload)))
	copy(out[4:], payload)
	return out
}

func encodeMessage(m message) []byte {
	payload, err := json.Marshal(m)
	if err != nil {
		panic(err) // only strings, numbers and lists of strings: cannot fail
	}
	return encodeFrame(payload)
}

// conn is one relay connection: frames in and out, fds on the frames that carry them.
type conn struct {
	uc       *net.UnixConn
	maxFrame int
	wmu      sync.Mutex // one frame (and its data frames) at a time
}

// readFull fills b; fds that arrive are returned, or refused (bad_frame) when
// fdsAllowed is false. Reading a header with exactly 4 bytes means a frame's
// fds can only arrive with its header: Linux stops a read after the message
// that carried them. net.UnixConn receives with MSG_CMSG_CLOEXEC.
func (c *conn) readFull(b []byte, fdsAllowed bool) ([]*os.File, error) {
	var files []*os.File
	oob := make([]byte, syscall.CmsgSpace(maxFDsPerFrame*4))
	for got := 0; got < len(b); {
		n, oobn, flags, _, err := c.uc.ReadMsgUnix(b[got:], oob)
		if oobn > 0 {
			fds, perr := fdsFromOOB(oob[:oobn])
			for _, fd := range fds {
				files = append(files, os.NewFile(uintptr(fd), "relay-fd"))
			}
			if perr != nil || !fdsAllowed && len(fds) > 0 {
				closeFiles(files)
				return nil, relayErr(CodeBadFrame, "file descriptors on bytes that are not the start of a frame")
			}
		}
		if flags&syscall.MSG_CTRUNC != 0 {
			closeFiles(files)
			return nil, relayErr(CodeBadFrame, "more than %d file descriptors on one frame", maxFDsPerFrame)
		}
		got += n
		if err != nil {
			closeFiles(files)
			if errors.Is(err, io.EOF) && got == 0 {
				return nil, io.EOF // nothing of b arrived: for a header, the peer closed between frames
			}
			if errors.Is(err, io.EOF) && got < len(b) {
				return nil, io.ErrUnexpectedEOF
			}
			if got < len(b) {
				return nil, err
			}
		} else if n == 0 {
			closeFiles(files)
			return nil, io.EOF
		}
	}
	return files, nil
}

func fdsFromOOB(oob []byte) ([]int, error) {
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for i := range msgs {
		rights, err := syscall.ParseUnixRights(&msgs[i])
		if err == nil {
			fds = append(fds, rights...)
		}
	}
	return fds, nil
}

// readHeader reads a frame's length (and the fds that rode on it) and checks the length.
func (c *conn) readHeader() (int, []*os.File, error) {
	var h [4]byte
	files, err := c.readFull(h[:], true)
	if err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(h[:])
	if n == 0 {
		closeFiles(files)
		return 0, nil, relayErr(CodeBadFrame, "a frame of length 0")
	}
	if int64(n) > int64(c.maxFrame) {
		closeFiles(files)
		return 0, nil, relayErr(CodeTooLarge, "a frame of %d bytes, above max_frame %d", n, c.maxFrame)
	}
	return int(n), files, nil
}

// readMessage reads one control frame and the fds it carries, in the order its "fds" names them.
func (c *conn) readMessage() (message, []*os.File, error) {
	n, files, err := c.readHeader()
	if err != nil {
		return message{}, nil, err
	}
	payload := make([]byte, n)
	if _, err := c.readFull(payload, false); err != nil {
		closeFiles(files)
		return message{}, nil, err
	}
	m, perr := parseMessage(payload)
	if perr != nil {
		closeFiles(files)
		return m, nil, perr
	}
	if len(files) != len(m.FDs) {
		closeFiles(files)
		return m, nil, relayErr(CodeBadFrame, "%s: %d fds named, %d received", m.Op, len(m.FDs), len(files))
	}
	return m, files, nil
}

// writeFrames sends a control frame, its fds on a sendmsg of its own that starts
// with the frame's header, then data as data frames, with nothing in between.
// When m announces a trailer, each data frame is hashed as it is sent and the
// digest follows in a trailer frame, so hashing overlaps the transfer.
func (c *conn) writeFrames(m message, fds []*os.File, data []byte) error {
	raw := make([]int, len(fds))
	for i, f := range fds {
		raw[i] = int(f.Fd())
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	// (a hello's "trailer" only declares the capability)
	return c.writeLocked(encodeMessage(m), raw, data, m.Trailer && m.Op != "hello")
}

// writeLocked is writeFrames for an encoded frame and raw fds, under wmu.
func (c *conn) writeLocked(frame []byte, fds []int, data []byte, trailer bool) error {
	if len(fds) > 0 {
		n, _, err := c.uc.WriteMsgUnix(frame, syscall.UnixRights(fds...), nil)
		if err != nil {
			return err
		}
		frame = frame[n:] // a stream socket may take part of it
	}
	if len(frame) > 0 {
		if _, err := c.uc.Write(frame); err != nil {
			return err
		}
	}
	var digest hash.Hash
	if trailer {
		digest = sha256.New()
	}
	chunk := dataChunk
	if c.maxFrame < chunk {
		chunk = c.maxFrame
	}
	for off := 0; off < len(data); off += chunk {
		end := off + chunk
		if end > len(data) {
			end = len(data)
		}
		var h [4]byte
		binary.BigEndian.PutUint32(h[:], uint32(end-off))
		if _, err := c.uc.Write(h[:]); err != nil {
			return err
		}
		if digest != nil {
			digest.Write(data[off:end])
		}
		if _, err := c.uc.Write(data[off:end]); err != nil {
			return err
		}
	}
	if digest != nil {
		_, err := c.uc.Write(encodeMessage(message{Op: "trailer", SHA256: hex.EncodeToString(digest.Sum(nil))}))
		return err
	}
	return nil
}

func (c *conn) send(m message) error { return c.writeFrames(m, nil, nil) }

// closeFiles closes files (skipping those taken: nil).
func closeFiles(files []*os.File) {
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
}

// takeNamed takes the fd named name out of files (named in order by names), or returns nil.
func takeNamed(names []string, files []*os.File, name string) *os.File {
	for i, n := range names {
		if n == name && i < len(files) && files[i] != nil {
			f := files[i]
			files[i] = nil
			return f
		}
	}
	return nil
}
