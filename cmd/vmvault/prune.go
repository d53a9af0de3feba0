package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"vmvault/repo"
	"vmvault/retention"
)

// policyFlags are the --keep-* flags shared by forget and prune.
type policyFlags struct {
	last, hourly, daily, weekly, monthly, yearly int
	within                                       string
	tags                                         []string
	allowEmpty, dryRun                           bool
}

func (p *policyFlags) register(cmd *cobra.Command) {
	f := cmd.Flags()
	f.IntVar(&p.last, "keep-last", 0, "keep the N newest generations")
	f.IntVar(&p.hourly, "keep-hourly", 0, "keep the newest generation of each of the last N hours")
	f.IntVar(&p.daily, "keep-daily", 0, "keep the newest generation of each of the last N days")
	f.IntVar(&p.weekly, "keep-weekly", 0, "keep the newest generation of each of the last N ISO weeks")
	f.IntVar(&p.monthly, "keep-monthly", 0, "keep the newest generation of each of the last N months")
	f.IntVar(&p.yearly, "keep-yearly", 0, "keep the newest generation of each of the last N years")
	f.StringVar(&p.within, "keep-within", "", "keep every generation within this duration of the newest (e.g. 7d, 1y2m)")
	f.StringArrayVar(&p.tags, "keep-tag", nil, "keep every generation with this tag (repeatable)")
	f.BoolVar(&p.allowEmpty, "allow-empty", false, "allow removing the newest generation of a VM")
	f.BoolVarP(&p.dryRun, "dry-run", "n", false, "only show what would be removed")
}

func (p *policyFlags) policy() (retention.Policy, error) {
	pol := retention.Policy{Last: p.last, Hourly: p.hourly, Daily: p.daily, Weekly: p.weekly,
		Monthly: p.monthly, Yearly: p.yearly, Tags: p.tags, AllowEmpty: p.allowEmpty}
	if p.within != "" {
		d, err := retention.ParseDuration(p.within)
		if err != nil {
			return pol, fmt.Errorf("--keep-within: %w", err)
		}
		pol.Within = d
	}
	return pol, pol.Validate()
}

// forgetResult is the JSON form of forget/prune.
type forgetResult struct {
	Status    string           `json:"status"` // ok (or dry-run)
	VMs       []retentionVM    `json:"vms"`
	Decisions []decisionJSON   `json:"generations"`
	Removed   int              `json:"removed"`
	Prune     *repo.PruneStats `json:"prune,omitempty"`
	DryRun    bool             `json:"dry_run"`
	Duration  float64          `json:"duration_seconds"`
}

// retentionVM is one VM's part of a forget/prune run.
type retentionVM struct {
	VM      string `json:"vm"`
	Kept    int    `json:"kept"`
	Removed int    `json:"removed"`
}

// perVM counts the decisions of each VM, in order of appearance.
func perVM(ds []decisionJSON) []retentionVM {
	out := []retentionVM{}
	idx := map[string]int{}
	for _, d := range ds {
		i, ok := idx[d.VM]
		if !ok {
			i = len(out)
			idx[d.VM] = i
			out = append(out, retentionVM{VM: d.VM})
		}
		if d.Keep {
			out[i].Kept++
		} else {
			out[i].Removed++
		}
	}
	return out
}

type decisionJSON struct {
	ID      string    `json:"id"`
	VM      string    `json:"vm"`
	Time    time.Time `json:"time"`
	Keep    bool      `json:"keep"`
	Reasons []string  `json:"reasons"`
}

// applyPolicy decides which generations go; it prints the decisions.
func (a *app) applyPolicy(ctx context.Context, r *repo.Repository, vm string, policyFor func(vm string) retention.Policy) ([]decisionJSON, []string, error) {
	ms, err := r.Manifests(ctx, vm)
	if err != nil {
		return nil, nil, err
	}
	byID := map[string]*repo.Manifest{}
	byVM := map[string][]retention.Generation{}
	var vms []string
	for _, m := range ms {
		if byVM[m.VM] == nil {
			vms = append(vms, m.VM)
		}
		byVM[m.VM] = append(byVM[m.VM], retention.Generation{ID: m.ID, Time: m.Time, Tags: m.Tags, Group: repo.GroupKey(m)})
		byID[m.ID] = m
	}
	sort.Strings(vms)
	var out []decisionJSON
	var remove []string
	now := time.Now()
	for _, v := range vms {
		for _, d := range retention.Apply(byVM[v], policyFor(v), now, time.Local) {
			m := byID[d.ID]
			out = append(out, decisionJSON{ID: d.ID, VM: m.VM, Time: m.Time, Keep: d.Keep, Reasons: d.Reasons})
			if !d.Keep {
				remove = append(remove, d.ID)
			}
			if d.Future {
				a.log.Warn("generation dated in the future (clock skew or forged time): kept, never counted as newest", "vm", m.VM, "generation", m.ShortID(), "time", m.Time)
			}
		}
	}
	return out, remove, nil
}

// configPolicies returns the retention policy of each VM from the
// configuration file ([vm.X] retention, else [retention]), and whether any
// VM has one. Flags' --allow-empty carries over.
func (a *app) configPolicies(allowEmpty bool) (func(string) retention.Policy, bool, error) {
	cfg, err := a.loadConfig(false)
	if err != nil || cfg == nil {
		return nil, false, err
	}
	found := !cfg.Retention.Empty()
	for _, v := range cfg.VMs {
		if v.Retention != nil && !v.Retention.Empty() {
			found = true
		}
	}
	return func(vm string) retention.Policy {
		p := cfg.Retention
		if v := cfg.VMs[vm]; v != nil && v.Retention != nil {
			p = *v.Retention
		}
		p.AllowEmpty = allowEmpty
		return p
	}, found, nil
}

func (a *app) printDecisions(ds []decisionJSON) {
	for _, d := range ds {
		verdict := "remove"
		if d.Keep {
			verdict = "keep (" + strings.Join(d.Reasons, ", ") + ")"
		}
		fmt.Fprintf(a.stdout, "%s  %-12s %s  %s\n", d.ID[:8], d.VM, d.Time.Local().Format("2006-01-02 15:04:05 MST"), verdict)
	}
}

func (a *app) forgetCommand() *cobra.Command {
	var pf policyFlags
	cmd := &cobra.Command{
		Use:   "forget [VM] --keep-…",
		Short: "Remove generations by a retention policy (manifests only; see prune)",
		Long: `Apply a grandfather-father-son retention policy per VM and disk set and
remove the generations it does not keep. Periods are calendar periods in
this host's time zone. The newest generation of a VM is never removed
unless --allow-empty; a generation dated in the future is kept and never
counts as newest. Data is reclaimed by prune.`,
		Example: `  vmvault forget vm01 --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run
  vmvault forget --keep-last 3`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.forgetPrune(cmd.Context(), args, &pf, false)
		},
	}
	pf.register(cmd)
	return cmd
}

func (a *app) pruneCommand() *cobra.Command {
	var pf policyFlags
	cmd := &cobra.Command{
		Use:   "prune [VM] [--keep-…]",
		Short: "Remove generations by policy and reclaim unreferenced data",
		Long: `With --keep-* flags, first forget generations as 'forget' does; then
delete every data object no remaining generation references and
consolidate the index. Prune takes an exclusive lock: it waits for (or,
without --retry-lock, refuses while) backups run. Interrupting it at any
point leaves a sound repository; the next prune finishes the job. On an
append-only SFTP account prune is refused: run it on the backup server
against the repository's local path.`,
		Example: `  vmvault prune --keep-daily 7 --keep-weekly 4
  vmvault prune vm01 --keep-daily 7 --keep-weekly 4 --dry-run
  vmvault prune        # reclaim space only`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.forgetPrune(cmd.Context(), args, &pf, true)
		},
	}
	pf.register(cmd)
	return cmd
}

func (a *app) forgetPrune(ctx context.Context, args []string, pf *policyFlags, prune bool) error {
	start := time.Now()
	vm := ""
	if len(args) == 1 {
		vm = args[0]
	}
	pol, err := pf.policy()
	if err != nil {
		return withCode(exitUsage, err)
	}
	policyFor := func(string) retention.Policy { return pol }
	havePolicy := !pol.Empty()
	if !havePolicy {
		// No --keep-* flags: the configuration's policies, if any.
		pf, ok, err := a.configPolicies(pol.AllowEmpty)
		if err != nil {
			return err
		}
		if ok {
			policyFor, havePolicy = pf, true
		}
	}
	if !havePolicy && !prune {
		return withCode(exitUsage, errors.New("forget: no policy given (--keep-daily, --keep-last, … or [retention] in the configuration)"))
	}
	command := "forget"
	if prune {
		command = "prune"
	}
	return a.withRepo(ctx, !pf.dryRun, command, func(r *repo.Repository) error {
		if !pf.dryRun {
			if err := r.CheckDeletable(ctx); err != nil {
				return err
			}
		}
		res := forgetResult{DryRun: pf.dryRun}
		var remove []string
		if havePolicy {
			ds, rm, err := a.applyPolicy(ctx, r, vm, policyFor)
			if err != nil {
				return err
			}
			res.Decisions, remove = ds, rm
			res.Removed = len(rm)
			if !a.jsonOut {
				a.printDecisions(ds)
			}
			if !pf.dryRun {
				if err := r.Forget(ctx, rm); err != nil {
					return err
				}
			}
		}
		if prune {
			exclude := map[string]bool{}
			if pf.dryRun {
				for _, id := range remove {
					exclude[id] = true
				}
			}
			st, err := r.Prune(ctx, pf.dryRun, exclude)
			if err != nil {
				return err
			}
			res.Prune = st
		}
		res.Duration = time.Since(start).Seconds()
		res.Status = "ok"
		if pf.dryRun {
			res.Status = "dry-run"
		}
		res.VMs = perVM(res.Decisions)
		if res.Decisions == nil {
			res.Decisions = []decisionJSON{}
		}
		if a.jsonOut {
			if err := printJSON(a.stdout, res); err != nil {
				return err
			}
		}
		verb := map[bool]string{true: "would remove", false: "removed"}[pf.dryRun]
		for _, v := range res.VMs {
			a.report(slog.LevelInfo, fmt.Sprintf("%s: kept %d, %s %d generation(s)", v.VM, v.Kept, verb, v.Removed))
		}
		line := fmt.Sprintf("%s: %s %d generation(s)", command, verb, res.Removed)
		if res.Prune != nil {
			line += fmt.Sprintf(", %s %d object(s) freeing %s, kept %d object(s) (%s)", verb, res.Prune.ObjectsRemoved,
				humanBytes(res.Prune.BytesRemoved), res.Prune.ObjectsKept, humanBytes(res.Prune.BytesKept))
		}
		a.report(slog.LevelInfo, fmt.Sprintf("%s, %s", line, time.Since(start).Round(10*time.Millisecond)))
		return nil
	})
}

func (a *app) statsCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "stats [VM]",
		Short: "Show sizes, deduplication and compression per VM and in total",
		Example: `  vmvault stats
  vmvault stats vm01 --json`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vm := ""
			if len(args) == 1 {
				vm = args[0]
			}
			return a.withRepo(cmd.Context(), false, "stats", func(r *repo.Repository) error {
				st, err := r.Stats(cmd.Context(), vm)
				if err != nil {
					return err
				}
				if a.jsonOut {
					return printJSON(a.stdout, st)
				}
				for _, s := range st {
					fmt.Fprintf(a.stdout, "%-12s %4d generation(s)  logical %10s  unique %10s  stored %10s  dedup %.2fx  compression %.2fx\n",
						s.Group, s.Generations, humanBytes(s.LogicalBytes), humanBytes(s.UniqueBytes), humanBytes(s.StoredBytes), s.DedupRatio, s.CompressionRate)
				}
				return nil
			})
		},
	}
}

func (a *app) unlockCommand() *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "unlock [--remove-all]",
		Short: "Remove stale locks (or all locks)",
		Long: `Remove locks whose holder is gone: not refreshed for 30 minutes, or a
process on this host that no longer exists. --remove-all removes every lock:
only do that when you know no vmvault process uses the repository.`,
		Example: `  vmvault unlock
  vmvault unlock --remove-all`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := a.openRepo(cmd.Context())
			if err != nil {
				return err
			}
			defer r.Backend().Close()
			if err := r.CheckDeletable(cmd.Context()); err != nil {
				return err
			}
			n, err := r.RemoveLocks(cmd.Context(), all)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stderr, "removed %d lock(s)\n", n)
			return nil
		},
	}
	cmd.Flags().BoolVar(&all, "remove-all", false, "remove all locks, not only stale ones")
	return cmd
}
