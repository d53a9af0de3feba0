package vmbackup

import (
	"context"
	"errors"
	"fmt"
	"time"

	"vmvault/repo"
	"vmvault/snapshot"
)

// Change tracking (thin LVM). A disk whose volume is a thin LV is
// snapshotted thin, and after a successful commit that snapshot is kept as
// the disk's base; the next backup asks the pool which ranges differ
// between the base and its new snapshot and lets the repository read only
// those. The rules:
//
//   - The base is used only if the previous generation of the VM recorded
//     it (its disk's Tracker note) and the volume still is that snapshot
//     (name, tags, pool, thin id, uuid): the generation and the base then
//     hold the same bytes. Anything else reads the disk whole, with one log
//     line saying why.
//   - A base is replaced only after the generation read from the new
//     snapshot is committed; a failed backup removes the new snapshot and
//     keeps the old base.
//   - A disk is read whole at least every FullEvery, and bases of disks no
//     longer tracked (removed from the configuration, cbt = false) are
//     removed before the snapshots are taken.

// DefaultFullEvery is how often a tracked disk is read whole when
// Options.FullEvery is zero.
const DefaultFullEvery = 7 * 24 * time.Hour

// ChangeTracker is implemented by a Snapshotter that can keep a disk's
// snapshot as the base of the next backup and tell what changed since
// (thin LVM). Notes are what the tracker records with a generation
// (repo.DiskSource.Tracker) to find the base again.
type ChangeTracker interface {
	// Trackable reports whether changes of origin can be tracked: then
	// its snapshot is made with snapshot.Disk.Thin set.
	Trackable(ctx context.Context, origin snapshot.LV) (bool, error)
	// CheckBase returns nil if the base a note names is still usable for
	// vm, an error saying why not otherwise.
	CheckBase(ctx context.Context, vm, note string) error
	// RemoveBases removes the bases of vm's disks in vg except those
	// named in keep, and returns what it removed.
	RemoveBases(ctx context.Context, vg, vm string, keep map[string]bool) ([]string, error)
}

// TrackedSnapshots are Snapshots whose thin snapshots can be compared
// with a base and kept.
type TrackedSnapshots interface {
	// Note returns the note that will name disk's snapshot once kept.
	Note(ctx context.Context, disk string) (string, error)
	// Changes returns the ranges of disk's snapshot (size bytes) that may
	// differ from the base baseNote names; every other byte is equal.
	Changes(ctx context.Context, disk, baseNote string, size int64) ([]repo.Range, error)
	// Keep makes disk's snapshot the disk's base, replacing the old one;
	// it is then no longer removed with the others.
	Keep(ctx context.Context, disk string) error
}

// tracking is the plan for one tracked disk.
type tracking struct {
	// base is the note of the base to compare with, empty for a full read.
	base string
	// baseGen is the generation read from the base.
	baseGen string
	// baseSize is that generation's size of the disk.
	baseSize int64
	// why says why the disk is read whole (when base is empty).
	why string
}

// planTracking decides, before anything is snapshotted, which disks are
// snapshotted thin and which of those have a usable base. It returns the
// disks to snapshot, with Thin set where tracked.
func (b *run) planTracking(ctx context.Context, r Repository, vols []snapshot.Disk) ([]snapshot.Disk, error) {
	ct, ok := b.vm.Snapshotter.(ChangeTracker)
	if !ok {
		return vols, nil
	}
	b.tracked = map[string]*tracking{}
	var prev *repo.Manifest
	prevLoaded := false
	for i, v := range vols {
		d := b.disk(v.Name)
		if d == nil || !d.Volume.CBT || d.Volume.File != "" {
			continue
		}
		thin, err := ct.Trackable(ctx, v.Origin)
		if err != nil {
			b.log.Info("change tracking off: reading the whole disk", "disk", v.Name, "reason", err.Error())
			continue
		}
		if !thin {
			continue
		}
		vols[i].Thin = true
		t := &tracking{}
		b.tracked[v.Name] = t
		if !prevLoaded {
			prev, err = r.Latest(ctx, b.vm.Name)
			if err != nil {
				return nil, fmt.Errorf("VM %s: find the previous generation: %w", b.vm.Name, err)
			}
			prevLoaded = true
		}
		t.why = b.baseFor(ctx, ct, prev, v.Name, t)
	}
	return vols, nil
}

// baseFor fills t with the base of disk recorded by prev, if usable, and
// returns why not otherwise.
func (b *run) baseFor(ctx context.Context, ct ChangeTracker, prev *repo.Manifest, disk string, t *tracking) string {
	if prev == nil {
		return "no previous generation"
	}
	pd, err := prev.Disk(disk)
	if err != nil {
		return fmt.Sprintf("generation %s has no disk %s", prev.ShortID(), disk)
	}
	if pd.Tracker == "" {
		return fmt.Sprintf("generation %s recorded no base snapshot", prev.ShortID())
	}
	full := pd.FullRead
	if full.IsZero() {
		full = prev.Time
	}
	every := b.opts.FullEvery
	if every <= 0 {
		every = DefaultFullEvery
	}
	if since := b.now().Sub(full); since >= every {
		return fmt.Sprintf("last read whole %s ago (full_every %s)", since.Round(time.Minute), every)
	}
	if err := ct.CheckBase(ctx, b.vm.Name, pd.Tracker); err != nil {
		return err.Error()
	}
	t.base, t.baseGen, t.baseSize = pd.Tracker, prev.ID, pd.Size
	return ""
}

// now is the time full_every is measured against: the generation's.
func (b *run) now() time.Time {
	if !b.opts.Time.IsZero() {
		return b.opts.Time
	}
	return time.Now()
}

func (b *run) disk(name string) *Disk {
	for i := range b.vm.Disks {
		if b.vm.Disks[i].Name == name && b.vm.Disks[i].Volume != nil {
			return &b.vm.Disks[i]
		}
	}
	return nil
}

// removeBases removes the bases of disks that are no longer tracked.
func (b *run) removeBases(ctx context.Context, vols []snapshot.Disk) error {
	ct, ok := b.vm.Snapshotter.(ChangeTracker)
	if !ok {
		return nil
	}
	keep := map[string]bool{}
	for _, v := range vols {
		keep[v.Name] = v.Thin
	}
	seen := map[string]bool{}
	for _, v := range vols {
		if seen[v.Origin.VG] {
			continue
		}
		seen[v.Origin.VG] = true
		removed, err := ct.RemoveBases(ctx, v.Origin.VG, b.vm.Name, keep)
		for _, lv := range removed {
			b.log.Info("removed the base snapshot of a disk no longer tracked", "lv", lv)
		}
		if err != nil {
			return fmt.Errorf("VM %s: %w", b.vm.Name, err)
		}
	}
	return nil
}

// track fills each tracked disk's Tracker note and, where a base is
// usable, its Changes; a disk whose changes cannot be had is read whole,
// with one log line saying why.
func (b *run) track(ctx context.Context, disks []repo.DiskSource) {
	if len(b.tracked) == 0 {
		return
	}
	ts, ok := b.snaps.(TrackedSnapshots)
	if !ok {
		return
	}
	for i := range disks {
		d := &disks[i]
		t := b.tracked[d.Name]
		if t == nil {
			continue
		}
		note, err := ts.Note(ctx, d.Name)
		if err != nil {
			// Without a note the next backup cannot trust the base.
			b.log.Warn("change tracking: cannot name the new snapshot; the next backup reads the disk whole", "disk", d.Name, "err", oneLine(err))
		}
		d.Tracker = note
		why := t.why
		if why == "" && d.Size != t.baseSize {
			why = fmt.Sprintf("size changed from %d to %d bytes", t.baseSize, d.Size)
		}
		if why == "" {
			ranges, err := ts.Changes(ctx, d.Name, t.base, d.Size)
			if err == nil {
				d.Changes = &repo.Changes{Base: t.baseGen, Ranges: ranges, Kind: "thin"}
				b.log.Info("change tracking: reading only what changed", "disk", d.Name, "base", shortID(t.baseGen),
					"ranges", len(ranges), "changed_bytes", rangeBytes(ranges))
				continue
			}
			if ctx.Err() != nil {
				return
			}
			why = oneLine(err)
		}
		b.log.Info("change tracking: reading the whole disk", "disk", d.Name, "reason", why)
	}
}

// dropChanges turns every disk's changes off after the repository
// refused a base (repo.ErrNoBase), with one log line each, and reports
// whether there were any.
func (b *run) dropChanges(disks []repo.DiskSource, why error) bool {
	dropped := false
	for i := range disks {
		if disks[i].Changes != nil {
			disks[i].Changes = nil
			dropped = true
			b.log.Info("change tracking: reading the whole disk", "disk", disks[i].Name, "reason", oneLine(why))
		}
	}
	return dropped
}

// keepBases makes the tracked disks' new snapshots their bases, after the
// commit. A failure costs the next backup a full read, nothing more: the
// generation is committed.
func (b *run) keepBases(ctx context.Context) {
	ts, ok := b.snaps.(TrackedSnapshots)
	if !ok || len(b.tracked) == 0 {
		return
	}
	b.closeReaders()
	for _, d := range b.vm.Disks {
		if b.tracked[d.Name] == nil {
			continue
		}
		if err := ts.Keep(ctx, d.Name); err != nil {
			b.warn(fmt.Sprintf("disk %s: keeping the snapshot as base failed, the next backup reads it whole: %s", d.Name, oneLine(err)))
		}
	}
}

func rangeBytes(rs []repo.Range) int64 {
	var n int64
	for _, r := range rs {
		n += r.Len
	}
	return n
}

func shortID(id string) string {
	if len(id) > 8 {
		return id[:8]
	}
	return id
}

// errNoTracker is returned by Changes for a disk with no thin snapshot.
var errNoTracker = errors.New("not a thin snapshot")
