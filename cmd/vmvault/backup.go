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

	"vmvault/config"
	"vmvault/repo"
	"vmvault/vmbackup"
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
	BytesChunked int64    `json:"bytes_chunked"`
	Duration     float64  `json:"duration_seconds"`
	// DiskStats says per disk how it was read.
	DiskStats []diskSummary `json:"disk_stats"`
}

// diskSummary is how one disk was read: whole ("none") or through a change
// tracker, and how many bytes really came from the source.
type diskSummary struct {
	Name      string `json:"name"`
	CBT       string `json:"cbt"`
	CBTBase   string `json:"cbt_base,omitempty"`
	BytesRead int64  `json:"bytes_read"`
}

func summarize(m *repo.Manifest) backupSummary {
	s := backupSummary{ID: m.ID, VM: m.VM, Time: m.Time.Format(time.RFC3339), BytesRead: m.Stats.BytesRead,
		BytesZero: m.Stats.BytesZero, BytesNew: m.Stats.BytesNew, BytesStored: m.Stats.BytesStored,
		ChunksNew: m.Stats.ChunksNew, SegmentsNew: m.Stats.SegmentsNew, Segments: m.Stats.SegmentsSeen, ObjectsFound: m.Stats.ObjectsFound,
		BytesChunked: m.Stats.BytesChunked, Duration: m.Finished.Sub(m.Started).Seconds()}
	for _, d := range m.Disks {
		s.Disks = append(s.Disks, d.Name)
		s.DiskStats = append(s.DiskStats, diskSummary{Name: d.Name, CBT: d.CBT, CBTBase: d.CBTBase, BytesRead: d.BytesRead})
	}
	return s
}

// backupFlags are backup's flags.
type backupFlags struct {
	sources, tags []string
	at            string
	when          time.Time // --time parsed; zero means now
	sha, all      bool
	// verify is --verify-unchanged; verifySet says it was given.
	verify    float64
	verifySet bool
}

func (a *app) backupCommand() *cobra.Command {
	var f backupFlags
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
			if err := a.checkLimits(); err != nil {
				return err
			}
			// More processors than cores; the workers stay one per core
			// (oversubscribe).
			_, restore := oversubscribe()
			defer restore()
			if f.at != "" {
				t, err := time.Parse(time.RFC3339, f.at)
				if err != nil {
					return withCode(exitUsage, fmt.Errorf("--time: %w", err))
				}
				f.when = t
			}
			if f.verifySet = cmd.Flags().Changed("verify-unchanged"); f.verifySet && (f.verify < 0 || f.verify > 100) {
				return withCode(exitUsage, fmt.Errorf("--verify-unchanged %v: want a percentage from 0 to 100", f.verify))
			}
			if f.all != (len(args) == 0) {
				return withCode(exitUsage, fmt.Errorf("name one VM, or give --all"))
			}
			if len(f.sources) == 0 {
				return a.backupConfigured(cmd.Context(), args, f)
			}
			if f.all {
				return withCode(exitUsage, fmt.Errorf("--all and --source exclude each other"))
			}
			vm := args[0]
			if err := config.CheckName("VM", vm); err != nil {
				return withCode(exitUsage, err) // and no metrics for a name that is not one
			}
			start := time.Now()
			err := a.backupSources(cmd.Context(), vm, f)
			if err != nil && cmd.Context().Err() == nil {
				a.recordFailure(vm, err, start)
			}
			return err
		},
	}
	cmd.Flags().StringArrayVarP(&f.sources, "source", "s", nil, "disk image to read: [NAME=]PATH, a file, block device or - for stdin (repeatable)")
	cmd.Flags().StringArrayVar(&f.tags, "tag", nil, "tag the generation (repeatable)")
	cmd.Flags().StringVar(&f.at, "time", "", "record this time (RFC 3339) instead of now, e.g. for imports")
	cmd.Flags().BoolVar(&f.all, "all", false, "back up every VM of the configuration file")
	cmd.Flags().StringVar(&a.metricsFile, "metrics-file", os.Getenv("VMVAULT_METRICS_FILE"), "after each VM, update this Prometheus textfile-collector file (env VMVAULT_METRICS_FILE)")
	cmd.Flags().BoolVar(&f.sha, "sha256", false, "also record a plain SHA-256 of each image (compare with sha256sum); it needs every byte, so every disk is read whole, without change tracking")
	cmd.Flags().Float64Var(&f.verify, "verify-unchanged", config.DefaultVerifyUnchanged,
		"with change tracking, re-read this percentage of the segments reported unchanged and compare them (default: [backup] verify_unchanged)")
	a.limitFlags.addBackup(cmd.Flags())
	return cmd
}

// backupSources backs up --source images as one generation of vm.
func (a *app) backupSources(ctx context.Context, vm string, f backupFlags) error {
	disks, closeAll, err := a.openSources(f.sources)
	if err != nil {
		return err
	}
	defer closeAll()
	r, err := a.openRepo(ctx)
	if err != nil {
		return err
	}
	defer r.Backend().Close()
	defer r.Close()
	plan := vmbackup.VM{Name: vm, Disks: disks}
	o, err := vmbackup.Run(ctx, vmbackup.Repo(r, a.retryLock), plan, a.runOptions(vm, f))
	if err != nil {
		return err
	}
	a.finishVM(outcome(o))
	return nil
}

// openSources opens every --source and returns the disks and a closer.
// They are opened before any lock is taken, so a typo fails at once.
func (a *app) openSources(specs []string) ([]vmbackup.Disk, func(), error) {
	var disks []vmbackup.Disk
	var files []io.Closer
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	seen := map[string]bool{}
	for _, spec := range specs {
		name, path := sourceName(spec, len(specs))
		if seen[name] {
			closeAll()
			return nil, nil, withCode(exitUsage, fmt.Errorf("two sources named %q: name them NAME=PATH", name))
		}
		seen[name] = true
		if path == "-" {
			img := vmbackup.Image{Reader: keepOpen(pollable(a.stdin)), Size: -1, Desc: "stdin"}
			disks = append(disks, vmbackup.Disk{Name: name, Source: vmbackup.Opened(img)})
			continue
		}
		img, err := vmbackup.File(path).Open(context.Background())
		if err != nil {
			closeAll()
			return nil, nil, fmt.Errorf("source: %w", err)
		}
		files = append(files, img.Reader)
		img.Desc, _ = filepath.Abs(path)
		disks = append(disks, vmbackup.Disk{Name: name, Source: vmbackup.Opened(img)})
	}
	return disks, closeAll, nil
}

// sourceName splits a --source spec into the disk's name and the path:
// "hda=/dev/x" names the disk; otherwise a lone source is "disk" and
// several are named after their files.
func sourceName(spec string, n int) (name, path string) {
	name, path, ok := strings.Cut(spec, "=")
	if ok {
		return name, path
	}
	if n > 1 {
		return strings.TrimSuffix(filepath.Base(spec), filepath.Ext(spec)), spec
	}
	return "disk", spec
}

// keepOpen makes stdin a ReadCloser whose Close leaves it open. An
// *os.File keeps its SetReadDeadline visible (the backup uses it to stop a
// read blocked on a stalled pipe when it is cancelled) and nothing else:
// no ReadAt or Seek that would make stdin look like a file.
func keepOpen(r io.Reader) io.ReadCloser {
	if f, ok := r.(*os.File); ok {
		return stdinFile{f}
	}
	return io.NopCloser(r)
}

type stdinFile struct{ f *os.File }

func (s stdinFile) Read(p []byte) (int, error)        { return s.f.Read(p) }
func (s stdinFile) SetReadDeadline(t time.Time) error { return s.f.SetReadDeadline(t) }
func (stdinFile) Close() error                        { return nil }

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
