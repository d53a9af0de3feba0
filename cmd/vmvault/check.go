package main

import (
	"fmt"
	"strconv"
	"strings"

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
referenced chunk and verifies it against its ID; --read-data-subset does so
for a random part (e.g. 10%). Each damaged object is named with the
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
			return a.withRepo(cmd.Context(), false, "check", func(r *repo.Repository) error {
				rep, err := r.Check(cmd.Context(), opts)
				if err != nil {
					return err
				}
				if a.jsonOut {
					if err := printJSON(a.stdout, rep); err != nil {
						return err
					}
				} else {
					for _, d := range rep.Damage {
						fmt.Fprintln(a.stdout, "damaged: "+d.String())
					}
				}
				fmt.Fprintf(a.stderr, "check: %d generations, %d segments, %d chunks (%d read, %s), %d objects, %d unreferenced: %s\n",
					rep.Manifests, rep.Segments, rep.Chunks, rep.ChunksRead, humanBytes(rep.BytesRead), rep.Objects, rep.Unreferenced,
					map[bool]string{true: "no errors", false: fmt.Sprintf("%d damaged objects", len(rep.Damage))}[rep.OK()])
				if !rep.OK() {
					return fmt.Errorf("%w: %d damaged objects (first: %s)", repo.ErrDamaged, len(rep.Damage), rep.Damage[0].String())
				}
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&readData, "read-data", false, "decrypt and verify all data")
	cmd.Flags().StringVar(&subset, "read-data-subset", "", "decrypt and verify a random part of the data, e.g. 10%")
	return cmd
}

func parsePercent(s string) (float64, error) {
	f, err := strconv.ParseFloat(strings.TrimSuffix(s, "%"), 64)
	if err != nil || f <= 0 || f > 100 {
		return 0, fmt.Errorf("--read-data-subset %q: want a percentage in (0, 100]", s)
	}
	return f / 100, nil
}
