//go:build linux

package client

import "fmt"

// Error codes: the protocol's (docs/srp.md, "Errors") and the SDK's own.
const (
	CodeForbidden          = "forbidden"
	CodeBadFrame           = "bad_frame"
	CodeTooLarge           = "too_large"
	CodeBadJSON            = "bad_json"
	CodeUnexpectedOp       = "unexpected_op"
	CodeUnsupportedVersion = "unsupported_version"
	CodeBusy               = "busy"
	CodeChecksumMismatch   = "checksum_mismatch"
	CodeTimeout            = "timeout"
	// CodeDisabled: Aeterna does not store checkpoints (its welcome did not announce them).
	CodeDisabled = "disabled"
	// CodeWriteFailed: a durable checkpoint could not be written (it is the latest in Aeterna's memory all the same).
	CodeWriteFailed = "write_failed"
	// CodeBadState: a state that failed verification other than its digest (a memfd not sealed, a wrong size).
	CodeBadState = "bad_state"
	// CodeLoadFailed: the app's load callback failed, or there is none for a later load.
	CodeLoadFailed = "load_failed"
	// CodeDumpFailed: the app's dump callback failed, or its result cannot be sent.
	CodeDumpFailed = "dump_failed"
	// CodeClosed: there is no connection (any more).
	CodeClosed = "closed"
	// CodeUsage: SDK calls out of order (Ready before Load, Load twice).
	CodeUsage = "usage"
)

// RelayError is why a relay call failed. Code is one of the Code* constants.
type RelayError struct {
	Code    string
	Message string
}

func (e *RelayError) Error() string { return fmt.Sprintf("aeterna relay: %s: %s", e.Code, e.Message) }

func relayErr(code, format string, args ...any) *RelayError {
	return &RelayError{Code: code, Message: fmt.Sprintf(format, args...)}
}

// refusal is a refusing ack's error text: the code first, so that Aeterna's log
// and the old generation can tell why.
func refusal(e *RelayError) string { return e.Code + ": " + e.Message }
