package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"vmvault/repo"
)

func (a *app) dumpCommand() *cobra.Command {
	var disk string
	var offset, length int64
	cmd := &cobra.Command{
		Use:   "dump VM latest|ID [--disk NAME] [--offset N] [--length N]",
		Short: "Write a byte range of a disk image to stdout",
		Long: `Write length bytes of one disk of a generation, starting at offset, to
stdout: for scripts that need a partition, a file system header or any other
range without restoring the whole disk. Only the chunks the range touches
are fetched; zero ranges are not fetched at all. Every byte is
authenticated; a damaged object stops the dump with an error naming it and a
non-zero exit, and what was written to stdout is then incomplete.
Without --length the range runs to the end of the disk.`,
		Example: `  vmvault dump vm01 latest --disk hda --offset 1048576 --length 4096 | xxd | head
  vmvault dump vm01 3f2a9c1b --disk hda --offset 1048576 > part1.img`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if offset < 0 || cmd.Flags().Changed("length") && length < 0 {
				return withCode(exitUsage, errors.New("--offset and --length must not be negative"))
			}
			if f, ok := a.stdout.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
				return withCode(exitUsage, errors.New("refusing to write disk data to a terminal: redirect stdout"))
			}
			return a.withRepo(ctx, repo.SharedLock, "dump "+args[0], func(r *repo.Repository) error {
				m, err := r.FindManifest(ctx, args[0], args[1])
				if err != nil {
					return err
				}
				dr, err := r.OpenDisk(ctx, m, disk, repo.ReaderOptions{})
				if err != nil {
					return err
				}
				defer dr.Close()
				if offset > dr.Size() {
					return fmt.Errorf("dump %s: offset %d is beyond the disk's end (%d bytes)", dr.Name(), offset, dr.Size())
				}
				n := dr.Size() - offset
				if cmd.Flags().Changed("length") {
					if length > n {
						return fmt.Errorf("dump %s: %d bytes at offset %d reach beyond the disk's end (%d bytes)", dr.Name(), length, offset, dr.Size())
					}
					n = length
				}
				w := bufio.NewWriterSize(a.stdout, 1<<20)
				written, err := io.CopyBuffer(w, io.NewSectionReader(ctxReaderAt{ctx, dr}, offset, n), make([]byte, 1<<20))
				if err == nil {
					err = w.Flush()
				}
				if err != nil {
					a.log.Error("dump failed: the data written to stdout is incomplete", "disk", dr.Name(), "written", written)
					return fmt.Errorf("dump %s: %w", dr.Name(), err)
				}
				st := dr.Stats()
				a.log.Info("dumped", "disk", dr.Name(), "offset", offset, "bytes", n, "fetched", st.FetchedBytes)
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&disk, "disk", "", "which disk of a multi-disk generation")
	cmd.Flags().Int64Var(&offset, "offset", 0, "first byte of the range")
	cmd.Flags().Int64Var(&length, "length", 0, "bytes in the range (default: to the end of the disk)")
	return cmd
}

// ctxReaderAt reads a DiskReader under the command's context, so
// SIGINT/SIGTERM stop a read in progress.
type ctxReaderAt struct {
	ctx context.Context
	dr  *repo.DiskReader
}

func (c ctxReaderAt) ReadAt(p []byte, off int64) (int, error) {
	return c.dr.ReadAtContext(c.ctx, p, off)
}
