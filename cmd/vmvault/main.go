// Command vmvault backs up virtual machine disk images into an encrypted,
// deduplicating repository on a local path, an SFTP server or S3-compatible
// object storage.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"runtime/pprof"
	"runtime/trace"
	"strings"
	"syscall"

	"vmvault/backend"
	"vmvault/repo"
	"vmvault/vmbackup"
)

// Exit codes; stable, documented in docs/exit-codes.md and `vmvault --help`.
const (
	exitOK          = 0
	exitError       = 1
	exitUsage       = 2
	exitPartial     = 3
	exitNoRepo      = 10
	exitLocked      = 11
	exitWrongPass   = 12
	exitInterrupted = 130
)

const exitCodesHelp = `Exit codes:
  0    success
  1    error (the message says what failed)
  2    bad command line
  3    partial success: some VMs failed, or warnings (e.g. a database was down)
  10   repository not found (or not a vmvault repository)
  11   repository or VM locked by another process
  12   wrong password
  130  interrupted (SIGINT/SIGTERM); the backup in progress committed nothing`

// codedError carries an exit code through cobra, for errors that no
// sentinel names (bad usage, a missing repository path).
type codedError struct {
	code int
	err  error
}

func (e *codedError) Error() string { return e.err.Error() }
func (e *codedError) Unwrap() error { return e.err }

func withCode(code int, err error) error {
	if err == nil {
		return nil
	}
	return &codedError{code: code, err: err}
}

// exitCode maps an error to the documented exit code.
func exitCode(ctx context.Context, err error) int {
	var ee *codedError
	switch {
	case err == nil:
		return exitOK
	case ctx.Err() != nil && errors.Is(err, context.Canceled):
		return exitInterrupted
	case errors.As(err, &ee):
		return ee.code
	case errors.Is(err, repo.ErrWrongPassword):
		return exitWrongPass
	case errors.Is(err, repo.ErrNotRepository):
		return exitNoRepo
	case errors.Is(err, repo.ErrLocked), errors.Is(err, vmbackup.ErrVMLocked):
		return exitLocked
	case ctx.Err() != nil:
		return exitInterrupted
	}
	return exitError
}

func main() {
	os.Exit(runMain(os.Args[1:]))
}

// memoryLimit is the soft limit for the Go heap. A backup's working set
// is bounded (segment buffers plus the upload window, see "Memory bound"
// in docs/performance.md); without a limit the garbage collector lets the
// heap grow to twice the live set. GOMEMLIMIT overrides it.
//
// While a mapped disk is read the backup lowers it by the windows' bound
// (48 MiB on 2 cores), and what is left must hold the live heap of a full
// upload window (about 102 MB: sealed buffers, chunk copies, read
// buffers, zstd history). At 144 MiB (96 MiB while reading) the collector
// ran back to back whenever the store was slower than the backup: 1,783–
// 1,864 collections for an SFTP full backup of a 4 GiB image, 171–322
// even to a local directory; at 176 MiB 35–42 and 15–23, for 0.4–2.0
// CPU-s less locally and 4.4–5.4 less over SFTP (images A and B;
// docs/performance.md, "Memory bound").
const memoryLimit = 176 << 20

// runMain runs a command line as the process: SIGINT and SIGTERM cancel
// the context, so cleanup (snapshots, locks) runs and the exit is 130.
func runMain(args []string) int {
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(memoryLimit)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if p := os.Getenv("VMVAULT_CPUPROFILE"); p != "" {
		if f, err := os.Create(p); err == nil {
			pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
	}
	if p := os.Getenv("VMVAULT_TRACE"); p != "" {
		if f, err := os.Create(p); err == nil {
			trace.Start(f)
			defer trace.Stop()
		}
	}
	return run(ctx, args, os.Stdin, os.Stdout, os.Stderr)
}

// run executes one command line and returns the exit code.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	app := &app{stdin: stdin, stdout: stdout, stderr: stderr}
	root := app.rootCommand()
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	if app.closeLog != nil {
		defer app.closeLog()
	}
	if err == nil {
		return app.code
	}
	code := exitCode(ctx, err)
	if isUsageError(err) {
		code = exitUsage
	}
	msg := "vmvault: " + oneLine(err)
	if code == exitInterrupted {
		// The command's own error says what stays unfinished (a backup
		// commits no generation, a restore's target is incomplete).
		msg = "vmvault: interrupted: " + oneLine(err)
	}
	fmt.Fprintln(stderr, msg)
	if app.sys != nil {
		app.sys.Error(msg, "exit", code)
	}
	return code
}

// oneLine keeps an error on one line (cron mail and syslog read better)
// and safe for a terminal: errors quote names read from the repository.
func oneLine(err error) string {
	return termSafe(strings.ReplaceAll(err.Error(), "\n", ";"))
}

// notFound wraps a missing-repository error with its exit code.
func notFound(err error) error {
	if errors.Is(err, backend.ErrNotExist) {
		return withCode(exitNoRepo, err)
	}
	return err
}
