package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"vmvault/config"
	"vmvault/repo"
	"vmvault/vmbackup"
)

// vmOutcome is what one VM's backup did: the summary line on stderr, the
// JSON object on stdout (--json), the metrics file.
type vmOutcome struct {
	backupSummary
	Status       string  `json:"status"` // ok, warning, failed
	Error        string  `json:"error,omitempty"`
	GuestHeld    float64 `json:"guest_held_seconds"`
	SnapshotPeak float64 `json:"snapshot_peak_percent"`
	// SnapshotWindow is how long the snapshots existed, in seconds.
	SnapshotWindow float64  `json:"snapshot_window_seconds"`
	Warnings       []string `json:"warnings,omitempty"`

	quiesced, snapshotted bool // whether GuestHeld and SnapshotPeak mean anything
}

func (o vmOutcome) line() string {
	if o.Status == "failed" {
		return fmt.Sprintf("%s: FAILED: %s", o.VM, o.Error)
	}
	disks := fmt.Sprintf("%d disks", len(o.Disks))
	if len(o.Disks) == 1 {
		disks = "1 disk"
	}
	s := fmt.Sprintf("%s: %s, %s, %s read, %s new (%s stored), %s", o.VM, o.Status, disks,
		humanBytes(o.BytesRead), humanBytes(o.BytesNew), humanBytes(o.BytesStored),
		time.Duration(o.Duration*float64(time.Second)).Round(10*time.Millisecond))
	if o.quiesced {
		s += fmt.Sprintf(", guest held %.1fs", o.GuestHeld)
	}
	if o.snapshotted {
		s += fmt.Sprintf(", snapshot peak %.0f %% over %.1fs", o.SnapshotPeak, o.SnapshotWindow)
	}
	s += ", generation " + o.ID[:8]
	if len(o.Warnings) > 0 {
		s += " (warnings: " + strings.Join(o.Warnings, "; ") + ")"
	}
	return s
}

// finishVM reports one VM's outcome: the summary line on stderr (or the
// JSON object on stdout), syslog, and the metrics file.
func (a *app) finishVM(o vmOutcome) {
	if o.Disks == nil {
		o.Disks = []string{}
	}
	if o.DiskStats == nil {
		o.DiskStats = []diskSummary{}
	}
	level := slog.LevelInfo
	switch o.Status {
	case "warning":
		level = slog.LevelWarn
	case "failed":
		level = slog.LevelError
	}
	if a.jsonOut {
		if err := printJSON(a.stdout, o); err != nil {
			a.log.Error("writing the JSON summary failed", "err", err)
		}
	}
	a.report(level, o.line())
	if a.metricsFile != "" {
		if err := recordMetrics(a.metricsFile, o, time.Now()); err != nil {
			a.log.Error("recording metrics failed", "vm", o.VM, "err", err)
			a.code = max(a.code, exitPartial)
		}
	}
}

// recordFailure records, in the metrics file if there is one, that vm's
// backup failed before it produced an outcome of its own (bad source,
// repository not found, wrong password, …). The error itself is printed
// by run.
func (a *app) recordFailure(vm string, err error, start time.Time) {
	if a.metricsFile == "" {
		return
	}
	o := vmOutcome{Status: "failed", Error: oneLine(err)}
	o.VM, o.Duration = vm, time.Since(start).Seconds()
	if merr := recordMetrics(a.metricsFile, o, time.Now()); merr != nil {
		a.log.Error("recording metrics failed", "vm", vm, "err", merr)
	}
}

// backupConfigured backs up VMs from the configuration file, each in
// turn; one VM's failure does not stop the others.
func (a *app) backupConfigured(ctx context.Context, names []string, f backupFlags) error {
	if a.configPath == "" {
		if _, err := os.Stat(config.DefaultPath); err != nil {
			return withCode(exitUsage, fmt.Errorf("no --source given and no configuration file %s: give --source PATH or --config FILE", config.DefaultPath))
		}
	}
	cfg, err := a.loadConfig(configRequired)
	if err != nil {
		return err
	}
	if f.all {
		names = cfg.VMNames()
		if len(names) == 0 {
			return fmt.Errorf("configuration %s lists no VMs", cfg.Path)
		}
	}
	for _, n := range names {
		if cfg.VMs[n] == nil {
			return withCode(exitUsage, fmt.Errorf("VM %q is not in %s (configured: %s)", n, cfg.Path, strings.Join(cfg.VMNames(), ", ")))
		}
	}
	r, err := a.openRepo(ctx)
	if err != nil {
		// No VM gets backed up: the metrics must say so, not keep the
		// last run's status.
		if ctx.Err() == nil {
			for _, n := range names {
				a.recordFailure(n, err, time.Now())
			}
		}
		return err
	}
	defer r.Backend().Close()
	defer r.Close()
	var failed, warned int
	var firstErr error
	for _, n := range names {
		start := time.Now()
		o, err := a.backupVM(ctx, r, cfg.VMs[n], f)
		if err != nil {
			if ctx.Err() != nil {
				return err
			}
			failed++
			if firstErr == nil {
				firstErr = err
			}
			o = vmOutcome{Status: "failed", Error: oneLine(err)}
			o.VM = n
			o.Duration = time.Since(start).Seconds()
		} else if len(o.Warnings) > 0 {
			warned++
		}
		a.finishVM(o)
	}
	switch {
	case failed == len(names):
		if len(names) == 1 {
			return firstErr
		}
		return fmt.Errorf("all %d VM backups failed", failed)
	case failed > 0:
		return withCode(exitPartial, fmt.Errorf("%d of %d VM backups failed", failed, len(names)))
	case warned > 0:
		a.code = exitPartial
	}
	return nil
}

// backupVM backs up one configured VM (see package vmbackup).
func (a *app) backupVM(ctx context.Context, r *repo.Repository, vm *config.VM, f backupFlags) (vmOutcome, error) {
	plan, err := vmbackup.FromConfig(vm, a.log) // quiesce adds the vm field itself
	if err != nil {
		return vmOutcome{}, err
	}
	o, err := vmbackup.Run(ctx, vmbackup.Repo(r, a.retryLock), plan, a.runOptions(vm.Name, f))
	if err != nil {
		return vmOutcome{}, err
	}
	return outcome(o), nil
}

// runOptions are the settings every backup run shares.
func (a *app) runOptions(vm string, f backupFlags) vmbackup.Options {
	cacheDir := a.cacheDir
	if cacheDir == "" {
		cacheDir = repo.DefaultCacheDir()
	}
	readLimit, err := a.readSettings()
	if err != nil {
		a.log.Warn("reading without a limit", "err", err)
	}
	bk := config.Backup{FullEvery: config.DefaultFullEvery, VerifyUnchanged: config.DefaultVerifyUnchanged}
	if cfg, err := a.loadConfig(configOptional); err == nil && cfg != nil {
		bk = cfg.Backup
	}
	if f.verifySet {
		bk.VerifyUnchanged = f.verify
	}
	return vmbackup.Options{Locks: vmbackup.FileLocks{Dir: cacheDir}, Time: f.when, Tags: f.tags, SHA256: f.sha, Logger: a.log, ReadLimit: readLimit,
		VerifyUnchanged: bk.VerifyUnchanged, FullEvery: bk.FullEvery,
		Progress: func(disks []repo.DiskSource) (func(string, int64), func()) {
			return a.progress(vm, disks)
		}}
}

// outcome turns what a run did into the summary printed and recorded.
func outcome(o vmbackup.Outcome) vmOutcome {
	out := vmOutcome{backupSummary: summarize(o.Manifest), Status: "ok", Warnings: o.Warnings,
		quiesced: o.Quiesced, snapshotted: o.Snapshotted}
	if len(out.Warnings) > 0 {
		out.Status = "warning"
	}
	if o.Quiesced {
		out.GuestHeld = o.Quiesce.Held.Seconds()
	}
	out.SnapshotPeak = o.Snapshots.Peak
	out.SnapshotWindow = o.SnapshotWindow.Seconds()
	return out
}
