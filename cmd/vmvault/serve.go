package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"vmvault/nbd"
	"vmvault/repo"
)

// serveFlags are the options of `vmvault serve`.
type serveFlags struct {
	listen, disk, overlayDir string
	writable, keep           bool
	cacheMiB, readAheadMiB   int64
}

// check validates the flags and returns the reader options they ask for.
func (f *serveFlags) check() (repo.ReaderOptions, error) {
	if f.listen == "" {
		return repo.ReaderOptions{}, withCode(exitUsage, errors.New("serve needs --listen unix:PATH or HOST:PORT"))
	}
	if _, _, err := nbd.ParseListen(f.listen); err != nil {
		return repo.ReaderOptions{}, withCode(exitUsage, err)
	}
	if (f.overlayDir != "" || f.keep) && !f.writable {
		return repo.ReaderOptions{}, withCode(exitUsage, errors.New("--overlay and --keep-overlay need --writable"))
	}
	if f.writable && f.overlayDir == "" {
		f.overlayDir = os.TempDir()
	}
	if f.cacheMiB <= 0 || f.readAheadMiB < 0 {
		return repo.ReaderOptions{}, withCode(exitUsage, errors.New("--cache-mib must be positive and --read-ahead-mib not negative"))
	}
	ropts := repo.ReaderOptions{CacheSize: f.cacheMiB << 20, ReadAhead: f.readAheadMiB << 20}
	if f.readAheadMiB == 0 {
		ropts.ReadAhead = -1
	}
	return ropts, nil
}

func (a *app) serveCommand() *cobra.Command {
	var f serveFlags
	cmd := &cobra.Command{
		Use:   "serve VM latest|ID --listen unix:PATH|HOST:PORT",
		Short: "Serve a generation's disks over NBD (instant recovery)",
		Long: `Serve the disks of one generation as Network Block Device exports, so qemu
can boot a VM from its backup, or qemu-img and other NBD clients can read
it, without restoring it first. Reads fetch, decrypt and authenticate only
the chunks they touch; holes and zero runs are answered without fetching
and are reported to clients (base:allocation), so they skip them. A range
whose data fails authentication is answered with an I/O error (EIO) and a
log line naming the object, never with other bytes.

The default export (empty name) is the first disk, or --disk; every disk is
also exported by its name. --listen takes unix:PATH or HOST:PORT; a TCP
address without a host listens on 127.0.0.1. NBD has no authentication or
encryption: anyone who can connect reads the disks (and with --writable,
writes the overlay). Prefer a unix socket, keep TCP on a loopback address,
or reach it through an SSH tunnel.

Without --writable every write is refused (EPERM). With --writable writes
go to a copy-on-write overlay: one sparse file per disk in --overlay DIR
(default: the temporary directory), removed when serve stops. With
--keep-overlay the overlay stays, and serving the same generation again with
--keep-overlay resumes it: what the client had flushed survives a restart,
even a crash. The repository is never written. To make a VM's changes
permanent, copy its disk out through NBD (qemu-img convert).

serve runs until SIGINT or SIGTERM, then closes the connections and exits 0.`,
		Example: `  vmvault serve vm01 latest --listen unix:/run/vmvault/vm01.sock
  qemu-img convert -f raw -O raw 'nbd+unix:///?socket=/run/vmvault/vm01.sock' vm01.raw
  vmvault serve vm01 latest --listen unix:/run/vm01.sock --writable --overlay /var/tmp --keep-overlay
  qemu-system-x86_64 -m 2048 -drive 'file=nbd+unix:///?socket=/run/vm01.sock,format=raw,if=virtio'
  vmvault serve vm01 3f2a9c1b --disk hdb --listen :10809`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ropts, err := f.check()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			return a.withRepo(ctx, repo.SharedLock, "serve "+args[0], func(r *repo.Repository) error {
				return a.serve(ctx, r, args[0], args[1], &f, ropts)
			})
		},
	}
	cmd.Flags().StringVar(&f.listen, "listen", "", "unix:PATH or HOST:PORT (a missing host means 127.0.0.1)")
	cmd.Flags().StringVar(&f.disk, "disk", "", "the disk served as the default export (default: the first)")
	cmd.Flags().BoolVar(&f.writable, "writable", false, "accept writes into a local copy-on-write overlay (the repository is never written)")
	cmd.Flags().StringVar(&f.overlayDir, "overlay", "", "directory for the overlay files of --writable (default: the temporary directory)")
	cmd.Flags().BoolVar(&f.keep, "keep-overlay", false, "keep the overlay files when serve stops, and resume them when this generation is served again")
	cmd.Flags().Int64Var(&f.cacheMiB, "cache-mib", repo.DefaultReaderCache>>20, "decoded chunk cache per disk, in MiB")
	cmd.Flags().Int64Var(&f.readAheadMiB, "read-ahead-mib", repo.DefaultReaderReadAhead>>20, "fetch this many MiB ahead of sequential reads (0: off)")
	return cmd
}

// serve exports the disks of generation gen of vm until ctx ends.
func (a *app) serve(ctx context.Context, r *repo.Repository, vm, gen string, f *serveFlags, ropts repo.ReaderOptions) error {
	m, err := r.FindManifest(ctx, vm, gen)
	if err != nil {
		return err
	}
	limit := raiseMemoryLimit(int64(len(m.Disks)) * ropts.Memory())
	procs, restore := oversubscribe()
	defer restore()
	sd, err := openExports(ctx, a.log, r, m, f.disk, f.overlayDir, f.keep, ropts)
	defer sd.close()
	if err != nil {
		return err
	}
	srv, err := nbd.NewServer(a.log, sd.def, sd.exports)
	if err != nil {
		return err
	}
	l, err := nbd.Listen(f.listen)
	if err != nil {
		return err
	}
	a.log.Info("serving", "vm", m.VM, "generation", m.ShortID(), "listen", l.Addr().String(),
		"default", sd.def, "exports", strings.Join(sd.names, ","), "writable", f.writable, "memory_limit", limit, "procs", procs)
	if err := srv.Serve(ctx, l); err != nil {
		return err
	}
	var st repo.ReaderStats
	for _, dr := range sd.readers {
		s := dr.Stats()
		st.BytesRead += s.BytesRead
		st.FetchedBytes += s.FetchedBytes
		st.Waits += s.Waits
		st.WaitTime += s.WaitTime
		st.ChunksFetched += s.ChunksFetched
		st.BuffersReused += s.BuffersReused
	}
	a.log.Info("stopped serving", "vm", m.VM, "generation", m.ShortID(), "read", st.BytesRead, "fetched", st.FetchedBytes,
		"waits", st.Waits, "wait_time", st.WaitTime, "chunks", st.ChunksFetched, "buffers_reused", st.BuffersReused)
	return nil
}

// servedDisks are the exports of one generation and what backs them.
type servedDisks struct {
	exports map[string]nbd.Export
	names   []string // sorted
	def     string   // the default export's name
	readers []*repo.DiskReader
	closers []func()
}

// close releases whatever was opened, in reverse order.
func (sd *servedDisks) close() {
	for i := len(sd.closers) - 1; i >= 0; i-- {
		sd.closers[i]()
	}
}

// openExports opens every disk of m as an export, with an overlay each
// when overlayDir is set (kept ones if keep). The default export is disk, or the first. The
// result must be closed, also on error.
func openExports(ctx context.Context, log *slog.Logger, r *repo.Repository, m *repo.Manifest, disk, overlayDir string, keep bool, opts repo.ReaderOptions) (*servedDisks, error) {
	sd := &servedDisks{exports: make(map[string]nbd.Export, len(m.Disks))}
	if len(m.Disks) == 0 {
		return sd, fmt.Errorf("generation %s of %s has no disks", m.ShortID(), m.VM)
	}
	sd.def = m.Disks[0].Name
	if disk != "" {
		d, err := m.Disk(disk)
		if err != nil {
			return sd, err
		}
		sd.def = d.Name
	}
	for _, d := range m.Disks {
		dr, err := r.OpenDisk(ctx, m, d.Name, opts)
		if err != nil {
			return sd, err
		}
		sd.readers = append(sd.readers, dr)
		sd.closers = append(sd.closers, func() { dr.Close() })
		var e nbd.Export = diskExport{ctx: ctx, dr: dr}
		if overlayDir != "" {
			name := fmt.Sprintf("vmvault-%s-%s-%s", safeName(m.VM), m.ShortID(), safeName(d.Name))
			var ov *nbd.Overlay
			var err error
			if keep {
				path := filepath.Join(overlayDir, name+".overlay")
				if _, serr := os.Stat(path + ".map"); serr == nil {
					log.Info("resuming kept overlay", "disk", d.Name, "overlay", path)
				}
				ov, err = nbd.OpenOverlay(e, path, m.VM+"/"+m.ID+"/"+d.Name)
			} else {
				ov, err = nbd.CreateOverlay(e, filepath.Join(overlayDir, fmt.Sprintf("%s-%d.overlay", name, os.Getpid())))
			}
			if err != nil {
				return sd, err
			}
			sd.closers = append(sd.closers, func() {
				if err := ov.Close(); err != nil {
					log.Warn("overlay not removed", "err", err)
				}
			})
			e = ov
		}
		sd.exports[d.Name] = e
		sd.names = append(sd.names, d.Name)
	}
	slices.Sort(sd.names)
	return sd, nil
}

// safeName keeps a VM or disk name usable in a file name.
func safeName(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '/' || r == 0 {
			return '_'
		}
		return r
	}, s)
}

// diskExport serves a repository disk reader as an NBD export.
type diskExport struct {
	ctx context.Context
	dr  *repo.DiskReader
}

func (d diskExport) Size() int64 { return d.dr.Size() }

func (d diskExport) ReadAt(p []byte, off int64) (int, error) {
	return d.dr.ReadAtContext(d.ctx, p, off)
}

// ReadSlices sends the reader's cached chunks without copying them; done
// hands them back to the reader.
func (d diskExport) ReadSlices(off, length int64) ([][]byte, func(), error) {
	v, err := d.dr.ReadSlices(d.ctx, off, int(length))
	return v.Bufs, v.Release, err
}

func (d diskExport) Extents(off, length int64) ([]nbd.Extent, error) {
	ext, err := d.dr.Extents(d.ctx, off, length)
	if err != nil {
		return nil, err
	}
	out := make([]nbd.Extent, len(ext))
	for i, x := range ext {
		out[i] = nbd.Extent{Offset: x.Off, Length: x.Length, Hole: x.Zero}
	}
	return out, nil
}
