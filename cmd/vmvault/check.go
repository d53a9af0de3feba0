package main

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"vmvault/repo"
)

func (a *app) checkCommand() *cobra.Command {
	var readData bool
	var subset string
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Verify the repository's structure, and optionally its data",
		Long: `Verify that every generation's manifest opens and that every object it
references exists with a sane header. --read-data also decrypts every
referenced chunk and verifies it against its ID, and hashes each segment's
assembled content to compare it with the segment's ID (so a segment list
naming sound chunks in a wrong order is found too); --read-data-subset
verifies chunks only, for a random part (e.g. 10%; at least one chunk). Each damaged object is named with the
generations it affects; any damage exits 1.`,
		Example: `  vmvault check
  vmvault check --read-data
  vmvault check --read-data-subset 10%`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts := repo.CheckOptions{ReadData: readData}
			if subset != "" {
				f, err := parsePercent(subset)
				if err != nil {
					return withCode(exitUsage, err)
				}
				opts.Subset = f
			}
			return a.withRepo(cmd.Context(), repo.SharedLock, "check", func(r *repo.Repository) error {
				return a.check(cmd.Context(), r, opts)
			})
		},
	}
	cmd.Flags().BoolVar(&readData, "read-data", false, "decrypt and verify all data")
	cmd.Flags().StringVar(&subset, "read-data-subset", "", "decrypt and verify a random part of the data, e.g. 10%")
	return cmd
}

// checkResult is check's summary: the repository's report, and one entry
// per VM saying how many of its generations the damage affects.
type checkResult struct {
	repo.CheckReport
	Status   string    `json:"status"` // ok or damaged
	Duration float64   `json:"duration_seconds"`
	VMs      []checkVM `json:"vms"`
}

type checkVM struct {
	VM          string `json:"vm"`
	Generations int    `json:"generations"`
	Damaged     int    `json:"damaged_generations"`
}

func (a *app) check(ctx context.Context, r *repo.Repository, opts repo.CheckOptions) error {
	start := time.Now()
	rep, err := r.Check(ctx, opts)
	if err != nil {
		return err
	}
	ms, err := r.Manifests(ctx, "")
	if err != nil {
		return err
	}
	res := checkResult{CheckReport: *rep, Status: "ok", VMs: []checkVM{}}
	if res.Damage == nil {
		res.Damage = []repo.Damage{}
	}
	if !rep.OK() {
		res.Status = "damaged"
	}
	damaged := map[string]bool{} // "vm/shortid"
	for _, d := range rep.Damage {
		for _, g := range d.Generations {
			damaged[g] = true
		}
	}
	idx := map[string]int{}
	for _, m := range ms {
		i, ok := idx[m.VM]
		if !ok {
			i = len(res.VMs)
			idx[m.VM] = i
			res.VMs = append(res.VMs, checkVM{VM: m.VM})
		}
		res.VMs[i].Generations++
		if damaged[m.VM+"/"+m.ShortID()] {
			res.VMs[i].Damaged++
		}
	}
	res.Duration = time.Since(start).Seconds()
	if a.jsonOut {
		if err := printJSON(a.stdout, res); err != nil {
			return err
		}
	} else {
		for _, d := range rep.Damage {
			fmt.Fprintln(a.textOut(), "damaged: "+d.String())
		}
	}
	for _, v := range res.VMs {
		if v.Damaged > 0 {
			a.report(slog.LevelError, fmt.Sprintf("%s: DAMAGED, %d of %d generation(s) affected", v.VM, v.Damaged, v.Generations))
		} else {
			a.report(slog.LevelInfo, fmt.Sprintf("%s: ok, %d generation(s)", v.VM, v.Generations))
		}
	}
	verdict, level := "no errors", slog.LevelInfo
	if !rep.OK() {
		verdict, level = fmt.Sprintf("%d damaged objects", len(rep.Damage)), slog.LevelError
	}
	a.report(level, fmt.Sprintf("check: %d generations, %d segments (%d verified), %d chunks (%d read, %s), %d objects, %d unreferenced: %s, %s",
		rep.Manifests, rep.Segments, rep.SegmentsRead, rep.Chunks, rep.ChunksRead, humanBytes(rep.BytesRead), rep.Objects, rep.Unreferenced,
		verdict, time.Since(start).Round(10*time.Millisecond)))
	if !rep.OK() {
		return fmt.Errorf("%w: %d damaged objects (first: %s)", repo.ErrDamaged, len(rep.Damage), rep.Damage[0].String())
	}
	return nil
}

// parsePercent parses --read-data-subset: a percentage with its "%"
// ("0.5" alone is ambiguous: half a percent or half the data).
func parsePercent(s string) (float64, error) {
	num, ok := strings.CutSuffix(s, "%")
	f, err := strconv.ParseFloat(num, 64)
	if !ok || err != nil || f <= 0 || f > 100 {
		return 0, fmt.Errorf("--read-data-subset %q: want a percentage in (0%%, 100%%], e.g. 10%%", s)
	}
	return f / 100, nil
}
