package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"vmvault/repo"
)

// backupSummary is the one-line (or one JSON object) result of a backup.
type backupSummary struct {
	ID           string   `json:"id"`
	VM           string   `json:"vm"`
	Time         string   `json:"time"`
	Disks        []string `json:"disks"`
	BytesRead    int64    `json:"bytes_read"`
	BytesZero    int64    `json:"bytes_zero"`
	BytesNew     int64    `json:"bytes_new"`
	BytesStored  int64    `json:"bytes_stored"`
	ChunksNew    int64    `json:"chunks_new"`
	SegmentsNew  int64    `json:"segments_new"`
	Segments     int64    `json:"segments"`
	ObjectsFound int64    `json:"objects_found"`
	Duration     float64  `json:"duration_seconds"`
}

func summarize(m *repo.Manifest) backupSummary {
	s := backupSummary{ID: m.ID, VM: m.VM, Time: m.Time.Format(time.RFC3339), BytesRead: m.Stats.BytesRead,
		BytesZero: m.Stats.BytesZero, BytesNew: m.Stats.BytesNew, BytesStored: m.Stats.BytesStored,
		ChunksNew: m.Stats.ChunksNew, SegmentsNew: m.Stats.SegmentsNew, Segments: m.Stats.SegmentsSeen, ObjectsFound: m.Stats.ObjectsFound,
		Duration: m.Finished.Sub(m.Started).Seconds()}
	for _, d := range m.Disks {
		s.Disks = append(s.Disks, d.Name)
	}
	return s
}

func (a *app) backupCommand() *cobra.Command {
	var sources, tags []string
	var at string
	var sha, all bool
	cmd := &cobra.Command{
		Use:   "backup VM [--source [DISK=]PATH...] | backup --all",
		Short: "Back up a VM's disk images as one new generation",
		Long: `Back up one or more disk images of a VM into the repository as one new,
complete generation. --source names a file or block device (or - for
stdin); repeat it for several disks, optionally naming each (hda=/dev/vg0/x).
Without --source, the VM comes from the configuration file: its guest is
flushed (and optionally frozen) over SSH, its databases locked, every disk's
LV snapshotted in that one instant, the guest released at once, and the
snapshots read, checked for overflow and always removed. --all backs up
every configured VM in turn; one VM's failure does not stop the others.
Only chunks new to the repository are stored. The generation is committed
only when every disk was read completely; an interrupted or failed backup
commits nothing, and the next run reuses what was already uploaded.`,
		Example: `  vmvault backup vm01                      # as configured in /etc/vmvault/vmvault.toml
  vmvault backup --all
  vmvault backup vm01 --source /var/lib/images/vm01.raw
  vmvault backup vm01 --source hda=/dev/vg0/vm01-hda --source hdb=/dev/vg0/vm01-hdb --tag nightly
  zcat vm01.raw.gz | vmvault backup vm01 --source -
  vmvault backup vm01 --source vm01.raw --time 2026-01-01T00:00:00Z`,
		Args: cobra.RangeArgs(0, 1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var when time.Time
			if at != "" {
				t, err := time.Parse(time.RFC3339, at)
				if err != nil {
					return withCode(exitUsage, fmt.Errorf("--time: %w", err))
				}
				when = t
			}
			if all != (len(args) == 0) {
				return withCode(exitUsage, fmt.Errorf("name one VM, or give --all"))
			}
			if len(sources) == 0 {
				return a.backupConfigured(cmd.Context(), args, all, tags, when)
			}
			if all {
				return withCode(exitUsage, fmt.Errorf("--all and --source exclude each other"))
			}
			vm := args[0]
			start := time.Now()
			err := a.backupSources(cmd.Context(), vm, sources, tags, when, sha)
			if err != nil && cmd.Context().Err() == nil {
				a.recordFailure(vm, err, start)
			}
			return err
		},
	}
	cmd.Flags().StringArrayVarP(&sources, "source", "s", nil, "disk image to read: [NAME=]PATH, a file, block device or - for stdin (repeatable)")
	cmd.Flags().StringArrayVar(&tags, "tag", nil, "tag the generation (repeatable)")
	cmd.Flags().StringVar(&at, "time", "", "record this time (RFC 3339) instead of now, e.g. for imports")
	cmd.Flags().BoolVar(&all, "all", false, "back up every VM of the configuration file")
	cmd.Flags().StringVar(&a.metricsFile, "metrics-file", os.Getenv("VMVAULT_METRICS_FILE"), "after each VM, update this Prometheus textfile-collector file (env VMVAULT_METRICS_FILE)")
	cmd.Flags().BoolVar(&sha, "sha256", false, "also record a plain SHA-256 of each image (compare with sha256sum)")
	return cmd
}

// backupSources backs up --source images as one generation of vm.
func (a *app) backupSources(ctx context.Context, vm string, sources, tags []string, when time.Time, sha bool) error {
	disks, closeAll, err := a.openSources(sources)
	if err != nil {
		return err
	}
	defer closeAll()
	return a.withLease(ctx, repo.SharedLock, "backup "+vm, func(ctx context.Context, r *repo.Repository) error {
		progress, progressDone := a.progress(vm, disks)
		m, err := r.Backup(ctx, repo.BackupRequest{VM: vm, Time: when, Tags: tags, Disks: disks, SHA256: sha, Progress: progress})
		progressDone()
		if err != nil {
			return fmt.Errorf("backup %s: %w", vm, err)
		}
		a.finishVM(vmOutcome{backupSummary: summarize(m), Status: "ok"})
		return nil
	})
}

// openSources opens every --source and returns the disks and a closer.
func (a *app) openSources(specs []string) ([]repo.DiskSource, func(), error) {
	var disks []repo.DiskSource
	var files []*os.File
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	seen := map[string]bool{}
	for _, spec := range specs {
		name, path, ok := strings.Cut(spec, "=")
		if !ok {
			path = spec
			name = "disk"
			if len(specs) > 1 {
				name = strings.TrimSuffix(filepath.Base(path), filepath.Ext(path))
			}
		}
		if seen[name] {
			closeAll()
			return nil, nil, withCode(exitUsage, fmt.Errorf("two sources named %q: name them NAME=PATH", name))
		}
		seen[name] = true
		if path == "-" {
			disks = append(disks, repo.DiskSource{Name: name, Source: "stdin", Reader: pollable(a.stdin), Size: -1})
			continue
		}
		f, err := os.Open(path)
		if err != nil {
			closeAll()
			return nil, nil, fmt.Errorf("source: %w", err)
		}
		files = append(files, f)
		size, err := f.Seek(0, io.SeekEnd)
		if err == nil {
			_, err = f.Seek(0, io.SeekStart)
		}
		if err != nil {
			closeAll()
			return nil, nil, fmt.Errorf("source %s: %w", path, err)
		}
		abs, _ := filepath.Abs(path)
		disks = append(disks, repo.DiskSource{Name: name, Source: abs, Reader: f, Size: size})
	}
	return disks, closeAll, nil
}

// pollable returns stdin in a form whose reads a cancellation can
// interrupt: a pipe is switched to non-blocking mode and reopened through
// the runtime's poller, so SIGINT/SIGTERM wake a backup waiting on a
// stalled writer. Anything else is returned as it is.
func pollable(r io.Reader) io.Reader {
	f, ok := r.(*os.File)
	if !ok {
		return r
	}
	st, err := f.Stat()
	if err != nil || st.Mode()&os.ModeNamedPipe == 0 {
		return r
	}
	fd := f.Fd()
	if err := syscall.SetNonblock(int(fd), true); err != nil {
		return r
	}
	return os.NewFile(fd, f.Name())
}
