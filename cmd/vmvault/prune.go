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
	within, tolerance                            string
	tags                                         []string
	allowEmpty, dryRun                           bool
	margin                                       time.Duration
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
	f.StringVar(&p.tolerance, "arrival-tolerance", "", "how far a generation's recorded time may lie before its arrival in the repository before it counts as unverified (default 26h)")
	f.BoolVarP(&p.dryRun, "dry-run", "n", false, "only show what would be removed")
}

func (p *policyFlags) policy() (retention.Policy, error) {
	pol := retention.Policy{Last: p.last, Hourly: p.hourly, Daily: p.daily, Weekly: p.weekly,
		Monthly: p.monthly, Yearly: p.yearly, Tags: p.tags, AllowEmpty: p.allowEmpty}
	if p.tolerance != "" {
		d, err := retention.ParseDuration(p.tolerance)
		if err != nil {
			return pol, fmt.Errorf("--arrival-tolerance: %w", err)
		}
		pol.ArrivalTolerance = d
	}
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
	Status     string           `json:"status"` // ok (or dry-run)
	VMs        []retentionVM    `json:"vms"`
	Decisions  []decisionJSON   `json:"generations"`
	Removed    int              `json:"removed"`
	Unverified int              `json:"unverified"`
	Prune      *repo.PruneStats `json:"prune,omitempty"`
	DryRun     bool             `json:"dry_run"`
	Duration   float64          `json:"duration_seconds"`
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
	ID         string    `json:"id"`
	VM         string    `json:"vm"`
	Time       time.Time `json:"time"`
	Arrived    time.Time `json:"arrived,omitzero"`
	Keep       bool      `json:"keep"`
	Unverified bool      `json:"unverified,omitempty"`
	Reasons    []string  `json:"reasons"`
}

// applyPolicy decides which generations go and returns the decisions
// and the IDs to remove; it prints nothing. A generation whose recorded
// time disagrees with its arrival is kept and warned about.
func (a *app) applyPolicy(ctx context.Context, r *repo.Repository, vm string, policyFor func(vm string) retention.Policy) ([]decisionJSON, []string, error) {
	ms, err := r.Manifests(ctx, vm)
	if err != nil {
		return nil, nil, err
	}
	if vm != "" && len(ms) == 0 {
		return nil, nil, noGenerations(ctx, r, vm)
	}
	byID := map[string]*repo.Manifest{}
	byVM := map[string][]retention.Generation{}
	var vms []string
	for _, m := range ms {
		if byVM[m.VM] == nil {
			vms = append(vms, m.VM)
		}
		byVM[m.VM] = append(byVM[m.VM], retention.Generation{ID: m.ID, Time: m.Time, Arrived: m.Arrived, Tags: m.Tags, Group: repo.GroupKey(m)})
		byID[m.ID] = m
	}
	sort.Strings(vms)
	var out []decisionJSON
	var remove []string
	now := time.Now()
	for _, v := range vms {
		for _, d := range retention.Apply(byVM[v], policyFor(v), now, time.Local) {
			m := byID[d.ID]
			out = append(out, decisionJSON{ID: d.ID, VM: m.VM, Time: m.Time, Arrived: m.Arrived, Keep: d.Keep, Unverified: d.Unverified, Reasons: d.Reasons})
			if !d.Keep {
				remove = append(remove, d.ID)
			}
			switch {
			case d.Future:
				a.log.Warn("generation dated in the future (clock skew or forged time): kept, never counted as newest", "vm", m.VM, "generation", m.ShortID(), "time", m.Time)
			case d.Unverified:
				a.log.Warn("generation's recorded time disagrees with when it arrived (an import, or forged): kept, counted by no rule", "vm", m.VM, "generation", m.ShortID(), "time", m.Time, "arrived", m.Arrived)
			}
		}
	}
	return out, remove, nil
}

// configPolicies returns the retention policy of each VM from the
// configuration file ([vm.X] retention, else [retention]), and whether any
// VM has one. Flags' --allow-empty and --arrival-tolerance carry over.
func (a *app) configPolicies(allowEmpty bool, tolerance time.Duration) (func(string) retention.Policy, bool, error) {
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
		p.AllowEmpty, p.ArrivalTolerance = allowEmpty, tolerance
		return p
	}, found, nil
}

func (a *app) printDecisions(ds []decisionJSON) {
	for _, d := range ds {
		verdict := "remove"
		if d.Keep {
			verdict = "keep (" + strings.Join(d.Reasons, ", ") + ")"
		}
		fmt.Fprintf(a.textOut(), "%s  %-12s %s  %s\n", d.ID[:8], d.VM, d.Time.Local().Format("2006-01-02 15:04:05 MST"), verdict)
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
unless --allow-empty. A generation dated in the future, or whose recorded
time lies more than --arrival-tolerance before it arrived in the
repository (an import, or a time forged by a client), is kept, reported
and counts for no rule. Data is reclaimed by prune.`,
		Example: `  vmvault forget vm01 --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run
  vmvault forget --keep-last 3`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.forgetPrune(cmd.Context(), args, &pf, forgetOnly)
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
		Long: `With --keep-* flags, first decide as 'forget' does which generations go;
then plan: mark every object the remaining generations reference, and
list the unreferenced data objects, the index objects a consolidated
index replaces, and stale locks. --dry-run prints that plan; otherwise
prune prints it and carries it out. Unreferenced objects younger than
--safety-margin (by the repository's clock) are kept: they may belong to
a backup still running. Prune takes an exclusive lock: it waits for (or,
without --retry-lock, refuses while) backups run. Interrupting it at any
point leaves a sound repository; the next prune finishes the job. On an
append-only SFTP account prune is refused: run it on the backup server
against the repository's local path.`,
		Example: `  vmvault prune --keep-daily 7 --keep-weekly 4
  vmvault prune vm01 --keep-daily 7 --keep-weekly 4 --dry-run
  vmvault prune        # reclaim space only`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.forgetPrune(cmd.Context(), args, &pf, forgetAndPrune)
		},
	}
	pf.register(cmd)
	cmd.Flags().DurationVar(&pf.margin, "safety-margin", repo.DefaultPruneMargin, "keep unreferenced objects younger than this (0 only when no backup can be running)")
	return cmd
}

// pruneMode says whether forgetPrune also prunes.
type pruneMode int

const (
	forgetOnly pruneMode = iota + 1
	forgetAndPrune
)

// policyFor returns the retention policy of each VM: the flags', else
// the configuration's; ok is false when there is none.
func (a *app) policyFor(pf *policyFlags) (func(string) retention.Policy, bool, error) {
	pol, err := pf.policy()
	if err != nil {
		return nil, false, withCode(exitUsage, err)
	}
	if !pol.Empty() {
		return func(string) retention.Policy { return pol }, true, nil
	}
	// No --keep-* flags: the configuration's policies, if any.
	return a.configPolicies(pol.AllowEmpty, pol.ArrivalTolerance)
}

func (a *app) forgetPrune(ctx context.Context, args []string, pf *policyFlags, mode pruneMode) error {
	start := time.Now()
	vm := ""
	if len(args) == 1 {
		vm = args[0]
	}
	policyFor, havePolicy, err := a.policyFor(pf)
	if err != nil {
		return err
	}
	if pf.margin < 0 {
		return withCode(exitUsage, fmt.Errorf("--safety-margin %s: must not be negative", pf.margin))
	}
	if !havePolicy && mode == forgetOnly {
		return withCode(exitUsage, errors.New("forget: no policy given (--keep-daily, --keep-last, … or [retention] in the configuration)"))
	}
	command, lock := "forget", repo.ExclusiveLock
	if mode == forgetAndPrune {
		command = "prune"
	}
	if pf.dryRun {
		lock = repo.SharedLock
	}
	return a.withRepo(ctx, lock, command, func(r *repo.Repository) error {
		if !pf.dryRun {
			if err := r.CheckDeletable(ctx); err != nil {
				return err
			}
		}
		res := forgetResult{DryRun: pf.dryRun, Status: "ok", Decisions: []decisionJSON{}}
		var remove []string
		if havePolicy {
			ds, rm, err := a.applyPolicy(ctx, r, vm, policyFor)
			if err != nil {
				return err
			}
			res.Decisions, remove, res.Removed = ds, rm, len(rm)
			for _, d := range ds {
				if d.Unverified {
					res.Unverified++
				}
			}
			if !a.jsonOut {
				a.printDecisions(ds)
			}
		}
		var err error
		if mode == forgetAndPrune {
			res.Prune, err = a.prune(ctx, r, remove, pf)
		} else if !pf.dryRun {
			err = r.Forget(ctx, remove)
		}
		if err != nil {
			return err
		}
		if pf.dryRun {
			res.Status = "dry-run"
		}
		res.VMs = perVM(res.Decisions)
		res.Duration = time.Since(start).Seconds()
		return a.reportForget(command, res)
	})
}

// prune makes the plan, prints it, and (unless a dry run) executes it.
func (a *app) prune(ctx context.Context, r *repo.Repository, forget []string, pf *policyFlags) (*repo.PruneStats, error) {
	plan, err := r.PlanPrune(ctx, repo.PruneOptions{Forget: forget, Margin: pf.margin})
	if err != nil {
		return nil, err
	}
	defer plan.Close()
	if !a.jsonOut {
		if err := a.printPlan(plan); err != nil {
			return nil, err
		}
	}
	if pf.dryRun {
		return &plan.Stats, nil
	}
	return plan.Execute(ctx)
}

// printPlan prints a prune plan on stdout: what a dry run shows is what
// execution does. With -v it lists every object to remove.
func (a *app) printPlan(p *repo.PrunePlan) error {
	st := p.Stats
	margin := time.Duration(st.MarginSeconds) * time.Second
	lines := []string{
		fmt.Sprintf("forget %d generation(s)", st.Forgotten),
		fmt.Sprintf("keep %d object(s) (%s) referenced by %d generation(s)", st.ObjectsKept, humanBytes(st.BytesKept), st.Generations),
		fmt.Sprintf("remove %d unreferenced object(s) (%s)", st.ObjectsRemoved, humanBytes(st.BytesRemoved)),
		fmt.Sprintf("keep %d unreferenced object(s) (%s) younger than the safety margin %s", st.YoungKept, humanBytes(st.YoungBytesKept), margin),
		fmt.Sprintf("write %d index object(s), remove %d (keep %d younger than the margin)", st.IndexWritten, st.IndexRemoved, st.IndexYoungKept),
		fmt.Sprintf("remove %d stale lock object(s) and temporary files of interrupted uploads", st.LocksRemoved),
	}
	for _, l := range lines {
		fmt.Fprintln(a.stdout, "plan: "+l)
	}
	if a.verbose == 0 {
		return nil
	}
	for _, id := range p.Forget {
		fmt.Fprintln(a.stdout, "plan: forget manifests/"+id)
	}
	return p.Garbage(func(name string, size int64) error {
		_, err := fmt.Fprintf(a.stdout, "plan: remove %s (%s)\n", name, humanBytes(size))
		return err
	})
}

// reportForget prints forget/prune's JSON or summary lines.
func (a *app) reportForget(command string, res forgetResult) error {
	if a.jsonOut {
		if err := printJSON(a.stdout, res); err != nil {
			return err
		}
	}
	verb := map[bool]string{true: "would remove", false: "removed"}[res.DryRun]
	for _, v := range res.VMs {
		a.report(slog.LevelInfo, fmt.Sprintf("%s: kept %d, %s %d generation(s)", v.VM, v.Kept, verb, v.Removed))
	}
	if res.Unverified > 0 {
		a.report(slog.LevelWarn, fmt.Sprintf("%s: %d generation(s) with a recorded time that disagrees with their arrival: kept, counted by no rule (see docs/security.md)", command, res.Unverified))
	}
	line := fmt.Sprintf("%s: %s %d generation(s)", command, verb, res.Removed)
	if res.Prune != nil {
		line += fmt.Sprintf(", %s %d object(s) freeing %s, kept %d object(s) (%s)", verb, res.Prune.ObjectsRemoved,
			humanBytes(res.Prune.BytesRemoved), res.Prune.ObjectsKept, humanBytes(res.Prune.BytesKept))
	}
	a.report(slog.LevelInfo, fmt.Sprintf("%s, %s", line, time.Duration(res.Duration*float64(time.Second)).Round(10*time.Millisecond)))
	return nil
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
			return a.withRepo(cmd.Context(), repo.SharedLock, "stats", func(r *repo.Repository) error {
				st, err := r.Stats(cmd.Context(), vm)
				if err != nil {
					return err
				}
				if vm != "" && st[len(st)-1].Generations == 0 {
					return noGenerations(cmd.Context(), r, vm)
				}
				if a.jsonOut {
					return printJSON(a.stdout, st)
				}
				for _, s := range st {
					fmt.Fprintf(a.textOut(), "%-12s %4d generation(s)  logical %10s  unique %10s  stored %10s  dedup %.2fx  compression %.2fx\n",
						s.VM, s.Generations, humanBytes(s.LogicalBytes), humanBytes(s.UniqueBytes), humanBytes(s.StoredBytes), s.DedupRatio, s.CompressionRate)
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
		Long: `Remove locks that protect nothing any more: not rewritten for 30 minutes
by the repository's clock, or held by a process of this host, boot and PID
namespace that no longer exists; also unreadable objects under locks/ of
that age. --remove-all removes every lock: only do that when you know no
vmvault process uses the repository (a running backup then fails instead
of committing).`,
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
			which := repo.StaleLocks
			if all {
				which = repo.AllLocks
			}
			n, err := r.RemoveLocks(cmd.Context(), which)
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
