package vmbackup

// Change tracking's ordering and fallback rules with fakes for the thin
// LVM steps (this kernel has no device-mapper); test/lvm's
// TestThinEndToEnd runs the same sequence against real thin LVM in the
// qemu guest.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"vmvault/repo"
	"vmvault/snapshot"
)

// thinSnapshotter tracks changes of the disks in thin.
type thinSnapshotter struct {
	*fakeSnapshotter
	thin     map[string]bool // origin LV name → thin
	checkErr error
	bases    []string // disks with a base before the run
	created  []snapshot.Disk
	keepErr  error
	deltaErr error
	ranges   []repo.Range
	kept     []string
	removed  []string
	keepArgs map[string]bool
}

func (s *thinSnapshotter) Trackable(_ context.Context, origin snapshot.LV) (bool, error) {
	return s.thin[origin.Name], nil
}

func (s *thinSnapshotter) CheckBase(_ context.Context, vm, note string) error {
	s.ev.add("check base " + note)
	return s.checkErr
}

func (s *thinSnapshotter) RemoveBases(_ context.Context, vg, vm string, keep map[string]bool) ([]string, error) {
	s.ev.add("remove bases " + vg)
	s.keepArgs = keep
	var removed []string
	for _, d := range s.bases {
		if !keep[d] {
			removed = append(removed, d)
		}
	}
	s.removed = removed
	return removed, nil
}

func (s *thinSnapshotter) Create(ctx context.Context, vm string, disks []snapshot.Disk) (Snapshots, error) {
	s.created = slices.Clone(disks)
	if _, err := s.fakeSnapshotter.Create(ctx, vm, disks); err != nil {
		return nil, err
	}
	return &thinSnaps{fakeSnaps: s.snaps, s: s}, nil
}

type thinSnaps struct {
	*fakeSnaps
	s *thinSnapshotter
}

func (t *thinSnaps) Note(_ context.Context, disk string) (string, error) {
	return "note-" + disk + "-new", nil
}

func (t *thinSnaps) Changes(_ context.Context, disk, base string, size int64) ([]repo.Range, error) {
	t.ev.add("changes " + disk + " since " + base)
	return t.s.ranges, t.s.deltaErr
}

func (t *thinSnaps) Keep(_ context.Context, disk string) error {
	t.ev.add("keep " + disk)
	t.s.kept = append(t.s.kept, disk)
	return t.s.keepErr
}

// recordingRepo records each backup request and lets Latest return a
// generation the test makes up. A made-up base generation is not in the
// repository, so the request goes on without its Changes.
type recordingRepo struct {
	Repository
	latest *repo.Manifest
	// passChanges hands the changes on to the repository as they are.
	passChanges bool
	mu          sync.Mutex
	reqs        []repo.BackupRequest
}

func (r *recordingRepo) Latest(ctx context.Context, vm string) (*repo.Manifest, error) {
	if r.latest != nil {
		return r.latest, nil
	}
	return r.Repository.Latest(ctx, vm)
}

func (r *recordingRepo) Backup(ctx context.Context, req repo.BackupRequest) (*repo.Manifest, error) {
	r.mu.Lock()
	clone := req
	clone.Disks = slices.Clone(req.Disks)
	r.reqs = append(r.reqs, clone)
	r.mu.Unlock()
	if !r.passChanges {
		for i := range req.Disks {
			req.Disks[i].Changes = nil
		}
	}
	return r.Repository.Backup(ctx, req)
}

// thinFixture is newFixture with disk hda a tracked thin LV, hdb a
// classic one, and a log to read.
type thinFixture struct {
	*fixture
	ts   *thinSnapshotter
	rr   *recordingRepo
	logs *bytes.Buffer
}

func newThinFixture(t *testing.T) *thinFixture {
	f := newFixture(t)
	ts := &thinSnapshotter{fakeSnapshotter: f.snap, thin: map[string]bool{"vm01-hda": true},
		ranges: []repo.Range{{Off: 4096, Len: 65536}}}
	f.vm.Snapshotter = ts
	for i := range f.vm.Disks {
		f.vm.Disks[i].Volume.CBT = true
	}
	logs := &bytes.Buffer{}
	f.opts.Logger = slog.New(slog.NewTextHandler(logs, nil))
	f.opts.VerifyUnchanged = 2.5
	return &thinFixture{fixture: f, ts: ts, rr: &recordingRepo{Repository: Repo(f.r, 0)}, logs: logs}
}

func (f *thinFixture) run(ctx context.Context) (Outcome, error) {
	return Run(ctx, f.rr, f.vm, f.opts)
}

// withBase makes Latest return a generation that recorded a base for hda.
func (f *thinFixture) withBase(fullRead time.Time) {
	f.rr.latest = &repo.Manifest{ID: "feedc0de00", VM: "vm01", Time: fullRead,
		Disks: []repo.Disk{{Name: "hda", Size: int64(len(f.snaps.data["hda"])), Tracker: "note-hda-old", FullRead: fullRead}}}
	f.ts.bases = []string{"hda"}
}

// hdaRequest returns what the backup asked of the repository for hda
// (the last request).
func (f *thinFixture) hdaRequest() repo.DiskSource {
	f.t.Helper()
	if len(f.rr.reqs) != 1 && !f.rr.passChanges {
		f.t.Fatalf("%d backup requests, want 1", len(f.rr.reqs))
	}
	for _, d := range f.rr.reqs[len(f.rr.reqs)-1].Disks {
		if d.Name == "hda" {
			return d
		}
	}
	f.t.Fatal("no disk hda in the request")
	return repo.DiskSource{}
}

// fullReadLogged checks that hda was read whole with one log line
// giving reason.
func (f *thinFixture) fullReadLogged(reason string) {
	f.t.Helper()
	if d := f.hdaRequest(); d.Changes != nil {
		f.t.Fatalf("hda was given changes %+v; want a full read because %s", d.Changes, reason)
	}
	var lines []string
	for _, l := range strings.Split(f.logs.String(), "\n") {
		if strings.Contains(l, "reading the whole disk") {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 || !strings.Contains(lines[0], "disk=hda") || !strings.Contains(lines[0], reason) {
		f.t.Fatalf("want one log line saying hda is read whole because %q, got %q\nlog:\n%s", reason, lines, f.logs)
	}
}

// The first backup of a thin disk reads it whole, snapshots it thin,
// records the note naming the new snapshot, and keeps the snapshot as
// base after the commit, before the others are removed.
func TestTrackFirstBackupKeepsBase(t *testing.T) {
	f := newThinFixture(t)
	if _, err := f.run(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.fullReadLogged("no previous generation")
	if len(f.ts.created) != 2 || !f.ts.created[0].Thin || f.ts.created[1].Thin {
		t.Fatalf("snapshots created %+v; want hda thin, hdb not", f.ts.created)
	}
	if d := f.hdaRequest(); d.Tracker != "note-hda-new" {
		t.Fatalf("hda's tracker note %q, want the new snapshot's", d.Tracker)
	}
	for _, d := range f.rr.reqs[0].Disks {
		if d.Name == "hdb" && (d.Tracker != "" || d.Changes != nil) {
			t.Fatalf("untracked disk hdb got %+v", d)
		}
	}
	if f.rr.reqs[0].VerifyUnchanged != 2.5 {
		t.Fatalf("VerifyUnchanged %v, want 2.5", f.rr.reqs[0].VerifyUnchanged)
	}
	ev := f.ev.list()
	order := []string{"remove bases vg0", "hold", "create 2", "release", "check", "keep hda", "remove"}
	last := -1
	for _, step := range order {
		i := slices.Index(ev, step)
		if i <= last {
			t.Fatalf("step %q out of order in %v", step, ev)
		}
		last = i
	}
	if !slices.Equal(f.ts.kept, []string{"hda"}) || !f.ts.keepArgs["hda"] || f.ts.keepArgs["hdb"] {
		t.Fatalf("kept %v, RemoveBases keep %v", f.ts.kept, f.ts.keepArgs)
	}
	if i, j := slices.Index(ev, "close hda"), slices.Index(ev, "keep hda"); i < 0 || i > j {
		t.Fatalf("snapshot kept before its reader was closed: %v", ev)
	}
}

// With a usable base the repository gets only the changed ranges, the
// base generation and the kind; the new snapshot replaces the base.
func TestTrackIncremental(t *testing.T) {
	f := newThinFixture(t)
	f.withBase(time.Now().Add(-time.Hour))
	if _, err := f.run(context.Background()); err != nil {
		t.Fatal(err)
	}
	d := f.hdaRequest()
	if d.Changes == nil || d.Changes.Base != "feedc0de00" || d.Changes.Kind != "thin" || !slices.Equal(d.Changes.Ranges, f.ts.ranges) {
		t.Fatalf("hda's changes %+v, want base feedc0de00, kind thin, ranges %v", d.Changes, f.ts.ranges)
	}
	if d.Tracker != "note-hda-new" {
		t.Fatalf("tracker note %q", d.Tracker)
	}
	if !strings.Contains(f.logs.String(), "reading only what changed") || strings.Contains(f.logs.String(), "reading the whole disk") {
		t.Fatalf("log:\n%s", f.logs)
	}
	ev := f.ev.list()
	if i, j := slices.Index(ev, "check base note-hda-old"), slices.Index(ev, "hold"); i < 0 || i > j {
		t.Fatalf("base not checked before the hold: %v", ev)
	}
	if i, j := slices.Index(ev, "release"), slices.Index(ev, "changes hda since note-hda-old"); j < i {
		t.Fatalf("thin_delta ran while the guest was held: %v", ev)
	}
	if len(f.ts.removed) != 0 || !slices.Equal(f.ts.kept, []string{"hda"}) {
		t.Fatalf("bases removed %v, kept %v", f.ts.removed, f.ts.kept)
	}
}

// Every reason to distrust the base reads the disk whole, with one log
// line saying why, and still keeps the new snapshot as the next base.
func TestTrackFallbacks(t *testing.T) {
	for _, tc := range []struct {
		name   string
		setup  func(f *thinFixture)
		reason string
	}{
		{"base gone", func(f *thinFixture) { f.ts.checkErr = errors.New("base vg0/vm01-hda-vmvault-base is gone") }, "is gone"},
		{"base not ours", func(f *thinFixture) {
			f.ts.checkErr = errors.New("base vg0/vm01-hda-vmvault-base does not carry vmvault's tags")
		}, "does not carry"},
		{"thin_delta fails", func(f *thinFixture) {
			f.ts.deltaErr = fmt.Errorf("thin_delta of pool vg0/pool: unexpected thin_delta output: unknown element <moved>")
		}, "unknown element"},
		{"full_every elapsed", func(f *thinFixture) { f.withBase(time.Now().Add(-8 * 24 * time.Hour)) }, "full_every 168h"},
		{"full_every configured", func(f *thinFixture) {
			f.withBase(time.Now().Add(-2 * time.Hour))
			f.opts.FullEvery = time.Hour
		}, "full_every 1h"},
		{"size changed", func(f *thinFixture) { f.rr.latest.Disks[0].Size++ }, "size changed"},
		{"no tracker note", func(f *thinFixture) { f.rr.latest.Disks[0].Tracker = "" }, "recorded no base"},
		{"disk not in the previous generation", func(f *thinFixture) { f.rr.latest.Disks[0].Name = "hdz" }, "has no disk hda"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newThinFixture(t)
			f.withBase(time.Now().Add(-time.Hour))
			tc.setup(f)
			if _, err := f.run(context.Background()); err != nil {
				t.Fatal(err)
			}
			f.fullReadLogged(tc.reason)
			if d := f.hdaRequest(); d.Tracker != "note-hda-new" {
				t.Fatalf("tracker note %q", d.Tracker)
			}
			if !slices.Equal(f.ts.kept, []string{"hda"}) {
				t.Fatalf("kept %v, want the new snapshot of hda", f.ts.kept)
			}
		})
	}
}

// cbt = false, or a disk that is not a thin LV: a classic snapshot, no
// tracking, and a base the disk still had is removed.
func TestTrackOff(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(f *thinFixture)
	}{
		{"cbt false", func(f *thinFixture) { f.vm.Disks[0].Volume.CBT = false }},
		{"not thin", func(f *thinFixture) { f.ts.thin = nil }},
		{"image file", func(f *thinFixture) { f.vm.Disks[0].Volume.File = "images/a.raw" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newThinFixture(t)
			f.withBase(time.Now())
			tc.setup(f)
			if _, err := f.run(context.Background()); err != nil {
				t.Fatal(err)
			}
			if d := f.hdaRequest(); d.Changes != nil || d.Tracker != "" {
				t.Fatalf("untracked hda got %+v", d)
			}
			if f.ts.created[0].Thin || len(f.ts.kept) != 0 || !slices.Equal(f.ts.removed, []string{"hda"}) {
				t.Fatalf("created %+v, kept %v, bases removed %v", f.ts.created, f.ts.kept, f.ts.removed)
			}
		})
	}
}

// A failed backup keeps the old base and removes the new snapshot.
func TestTrackFailureKeepsOldBase(t *testing.T) {
	f := newThinFixture(t)
	f.withBase(time.Now().Add(-time.Hour))
	f.snaps.checkErr = errors.New("snapshot failed")
	_, err := f.run(context.Background())
	if err == nil {
		t.Fatal("backup succeeded")
	}
	if len(f.ts.kept) != 0 || len(f.ts.removed) != 0 || f.snaps.removes != 1 {
		t.Fatalf("kept %v, bases removed %v, snapshots removed %d times", f.ts.kept, f.ts.removed, f.snaps.removes)
	}
}

// Keeping the base fails after the commit: the generation stands, with a
// warning that the next backup reads the disk whole.
func TestTrackKeepFails(t *testing.T) {
	f := newThinFixture(t)
	f.ts.keepErr = errors.New("lvrename failed")
	o, err := f.run(context.Background())
	if err != nil || o.Manifest == nil {
		t.Fatalf("outcome %+v, err %v", o, err)
	}
	if len(o.Warnings) != 1 || !strings.Contains(o.Warnings[0], "next backup reads it whole") {
		t.Fatalf("warnings %q", o.Warnings)
	}
	if f.snaps.removes != 1 {
		t.Fatalf("snapshots removed %d times", f.snaps.removes)
	}
}

// The repository refuses the base (here: the fake reader cannot be read
// at any offset, and the base generation is made up):
// the backup is asked again without changes, one log line says why, and
// the generation is committed from a full read.
func TestTrackRepoRefusesBase(t *testing.T) {
	f := newThinFixture(t)
	f.withBase(time.Now().Add(-time.Hour))
	f.rr.passChanges = true
	o, err := f.run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(f.rr.reqs) != 2 || f.rr.reqs[0].Disks[0].Changes == nil {
		t.Fatalf("%d requests; want one with changes, then one without", len(f.rr.reqs))
	}
	f.fullReadLogged("read the disk whole")
	if d, _ := o.Manifest.Disk("hda"); d == nil || d.CBT != "none" || d.BytesRead != d.Size || d.Tracker != "note-hda-new" {
		t.Fatalf("hda recorded as %+v", d)
	}
	if !slices.Equal(f.ts.kept, []string{"hda"}) {
		t.Fatalf("kept %v", f.ts.kept)
	}
}
