//go:build linux

package client

import (
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

var (
	decimal   = regexp.MustCompile(`^[0-9]+$`)
	inherited struct {
		sync.Once
		files     map[string]*os.File
		listeners map[string]net.Listener
	}
)

// ListenerFiles are the sockets Aeterna passed to this process (systemd's
// LISTEN_FDS protocol), by LISTEN_FDNAMES name: "fd3", "fd4", ... where a
// name is missing, empty or taken by an earlier fd. Empty unless LISTEN_PID
// is this process. The fds become close-on-exec (as sd_listen_fds does); an
// fd that is not a socket is left out, with a warning. The same files on
// every call.
func ListenerFiles() map[string]*os.File {
	parseInherited()
	return copyMap(inherited.files)
}

// Listeners are the inherited stream sockets as net.Listeners, by name (see
// ListenerFiles). A socket that cannot be a net.Listener (a datagram socket:
// take it from ListenerFiles with net.FilePacketConn) is left out, with a
// warning. The same listeners on every call.
func Listeners() map[string]net.Listener {
	parseInherited()
	return copyMap(inherited.listeners)
}

func parseInherited() {
	inherited.Do(func() {
		inherited.files = listenerFiles(os.Getenv, os.Getpid())
		inherited.listeners = map[string]net.Listener{}
		for name, f := range inherited.files {
			ln, err := net.FileListener(f) // a close-on-exec dup; f keeps the original fd
			if err != nil {
				logf("LISTEN_FDS: %s (fd %d) is not a stream listener: %v", name, f.Fd(), err)
				continue
			}
			inherited.listeners[name] = ln
		}
	})
}

// listenerFiles is the parse, with the environment and pid as arguments (the tests' seam).
func listenerFiles(getenv func(string) string, pid int) map[string]*os.File {
	found := map[string]*os.File{}
	pidText, countText := getenv("LISTEN_PID"), getenv("LISTEN_FDS")
	if !decimal.MatchString(pidText) || !decimal.MatchString(countText) {
		return found
	}
	owner, err1 := strconv.Atoi(pidText)
	count, err2 := strconv.Atoi(countText)
	if err1 != nil || err2 != nil || owner != pid {
		return found
	}
	names := strings.Split(getenv("LISTEN_FDNAMES"), ":")
	for i := 0; i < count; i++ {
		fd := 3 + i
		var st syscall.Stat_t
		if err := syscall.Fstat(fd, &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFSOCK {
			logf("LISTEN_FDS: fd %d is not a socket, left out", fd)
			continue
		}
		syscall.CloseOnExec(fd)
		name := ""
		if i < len(names) {
			name = names[i]
		}
		if _, taken := found[name]; name == "" || taken {
			name = "fd" + strconv.Itoa(fd)
		}
		found[name] = os.NewFile(uintptr(fd), name)
	}
	return found
}

func copyMap[V any](m map[string]V) map[string]V {
	out := make(map[string]V, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}
