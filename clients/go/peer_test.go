package client

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// peer plays Aeterna on a real unix socket: the tests script what it sends and
// check what the client sends.
type peer struct {
	t    *testing.T
	path string
	ln   *net.UnixListener
	c    *conn
	// checkpoints: the welcome announces that Aeterna stores checkpoints.
	checkpoints bool
	// handoffs: the welcome offers connection handoff.
	handoffs bool
}

func newPeer(t *testing.T) *peer {
	t.Helper()
	dir, err := os.MkdirTemp("", "aeterna-go-") // short: a unix socket path has at most 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "state.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	p := &peer{t: t, path: path, ln: ln}
	t.Cleanup(func() {
		ln.Close()
		if p.c != nil {
			p.c.uc.Close()
		}
	})
	return p
}

// accept takes the client's connection (Connect may wait in the backlog meanwhile).
func (p *peer) accept() {
	p.t.Helper()
	p.ln.SetDeadline(time.Now().Add(10 * time.Second))
	uc, err := p.ln.AcceptUnix()
	if err != nil {
		p.t.Fatal(err)
	}
	uc.SetDeadline(time.Now().Add(20 * time.Second)) // a hang guard, not a timing assertion
	p.c = &conn{uc: uc, maxFrame: DefaultMaxFrame}
}

// expect reads the client's next control frame; it must hold every field of want.
func (p *peer) expect(want map[string]any) (map[string]any, []*os.File) {
	p.t.Helper()
	got, files, err := p.next()
	if err != nil {
		p.t.Fatalf("expected %v, got %v", want, err)
	}
	if !matches(want, got) {
		p.t.Fatalf("expected %v, got %v", want, got)
	}
	return got, files
}

// next is the client's next control frame as a JSON object.
func (p *peer) next() (map[string]any, []*os.File, error) {
	n, files, err := p.c.readHeader()
	if err != nil {
		return nil, nil, err
	}
	payload := make([]byte, n)
	if _, err := p.c.readFull(payload, false); err != nil {
		return nil, nil, err
	}
	var got map[string]any
	if err := json.Unmarshal(payload, &got); err != nil {
		p.t.Fatalf("the client sent a frame that is not JSON: %q", payload)
	}
	return got, files, nil
}

// expectData reads data frames until n bytes have arrived.
func (p *peer) expectData(n int) []byte {
	p.t.Helper()
	out := make([]byte, 0, n)
	for len(out) < n {
		size, files, err := p.c.readHeader()
		if err != nil || len(files) > 0 {
			p.t.Fatalf("expected data, got %v (%d fds)", err, len(files))
		}
		chunk := make([]byte, size)
		if _, err := p.c.readFull(chunk, false); err != nil {
			p.t.Fatal(err)
		}
		out = append(out, chunk...)
	}
	return out
}

// expectClosed: the client closes its end (after an error it may have sent).
func (p *peer) expectClosed() {
	p.t.Helper()
	for {
		got, _, err := p.next()
		if err != nil {
			return
		}
		if got["op"] != "error" {
			p.t.Fatalf("expected the client to close, got %v", got)
		}
	}
}

// send writes a control frame (raw JSON) with fds, then data frames.
func (p *peer) send(raw any, fds []*os.File, data ...[]byte) {
	p.t.Helper()
	payload, err := json.Marshal(raw)
	if err != nil {
		p.t.Fatal(err)
	}
	frame := encodeFrame(payload)
	if len(fds) > 0 {
		ints := make([]int, len(fds))
		for i, f := range fds {
			ints[i] = int(f.Fd())
		}
		_, _, err = p.c.uc.WriteMsgUnix(frame, syscall.UnixRights(ints...), nil)
	} else {
		_, err = p.c.uc.Write(frame)
	}
	for _, d := range data {
		if err == nil {
			_, err = p.c.uc.Write(encodeFrame(d))
		}
	}
	if err != nil {
		p.t.Fatal(err)
	}
}

// welcome does Aeterna's side of the handshake.
func (p *peer) welcome(generation int) {
	p.t.Helper()
	p.accept()
	p.expect(map[string]any{"op": "hello", "v": 1.0})
	welcome := map[string]any{"op": "welcome", "v": 1, "generation": generation, "max_frame": DefaultMaxFrame}
	if p.checkpoints {
		welcome["checkpoint"] = true
	}
	if p.handoffs {
		welcome["handoff"] = true
	}
	p.send(welcome, nil)
}

// matches: every field of want is in got; {"prefix": s} matches a string that starts with s.
func matches(want, got map[string]any) bool {
	for key, w := range want {
		g, present := got[key]
		if pm, ok := w.(map[string]any); ok && len(pm) == 1 && pm["prefix"] != nil {
			s, isString := g.(string)
			if !isString || len(s) < len(pm["prefix"].(string)) || s[:len(pm["prefix"].(string))] != pm["prefix"] {
				return false
			}
			continue
		}
		wj, _ := json.Marshal(w)
		gj, _ := json.Marshal(g)
		if !present || string(wj) != string(gj) {
			return false
		}
	}
	return true
}

// sealedMemfd is a memfd holding text, sealed or not.
func sealedMemfd(t *testing.T, text string, sealed bool) *os.File {
	t.Helper()
	if sealed {
		f, err := MemfdState([]byte(text), "test")
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	f, err := createMemfd("test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(text); err != nil {
		t.Fatal(err)
	}
	return f
}
