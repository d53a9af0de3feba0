package snapshot

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"vmvault/internal/bytesize"
)

// cleanupTimeout bounds unmounting and removing snapshots. Cleanup runs on
// a context detached from the caller's, so it still happens after Ctrl-C or
// SIGTERM cancelled the backup.
const cleanupTimeout = 2 * time.Minute

// WarnPercent is the fill level above which a backup should warn that the
// snapshot size is too tight.
const WarnPercent = 80

// Disk is one disk of a VM to snapshot.
type Disk struct {
	// Name is the disk's name in the configuration; it becomes part of the
	// snapshot name "<vm>-<disk>-vmvault".
	Name string
	// Origin is the logical volume holding the disk (or the file system
	// with its image file).
	Origin LV
	// Size is the snapshot's copy-on-write space in bytes; unused for a
	// thin snapshot.
	Size int64
	// Thin makes a thin snapshot of a thin volume (no copy-on-write space
	// to size: it shares the pool), which can be kept as a base (Keep).
	Thin bool
}

// Snapshot is one snapshot in a Set.
type Snapshot struct {
	// Disk is the disk's name.
	Disk string
	// Origin is the snapshotted volume.
	Origin LV
	// LV is the snapshot volume.
	LV LV
	// Size is the requested copy-on-write space in bytes.
	Size int64
	// Thin says it is a thin snapshot.
	Thin bool
}

// Set holds the snapshots of one VM. RemoveAll and Close are idempotent
// and safe to call from a defer and a signal handler at once.
type Set struct {
	r  Runner
	vm string

	mu      sync.Mutex
	snaps   []Snapshot
	removed map[LV]bool
	readers map[*reader]struct{}
	peak    float64
	active  map[LV]bool // thin snapshots activated
}

// CreateSet snapshots every disk of vm back to back, so that the caller can
// hold the quiesce window (frozen guest, locked databases) as briefly as
// possible. Names are validated before the first lvcreate. If one snapshot
// fails, those already made are removed and the error returned.
func CreateSet(ctx context.Context, r Runner, vm string, disks []Disk) (*Set, error) {
	if err := CheckName("VM", vm); err != nil {
		return nil, err
	}
	if len(disks) == 0 {
		return nil, fmt.Errorf("VM %s: no disks to snapshot", vm)
	}
	seen := map[string]bool{}
	for _, d := range disks {
		if err := CheckName("disk", d.Name); err != nil {
			return nil, fmt.Errorf("VM %s: %w", vm, err)
		}
		if seen[d.Name] {
			return nil, fmt.Errorf("VM %s: disk %s listed twice", vm, d.Name)
		}
		seen[d.Name] = true
		if err := CheckName("snapshot", SnapshotName(vm, d.Name)); err != nil {
			return nil, fmt.Errorf("VM %s: %w", vm, err)
		}
		if d.Size <= 0 && !d.Thin {
			return nil, fmt.Errorf("VM %s disk %s: snapshot size must be positive", vm, d.Name)
		}
	}
	s := &Set{r: r, vm: vm, removed: map[LV]bool{}, readers: map[*reader]struct{}{}, active: map[LV]bool{}}
	for _, d := range disks {
		var lv LV
		var err error
		if d.Thin {
			lv, err = CreateThin(ctx, r, d.Origin, SnapshotName(vm, d.Name), "vmvault", vmTagPrefix+vm)
		} else {
			lv, err = Create(ctx, r, d.Origin, SnapshotName(vm, d.Name), d.Size, "vmvault", vmTagPrefix+vm)
		}
		if err != nil {
			return nil, errors.Join(err, s.RemoveAll(ctx))
		}
		s.mu.Lock()
		s.snaps = append(s.snaps, Snapshot{Disk: d.Name, Origin: d.Origin, LV: lv, Size: d.Size, Thin: d.Thin})
		s.mu.Unlock()
	}
	return s, nil
}

// VM returns the name of the VM the set belongs to.
func (s *Set) VM() string { return s.vm }

// Snapshots returns the set's snapshots in creation order.
func (s *Set) Snapshots() []Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Snapshot(nil), s.snaps...)
}

func (s *Set) lookup(disk string) (Snapshot, error) {
	for _, sn := range s.snaps {
		if sn.Disk == disk {
			if s.removed[sn.LV] {
				return Snapshot{}, fmt.Errorf("snapshot %s already removed", sn.LV)
			}
			return sn, nil
		}
	}
	return Snapshot{}, fmt.Errorf("VM %s has no snapshot of disk %q", s.vm, disk)
}

// Open opens the snapshot of disk for reading. With file empty it reads the
// snapshot's block device; otherwise file is a path inside the file system on
// the snapshot, which is mounted read-only until the reader is closed. The
// size is the number of bytes the reader will deliver; a read error (EIO
// from an overflowed snapshot) or a short read is returned as an error.
func (s *Set) Open(ctx context.Context, disk, file string) (io.ReadCloser, int64, error) {
	s.mu.Lock()
	sn, err := s.lookup(disk)
	s.mu.Unlock()
	if err != nil {
		return nil, 0, err
	}
	if err := s.activate(ctx, sn); err != nil {
		return nil, 0, err
	}
	rd, err := open(ctx, s.r, sn.LV, file)
	if err != nil {
		return nil, 0, err
	}
	s.mu.Lock()
	s.readers[rd] = struct{}{}
	s.mu.Unlock()
	rd.onClose = func() {
		s.mu.Lock()
		delete(s.readers, rd)
		s.mu.Unlock()
	}
	return rd, rd.size, nil
}

// activate makes the device of a thin snapshot, once: it was created
// inactive (LVM's activation-skip flag), so that creating it inside the
// quiesce window is one command.
func (s *Set) activate(ctx context.Context, sn Snapshot) error {
	s.mu.Lock()
	done := !sn.Thin || s.active[sn.LV]
	s.mu.Unlock()
	if done {
		return nil
	}
	if err := ActivateThin(ctx, s.r, sn.LV); err != nil {
		return err
	}
	s.mu.Lock()
	s.active[sn.LV] = true
	s.mu.Unlock()
	return nil
}

// Volume returns what lvs says about the snapshot of disk (a thin
// snapshot's thin id and uuid, for its ThinBase).
func (s *Set) Volume(ctx context.Context, disk string) (Volume, error) {
	s.mu.Lock()
	sn, err := s.lookup(disk)
	s.mu.Unlock()
	if err != nil {
		return Volume{}, err
	}
	return Inspect(ctx, s.r, sn.LV)
}

// Keep makes the thin snapshot of disk the disk's base, for the next
// backup to compare against: the previous base (if vm's) is removed, the
// snapshot renamed to BaseName and deactivated. It leaves the set, so
// RemoveAll no longer removes it. The caller closes its readers first.
func (s *Set) Keep(ctx context.Context, disk string) (LV, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	s.mu.Lock()
	defer s.mu.Unlock()
	sn, err := s.lookup(disk)
	if err != nil {
		return LV{}, err
	}
	if !sn.Thin {
		return LV{}, fmt.Errorf("snapshot %s is not thin: it cannot be kept", sn.LV)
	}
	base := LV{VG: sn.LV.VG, Name: BaseName(s.vm, disk)}
	if err := RemoveBase(ctx, s.r, s.vm, base); err != nil {
		return LV{}, fmt.Errorf("replace base: %w", err)
	}
	kept, err := Rename(ctx, s.r, sn.LV, base.Name)
	if err != nil {
		return LV{}, err
	}
	s.removed[sn.LV] = true
	// An inactive base has no device anyone could write to by mistake;
	// thin_delta reads the pool's metadata, not the device.
	if err := Deactivate(ctx, s.r, kept); err != nil {
		return kept, err
	}
	return kept, nil
}

// Usage is one snapshot's fill level at a Check.
type Usage struct {
	LV      LV
	Percent float64
	// Size is the copy-on-write space LVM allocated (after rounding to
	// extents), or the requested size if lvs did not report it.
	Size int64
}

// Report is the outcome of Check.
type Report struct {
	Snapshots []Usage
	// Peak is the highest fill level seen by any Check of this set.
	Peak float64
}

// Warn reports whether a snapshot came close to overflowing.
func (r Report) Warn() bool { return r.Peak > WarnPercent }

// OverflowError reports a snapshot that ran out of copy-on-write space; its
// content is lost and the backup must not be committed.
type OverflowError struct {
	LV      LV
	Percent float64
	Size    int64
}

func (e *OverflowError) Error() string {
	return fmt.Sprintf("snapshot %s overflowed (%.0f%% of %s): raise snapshot_size", e.LV, e.Percent, bytesize.Format(e.Size))
}

// Check verifies that every snapshot is still valid; the backup calls it
// after reading and before committing. The first error is an
// *OverflowError for an invalid snapshot.
func (s *Set) Check(ctx context.Context) (Report, error) {
	var rep Report
	// Overflows come first: they are the errors the user must act on.
	var overflows, errs []error
	for _, sn := range s.Snapshots() {
		st, err := GetStatus(ctx, s.r, sn.LV)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		u := Usage{LV: sn.LV, Percent: st.Percent, Size: st.Size}
		if u.Size == 0 {
			u.Size = sn.Size
		}
		if sn.Thin {
			// A thin snapshot has no copy-on-write space to fill: it shares
			// the pool's blocks and cannot overflow; it can only fail.
			u.Percent, u.Size = 0, 0
			rep.Snapshots = append(rep.Snapshots, u)
			if !st.ThinValid() {
				errs = append(errs, fmt.Errorf("thin snapshot %s failed (attr %s)", sn.LV, st.Attr))
			}
			continue
		}
		rep.Snapshots = append(rep.Snapshots, u)
		if st.Invalid() {
			overflows = append(overflows, &OverflowError{LV: sn.LV, Percent: st.Percent, Size: u.Size})
		} else if !st.IsSnapshot() {
			errs = append(errs, fmt.Errorf("%s is no longer a snapshot (attr %s)", sn.LV, st.Attr))
		}
	}
	s.mu.Lock()
	for _, u := range rep.Snapshots {
		s.peak = max(s.peak, u.Percent)
	}
	rep.Peak = s.peak
	s.mu.Unlock()
	return rep, errors.Join(append(overflows, errs...)...)
}

// RemoveAll closes readers still open (unmounting their file systems) and
// removes every snapshot not yet removed. It keeps going after errors and
// may be called again to retry; once everything is gone it does nothing.
func (s *Set) RemoveAll(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	s.mu.Lock()
	readers := make([]*reader, 0, len(s.readers))
	for rd := range s.readers {
		readers = append(readers, rd)
	}
	s.mu.Unlock()
	var errs []error
	for _, rd := range readers {
		if err := rd.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	// The lock is held while removing so a concurrent caller waits and
	// then finds nothing left to do.
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := len(s.snaps) - 1; i >= 0; i-- {
		lv := s.snaps[i].LV
		if s.removed[lv] {
			continue
		}
		if err := Remove(ctx, s.r, lv); err != nil {
			errs = append(errs, err)
			continue
		}
		s.removed[lv] = true
	}
	return errors.Join(errs...)
}

// Close removes all snapshots; see RemoveAll.
func (s *Set) Close() error { return s.RemoveAll(context.Background()) }
