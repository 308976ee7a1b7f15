// go-counter: a Go HTTP server under Aeterna whose counter survives reloads.
// It serves on the listener Aeterna hands over ("http"), takes the previous
// generation's count through the State Relay, and on SIGTERM drains (the SDK's
// Drain: no request racing a closing keep-alive connection is lost), then
// hands its final count over (the final sync).
//
//	GET /  counts one visit: {"count":N,"pid":P,"generation":G,"checkpoint":S}
//
// With orchestration.state_handoff.checkpoint.enabled, each visit also stores
// the count as a checkpoint (S is its sequence number, 0 otherwise), so a
// kill -9 of the counter loses nothing: the generation Aeterna restarts loads
// it ("source" checkpoint). COUNTER_TRANSPORT=memfd hands the state over in a
// sealed memfd instead of data frames.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	client "aeterna.dev/client"
)

type counter struct {
	mu    sync.Mutex
	count int64
	// checkpointing keeps checkpoints in the order of their snapshots, so a later count is never overwritten by an earlier one.
	checkpointing sync.Mutex
	// base is the count this generation started from: the final sync adds
	// what the old generation counted after its first dump (count - base).
	base int64
}

type snapshot struct {
	Count int64 `json:"count"`
}

func (c *counter) dump(final bool) (*client.Dump, error) {
	c.mu.Lock()
	raw, err := json.Marshal(snapshot{c.count})
	c.mu.Unlock()
	if err != nil || os.Getenv("COUNTER_TRANSPORT") != "memfd" {
		return &client.Dump{Encoding: "json", Data: raw}, err
	}
	memfd, err := client.MemfdState(raw, "go-counter")
	return &client.Dump{Encoding: "json", Memfd: memfd}, err
}

// checkpoint stores the current count in Aeterna; it returns the checkpoint's sequence number.
func (c *counter) checkpoint(relay *client.Client) (uint64, error) {
	c.checkpointing.Lock()
	defer c.checkpointing.Unlock()
	d, err := c.dump(false)
	if err != nil {
		return 0, err
	}
	return relay.Checkpoint(d)
}

func (c *counter) restore(s *client.State) error {
	var snap snapshot
	if err := s.JSON(&snap); err != nil {
		return err
	}
	c.mu.Lock()
	c.count, c.base = snap.Count, snap.Count
	c.mu.Unlock()
	fmt.Printf("LOADED count=%d source=%s seq=%d\n", snap.Count, s.Source, s.Seq)
	return nil
}

func (c *counter) finalSync(s *client.State) error {
	var snap snapshot
	if err := s.JSON(&snap); err != nil {
		return err
	}
	c.mu.Lock()
	c.count += snap.Count - c.base
	c.base = snap.Count
	c.mu.Unlock()
	fmt.Printf("FINAL_SYNC count=%d\n", snap.Count)
	return nil
}

func main() {
	relay, err := client.Connect(client.Options{})
	if err != nil {
		log.Fatalf("go-counter: %v", err)
	}
	c := &counter{}
	relay.OnDump(c.dump)
	relay.OnLoad(c.finalSync)
	if _, err := relay.Load(c.restore); err != nil {
		log.Fatalf("go-counter: the previous state: %v", err)
	}
	ln := client.Listeners()["http"]
	if ln == nil { // outside Aeterna
		if ln, err = net.Listen("tcp", "127.0.0.1:8080"); err != nil {
			log.Fatal(err)
		}
	}
	generation := os.Getenv("AETERNA_GENERATION")
	server := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		c.count++
		n := c.count
		c.mu.Unlock()
		var seq uint64
		if relay.Checkpoints {
			stored, err := c.checkpoint(relay)
			if err != nil {
				log.Printf("go-counter: checkpoint: %v", err) // the count still survives reloads
			}
			seq = stored
		}
		w.Header().Set("content-type", "application/json")
		fmt.Fprintf(w, `{"count":%d,"pid":%d,"generation":%s,"checkpoint":%d}`+"\n", n, os.Getpid(), strconv.Quote(generation), seq)
	})}
	// Drain (below) needs to see the connections from the start.
	client.TrackConnections(server)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	served := make(chan error, 1)
	go func() { served <- server.Serve(ln) }()
	if err := relay.Ready(); err != nil {
		log.Fatalf("go-counter: ready: %v", err)
	}
	select {
	case <-stop:
	case err := <-served:
		log.Fatalf("go-counter: %v", err)
	}
	// Drain: stop accepting, answer with `Connection: close`, close keep-alive
	// connections only once idle for a second (server.Shutdown alone would cut
	// a request racing an idle one), then the final sync.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	if err := client.Drain(ctx, server, client.DrainOptions{Idle: time.Second}); err != nil {
		log.Printf("go-counter: drain: %v", err)
	}
	cancel()
	handed := relay.Shutdown(10 * time.Second)
	c.mu.Lock()
	fmt.Printf("SHUTDOWN %d count=%d handed_over=%v\n", os.Getpid(), c.count, handed)
	c.mu.Unlock()
}
