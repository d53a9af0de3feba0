package main

import (
	"os"
	"runtime"
	"runtime/debug"
	"sync"

	"github.com/spf13/cobra"

	"vmvault/fusefs"
	"vmvault/repo"
)

func (a *app) mountCommand() *cobra.Command {
	var cacheMiB, readAheadMiB int64
	var debug bool
	cmd := &cobra.Command{
		Use:   "mount MOUNTPOINT",
		Short: "Mount every generation as read-only disk image files (FUSE)",
		Long: `Mount the repository's generations as a read-only file system:

  MOUNTPOINT/VM/<short-id>/<disk>   one directory per generation
  MOUNTPOINT/VM/latest              link to the newest generation
  MOUNTPOINT/VM/<time>              link by backup time (UTC, RFC 3339)

Each disk is a file the size of the disk image. A read fetches only the
chunks it touches, authenticates them, and answers zero ranges without
fetching; a read that touches a damaged object fails with an I/O error
(never with other bytes) and the log names the object. Loop-mount a disk to
copy single files out (see docs/disaster-recovery.md).

The command stays in the foreground and holds a shared repository lock
(prune waits). SIGINT or SIGTERM unmounts and exits 0; while the mount
point is busy (a loop mount on a disk file, an open file), it says so and
retries every second. Root mounts directly; other users need fusermount3.`,
		Example: `  mkdir -p /mnt/vmvault && vmvault mount /mnt/vmvault &
  mount -o ro,loop,noload /mnt/vmvault/vm01/latest/hda /mnt/hda
  cp /mnt/hda/etc/fstab /tmp/ && umount /mnt/hda && kill %1`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			dir := args[0]
			if err := fusefs.CheckMountPoint(dir); err != nil {
				return err
			}
			opts := fusefs.Options{Logger: a.log, Debug: debug,
				Reader: repo.ReaderOptions{CacheSize: cacheMiB << 20, ReadAhead: readAheadMiB << 20}}
			if readAheadMiB == 0 {
				opts.Reader.ReadAhead = -1
			}
			// One disk's reader: disks are opened as they are read.
			limit := raiseMemoryLimit(opts.Reader.Memory())
			procs, restore := oversubscribe()
			defer restore()
			return a.withRepo(ctx, repo.SharedLock, "mount "+dir, func(r *repo.Repository) error {
				m, err := fusefs.Mount(ctx, dir, r, opts)
				if err != nil {
					return err
				}
				a.log.Info("mounted; SIGINT or SIGTERM unmounts", "mountpoint", dir, "direct_io", m.DirectIO(), "memory_limit", limit, "procs", procs)
				if err := m.Serve(ctx); err != nil {
					return err
				}
				st := m.Stats()
				a.log.Info("unmounted", "mountpoint", dir, "read", st.BytesRead, "fetched", st.FetchedBytes,
					"waits", st.Waits, "wait_time", st.WaitTime, "buffers_reused", st.BuffersReused, "chunks", st.ChunksFetched, "largest_read", m.LargestRead())
				return nil
			})
		},
	}
	cmd.Flags().Int64Var(&cacheMiB, "cache-mib", repo.DefaultReaderCache>>20, "decoded chunk cache per open disk, in MiB")
	cmd.Flags().Int64Var(&readAheadMiB, "read-ahead-mib", repo.DefaultReaderReadAhead>>20, "fetch this many MiB ahead of sequential reads (0: off)")
	cmd.Flags().BoolVar(&debug, "debug-fuse", false, "log every FUSE request (very verbose)")
	return cmd
}

// raiseMemoryLimit adds n bytes to the process's soft heap limit, unless
// the user set one (GOMEMLIMIT), and returns the limit. The default limit
// fits a backup; a reader's cache on top of it kept the garbage collector
// running without end: a mount with --cache-mib 256 read image B in 4.0 s
// with 7.2 CPU seconds, against 1.9 s and 3.0 with the default cache.
func raiseMemoryLimit(n int64) int64 {
	limit := debug.SetMemoryLimit(-1)
	if os.Getenv("GOMEMLIMIT") != "" {
		return limit
	}
	debug.SetMemoryLimit(limit + n)
	return limit + n
}

// oversubscribe gives a command twice as many Go processors as it had,
// unless the user set GOMAXPROCS: a backup, and a server of reads (mount,
// serve).
//
// A backup's segment workers stay one per core (repo counts them from the
// processors the process started with); the extra processors serve the
// goroutines that block in system calls: an object's O_DIRECT write, the
// batch's syncfs, the reader's madvise. With one processor per core, an
// execution trace of a full backup of image A into a repository on the
// root disk showed those calls blocked 3.3 s in all and the two workers
// waiting 2.9 s of their 13.5 s for a segment. Full backups on that disk,
// 3 interleaved rounds on 2 cores (docs/performance.md, "Session 14"):
// image A 7.25-7.38 s -> 6.22-6.72 s, image B 3.68-4.00 s -> 3.30-3.84 s;
// incrementals on /dev/shm and restores did not change.
//
// For a server of reads: a read request arrives on a thread coming back
// from a blocking read of the FUSE device or a socket; with one processor
// per core, both were usually held by read-ahead goroutines decoding
// chunks, and the request waited for one to yield (a reader reading 1 MiB
// at a time, as dd and cat do, then waited each time). With more
// processors than cores it runs at once and the kernel shares the cores.
// Measured on 2 cores (docs/performance.md, "Session 13: a read request
// waits for a processor"): dd of image A through the mount 2.76-3.00 s ->
// 2.37-2.53 s, of B 1.85-2.13 s -> 1.66-1.75 s, at the same CPU seconds.
// (Backups whose workers followed the processors spent more CPU time with
// 4 than with 2.)
//
// It returns the count and a function that puts the old one back once
// every caller's has been called (commands run in-process, as the tests
// run them, may overlap: a mount serving while a backup runs); calling it
// again changes nothing.
func oversubscribe() (int, func()) {
	if os.Getenv("GOMAXPROCS") != "" {
		return runtime.GOMAXPROCS(0), func() {}
	}
	n := 2 * startProcs
	procs.Lock()
	defer procs.Unlock()
	if procs.users == 0 {
		procs.old = runtime.GOMAXPROCS(n)
	}
	procs.users++
	var once sync.Once
	return n, func() {
		once.Do(func() {
			procs.Lock()
			defer procs.Unlock()
			if procs.users--; procs.users == 0 {
				runtime.GOMAXPROCS(procs.old)
			}
		})
	}
}

// procs counts the callers of oversubscribe that have not restored yet,
// and the processor count to restore when the last one does.
var procs struct {
	sync.Mutex
	users, old int
}

// startProcs is the processor count the process started with.
var startProcs = runtime.GOMAXPROCS(0)
