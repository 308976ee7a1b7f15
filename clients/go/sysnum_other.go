//go:build linux && !amd64 && !arm64

package client

// sysMemfdCreate 0: the memfd transport is not offered on this architecture (MemfdState says so).
const sysMemfdCreate = 0
