package main

import (
	"fmt"
	"log/slog"

	"github.com/spf13/cobra"

	"vmvault/repo"
)

func (a *app) repairCommand() *cobra.Command {
	var opts repo.RepairOptions
	cmd := &cobra.Command{
		Use:   "repair [OBJECT...]",
		Short: "Quarantine damaged data objects so the next backup stores their content again",
		Long: `Move damaged data objects out of the way and out of the index, so that the
next backup stores their content again (an object's name is its ID and is
never overwritten, so a damaged one must go before it can be replaced).

With OBJECT names (as a failed backup or check prints them: data/xx/<id>),
each is read and verified first; a sound object is left alone. Without,
repair runs check (--read-data: with all data decrypted and verified) and
repairs every damaged data object it finds, and every manifest that fails
authentication (planted by someone with add-only access, or damaged: no
restore can use it, and it stops prune).

Nothing is deleted that cannot be put back: each object is copied to
quarantine/<name>.<unix time> before it is removed. Segment lists that name
a damaged chunk leave the index too. Repair then lists the generations that
stay damaged: the next backup of the same data heals them; or forget them.
It takes the exclusive lock and needs delete access: on an append-only
repository run it on the server against the local path. Exit 3 when
generations stay damaged.`,
		Example: `  vmvault repair --read-data
  vmvault repair data/3f/3f2a…        # the object a failed backup named
  vmvault repair --read-data --dry-run`,
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.Objects = args
			return a.withRepo(cmd.Context(), repo.ExclusiveLock, "repair", func(r *repo.Repository) error {
				rep, err := r.Repair(cmd.Context(), opts)
				if err != nil {
					return err
				}
				if a.jsonOut {
					if err := printJSON(a.stdout, rep); err != nil {
						return err
					}
				} else {
					out := a.textOut() // generation names come from the repository
					verb := "quarantined"
					if opts.DryRun {
						verb = "would quarantine"
					}
					for _, q := range rep.Quarantined {
						if q.To == "" {
							fmt.Fprintf(out, "%s: missing, removed from the index (%s)\n", q.Object, q.Problem)
						} else {
							fmt.Fprintf(out, "%s %s -> %s (%s)\n", verb, q.Object, q.To, q.Problem)
						}
					}
					for _, s := range rep.Sound {
						fmt.Fprintf(out, "sound, left alone: %s\n", s)
					}
					for _, d := range rep.Unhandled {
						fmt.Fprintf(out, "not repaired: %s\n", d.String())
					}
					for _, g := range rep.Damaged {
						fmt.Fprintf(out, "damaged generation: %s\n", g)
					}
				}
				a.report(slog.LevelInfo, fmt.Sprintf("repair: %d object(s) quarantined, %d index entries removed, %d generation(s) stay damaged until the next backup of their data",
					len(rep.Quarantined), rep.Deindexed, len(rep.Damaged)))
				if len(rep.Damaged) > 0 || len(rep.Unhandled) > 0 {
					a.code = exitPartial
				}
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&opts.ReadData, "read-data", false, "find damage by decrypting and verifying all data (without OBJECT names)")
	cmd.Flags().BoolVar(&opts.DryRun, "dry-run", false, "report what would be done, change nothing")
	return cmd
}
