package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"vmvault/config"
	"vmvault/quiesce"
	"vmvault/repo"
	"vmvault/snapshot"
)

// longBackup is when a running backup starts warning: the next night's
// run is due.
const longBackup = 24 * time.Hour

// vmLock is a per-VM lock on this host, so overlapping cron runs of the
// same VM exit at once instead of fighting over the snapshot.
type vmLock struct{ f *os.File }

func lockVM(dir, vm string) (*vmLock, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "vm-"+vm+".lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		pid, _ := io.ReadAll(f)
		f.Close()
		return nil, withCode(exitLocked, fmt.Errorf("a backup of %s is already running (PID %s, lock %s)", vm, strings.TrimSpace(string(pid)), path))
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return &vmLock{f: f}, nil
}

func (l *vmLock) unlock() { l.f.Close() }

// vmOutcome is what one VM's backup did: the summary line on stderr, the
// JSON object on stdout (--json), the metrics file.
type vmOutcome struct {
	backupSummary
	Status       string   `json:"status"` // ok, warning, failed
	Error        string   `json:"error,omitempty"`
	GuestHeld    float64  `json:"guest_held_seconds"`
	SnapshotPeak float64  `json:"snapshot_peak_percent"`
	Warnings     []string `json:"warnings,omitempty"`

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
		s += fmt.Sprintf(", snapshot peak %.0f %%", o.SnapshotPeak)
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
func (a *app) backupConfigured(ctx context.Context, names []string, all bool, tags []string, when time.Time) error {
	if a.configPath == "" {
		if _, err := os.Stat(config.DefaultPath); err != nil {
			return withCode(exitUsage, fmt.Errorf("no --source given and no configuration file %s: give --source PATH or --config FILE", config.DefaultPath))
		}
	}
	cfg, err := a.loadConfig(true)
	if err != nil {
		return err
	}
	if all {
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
		o, err := a.backupVM(ctx, r, cfg.VMs[n], tags, when)
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

// backupVM runs the whole sequence for one VM: leftovers, quiesce,
// snapshots, release, read, check, commit, cleanup.
func (a *app) backupVM(ctx context.Context, r *repo.Repository, vm *config.VM, tags []string, when time.Time) (vmOutcome, error) {
	var out vmOutcome
	log := a.log.With("vm", vm.Name)
	cacheDir := a.cacheDir
	if cacheDir == "" {
		cacheDir = repo.DefaultCacheDir()
	}
	vl, err := lockVM(cacheDir, vm.Name)
	if err != nil {
		return out, err
	}
	defer vl.unlock()
	lock, err := r.Lock(ctx, repo.SharedLock, "backup "+vm.Name, a.retryLock)
	if err != nil {
		return out, err
	}
	defer lock.Unlock()
	ctx = lock.Context() // cancelled when the lease is lost
	slow := time.AfterFunc(longBackup, func() {
		log.Warn("backup has been running for more than 24 hours")
	})
	defer slow.Stop()

	runner := snapshot.Exec{Sudo: vm.Sudo}
	var snapDisks []snapshot.Disk
	vgs := map[string]bool{}
	for _, d := range vm.Disks {
		if d.LV.IsZero() {
			continue
		}
		snapDisks = append(snapDisks, snapshot.Disk{Name: d.Name, Origin: snapshot.LV{VG: d.LV.VG, Name: d.LV.Name}, Size: d.SnapshotSize})
		vgs[d.LV.VG] = true
	}
	// Leftovers of a crashed run would make lvcreate fail (same name).
	for vg := range vgs {
		left, err := snapshot.FindLeftovers(ctx, runner, vg, vm.Name)
		if err != nil {
			return out, fmt.Errorf("VM %s: look for leftover snapshots: %w", vm.Name, err)
		}
		for _, lv := range left {
			log.Warn("removing leftover snapshot of an earlier run", "lv", lv.String())
			if err := snapshot.Remove(ctx, runner, lv); err != nil {
				return out, fmt.Errorf("VM %s: remove leftover snapshot %s: %w", vm.Name, lv, err)
			}
		}
	}

	qcfg, err := quiesceConfig(vm, a.log) // quiesce adds the vm field itself
	if err != nil {
		return out, err
	}
	q := quiesce.New(qcfg)
	var set *snapshot.Set
	var report quiesce.Report
	// Quiesce whenever there is something to quiesce or to snapshot; for
	// plain-path disks the hold still flushes the guest and records the
	// databases' state.
	if len(snapDisks) > 0 || vm.Guest != nil || len(vm.Databases) > 0 {
		hold, err := q.Hold(ctx)
		if err != nil {
			return out, err
		}
		if len(snapDisks) > 0 {
			set, err = snapshot.CreateSet(ctx, runner, vm.Name, snapDisks)
		}
		report = hold.Release(ctx)
		if err != nil {
			return out, fmt.Errorf("VM %s: %w", vm.Name, err)
		}
		if set != nil {
			defer func() {
				if err := set.RemoveAll(ctx); err != nil {
					log.Error("removing snapshots failed: remove them by hand (lvremove)", "err", err)
				}
			}()
		}
		if report.Err != nil {
			out.Warnings = append(out.Warnings, "release: "+oneLine(report.Err))
		}
		if report.Expired {
			return out, fmt.Errorf("VM %s: the quiesce hold expired before the snapshots existed; they are not consistent", vm.Name)
		}
		log.Info("guest released", "held", report.Held.Round(time.Millisecond))
	}
	for _, d := range report.Databases {
		if d.Status != quiesce.DBLocked {
			out.Warnings = append(out.Warnings, fmt.Sprintf("database %s %s", d.Name, d.Status))
		}
	}

	var sources []repo.DiskSource
	for _, d := range vm.Disks {
		var rd io.ReadCloser
		var size int64
		var desc string
		if d.LV.IsZero() {
			f, err := os.Open(d.Path)
			if err != nil {
				return out, fmt.Errorf("VM %s disk %s: %w", vm.Name, d.Name, err)
			}
			size, err = f.Seek(0, io.SeekEnd)
			if err == nil {
				_, err = f.Seek(0, io.SeekStart)
			}
			if err != nil {
				f.Close()
				return out, fmt.Errorf("VM %s disk %s: %w", vm.Name, d.Name, err)
			}
			rd, desc = f, d.Path
		} else {
			rd, size, err = set.Open(ctx, d.Name, d.File)
			if err != nil {
				return out, fmt.Errorf("VM %s disk %s: %w", vm.Name, d.Name, err)
			}
			desc = d.LV.String()
			if d.File != "" {
				desc += ":" + d.File
			}
		}
		defer rd.Close()
		sources = append(sources, repo.DiskSource{Name: d.Name, Source: desc, Reader: rd, Size: size})
	}

	var peak float64
	progress, progressDone := a.progress(vm.Name, sources)
	m, err := r.Backup(ctx, repo.BackupRequest{VM: vm.Name, Time: when, Tags: tags, Disks: sources, Progress: progress,
		BeforeCommit: func(ctx context.Context) (json.RawMessage, error) {
			rec := map[string]any{"quiesce": report}
			if set != nil {
				rep, err := set.Check(ctx)
				if err != nil {
					return nil, fmt.Errorf("%w; nothing was committed", err)
				}
				peak = rep.Peak
				if rep.Warn() {
					log.Warn("snapshot was more than 80% full: raise snapshot_size", "peak_percent", rep.Peak)
					out.Warnings = append(out.Warnings, fmt.Sprintf("snapshot %.0f%% full", rep.Peak))
				}
				rec["snapshots"] = rep
			}
			return json.Marshal(rec)
		}})
	progressDone()
	if err != nil && set != nil && ctx.Err() == nil {
		// A snapshot that overflows while it is read makes reads fail
		// with EIO before the pre-commit check runs: say what happened.
		if _, cerr := set.Check(context.WithoutCancel(ctx)); cerr != nil {
			var oe *snapshot.OverflowError
			if errors.As(cerr, &oe) {
				return out, fmt.Errorf("VM %s: %w; nothing was committed (%v)", vm.Name, oe, err)
			}
		}
	}
	if err != nil {
		return out, fmt.Errorf("VM %s: %w", vm.Name, err)
	}
	out.backupSummary = summarize(m)
	out.Status = "ok"
	if len(out.Warnings) > 0 {
		out.Status = "warning"
	}
	out.GuestHeld = report.Held.Seconds()
	out.SnapshotPeak = peak
	out.quiesced = len(snapDisks) > 0 || vm.Guest != nil || len(vm.Databases) > 0
	out.snapshotted = set != nil
	return out, nil
}

// quiesceConfig turns a VM's configuration into quiesce settings, reading
// database password files.
func quiesceConfig(vm *config.VM, log *slog.Logger) (quiesce.Config, error) {
	qc := quiesce.Config{VM: vm.Name, Logger: log}
	if g := vm.Guest; g != nil {
		qc.Guest = &quiesce.GuestConfig{Addr: net.JoinHostPort(g.Host, strconv.Itoa(g.Port)), User: g.User, KeyFile: g.Key,
			KnownHostsFile: g.KnownHosts, BeforeSnapshot: g.BeforeSnapshot, FreezeMounts: g.Freeze, FreezeTimeout: g.FreezeTimeout}
	}
	for _, d := range vm.Databases {
		db := quiesce.Database{Name: d.Name, DSN: d.DSN, TLSCA: d.TLSCA, TLSCert: d.TLSCert, TLSKey: d.TLSKey, Required: d.Required}
		if d.PasswordFile != "" {
			pw, err := config.ReadSecretFile(d.PasswordFile)
			if err != nil {
				return qc, fmt.Errorf("VM %s database %s: %w", vm.Name, d.Name, err)
			}
			db.Password = pw
		}
		qc.Databases = append(qc.Databases, db)
	}
	return qc, nil
}
