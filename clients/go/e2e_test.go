package client

// End to end against the real daemon: examples/go-counter under
// `node bin/aeterna.js start`, reloaded, keeps its count; killed with SIGKILL,
// the generation Aeterna restarts loads its checkpoint. Needs node and the
// daemon built in the repo (npx node-gyp rebuild && npx tsc -p tsconfig.json);
// skipped with the reason otherwise.

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"syscall"
	"testing"
	"time"
)

var repoRoot, _ = filepath.Abs(filepath.Join("..", ".."))

type daemon struct {
	t      *testing.T
	dir    string
	config string
	port   int
	cmd    *exec.Cmd
	exited chan struct{}
	// output is a file, not a pipe: an app left behind by a failed test cannot keep Wait waiting for its end.
	output *os.File
}

func (d *daemon) log() string {
	out, _ := os.ReadFile(d.output.Name())
	return string(out)
}

// startCounter builds examples/go-counter and runs it under a fresh daemon,
// with state_handoff.checkpoint enabled when checkpoints is true.
func startCounter(t *testing.T, checkpoints bool, env ...string) *daemon {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node is not available: the end-to-end test needs the daemon")
	}
	for _, built := range []string{"dist/src/daemon.js", "build/Release/aeterna.node"} {
		if _, err := os.Stat(filepath.Join(repoRoot, built)); err != nil {
			t.Skipf("the daemon is not built (%s missing): npx node-gyp rebuild && npx tsc -p tsconfig.json", built)
		}
	}
	dir, err := os.MkdirTemp("", "aeterna-go-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin := filepath.Join(dir, "go-counter")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Dir = filepath.Join(repoRoot, "examples", "go-counter")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building examples/go-counter: %v\n%s", err, out)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	envJSON, _ := json.Marshal(append([]string{}, env...))
	config := filepath.Join(dir, "aeterna.yaml")
	yaml := fmt.Sprintf(`version: "v1"
service:
  name: "go-counter"
  command: [%q]
  env: %s
  listeners:
    - name: "http"
      address: "tcp://127.0.0.1:%d"
  stop_timeout: "15s"
orchestration:
  strategy: "immediate"
  readiness: { mode: "notify", timeout: "20s" }
  state_handoff: { enabled: true, socket_path: %q, timeout: "10s", checkpoint: { enabled: %t } }
control:
  socket_path: %q
observability:
  log_level: "debug"
`, bin, envJSON, port, filepath.Join(dir, "state.sock"), checkpoints, filepath.Join(dir, "control.sock"))
	if err := os.WriteFile(config, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	output, err := os.Create(filepath.Join(dir, "output.log"))
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, dir: dir, config: config, port: port, exited: make(chan struct{}), output: output}
	d.cmd = exec.Command(node, filepath.Join(repoRoot, "bin", "aeterna.js"), "start", "-c", config)
	d.cmd.Stdout, d.cmd.Stderr = output, output
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		d.cmd.Wait()
		close(d.exited)
	}()
	t.Cleanup(func() {
		output.Close()
		d.cmd.Process.Signal(syscall.SIGTERM) // a graceful stop takes the apps with it
		select {
		case <-d.exited:
		case <-time.After(20 * time.Second):
			d.cmd.Process.Kill()
			<-d.exited
		}
	})
	d.waitFor(regexp.MustCompile(`"state":"Running"|state.*Running`), "the daemon to run the counter")
	return d
}

// waitFor polls the daemon's output for re (a hang guard, not a timing assertion).
func (d *daemon) waitFor(re *regexp.Regexp, what string) []string {
	d.t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if m := re.FindStringSubmatch(d.log()); m != nil {
			return m
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("waiting for %s: not seen\n%s", what, d.log())
		}
	}
}

func (d *daemon) cli(args ...string) (int, string) {
	cmd := exec.Command("node", append([]string{filepath.Join(repoRoot, "bin", "aeterna.js")}, append(args, "-c", d.config)...)...)
	out, err := cmd.CombinedOutput()
	if exit, ok := err.(*exec.ExitError); ok {
		return exit.ExitCode(), string(out)
	}
	if err != nil {
		d.t.Fatal(err)
	}
	return 0, string(out)
}

type visit struct {
	Count      int64  `json:"count"`
	PID        int    `json:"pid"`
	Generation string `json:"generation"`
	Checkpoint uint64 `json:"checkpoint"` // the seq of the checkpoint this visit stored, 0 without checkpoints
}

func (d *daemon) visit() visit {
	d.t.Helper()
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	r, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/", d.port))
	if err != nil {
		d.t.Fatal(err)
	}
	defer r.Body.Close()
	body, _ := io.ReadAll(r.Body)
	var v visit
	if err := json.Unmarshal(body, &v); err != nil {
		d.t.Fatalf("%q: %v", body, err)
	}
	return v
}

func (d *daemon) stop() {
	d.t.Helper()
	d.cmd.Process.Signal(syscall.SIGTERM)
	<-d.exited
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		d.t.Fatalf("the daemon stopped with exit code %d\n%s", code, d.log())
	}
}

func testCounterSurvivesReloads(t *testing.T, env ...string) {
	d := startCounter(t, false, env...)
	var first visit
	for i := 0; i < 5; i++ {
		first = d.visit()
	}
	if first.Count != 5 || first.Generation != "1" {
		t.Fatalf("before the reload: %+v", first)
	}
	for reload := 2; reload <= 3; reload++ {
		if code, out := d.cli("reload"); code != 0 {
			t.Fatalf("reload exited %d: %s\n%s", code, out, d.log())
		}
		after := d.visit()
		if after.PID == first.PID || after.Generation != fmt.Sprint(reload) {
			t.Fatalf("after reload %d: %+v (before %+v)", reload, after, first)
		}
		if after.Count != first.Count+1 {
			t.Fatalf("after reload %d the count is %d, want %d", reload, after.Count, first.Count+1)
		}
		// The old generation answered the final dump and got its ack.
		d.waitFor(regexp.MustCompile(fmt.Sprintf(`SHUTDOWN %d count=\d+ handed_over=true`, first.PID)), "the old generation's final sync")
		first = after
	}
	d.stop()
}

func TestE2ECounterSurvivesReloadsThroughTheDaemon(t *testing.T) {
	testCounterSurvivesReloads(t)
}

func TestE2ECounterSurvivesReloadsWithTheMemfdTransport(t *testing.T) {
	testCounterSurvivesReloads(t, "COUNTER_TRANSPORT=memfd")
}

// testCounterSurvivesKill9: every visit stores the count with Checkpoint; after
// a SIGKILL of the counter (no final dump, no live predecessor) the generation
// Aeterna restarts loads the latest checkpoint, marked with its source and seq.
func testCounterSurvivesKill9(t *testing.T, env ...string) {
	d := startCounter(t, true, env...)
	var before visit
	for i := 1; i <= 5; i++ {
		before = d.visit()
		if before.Count != int64(i) || before.Checkpoint != uint64(i) {
			t.Fatalf("visit %d: %+v (each visit stores checkpoint number i)", i, before)
		}
	}
	if err := syscall.Kill(before.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	d.waitFor(regexp.MustCompile(`LOADED count=5 source=checkpoint seq=5`), "the restarted counter to load checkpoint 5")
	after := d.visit()
	if after.PID == before.PID || after.Generation != "2" || after.Count != 6 || after.Checkpoint != 6 {
		t.Fatalf("after kill -9: %+v (before %+v)", after, before)
	}
	d.stop()
}

func TestE2ECounterSurvivesKill9WithACheckpoint(t *testing.T) {
	testCounterSurvivesKill9(t)
}

func TestE2ECounterSurvivesKill9WithAMemfdCheckpoint(t *testing.T) {
	testCounterSurvivesKill9(t, "COUNTER_TRANSPORT=memfd")
}
