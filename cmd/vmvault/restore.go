package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"golang.org/x/term"

	"vmvault/repo"
)

func (a *app) restoreCommand() *cobra.Command {
	var target, targetDir, disk string
	cmd := &cobra.Command{
		Use:   "restore VM latest|ID [--target FILE|DEVICE | --target-dir DIR]",
		Short: "Restore a disk image, to stdout or in place",
		Long: `Restore one disk of a generation, or all of them. Without --target the
image streams to stdout in order. With --target it is written in place into
a file (created if missing, zero ranges left as holes) or block device,
writing only the ranges that differ; on a device that zeroes ranges itself
(write-zeroes: a loop device, NVMe, an LV over one) the image's all-zero
stretches are zeroed that way instead of being read back and compared.
With --target-dir every disk of the generation (or the one --disk names)
is restored into DIR/NAME.raw, DIR created if missing.

When stdout is a new, empty file (restore … > disk.raw), the image is
written into it as with --target: zero ranges left as holes.

Durability: a restore into a file or block device (--target, --target-dir,
or stdout redirected into a file or device) calls fsync on it before it
reports success, so a restore that exits 0 has its data on stable storage
as far as the kernel and the device report. Into a pipe nothing can be
synced: there durability is the reader's job.

Every segment is authenticated before it is written, and the whole image is
checked against the digest recorded at backup time; any damage stops the
restore with an error naming the object. A restore that fails or is
interrupted exits non-zero (130 when interrupted) and says that the target
(or stdout) is incomplete: never use such a target. An existing larger file
is cut to the image's size only when the restore has completed.
ID may be any unique prefix of a generation ID; latest is the VM's newest.`,
		Example: `  vmvault restore vm01 latest > vm01.raw
  vmvault restore vm01 3f2a9c1b --target /dev/vg0/vm01
  vmvault restore vm01 latest --disk hdb --target hdb.raw
  vmvault restore vm01 latest --target-dir /var/lib/images/vm01`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if target != "" && targetDir != "" {
				return withCode(exitUsage, errors.New("give --target or --target-dir, not both"))
			}
			if target == "" && targetDir == "" {
				if f, ok := a.stdout.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
					return withCode(exitUsage, errors.New("refusing to write a disk image to a terminal: redirect stdout or use --target"))
				}
			}
			return a.withRepo(ctx, repo.SharedLock, "restore "+args[0], func(r *repo.Repository) error {
				m, err := r.FindManifest(ctx, args[0], args[1])
				if err != nil {
					return err
				}
				switch {
				case targetDir != "":
					return a.restoreAll(cmd, r, m, disk, targetDir)
				case target != "":
					return a.restoreTarget(cmd, r, m, disk, target)
				}
				out, _ := a.stdout.(*os.File)
				if newFile(out) {
					return a.restoreNewStdout(cmd, r, m, disk, out)
				}
				growPipe(out)
				w := bufio.NewWriterSize(a.stdout, 1<<20)
				st, err := r.Restore(ctx, m, disk, w)
				if err == nil {
					err = w.Flush()
				}
				if err == nil && out != nil && storage(out) {
					if err = out.Sync(); err != nil {
						err = fmt.Errorf("sync stdout: %w", err)
					}
				}
				if err != nil {
					a.log.Error("restore failed: the image written to stdout is incomplete", "vm", m.VM, "generation", m.ShortID())
					return fmt.Errorf("restore %s %s: %w", m.VM, m.ShortID(), err)
				}
				a.log.Info("restored", "vm", m.VM, "generation", m.ShortID(), "bytes", st.Bytes)
				return nil
			})
		},
	}
	cmd.Flags().StringVarP(&target, "target", "t", "", "write into this file or block device in place instead of stdout")
	cmd.Flags().StringVar(&targetDir, "target-dir", "", "restore every disk of the generation into DIR/NAME.raw")
	cmd.Flags().StringVar(&disk, "disk", "", "which disk of a multi-disk generation")
	return cmd
}

// newFile reports whether f is a regular file that is empty, open for
// writing at offset 0 and not for appending: stdout after `> disk.raw`.
// Such a file can be written out of order and left with holes, and reads
// the same as if the image had been streamed into it.
func newFile(f *os.File) bool {
	if f == nil {
		return false
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() || fi.Size() != 0 {
		return false
	}
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil || fl&unix.O_APPEND != 0 || fl&unix.O_ACCMODE == unix.O_RDONLY {
		return false
	}
	off, err := f.Seek(0, io.SeekCurrent)
	return err == nil && off == 0
}

// storage reports whether f is a regular file or a block device: what
// fsync can make durable, unlike a pipe or a terminal.
func storage(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && (fi.Mode().IsRegular() || fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0)
}

// restoreNewStdout restores one disk into stdout when it is a new file
// (see newFile), in place as --target does, and leaves the file offset
// at the image's end, where a stream would have left it.
func (a *app) restoreNewStdout(cmd *cobra.Command, r *repo.Repository, m *repo.Manifest, disk string, out *os.File) error {
	st, err := r.RestoreToFile(cmd.Context(), m, disk, out, "stdout")
	if err == nil {
		if _, err = out.Seek(st.Bytes, io.SeekStart); err != nil {
			err = fmt.Errorf("stdout: %w", err)
		}
	}
	if err != nil {
		a.log.Error("restore failed: the image written to stdout is incomplete", "vm", m.VM, "generation", m.ShortID())
		return fmt.Errorf("restore %s %s: %w", m.VM, m.ShortID(), err)
	}
	a.log.Info("restored", "vm", m.VM, "generation", m.ShortID(), "bytes", st.Bytes, "written", st.Written, "skipped", st.Skipped)
	return nil
}

// restoreTarget restores one disk in place and logs the outcome; a
// failure says the target is incomplete.
func (a *app) restoreTarget(cmd *cobra.Command, r *repo.Repository, m *repo.Manifest, disk, target string) error {
	st, err := r.RestoreTo(cmd.Context(), m, disk, target)
	if err != nil {
		if errors.Is(err, repo.ErrTargetIncomplete) {
			a.log.Error("restore failed: the target is incomplete, do not use it", "vm", m.VM, "generation", m.ShortID(), "target", target)
		}
		return fmt.Errorf("restore %s %s: %w", m.VM, m.ShortID(), err)
	}
	a.log.Info("restored", "vm", m.VM, "generation", m.ShortID(), "target", target, "bytes", st.Bytes, "written", st.Written, "skipped", st.Skipped, "zeroed", st.Zeroed)
	return nil
}

// restoreAll restores every disk of m (or only disk) into dir/NAME.raw.
func (a *app) restoreAll(cmd *cobra.Command, r *repo.Repository, m *repo.Manifest, disk, dir string) error {
	var names []string
	for _, d := range m.Disks {
		if disk == "" || d.Name == disk {
			names = append(names, d.Name)
		}
	}
	if len(names) == 0 {
		_, err := m.Disk(disk)
		return err
	}
	for _, n := range names {
		// Disk names come from the repository: never let one leave dir.
		if n == "" || n == "." || n == ".." || strings.ContainsAny(n, "/\x00") {
			return fmt.Errorf("generation %s of %s: disk name %q cannot be a file name", m.ShortID(), m.VM, n)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("target directory: %w", err)
	}
	for _, n := range names {
		if err := a.restoreTarget(cmd, r, m, n, filepath.Join(dir, n+".raw")); err != nil {
			return err
		}
	}
	return nil
}
