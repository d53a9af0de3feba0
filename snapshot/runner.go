// Package snapshot freezes a VM's disks for a backup with LVM snapshots: it
// creates them for all disks of a VM back to back (inside the quiesce
// window), opens them for reading (the block device, or an image file inside a
// file system on it), checks before the commit that none overflowed, and
// removes them on every exit path. The one exception is a thin snapshot
// the caller keeps as the base of the next backup (Set.Keep); thin.go
// states the rules for bases and thin_delta.
package snapshot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// Runner runs an external command and returns its standard output. A
// failure is returned as a *CommandError carrying the command's stderr.
type Runner interface {
	Run(ctx context.Context, name string, args ...string) ([]byte, error)
}

// Exec runs commands on the local machine, optionally through "sudo -n" so
// that vmvault can run as an unprivileged user with a sudoers entry for the
// LVM and mount commands.
type Exec struct {
	// Sudo prefixes every command with "sudo -n" (never prompts).
	Sudo bool
	// Env is added to the environment of every command.
	Env []string
}

// CommandError reports a command that failed.
type CommandError struct {
	// Args is the command line, including any sudo prefix.
	Args []string
	// ExitCode is the exit status, or -1 if the command did not exit.
	ExitCode int
	// Stderr is the command's standard error, trimmed.
	Stderr string
	// Err is the underlying error from os/exec (and the context's error if
	// it was cancelled).
	Err error
}

func (e *CommandError) Error() string {
	msg := fmt.Sprintf("%s: %v", strings.Join(e.Args, " "), e.Err)
	if e.Stderr != "" {
		msg += ": " + e.Stderr
	}
	return msg
}

func (e *CommandError) Unwrap() error { return e.Err }

// cancelGrace is how long a cancelled command may take to stop on SIGINT.
const cancelGrace = 30 * time.Second

// maxStderr bounds the stderr kept in an error; LVM can be verbose.
const maxStderr = 4096

// Run implements Runner.
func (e Exec) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	argv := append([]string{name}, args...)
	if e.Sudo {
		argv = append([]string{"sudo", "-n"}, argv...)
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	// The C locale keeps lvs output parseable (decimal point, not comma);
	// LVM_SUPPRESS_FD_WARNINGS silences warnings about inherited descriptors.
	cmd.Env = append(append(os.Environ(), "LC_ALL=C", "LVM_SUPPRESS_FD_WARNINGS=1"), e.Env...)
	// Killing lvcreate half-way could leave the origin suspended and the VM's
	// I/O hanging, so cancellation asks politely (LVM stops at a safe point
	// on SIGINT; sudo relays it) and kills only after a grace period.
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = cancelGrace
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		ce := &CommandError{Args: argv, ExitCode: -1, Err: err}
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			ce.ExitCode = ee.ExitCode()
		}
		if ctx.Err() != nil {
			ce.Err = fmt.Errorf("%w (%w)", err, ctx.Err())
		}
		s := strings.TrimSpace(stderr.String())
		if len(s) > maxStderr {
			s = s[:maxStderr] + "…"
		}
		ce.Stderr = s
		return stdout.Bytes(), ce
	}
	return stdout.Bytes(), nil
}
