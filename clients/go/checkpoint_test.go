package client

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net"
	"os"
	"testing"
	"time"
)

// Checkpoint against a scripted Aeterna (docs/srp.md, "Checkpoints").

func connectedWithCheckpoints(t *testing.T) (*Client, *peer) {
	t.Helper()
	p := newPeer(t)
	p.checkpoints = true
	return connectedTo(t, p)
}

func wantCode(t *testing.T, err error, code string) {
	t.Helper()
	var re *RelayError
	if !errors.As(err, &re) || re.Code != code {
		t.Fatalf("want a *RelayError %s, got %v", code, err)
	}
}

func TestTwoCheckpointsAtOnceGetTheAnswersInTheOrderTheyWentOut(t *testing.T) {
	relay, p := connectedWithCheckpoints(t)
	type result struct {
		seq uint64
		err error
	}
	results := map[string]chan result{"one": make(chan result, 1), "two": make(chan result, 1)}
	for text, out := range results {
		text, out := text, out
		go func() {
			seq, err := relay.Checkpoint(TextDump(text))
			out <- result{seq, err}
		}()
	}
	// Each goes out whole (header, data, trailer) before the other: no interleaving.
	var order []string
	for i := 0; i < 2; i++ {
		got, _ := p.expect(map[string]any{"op": "checkpoint", "encoding": "text", "size": 3.0, "trailer": true})
		if got["sha256"] != nil {
			t.Fatalf("a checkpoint with a trailer has no sha256 in its header: %v", got)
		}
		order = append(order, string(p.expectData(3)))
		p.expect(map[string]any{"op": "trailer"})
	}
	p.send(map[string]any{"op": "checkpointed", "seq": 41}, nil)
	p.send(map[string]any{"op": "checkpointed", "code": "too_large", "message": "above max_size"}, nil)
	first, second := <-results[order[0]], <-results[order[1]]
	if first.seq != 41 || first.err != nil {
		t.Fatalf("the first checkpoint sent (%s): %+v", order[0], first)
	}
	wantCode(t, second.err, CodeTooLarge)
	// A refusal leaves the connection open: the next checkpoint is stored.
	// Aeterna's side answers once the checkpoint arrived, and the test ends only after it read it (the
	// connection closes at the end of the test: reading it afterwards failed now and then).
	answered := make(chan struct{})
	go func() {
		defer close(answered)
		p.expect(map[string]any{"op": "checkpoint", "size": 0.0})
		p.send(map[string]any{"op": "checkpointed", "seq": 42}, nil)
	}()
	seq, err := relay.Checkpoint(nil)
	<-answered
	if seq != 42 || err != nil {
		t.Fatalf("an empty checkpoint after a refusal: %d %v", seq, err)
	}
}

func TestAMemfdCheckpointGoesAsTheFdAloneAndTheAppsOtherFdsStayHome(t *testing.T) {
	relay, p := connectedWithCheckpoints(t)
	payload := []byte("a checkpoint in a memfd")
	memfd, err := MemfdState(payload, "ckpt-state")
	if err != nil {
		t.Fatal(err)
	}
	conn, _ := net.Listen("tcp", "127.0.0.1:0")
	defer conn.Close()
	connFile, _ := conn.(*net.TCPListener).File()
	defer connFile.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, files := p.expect(map[string]any{"op": "checkpoint", "transport": "memfd", "size": float64(len(payload)), "fds": []any{"state"}})
		defer closeFiles(files)
		if len(files) != 1 {
			t.Errorf("%d fds with the checkpoint, want the memfd alone", len(files))
			return
		}
		if data, problem := mapMemfd(files[0], int64(len(payload)), ""); problem != nil || string(data) != string(payload) {
			t.Errorf("%q %v", data, problem)
		}
		p.send(map[string]any{"op": "checkpointed", "seq": 1}, nil)
	}()
	seq, err := relay.Checkpoint(&Dump{Encoding: "binary", Memfd: memfd, FDs: map[string]*os.File{"conn:1": connFile}})
	<-done
	if seq != 1 || err != nil {
		t.Fatalf("%d %v", seq, err)
	}
	if openMemfds(t, "ckpt-state") != 0 {
		t.Fatal("the SDK kept the memfd it sent")
	}
}

func TestACheckpointStillWaitingWhenTheConnectionEndsFailsWithClosed(t *testing.T) {
	relay, p := connectedWithCheckpoints(t)
	go func() {
		p.expect(map[string]any{"op": "checkpoint"})
		p.c.uc.Close()
	}()
	_, err := relay.Checkpoint(TextDump("lost"))
	wantCode(t, err, CodeClosed)
	_, err = relay.Checkpoint(TextDump("after the end"))
	wantCode(t, err, CodeClosed)
}

func TestCheckpointBeforeLoadIsAUsageErrorAndWithoutTheWelcomesAnnouncementDisabled(t *testing.T) {
	p := newPeer(t)
	p.checkpoints = true
	go p.welcome(1)
	relay, err := Connect(Options{Path: p.path})
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	_, err = relay.Checkpoint(TextDump("too early"))
	wantCode(t, err, CodeUsage)

	off, _ := connected(t) // a welcome without "checkpoint": true
	_, err = off.Checkpoint(TextDump("nowhere to keep it"))
	wantCode(t, err, CodeDisabled)
}

func TestAStreamedLoadFromACheckpointTellsItsSourceSeqAndAge(t *testing.T) {
	text := `{"sessions":[1]}`
	sum := sha256.Sum256([]byte(text))
	st, err := loadStreamed(t, newPeer(t), map[string]any{"op": "load", "encoding": "json", "size": len(text), "sha256": hex.EncodeToString(sum[:]), "source": "checkpoint", "seq": 9, "age_ms": 2500}, []byte(text))
	if err != nil || st == nil {
		t.Fatalf("%v %v", st, err)
	}
	if st.Source != "checkpoint" || st.Seq != 9 || st.Age != 2500*time.Millisecond || st.Text() != text {
		t.Fatalf("%+v", st)
	}
}
