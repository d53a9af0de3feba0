package main

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"vmvault/repo"
	"vmvault/retention"
)

// generationJSON is one generation in `snapshots --json`.
type generationJSON struct {
	ID          string    `json:"id"`
	ShortID     string    `json:"short_id"`
	VM          string    `json:"vm"`
	Time        time.Time `json:"time"`
	Arrived     time.Time `json:"arrived,omitzero"` // when the repository received it (the store's clock)
	Unverified  bool      `json:"unverified,omitempty"`
	Host        string    `json:"host"`
	Tags        []string  `json:"tags"`
	Disks       []diskRef `json:"disks"`
	Size        int64     `json:"size"`
	BytesNew    int64     `json:"bytes_new"`
	BytesStored int64     `json:"bytes_stored"`
}

type diskRef struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256,omitempty"`
}

func (a *app) snapshotsCommand() *cobra.Command {
	return &cobra.Command{
		Use:     "generations [VM]",
		Aliases: []string{"snapshots", "list"}, // snapshots: restic users' habit
		Short:   "List generations (all VMs, or one)",
		Example: `  vmvault generations
  vmvault generations vm01 --json`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm := ""
			if len(args) == 1 {
				vm = args[0]
			}
			return a.withRepo(cmd.Context(), repo.SharedLock, "snapshots", func(r *repo.Repository) error {
				ms, err := r.Manifests(cmd.Context(), vm)
				if err != nil {
					return err
				}
				if vm != "" && len(ms) == 0 {
					return noGenerations(cmd.Context(), r, vm)
				}
				out := make([]generationJSON, 0, len(ms))
				for _, m := range ms {
					g := generationJSON{ID: m.ID, ShortID: m.ShortID(), VM: m.VM, Time: m.Time, Host: m.Host, Tags: m.Tags,
						BytesNew: m.Stats.BytesNew, BytesStored: m.Stats.BytesStored, Arrived: m.Arrived,
						Unverified: retention.Unverified(m.Time, m.Arrived, 0)}
					if g.Tags == nil {
						g.Tags = []string{}
					}
					for _, d := range m.Disks {
						g.Disks = append(g.Disks, diskRef{Name: d.Name, Size: d.Size, SHA256: d.SHA256})
						g.Size += d.Size
					}
					out = append(out, g)
				}
				if a.jsonOut {
					return printJSON(a.stdout, out)
				}
				tw := tabwriter.NewWriter(a.textOut(), 0, 0, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tVM\tTIME\tDISKS\tSIZE\tNEW\tSTORED\tTAGS")
				for _, g := range out {
					names := make([]string, len(g.Disks))
					for i, d := range g.Disks {
						names[i] = d.Name
					}
					when := g.Time.Local().Format("2006-01-02 15:04:05")
					if g.Unverified {
						when += " (unverified: arrived " + g.Arrived.Local().Format("2006-01-02 15:04") + ")"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", g.ShortID, g.VM, when,
						strings.Join(names, ","), humanBytes(g.Size), humanBytes(g.BytesNew), humanBytes(g.BytesStored), strings.Join(g.Tags, ","))
				}
				tw.Flush()
				fmt.Fprintf(a.stderr, "%d generation(s)\n", len(out))
				return nil
			})
		},
	}
}

// noGenerations is the error for a VM without generations (exit 1): a
// typo must not look like an empty list. It names the VMs that have some.
func noGenerations(ctx context.Context, r *repo.Repository, vm string) error {
	ms, err := r.Manifests(ctx, "")
	if err != nil {
		return err
	}
	seen := map[string]bool{}
	var vms []string
	for _, m := range ms {
		if !seen[m.VM] {
			seen[m.VM] = true
			vms = append(vms, m.VM)
		}
	}
	sort.Strings(vms)
	known := "none"
	if len(vms) > 0 {
		known = strings.Join(vms, ", ")
	}
	return fmt.Errorf("VM %q has no generations (VMs with generations: %s): %w", vm, known, repo.ErrNoSnapshot)
}
