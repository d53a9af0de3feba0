// Package vmbackup runs the backup of one VM as one generation: it takes
// the VM's lock on this host and a shared repository lock, removes
// snapshots a crashed run left behind, holds the guest (sync, freeze,
// database locks) just long enough to snapshot every disk, reads the
// disks and commits the generation.
//
// The rules this package keeps — each tested with fakes in
// vmbackup_test.go, and end to end by test/lvm and the snapshot package's
// guest tests:
//
//   - The guest is released as soon as the snapshots exist, before any
//     disk is opened or read: nothing slow happens while it is held. A
//     failed snapshot releases it too.
//   - Snapshots are removed on every path: success, error and
//     cancellation (SIGINT/SIGTERM cancel ctx). Removal runs on a context
//     that is not cancelled, after the readers are closed.
//   - Nothing is committed after a snapshot overflowed or once the
//     repository lock is no longer held: both are checked after the last
//     byte is stored and before the manifest is written (the commit).
//   - Two runs for the same VM on one host never overlap: the second
//     fails at once with ErrVMLocked, whether the disks come from the
//     configuration or from --source.
//
// The host-facing steps are small interfaces defined here (Snapshotter,
// Quiescer, HostLocks, Repository); host.go adapts the real ones: package
// snapshot (LVM), package quiesce (SSH guest, databases), flock files and
// package repo. Change tracking (thin LVM) is a Snapshotter that also
// implements ChangeTracker, with Snapshots that implement
// TrackedSnapshots; its rules are in track.go: a base is trusted only as
// recorded by the previous generation, replaced only after a commit, and
// every doubt reads the disk whole with one log line saying why.
package vmbackup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"vmvault/config"
	"vmvault/quiesce"
	"vmvault/repo"
	"vmvault/snapshot"
)

// ErrVMLocked reports that another backup of the same VM runs on this host.
var ErrVMLocked = errors.New("VM locked on this host")

// ErrLockLost reports that the repository lock a backup held went away
// (removed by unlock or judged stale by a prune) before the commit. It is
// repo.ErrLockLost: the lease rules live in repo/lock.go (exit 11).
var ErrLockLost = repo.ErrLockLost

// LongRun is how long a backup runs before it warns: the next night's
// run is due.
const LongRun = 24 * time.Hour

// Repository is where a generation is committed.
type Repository interface {
	// Lock takes a shared repository lock for command.
	Lock(ctx context.Context, command string) (Lease, error)
	// Backup stores the disks and commits the generation; see
	// repo.Repository.Backup.
	Backup(ctx context.Context, req repo.BackupRequest) (*repo.Manifest, error)
	// Latest returns vm's newest generation (repo's "latest"), or nil
	// if it has none: change tracking finds its base through it.
	Latest(ctx context.Context, vm string) (*repo.Manifest, error)
}

// Lease is a held repository lock. That it still holds at the commit
// is verified once, by repo.Repository.Backup just before it writes the
// manifest (repo's lease rules); a lost lease there is repo.ErrLockLost.
type Lease interface {
	// Context is cancelled when the lease is lost (a failed refresh), so
	// the backup stops instead of committing after its lock lapsed.
	Context() context.Context
	// Unlock releases the lock.
	Unlock() error
}

// HostLocks serialises backups of one VM on this host.
type HostLocks interface {
	// Lock returns an error wrapping ErrVMLocked when another process
	// holds vm's lock; it never waits.
	Lock(vm string) (unlock func(), err error)
}

// Quiescer makes the guest consistent (sync, fsfreeze, database locks).
type Quiescer interface {
	Hold(ctx context.Context) (Hold, error)
}

// Hold is a held guest; Release undoes it and says what was done.
type Hold interface {
	Release(ctx context.Context) quiesce.Report
}

// Snapshotter creates the snapshots of a VM's volumes.
type Snapshotter interface {
	// RemoveLeftovers removes snapshots of vm that a crashed run left in
	// vg and returns their names.
	RemoveLeftovers(ctx context.Context, vg, vm string) ([]string, error)
	// Create snapshots every disk back to back; on error none is left.
	Create(ctx context.Context, vm string, disks []snapshot.Disk) (Snapshots, error)
}

// Snapshots are the snapshots of one run. Those that can track changes
// (thin LVM) also implement TrackedSnapshots; see track.go.
type Snapshots interface {
	// Open opens the snapshot of disk (the image file inside it when
	// file is not empty) and returns it and its size.
	Open(ctx context.Context, disk, file string) (io.ReadCloser, int64, error)
	// Check returns the fill levels; an overflow is an
	// *snapshot.OverflowError.
	Check(ctx context.Context) (snapshot.Report, error)
	// RemoveAll removes every snapshot; it may be called more than once.
	RemoveAll(ctx context.Context) error
}

// Source opens one disk that is not snapshotted: a file, a device, a
// stream.
type Source interface {
	Open(ctx context.Context) (Image, error)
}

// Image is a disk opened for reading.
type Image struct {
	Reader io.ReadCloser
	// Size is the number of bytes Reader delivers, -1 if unknown.
	Size int64
	// Desc describes where the image comes from (a path, vg/lv); it is
	// recorded in the generation, so it must hold no secret.
	Desc string
}

// Volume is a logical volume snapshotted for a disk.
type Volume struct {
	Origin snapshot.LV
	// File, if not empty, is the image file inside the file system on the
	// volume; empty means the volume is the disk.
	File string
	// SnapshotSize is the snapshot's copy-on-write space in bytes (unused
	// for a thin snapshot).
	SnapshotSize int64
	// CBT tracks changes when the volume is a thin LV and File is empty:
	// the snapshot is kept as the next backup's base, which then reads
	// only what changed (see track.go).
	CBT bool
}

// Disk is one disk of the VM: a Volume read through its snapshot, or a
// Source read as it is.
type Disk struct {
	Name   string
	Volume *Volume
	Source Source
}

// VM is what Run backs up.
type VM struct {
	Name  string
	Disks []Disk
	// Quiescer, if not nil, holds the guest while the snapshots are taken.
	Quiescer Quiescer
	// Snapshotter snapshots the disks that have a Volume.
	Snapshotter Snapshotter
}

// Options are the settings of one run.
type Options struct {
	// Locks serialises runs of one VM on this host; required.
	Locks HostLocks
	// Time is recorded as the generation's time; zero means now.
	Time time.Time
	// Tags are recorded in the generation.
	Tags []string
	// SHA256 also records a plain SHA-256 of each image.
	SHA256 bool
	// Logger receives progress and warnings; nil discards them.
	Logger *slog.Logger
	// ReadLimit caps reading the disks, in bytes per second; 0: none.
	ReadLimit int64
	// VerifyUnchanged is the percentage of segments a change tracker
	// reports unchanged that are read anyway and compared
	// (repo.BackupRequest.VerifyUnchanged).
	VerifyUnchanged float64
	// FullEvery is how long a tracked disk may go without being read
	// whole; zero means DefaultFullEvery.
	FullEvery time.Duration
	// Progress, if set, is called once the disks are open; it returns
	// the callback for repo.BackupRequest.Progress and a function called
	// when reading is over.
	Progress func(disks []repo.DiskSource) (func(disk string, read int64), func())
}

// Outcome is what a run did.
type Outcome struct {
	// Manifest records the committed generation.
	Manifest *repo.Manifest
	// Quiesced says the guest was held; Quiesce is then its report.
	Quiesced bool
	Quiesce  quiesce.Report
	// Snapshotted says snapshots were taken; Snapshots then holds their
	// fill levels at the commit.
	Snapshotted bool
	Snapshots   snapshot.Report
	// Warnings are problems that did not stop the backup.
	Warnings []string
	// SnapshotWindow is how long the snapshots existed, from just before
	// they were created until they were removed: the time in which the
	// guest's writes pay copy-on-write.
	SnapshotWindow time.Duration
}

// Run backs up vm as one generation in r.
func Run(ctx context.Context, r Repository, vm VM, opts Options) (out Outcome, err error) {
	if err := config.CheckName("VM", vm.Name); err != nil {
		return Outcome{}, err
	}
	if opts.Locks == nil {
		return Outcome{}, errors.New("vmbackup: no host locks")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b := &run{vm: vm, opts: opts, log: log.With("vm", vm.Name)}
	unlock, err := opts.Locks.Lock(vm.Name)
	if err != nil {
		return Outcome{}, err
	}
	defer unlock()
	lease, err := r.Lock(ctx, "backup "+vm.Name)
	if err != nil {
		return Outcome{}, err
	}
	defer lease.Unlock()
	ctx = lease.Context()
	slow := time.AfterFunc(LongRun, func() {
		b.log.Warn("backup has been running for more than 24 hours")
	})
	defer slow.Stop()
	defer func() {
		b.cleanup(ctx)
		out.SnapshotWindow = b.out.SnapshotWindow
	}()

	m, err := b.run(ctx, r)
	if err != nil {
		// A lease lost mid-run cancels ctx: whichever step saw the
		// cancellation first, say why rather than "context canceled"
		// (repo.ErrLockLost says that nothing was committed).
		if cause := context.Cause(ctx); errors.Is(cause, ErrLockLost) && !errors.Is(err, ErrLockLost) {
			err = fmt.Errorf("VM %s: %w", vm.Name, cause)
		}
		return b.out, err
	}
	b.out.Manifest = m
	return b.out, nil
}

// run holds, snapshots, releases, opens and commits.
func (b *run) run(ctx context.Context, r Repository) (*repo.Manifest, error) {
	if err := b.freeze(ctx, r); err != nil {
		return nil, err
	}
	disks, err := b.open(ctx)
	if err != nil {
		return nil, err
	}
	b.track(ctx, disks)
	m, err := b.commit(ctx, r, disks)
	if err != nil {
		return nil, err
	}
	b.keepBases(ctx)
	return m, nil
}

// run is the state of one Run: what must be undone, and the outcome.
type run struct {
	vm      VM
	opts    Options
	log     *slog.Logger
	snaps   Snapshots
	readers []io.Closer // readers, closed before the snapshots go
	out     Outcome
	// snapStart is when snapshot creation began.
	snapStart time.Time
	// tracked holds the plan of each disk whose changes are tracked.
	tracked map[string]*tracking
}

// volumes returns the disks to snapshot.
func (b *run) volumes() []snapshot.Disk {
	var ds []snapshot.Disk
	for _, d := range b.vm.Disks {
		if d.Volume != nil {
			ds = append(ds, snapshot.Disk{Name: d.Name, Origin: d.Volume.Origin, Size: d.Volume.SnapshotSize})
		}
	}
	return ds
}

// freeze removes leftover snapshots, decides which disks are tracked
// (removing the bases of those that are not), then holds the guest
// exactly as long as it takes to create the snapshots.
func (b *run) freeze(ctx context.Context, r Repository) error {
	vols := b.volumes()
	if len(vols) > 0 && b.vm.Snapshotter == nil {
		return fmt.Errorf("VM %s: disks to snapshot but no snapshotter", b.vm.Name)
	}
	if err := b.removeLeftovers(ctx, vols); err != nil {
		return err
	}
	vols, err := b.planTracking(ctx, r, vols)
	if err != nil {
		return err
	}
	if err := b.removeBases(ctx, vols); err != nil {
		return err
	}
	if err := b.snapshotHeld(ctx, vols); err != nil {
		return err
	}
	if b.out.Quiesce.Expired {
		return fmt.Errorf("VM %s: the quiesce hold expired before the snapshots existed; they are not consistent", b.vm.Name)
	}
	return nil
}

// snapshotHeld creates the snapshots while the guest is held. The release
// is deferred, so it also happens when creating them fails or panics.
func (b *run) snapshotHeld(ctx context.Context, vols []snapshot.Disk) error {
	if b.vm.Quiescer != nil {
		hold, err := b.vm.Quiescer.Hold(ctx)
		if err != nil {
			return err // quiesce names the VM
		}
		defer b.release(ctx, hold)
	}
	if len(vols) == 0 {
		return nil
	}
	b.snapStart = time.Now()
	snaps, err := b.vm.Snapshotter.Create(ctx, b.vm.Name, vols)
	if err != nil {
		return fmt.Errorf("VM %s: %w", b.vm.Name, err)
	}
	b.snaps, b.out.Snapshotted = snaps, true
	return nil
}

// removeLeftovers removes what a crashed run left: lvcreate would fail on
// the same names.
func (b *run) removeLeftovers(ctx context.Context, vols []snapshot.Disk) error {
	seen := map[string]bool{}
	for _, v := range vols {
		if seen[v.Origin.VG] {
			continue
		}
		seen[v.Origin.VG] = true
		removed, err := b.vm.Snapshotter.RemoveLeftovers(ctx, v.Origin.VG, b.vm.Name)
		for _, lv := range removed {
			b.log.Warn("removed leftover snapshot of an earlier run", "lv", lv)
		}
		if err != nil {
			return fmt.Errorf("VM %s: %w", b.vm.Name, err)
		}
	}
	return nil
}

// release lets the guest go and records what the hold did.
func (b *run) release(ctx context.Context, hold Hold) {
	rep := hold.Release(ctx)
	b.out.Quiesced, b.out.Quiesce = true, rep
	if rep.Err != nil {
		b.warn("release: " + oneLine(rep.Err))
	}
	for _, d := range rep.Databases {
		if d.Status != quiesce.DBLocked {
			b.warn(fmt.Sprintf("database %s %s", d.Name, d.Status))
		}
	}
	b.log.Info("guest released", "held", rep.Held.Round(time.Millisecond))
}

func (b *run) warn(s string) { b.out.Warnings = append(b.out.Warnings, s) }

// open opens every disk, from its snapshot or its source.
func (b *run) open(ctx context.Context) ([]repo.DiskSource, error) {
	var ds []repo.DiskSource
	for _, d := range b.vm.Disks {
		img, err := b.openDisk(ctx, d)
		if err != nil {
			return nil, fmt.Errorf("VM %s disk %s: %w", b.vm.Name, d.Name, err)
		}
		b.readers = append(b.readers, img.Reader)
		ds = append(ds, repo.DiskSource{Name: d.Name, Source: img.Desc, Reader: img.Reader, Size: img.Size})
	}
	return ds, nil
}

func (b *run) openDisk(ctx context.Context, d Disk) (Image, error) {
	if d.Volume == nil {
		if d.Source == nil {
			return Image{}, errors.New("neither a volume nor a source")
		}
		return d.Source.Open(ctx)
	}
	rd, size, err := b.snaps.Open(ctx, d.Name, d.Volume.File)
	if err != nil {
		return Image{}, err
	}
	desc := d.Volume.Origin.String()
	if d.Volume.File != "" {
		desc += ":" + d.Volume.File
	}
	return Image{Reader: rd, Size: size, Desc: desc}, nil
}

// commit reads the disks into the repository; the generation is written
// only if, after the last byte, no snapshot overflowed and the lease
// still holds.
func (b *run) commit(ctx context.Context, r Repository, disks []repo.DiskSource) (*repo.Manifest, error) {
	progress, done := func(string, int64) {}, func() {}
	if b.opts.Progress != nil {
		progress, done = b.opts.Progress(disks)
	}
	req := repo.BackupRequest{VM: b.vm.Name, Time: b.opts.Time, Tags: b.opts.Tags, Disks: disks,
		SHA256: b.opts.SHA256, Progress: progress, ReadLimit: b.opts.ReadLimit, VerifyUnchanged: b.opts.VerifyUnchanged,
		BeforeCommit: func(ctx context.Context) (json.RawMessage, error) {
			return b.beforeCommit(ctx)
		}}
	m, err := r.Backup(ctx, req)
	if errors.Is(err, repo.ErrNoBase) && b.dropChanges(disks, err) {
		// The repository refused the base before reading anything.
		m, err = r.Backup(ctx, req)
	}
	done()
	if err != nil && b.snaps != nil && ctx.Err() == nil {
		// A snapshot that overflows while it is read makes reads fail
		// with EIO before the pre-commit check runs: say what happened.
		var oe *snapshot.OverflowError
		if _, cerr := b.snaps.Check(context.WithoutCancel(ctx)); errors.As(cerr, &oe) {
			return nil, fmt.Errorf("VM %s: %w; nothing was committed (%v)", b.vm.Name, oe, err)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("VM %s: %w", b.vm.Name, err)
	}
	return m, nil
}

// beforeCommit is the last word before the commit: the snapshots must
// still be valid (the lease is verified by repo's commit right after). It
// returns what the
// consistency step did, for the generation's record.
func (b *run) beforeCommit(ctx context.Context) (json.RawMessage, error) {
	rec := map[string]any{}
	if b.out.Quiesced {
		rec["quiesce"] = b.out.Quiesce
	}
	if b.snaps != nil {
		rep, err := b.snaps.Check(ctx)
		if err != nil {
			return nil, fmt.Errorf("%w; nothing was committed", err)
		}
		b.out.Snapshots = rep
		if rep.Warn() {
			b.log.Warn("snapshot was more than 80% full: raise snapshot_size", "peak_percent", rep.Peak)
			b.warn(fmt.Sprintf("snapshot %.0f%% full", rep.Peak))
		}
		rec["snapshots"] = rep
	}
	if len(rec) == 0 {
		return nil, nil
	}
	return json.Marshal(rec)
}

// cleanup closes the readers (unmounting image-file snapshots), then
// removes the snapshots, on a context that the caller's cancellation
// does not reach.
func (b *run) cleanup(ctx context.Context) {
	b.closeReaders()
	if b.snaps == nil {
		return
	}
	if err := b.snaps.RemoveAll(context.WithoutCancel(ctx)); err != nil {
		b.log.Error("removing snapshots failed: remove them by hand (lvremove)", "err", err)
	}
	b.out.SnapshotWindow = time.Since(b.snapStart)
	b.log.Info("snapshots removed", "window", b.out.SnapshotWindow.Round(time.Millisecond))
}

// closeReaders closes the disks' readers; it may be called again.
func (b *run) closeReaders() {
	for _, c := range b.readers {
		c.Close()
	}
	b.readers = nil
}

// oneLine keeps an error on one line for summaries and syslog.
func oneLine(err error) string {
	return strings.ReplaceAll(err.Error(), "\n", ";")
}
