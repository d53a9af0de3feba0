package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"vmvault/repo"
)

func (a *app) restoreCommand() *cobra.Command {
	var target, disk string
	cmd := &cobra.Command{
		Use:   "restore VM latest|ID [--target FILE|DEVICE]",
		Short: "Restore a disk image, to stdout or in place",
		Long: `Restore one disk of a generation. Without --target the image streams to
stdout in order. With --target it is written in place into a file (created
if missing, zero ranges left as holes) or block device, writing only the
ranges that differ. Every segment is authenticated before it is written, and
the whole image is checked against the digest recorded at backup time; any
damage stops the restore with an error naming the object.
ID may be any unique prefix of a generation ID; latest is the VM's newest.`,
		Example: `  vmvault restore vm01 latest > vm01.raw
  vmvault restore vm01 3f2a9c1b --target /dev/vg0/vm01
  vmvault restore vm01 latest --disk hdb --target hdb.raw`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if target == "" {
				if f, ok := a.stdout.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
					return withCode(exitUsage, errors.New("refusing to write a disk image to a terminal: redirect stdout or use --target"))
				}
			}
			return a.withRepo(ctx, repo.SharedLock, "restore "+args[0], func(r *repo.Repository) error {
				m, err := r.FindManifest(ctx, args[0], args[1])
				if err != nil {
					return err
				}
				var st repo.RestoreStats
				if target != "" {
					st, err = r.RestoreTo(ctx, m, disk, target)
				} else {
					w := bufio.NewWriterSize(a.stdout, 1<<20)
					st, err = r.Restore(ctx, m, disk, w)
					if err == nil {
						err = w.Flush()
					}
				}
				if err != nil {
					return fmt.Errorf("restore %s %s: %w", m.VM, m.ShortID(), err)
				}
				a.log.Info("restored", "vm", m.VM, "generation", m.ShortID(), "bytes", st.Bytes, "written", st.Written, "skipped", st.Skipped)
				return nil
			})
		},
	}
	cmd.Flags().StringVarP(&target, "target", "t", "", "write into this file or block device in place instead of stdout")
	cmd.Flags().StringVar(&disk, "disk", "", "which disk of a multi-disk generation")
	return cmd
}
