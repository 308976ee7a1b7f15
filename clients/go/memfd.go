//go:build linux

package client

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"syscall"
	"unsafe"
)

// fcntl and memfd_create constants (linux/fcntl.h, linux/memfd.h); the frozen
// syscall package does not have them.
const (
	fAddSeals   = 1024 + 9
	fGetSeals   = 1024 + 10
	fSealSeal   = 0x1
	fSealShrink = 0x2
	fSealGrow   = 0x4
	fSealWrite  = 0x8
	mfdCloexec  = 0x1
	mfdSealing  = 0x2
	// requiredSeals: nobody can change a memfd state under its receiver.
	requiredSeals = fSealWrite | fSealShrink | fSealGrow
)

// MemfdState returns a new memfd holding data, sealed with F_SEAL_WRITE,
// F_SEAL_SHRINK, F_SEAL_GROW and F_SEAL_SEAL (close-on-exec). Hand it to
// Dump.Memfd: a multi-gigabyte state then moves without a copy through the
// socket. The SDK closes it once sent.
func MemfdState(data []byte, name string) (*os.File, error) {
	f, err := createMemfd(name)
	if err != nil {
		return nil, err
	}
	for off := 0; off < len(data); {
		n, err := f.Write(data[off:])
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("writing the memfd: %w", err)
		}
		off += n
	}
	if _, _, errno := syscall.Syscall(syscall.SYS_FCNTL, f.Fd(), fAddSeals, requiredSeals|fSealSeal); errno != 0 {
		f.Close()
		return nil, fmt.Errorf("sealing the memfd: %w", errno)
	}
	return f, nil
}

// createMemfd is a new, empty, sealable memfd (close-on-exec).
func createMemfd(name string) (*os.File, error) {
	if sysMemfdCreate == 0 {
		return nil, fmt.Errorf("memfd_create: not supported on this architecture by this SDK")
	}
	cname, err := syscall.BytePtrFromString(name)
	if err != nil {
		return nil, err
	}
	fd, _, errno := syscall.Syscall(sysMemfdCreate, uintptr(unsafe.Pointer(cname)), mfdCloexec|mfdSealing, 0)
	if errno != 0 {
		return nil, fmt.Errorf("memfd_create: %w", errno)
	}
	return os.NewFile(fd, "memfd:"+name), nil
}

func memfdSeals(fd uintptr) (int, error) {
	seals, _, errno := syscall.Syscall(syscall.SYS_FCNTL, fd, fGetSeals, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(seals), nil
}

// checkMemfd is the sender's check of a memfd it is about to hand over: sealed, and its size.
func checkMemfd(f *os.File) (int64, error) {
	seals, err := memfdSeals(f.Fd())
	if err != nil {
		return 0, fmt.Errorf("not a memfd: %w", err)
	}
	if seals&requiredSeals != requiredSeals {
		return 0, fmt.Errorf("the memfd is not sealed with F_SEAL_WRITE, F_SEAL_SHRINK and F_SEAL_GROW (use MemfdState)")
	}
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// mapMemfd verifies a received memfd (seals, size, sha256 when announced) and
// maps it read-only. The memfd itself may be closed afterwards.
func mapMemfd(f *os.File, size int64, sha string) ([]byte, *RelayError) {
	seals, err := memfdSeals(f.Fd())
	if err != nil {
		return nil, relayErr(CodeBadState, "the state fd is not a memfd: %v", err)
	}
	if seals&requiredSeals != requiredSeals {
		return nil, relayErr(CodeBadState, "the memfd is not sealed with F_SEAL_WRITE, F_SEAL_SHRINK and F_SEAL_GROW")
	}
	st, err := f.Stat()
	if err != nil {
		return nil, relayErr(CodeBadState, "fstat of the memfd: %v", err)
	}
	if st.Size() != size {
		return nil, relayErr(CodeBadState, "the memfd holds %d bytes, %d announced", st.Size(), size)
	}
	var data []byte
	if size > 0 {
		if data, err = syscall.Mmap(int(f.Fd()), 0, int(size), syscall.PROT_READ, syscall.MAP_SHARED); err != nil {
			return nil, relayErr(CodeBadState, "mapping the memfd: %v", err)
		}
	}
	if sha != "" {
		sum := sha256.Sum256(data)
		if got := hex.EncodeToString(sum[:]); got != sha {
			if data != nil {
				syscall.Munmap(data)
			}
			return nil, relayErr(CodeChecksumMismatch, "the memfd holds sha256 %s, %s announced (%d bytes)", got, sha, size)
		}
	}
	return data, nil
}
