//go:build linux

package client

import (
	"encoding/json"
	"os"
	"syscall"
	"time"
)

// State is a state received from the previous generation.
type State struct {
	// Encoding is what the sender announced ("json", "text", "binary", "protobuf", ...).
	Encoding string
	// Data is the state: the bytes as received (stream transport), or a
	// read-only mapping of the memfd (memfd transport) until Close.
	Data []byte
	// FDs are the other fds that came with it, by name (e.g. live connections
	// "conn:1"): the app's to adopt (net.FileConn) and close.
	FDs map[string]*os.File
	// Final is true for the final sync (the second load, given to OnLoad).
	Final bool
	// Transport is "stream" or "memfd".
	Transport string
	// Source is "relay" (a live generation's dump) or "checkpoint" (the latest
	// checkpoint, for a generation started with no live predecessor).
	Source string
	// Seq and Age are the checkpoint's sequence number and its age when Aeterna
	// sent it (Source "checkpoint"; zero otherwise).
	Seq    uint64
	Age    time.Duration
	mapped bool
}

// Text is the state as a string.
func (s *State) Text() string { return string(s.Data) }

// JSON decodes the state into v.
func (s *State) JSON(v any) error { return json.Unmarshal(s.Data, v) }

// Close unmaps a memfd state (Data is empty afterwards); the FDs stay the app's.
func (s *State) Close() error {
	if !s.mapped {
		return nil
	}
	s.mapped = false
	data := s.Data
	s.Data = nil
	return syscall.Munmap(data)
}

// Dump is a dump callback's answer: the state to hand to the next generation.
// A nil *Dump hands over nothing (a state of size 0).
type Dump struct {
	// Encoding is the app's name for the format; "binary" when empty.
	Encoding string
	// Data is the state, sent as data frames (the stream transport).
	Data []byte
	// Memfd, instead of Data: a sealed memfd from MemfdState (the memfd
	// transport, no copy). The SDK closes it once sent.
	Memfd *os.File
	// FDs are sent along by name (e.g. "conn:1" for a live connection). They
	// stay the app's: close them once the dump is answered. "state" is reserved.
	FDs map[string]*os.File
	// SHA256, when the app already has the digest (lowercase hex), saves hashing the state again.
	SHA256 string
}

// JSONDump is a Dump of v as JSON (encoding "json").
func JSONDump(v any) (*Dump, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	return &Dump{Encoding: "json", Data: data}, nil
}

// TextDump is a Dump of s (encoding "text").
func TextDump(s string) *Dump { return &Dump{Encoding: "text", Data: []byte(s)} }

// BytesDump is a Dump of b (encoding "binary").
func BytesDump(b []byte) *Dump { return &Dump{Encoding: "binary", Data: b} }
