package vmbackup

import (
	"context"
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

// FromConfig turns a configured VM into what Run backs up, with the real
// host steps: LVM snapshots (through sudo if configured) and the guest
// and databases quiesced over SSH and SQL. It reads the databases'
// password files.
func FromConfig(vm *config.VM, log *slog.Logger) (VM, error) {
	out := VM{Name: vm.Name}
	for _, d := range vm.Disks {
		disk := Disk{Name: d.Name}
		if d.LV.IsZero() {
			disk.Source = File(d.Path)
		} else {
			disk.Volume = &Volume{Origin: snapshot.LV{VG: d.LV.VG, Name: d.LV.Name}, File: d.File, SnapshotSize: d.SnapshotSize, CBT: d.CBT}
			out.Snapshotter = LVM{Runner: snapshot.Exec{Sudo: vm.Sudo}}
		}
		out.Disks = append(out.Disks, disk)
	}
	// Hold whenever there is something to quiesce or to snapshot; for
	// plain-path disks the hold still flushes the guest and records the
	// databases' state.
	if out.Snapshotter != nil || vm.Guest != nil || len(vm.Databases) > 0 {
		qc, err := quiesceConfig(vm, log)
		if err != nil {
			return VM{}, err
		}
		out.Quiescer = guestQuiescer{quiesce.New(qc)}
	}
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
			db.Password = string(pw)
		}
		qc.Databases = append(qc.Databases, db)
	}
	return qc, nil
}

// guestQuiescer adapts *quiesce.Quiescer to Quiescer.
type guestQuiescer struct{ q *quiesce.Quiescer }

func (g guestQuiescer) Hold(ctx context.Context) (Hold, error) {
	h, err := g.q.Hold(ctx)
	if err != nil {
		return nil, err
	}
	return h, nil
}

// LVM is the Snapshotter of LVM volumes on this host.
type LVM struct {
	Runner snapshot.Runner
}

// RemoveLeftovers implements Snapshotter.
func (l LVM) RemoveLeftovers(ctx context.Context, vg, vm string) ([]string, error) {
	left, err := snapshot.FindLeftovers(ctx, l.Runner, vg, vm)
	if err != nil {
		return nil, fmt.Errorf("look for leftover snapshots: %w", err)
	}
	var removed []string
	for _, lv := range left {
		if err := snapshot.Remove(ctx, l.Runner, lv); err != nil {
			return removed, fmt.Errorf("remove leftover snapshot %s: %w", lv, err)
		}
		removed = append(removed, lv.String())
	}
	return removed, nil
}

// Create implements Snapshotter.
func (l LVM) Create(ctx context.Context, vm string, disks []snapshot.Disk) (Snapshots, error) {
	set, err := snapshot.CreateSet(ctx, l.Runner, vm, disks)
	if err != nil {
		return nil, err
	}
	return lvmSnapshots{Set: set, r: l.Runner}, nil
}

// Trackable implements ChangeTracker: a thin LV's changes are tracked.
func (l LVM) Trackable(ctx context.Context, origin snapshot.LV) (bool, error) {
	v, err := snapshot.Inspect(ctx, l.Runner, origin)
	if err != nil {
		return false, err
	}
	return v.Thin(), nil
}

// CheckBase implements ChangeTracker.
func (l LVM) CheckBase(ctx context.Context, vm, note string) error {
	b, err := snapshot.ParseThinBase(note)
	if err != nil {
		return err
	}
	return snapshot.CheckBase(ctx, l.Runner, vm, b)
}

// RemoveBases implements ChangeTracker.
func (l LVM) RemoveBases(ctx context.Context, vg, vm string, keep map[string]bool) ([]string, error) {
	bases, err := snapshot.FindBases(ctx, l.Runner, vg, vm)
	if err != nil {
		return nil, fmt.Errorf("look for base snapshots: %w", err)
	}
	var removed []string
	for disk, lv := range bases {
		if keep[disk] {
			continue
		}
		if err := snapshot.RemoveBase(ctx, l.Runner, vm, lv); err != nil {
			return removed, fmt.Errorf("remove base snapshot %s: %w", lv, err)
		}
		removed = append(removed, lv.String())
	}
	return removed, nil
}

// lvmSnapshots adds change tracking to a snapshot set.
type lvmSnapshots struct {
	*snapshot.Set
	r snapshot.Runner
}

// Note implements TrackedSnapshots: the thin id and uuid of disk's
// snapshot, under the name it will have as base.
func (s lvmSnapshots) Note(ctx context.Context, disk string) (string, error) {
	v, err := s.Volume(ctx, disk)
	if err != nil {
		return "", err
	}
	if !v.Thin() {
		return "", fmt.Errorf("%s: %w", v.LV, errNoTracker)
	}
	return snapshot.ThinBase{LV: snapshot.LV{VG: v.LV.VG, Name: snapshot.BaseName(s.VM(), disk)},
		Pool: v.PoolLV(), ThinID: v.ThinID, UUID: v.UUID}.Note(), nil
}

// Changes implements TrackedSnapshots with thin_delta.
func (s lvmSnapshots) Changes(ctx context.Context, disk, baseNote string, size int64) ([]repo.Range, error) {
	base, err := snapshot.ParseThinBase(baseNote)
	if err != nil {
		return nil, err
	}
	v, err := s.Volume(ctx, disk)
	if err != nil {
		return nil, err
	}
	if !v.Thin() || v.PoolLV() != base.Pool {
		return nil, fmt.Errorf("snapshot %s is not in the base's pool %s", v.LV, base.Pool)
	}
	rs, err := snapshot.ThinDelta(ctx, s.r, base.Pool, base.ThinID, v.ThinID, size)
	if err != nil {
		return nil, err
	}
	out := make([]repo.Range, len(rs))
	for i, r := range rs {
		out[i] = repo.Range{Off: r.Off, Len: r.Len}
	}
	return out, nil
}

// Keep implements TrackedSnapshots.
func (s lvmSnapshots) Keep(ctx context.Context, disk string) error {
	_, err := s.Set.Keep(ctx, disk)
	return err
}

// File is a Source reading a plain file or block device as it is.
type File string

// Open implements Source.
func (f File) Open(context.Context) (Image, error) {
	fh, err := os.Open(string(f))
	if err != nil {
		return Image{}, err
	}
	// Seeking to the end is how a block device tells its size.
	size, err := fh.Seek(0, io.SeekEnd)
	if err == nil {
		_, err = fh.Seek(0, io.SeekStart)
	}
	if err != nil {
		fh.Close()
		return Image{}, fmt.Errorf("size of %s: %w", f, err)
	}
	return Image{Reader: fh, Size: size, Desc: string(f)}, nil
}

// Opened is a Source for an image the caller has already opened (the
// --source files and stdin, opened before any lock is taken so that a
// typo fails at once).
type Opened Image

// Open implements Source.
func (o Opened) Open(context.Context) (Image, error) { return Image(o), nil }

// FileLocks are per-VM lock files in a directory ("vm-<name>.lock"),
// held with flock: the kernel releases them when the process dies, so a
// crashed run never blocks the next one.
type FileLocks struct {
	Dir string
}

// Lock implements HostLocks.
func (l FileLocks) Lock(vm string) (func(), error) {
	if err := config.CheckName("VM", vm); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(l.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("VM lock: %w", err)
	}
	path := filepath.Join(l.Dir, "vm-"+vm+".lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("VM lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		pid, _ := io.ReadAll(io.LimitReader(f, 32))
		f.Close()
		return nil, fmt.Errorf("%w: a backup of %s is already running (PID %s, lock %s)", ErrVMLocked, vm, strings.TrimSpace(string(pid)), path)
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return func() { f.Close() }, nil
}

// Repo adapts a *repo.Repository; wait is how long Lock waits for a
// conflicting lock to go away.
func Repo(r *repo.Repository, wait time.Duration) Repository {
	return repoAdapter{r: r, wait: wait}
}

type repoAdapter struct {
	r    *repo.Repository
	wait time.Duration
}

func (a repoAdapter) Lock(ctx context.Context, command string) (Lease, error) {
	l, err := a.r.Lock(ctx, repo.SharedLock, command, a.wait)
	if err != nil {
		return nil, err
	}
	return &lease{Lock: l}, nil
}

func (a repoAdapter) Backup(ctx context.Context, req repo.BackupRequest) (*repo.Manifest, error) {
	return a.r.Backup(ctx, req)
}

func (a repoAdapter) Latest(ctx context.Context, vm string) (*repo.Manifest, error) {
	m, err := a.r.FindManifest(ctx, vm, "latest")
	if errors.Is(err, repo.ErrNoSnapshot) {
		return nil, nil
	}
	return m, err
}

// lease is a held repository lock (repo's lease rules: refreshed, and
// verified by the commit).
type lease struct {
	*repo.Lock
}
