package main

import (
	"errors"
	"fmt"

	"github.com/spf13/pflag"

	"vmvault/backend"
	"vmvault/backend/limit"
	"vmvault/config"
	"vmvault/internal/ioprio"
)

// limitFlags are the bandwidth and I/O priority settings of the command
// line; a flag not given takes the configuration's [limits] value.
type limitFlags struct {
	read, upload, download int // MiB/s
	ioPriority             string
	set                    *pflag.FlagSet // to tell flags given from defaults
}

const mib = 1 << 20

// addGlobal adds the flags every command that talks to the repository
// honours.
func (l *limitFlags) addGlobal(f *pflag.FlagSet) {
	f.IntVar(&l.upload, "limit-upload", 0, "limit uploads to the repository to this many MiB/s (config: [limits] upload)")
	f.IntVar(&l.download, "limit-download", 0, "limit downloads from the repository to this many MiB/s (config: [limits] download)")
}

// addBackup adds the flags about reading disks.
func (l *limitFlags) addBackup(f *pflag.FlagSet) {
	f.IntVar(&l.read, "limit-read", 0, "limit reading the disks to this many MiB/s (config: [limits] read)")
	f.StringVar(&l.ioPriority, "io-priority", "idle", "I/O priority for reading the disks: idle, best-effort or none (config: [limits] io_priority)")
}

// effective returns the limits in force: flags given, else the
// configuration's, else none (and idle I/O priority).
func (a *app) limits() config.Limits {
	l := config.Limits{IOPriority: "idle"}
	if cfg, err := a.loadConfig(configOptional); err == nil && cfg != nil {
		l = cfg.Limits
	}
	changed := func(name string) bool {
		if a.limitFlags.set == nil {
			return false
		}
		f := a.limitFlags.set.Lookup(name)
		return f != nil && f.Changed
	}
	if changed("limit-read") {
		l.ReadMiB = a.limitFlags.read
	}
	if changed("limit-upload") {
		l.UploadMiB = a.limitFlags.upload
	}
	if changed("limit-download") {
		l.DownloadMiB = a.limitFlags.download
	}
	if changed("io-priority") {
		l.IOPriority = a.limitFlags.ioPriority
	}
	return l
}

// checkLimits refuses limits that make no sense, before anything starts.
func (a *app) checkLimits() error {
	l := a.limits()
	if l.ReadMiB < 0 || l.UploadMiB < 0 || l.DownloadMiB < 0 {
		return withCode(exitUsage, errors.New("--limit-read, --limit-upload and --limit-download take 0 (no limit) or a positive number of MiB/s"))
	}
	if _, err := ioprio.Parse(l.IOPriority); err != nil {
		return withCode(exitUsage, fmt.Errorf("--io-priority: %w", err))
	}
	return nil
}

// limitBackend wraps be with the upload and download limits in force.
func (a *app) limitBackend(be backend.Backend) backend.Backend {
	l := a.limits()
	return limit.Wrap(be, int64(l.UploadMiB)*mib, int64(l.DownloadMiB)*mib)
}

// readSettings applies the I/O priority for reading disks (once per
// process; a failure costs only the priority, and is logged) and returns
// the read limit in bytes per second.
func (a *app) readSettings() (int64, error) {
	l := a.limits()
	c, err := ioprio.Parse(l.IOPriority)
	if err != nil {
		return 0, withCode(exitUsage, fmt.Errorf("--io-priority: %w", err))
	}
	if err := ioprio.Set(c); err != nil {
		a.log.Warn("reading at the normal I/O priority", "err", err)
	}
	return int64(l.ReadMiB) * mib, nil
}
