//go:build linux

// Package client is Aeterna's Go SDK: the listeners Aeterna passes to the app
// (LISTEN_FDS) and the client side of the State Relay Protocol (docs/srp.md)
// that carries the app's memory across a reload. Standard library only, Linux
// only (memfd, SCM_RIGHTS), Go 1.19 or newer.
//
//	relay, err := client.Connect(client.Options{})    // a no-op client outside Aeterna
//	relay.OnDump(func(final bool) (*client.Dump, error) { return client.JSONDump(snapshot()) })
//	relay.OnLoad(func(s *client.State) error { return merge(s) }) // the final sync, while serving
//	_, err = relay.Load(func(s *client.State) error { return restore(s) })
//	ln := client.Listeners()["http"]
//	server := &http.Server{Handler: handler}
//	client.TrackConnections(server)
//	go server.Serve(ln)
//	relay.Ready()
//	// on SIGTERM: client.Drain(ctx, server, client.DrainOptions{}), then
//	relay.Shutdown(10 * time.Second)
//
// Goroutines: Load runs in the caller's goroutine. After the initial ack a
// goroutine reads Aeterna's frames: it answers a non-final dump at once (the
// dump callback runs there, while the app serves, so it must take the app's
// own locks) and calls the load callback for the final sync. A final dump is
// left for Shutdown, which the app calls once it has drained, so that the
// final state includes what the in-flight requests changed.
//
// Connection handoff (Handoff, OnConnection) moves live client connections
// from the old generation to the new one at promotion, over a socket pair of
// their own; Drain (with TrackConnections) stops an *http.Server without
// cutting a request that races a closing keep-alive connection.
//
// Failures are *RelayError values whose Code field is the protocol's error
// code (forbidden, busy, bad_frame, ...) or the SDK's own (checksum_mismatch,
// bad_state, load_failed, dump_failed, closed, usage, timeout).
package client
