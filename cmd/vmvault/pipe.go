package main

import (
	"os"

	"golang.org/x/sys/unix"
)

// pipeSize is the buffer restore asks the kernel for when stdout is a
// pipe. With the default 64 KiB every 1 MiB write blocked until the reader
// had drained the pipe sixteen times over: a restore of 4 GiB into `cat`
// spent half of its samples in context switches.
const pipeSize = 1 << 20

// growPipe enlarges out's pipe buffer to pipeSize when out is a pipe. It is
// best effort: an unprivileged process is capped by
// /proc/sys/fs/pipe-max-size (1 MiB by default), and a failure leaves the
// pipe as it was.
func growPipe(out *os.File) {
	if out == nil {
		return
	}
	fi, err := out.Stat()
	if err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		return
	}
	if n, err := unix.FcntlInt(out.Fd(), unix.F_GETPIPE_SZ, 0); err == nil && n < pipeSize {
		unix.FcntlInt(out.Fd(), unix.F_SETPIPE_SZ, pipeSize)
	}
}
