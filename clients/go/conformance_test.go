package client

// The language-neutral conformance suite (test/conformance/*.json at the repo
// root) run against this SDK, with Aeterna played by a scripted peer on a real
// unix socket (and a socketpair for the frame vectors).

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// conformanceDir is the suite: $AETERNA_CONFORMANCE_DIR, else ../../test/conformance.
func conformanceDir(t *testing.T) string {
	dir := os.Getenv("AETERNA_CONFORMANCE_DIR")
	if dir == "" {
		dir = filepath.Join("..", "..", "test", "conformance")
	}
	if _, err := os.Stat(filepath.Join(dir, "exchanges.json")); err != nil {
		t.Skipf("the conformance suite is not at %s (set AETERNA_CONFORMANCE_DIR): %v", dir, err)
	}
	return dir
}

func loadSuite(t *testing.T, name string, v any) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(conformanceDir(t), name))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, v); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

// notDeclared says why this SDK skips the optional capabilities it does not declare in its hello
// (test/conformance/README.md, "Optional capabilities"); it declares "trailer" and implements checkpoints.
var notDeclared = map[string]string{
	"direct": `the Go SDK does not implement the direct transport (its hello has no "direct": true), so Aeterna never offers it a socket pair`,
	"crc32":  `the Go SDK does not implement crc32 (its hello lists no "checksums"), so Aeterna never offers it one`,
}

// skipUndeclared skips a case or vector that requires a capability this SDK does not declare, saying why.
func skipUndeclared(t *testing.T, requires []string) {
	t.Helper()
	for _, r := range requires {
		if reason, ok := notDeclared[r]; ok {
			t.Skipf("requires %s: %s", r, reason)
		}
	}
}

// part is a vector's bytes: hex, raw text, or a whole frame (length header + UTF-8 text).
type part struct {
	Hex   *string `json:"hex"`
	Text  *string `json:"text"`
	Frame *string `json:"frame"`
}

func toBytes(t *testing.T, parts []part) []byte {
	var out []byte
	for _, p := range parts {
		switch {
		case p.Hex != nil:
			b, err := hex.DecodeString(*p.Hex)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, b...)
		case p.Text != nil:
			out = append(out, *p.Text...)
		default:
			out = append(out, encodeFrame([]byte(*p.Frame))...)
		}
	}
	return out
}

// asJSON is a decoded message as the suite spells it (final is false when absent).
func asJSON(m message) map[string]any {
	raw, _ := json.Marshal(m)
	var out map[string]any
	json.Unmarshal(raw, &out)
	if m.Op == "dump" || m.Op == "load" {
		out["final"] = m.Final
	}
	return out
}

func socketpair(t *testing.T) (mine *net.UnixConn, theirs int) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "mine")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.UnixConn), fds[1]
}

func TestConformanceFrames(t *testing.T) {
	var vectors struct {
		Decode []struct {
			Name     string         `json:"name"`
			Requires []string       `json:"requires"`
			Bytes    []part         `json:"bytes"`
			MaxFrame int            `json:"max_frame"`
			Message  map[string]any `json:"message"`
			Error    string         `json:"error"`
		} `json:"decode"`
		Encode []struct {
			Name    string          `json:"name"`
			Message json.RawMessage `json:"message"`
			Bytes   []part          `json:"bytes"`
		} `json:"encode"`
	}
	loadSuite(t, "frames.json", &vectors)
	for _, v := range vectors.Decode {
		v := v
		t.Run("decode: "+v.Name, func(t *testing.T) {
			skipUndeclared(t, v.Requires)
			mine, theirs := socketpair(t)
			if _, err := syscall.Write(theirs, toBytes(t, v.Bytes)); err != nil {
				t.Fatal(err)
			}
			syscall.Close(theirs)
			max := v.MaxFrame
			if max == 0 {
				max = DefaultMaxFrame
			}
			m, files, err := (&conn{uc: mine, maxFrame: max}).readMessage()
			closeFiles(files)
			var re *RelayError
			if v.Error != "" {
				if !errors.As(err, &re) || re.Code != v.Error {
					t.Fatalf("want error %s, got %v (message %+v)", v.Error, err, m)
				}
				return
			}
			if err != nil || !matches(v.Message, asJSON(m)) {
				t.Fatalf("want %v, got %v (%v)", v.Message, asJSON(m), err)
			}
		})
	}
	for _, v := range vectors.Encode {
		v := v
		t.Run("encode: "+v.Name, func(t *testing.T) {
			var m message
			if err := json.Unmarshal(v.Message, &m); err != nil {
				t.Fatal(err)
			}
			if got, want := hex.EncodeToString(encodeMessage(m)), hex.EncodeToString(toBytes(t, v.Bytes)); got != want {
				t.Fatalf("encoded %s, want %s", got, want)
			}
		})
	}
}

type exchangeCase struct {
	Name string `json:"name"`
	// Capabilities the case needs the client to have (test/conformance/README.md, "Optional capabilities").
	Requires []string `json:"requires"`
	App      struct {
		Ready  bool   `json:"ready"`
		Apply  string `json:"apply"`
		OnLoad string `json:"on_load"`
		Dump   *struct {
			JSON   any     `json:"json"`
			Text   *string `json:"text"`
			None   bool    `json:"none"`
			Throws bool    `json:"throws"`
		} `json:"dump"`
		// Checkpoint: after Load and Ready, the app calls Checkpoint with this JSON.
		Checkpoint *struct {
			JSON any `json:"json"`
		} `json:"checkpoint"`
	} `json:"app"`
	Steps []struct {
		ClientSends     map[string]any `json:"client_sends"`
		ClientSendsData *string        `json:"client_sends_data"`
		ClientCloses    bool           `json:"client_closes"`
		PeerSends       map[string]any `json:"peer_sends"`
		Memfd           *struct {
			Text   string `json:"text"`
			Sealed bool   `json:"sealed"`
		} `json:"memfd"`
		Data []string `json:"data"`
	} `json:"steps"`
	Expect struct {
		Connect *struct {
			Error string `json:"error"`
		} `json:"connect"`
		Load *struct {
			State    json.RawMessage `json:"state"`
			Error    string          `json:"error"`
			AppError bool            `json:"app_error"`
		} `json:"load"`
		LaterLoads []map[string]any `json:"later_loads"`
		// Checkpoint is what the app's Checkpoint call gives: a seq, or an error code.
		Checkpoint *struct {
			Seq   *uint64 `json:"seq"`
			Error string  `json:"error"`
		} `json:"checkpoint"`
		// LoadSource is the initial load's State.Source.
		LoadSource string `json:"load_source"`
	} `json:"expect"`
}

func describeState(s *State) map[string]any {
	return map[string]any{"encoding": s.Encoding, "text": s.Text(), "final": s.Final}
}

var errApp = errors.New("the app cannot use it")

func TestConformanceExchanges(t *testing.T) {
	var suite struct {
		Cases []exchangeCase `json:"cases"`
	}
	loadSuite(t, "exchanges.json", &suite)
	for _, c := range suite.Cases {
		c := c
		t.Run(c.Name, func(t *testing.T) {
			skipUndeclared(t, c.Requires)
			runExchange(t, c)
		})
	}
}

// playPeer is Aeterna's side of one case: the steps in order. It reports the first mismatch.
func playPeer(p *peer, c exchangeCase) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	p.accept()
	for _, step := range c.Steps {
		switch {
		case step.ClientSends != nil:
			got, files, rerr := p.next()
			closeFiles(files)
			if rerr != nil || !matches(step.ClientSends, got) {
				return fmt.Errorf("expected %v, got %v (%v)", step.ClientSends, got, rerr)
			}
		case step.ClientSendsData != nil:
			if got := string(p.expectData(len(*step.ClientSendsData))); got != *step.ClientSendsData {
				return fmt.Errorf("expected data %q, got %q", *step.ClientSendsData, got)
			}
		case step.ClientCloses:
			for {
				got, _, rerr := p.next()
				if rerr != nil {
					break
				}
				if got["op"] != "error" {
					return fmt.Errorf("expected the client to close, got %v", got)
				}
			}
		case step.PeerSends != nil:
			var fds []*os.File
			if step.Memfd != nil {
				f := sealedMemfd(p.t, step.Memfd.Text, step.Memfd.Sealed)
				defer f.Close()
				fds = append(fds, f)
			}
			var data [][]byte
			for _, d := range step.Data {
				data = append(data, []byte(d))
			}
			p.send(step.PeerSends, fds, data...)
		}
	}
	return nil
}

func runExchange(t *testing.T, c exchangeCase) {
	p := newPeer(t)
	played := make(chan error, 1)
	go func() { played <- playPeer(p, c) }()
	relay, err := Connect(Options{Path: p.path})
	if c.Expect.Connect != nil {
		var re *RelayError
		if !errors.As(err, &re) || re.Code != c.Expect.Connect.Error {
			t.Fatalf("connect: want error %s, got %v", c.Expect.Connect.Error, err)
		}
		if perr := <-played; perr != nil {
			t.Fatal(perr)
		}
		return
	}
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer relay.Close()
	var later []map[string]any
	laterDone := make(chan struct{}, 8)
	relay.OnDump(func(final bool) (*Dump, error) {
		d := c.App.Dump
		switch {
		case d == nil || d.None:
			return nil, nil
		case d.Throws:
			return nil, errors.New("the app cannot dump")
		case d.Text != nil:
			return TextDump(*d.Text), nil
		default:
			return JSONDump(d.JSON)
		}
	})
	if c.App.OnLoad != "" {
		relay.OnLoad(func(s *State) error {
			defer func() { laterDone <- struct{}{} }()
			if c.App.OnLoad == "throws" {
				return errors.New("the app cannot apply it")
			}
			later = append(later, describeState(s))
			return nil
		})
	}
	want := c.Expect.Load
	state, err := relay.Load(func(s *State) error {
		if c.App.Apply == "throws" {
			return errApp
		}
		return nil
	})
	var re *RelayError
	switch {
	case err == nil:
		var got any
		if state != nil {
			got = describeState(state)
		}
		gotJSON, _ := json.Marshal(got)
		var wantV any
		json.Unmarshal(want.State, &wantV)
		wantJSON, _ := json.Marshal(wantV)
		if string(gotJSON) != string(wantJSON) {
			t.Fatalf("load: got %s, want %s", gotJSON, wantJSON)
		}
	case errors.As(err, &re):
		if re.Code != want.Error {
			t.Fatalf("load: want error %q, got %v", want.Error, err)
		}
	default:
		if !want.AppError || !errors.Is(err, errApp) {
			t.Fatalf("load: unexpected error %v", err)
		}
	}
	if c.Expect.LoadSource != "" && (state == nil || state.Source != c.Expect.LoadSource) {
		t.Fatalf("load: want source %q, got state %+v", c.Expect.LoadSource, state)
	}
	if c.App.Ready {
		if err := relay.Ready(); err != nil {
			t.Fatal(err)
		}
	}
	if c.App.Checkpoint != nil {
		checkCheckpoint(t, relay, c)
	}
	if perr := <-played; perr != nil {
		t.Fatal(perr)
	}
	// The peer has seen the ack of every later load: the callbacks have returned.
	for range c.Expect.LaterLoads {
		<-laterDone
	}
	gotJSON, _ := json.Marshal(later)
	wantJSON, _ := json.Marshal(c.Expect.LaterLoads)
	if len(later) == 0 {
		gotJSON = []byte("null")
	}
	if len(c.Expect.LaterLoads) == 0 {
		wantJSON = []byte("null")
	}
	if string(gotJSON) != string(wantJSON) {
		t.Fatalf("later loads: got %s, want %s", gotJSON, wantJSON)
	}
}

// checkCheckpoint has the app call Checkpoint and compares what it gives with the case's expectation.
func checkCheckpoint(t *testing.T, relay *Client, c exchangeCase) {
	t.Helper()
	d, err := JSONDump(c.App.Checkpoint.JSON)
	if err != nil {
		t.Fatal(err)
	}
	seq, err := relay.Checkpoint(d)
	want := c.Expect.Checkpoint
	var re *RelayError
	switch {
	case want == nil:
		t.Fatalf("the case has app.checkpoint but no expect.checkpoint")
	case want.Seq != nil && (err != nil || seq != *want.Seq):
		t.Fatalf("checkpoint: want seq %d, got %d, %v", *want.Seq, seq, err)
	case want.Error != "" && (!errors.As(err, &re) || re.Code != want.Error):
		t.Fatalf("checkpoint: want error %q, got %d, %v", want.Error, seq, err)
	}
}

// listenersChildEnv marks the test binary re-run as the child of a listeners case.
const listenersChildEnv = "AETERNA_GO_LISTENERS_CASE"

func TestMain(m *testing.M) {
	if raw := os.Getenv(listenersChildEnv); raw != "" {
		listenersChild(raw)
		return
	}
	os.Exit(m.Run())
}

// listenersChild: the case's env with its own pid, then what ListenerFiles found and whether each fd is now close-on-exec.
func listenersChild(raw string) {
	var env map[string]string
	json.Unmarshal([]byte(raw), &env)
	for k, v := range env {
		os.Setenv(k, strings.ReplaceAll(v, "$PID", strconv.Itoa(os.Getpid())))
	}
	found := map[string]int{}
	cloexec := true
	for name, f := range ListenerFiles() {
		found[name] = int(f.Fd())
		flags, _, _ := syscall.Syscall(syscall.SYS_FCNTL, f.Fd(), syscall.F_GETFD, 0)
		cloexec = cloexec && flags&syscall.FD_CLOEXEC != 0
	}
	out, _ := json.Marshal(map[string]any{"listeners": found, "cloexec": cloexec, "listener_count": len(Listeners())})
	fmt.Println(string(out))
	os.Exit(0)
}

func TestConformanceListeners(t *testing.T) {
	var suite struct {
		Cases []struct {
			Name   string            `json:"name"`
			Env    map[string]string `json:"env"`
			FDs    []string          `json:"fds"`
			Expect map[string]int    `json:"expect"`
		} `json:"cases"`
	}
	loadSuite(t, "listeners.json", &suite)
	for _, c := range suite.Cases {
		c := c
		t.Run(c.Name, func(t *testing.T) {
			got := runListenersChild(t, c.Env, c.FDs)
			if fmt.Sprint(got.Listeners) != fmt.Sprint(c.Expect) {
				t.Fatalf("listeners: got %v, want %v", got.Listeners, c.Expect)
			}
			if !got.Cloexec {
				t.Fatal("listeners are not close-on-exec")
			}
			if got.ListenerCount != len(c.Expect) {
				t.Fatalf("Listeners() gave %d net.Listeners for %d sockets", got.ListenerCount, len(c.Expect))
			}
		})
	}
}

type listenersResult struct {
	Listeners     map[string]int `json:"listeners"`
	Cloexec       bool           `json:"cloexec"`
	ListenerCount int            `json:"listener_count"`
}

// runListenersChild re-runs this test binary with fds at 3, 4, ... (TCP listeners or /dev/null) and env.
func runListenersChild(t *testing.T, env map[string]string, kinds []string) listenersResult {
	t.Helper()
	var files []*os.File
	for _, kind := range kinds {
		if kind == "socket" {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			f, err := ln.(*net.TCPListener).File()
			ln.Close()
			if err != nil {
				t.Fatal(err)
			}
			files = append(files, f)
		} else {
			f, err := os.Open(os.DevNull)
			if err != nil {
				t.Fatal(err)
			}
			files = append(files, f)
		}
	}
	defer closeFiles(files)
	raw, _ := json.Marshal(env)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "LISTEN_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, listenersChildEnv+"="+string(raw))
	cmd.ExtraFiles = files
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child: %v", err)
	}
	var got listenersResult
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("child said %q: %v", out, err)
	}
	return got
}
