package vmbackup

// The host-facing steps (LVM, the guest, databases) are fakes here: this
// machine's kernel has no device-mapper, so real snapshots only exist
// inside the qemu guest, where test/lvm and the snapshot package's guest
// tests run the same sequence end to end. The repository and the host
// locks are real: a repository in a temporary directory, flock files.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"vmvault/backend/local"
	"vmvault/crypto"
	"vmvault/quiesce"
	"vmvault/repo"
	"vmvault/snapshot"
)

// events records the order in which the host steps ran.
type events struct {
	mu  sync.Mutex
	log []string
}

func (e *events) add(s string) {
	e.mu.Lock()
	e.log = append(e.log, s)
	e.mu.Unlock()
}

func (e *events) list() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.log)
}

// index returns the position of the first event starting with prefix, or -1.
func (e *events) index(prefix string) int {
	return slices.IndexFunc(e.list(), func(s string) bool { return strings.HasPrefix(s, prefix) })
}

type fakeQuiescer struct {
	ev      *events
	holdErr error
	report  quiesce.Report
}

func (q *fakeQuiescer) Hold(context.Context) (Hold, error) {
	q.ev.add("hold")
	if q.holdErr != nil {
		return nil, q.holdErr
	}
	return q, nil
}

func (q *fakeQuiescer) Release(context.Context) quiesce.Report {
	q.ev.add("release")
	return q.report
}

type fakeSnapshotter struct {
	ev        *events
	panics    bool
	createErr error
	left      []string
	leftErr   error
	snaps     *fakeSnaps
}

func (s *fakeSnapshotter) RemoveLeftovers(_ context.Context, vg, _ string) ([]string, error) {
	s.ev.add("leftovers " + vg)
	return s.left, s.leftErr
}

func (s *fakeSnapshotter) Create(_ context.Context, _ string, disks []snapshot.Disk) (Snapshots, error) {
	s.ev.add(fmt.Sprintf("create %d", len(disks)))
	if s.panics {
		panic("lvcreate wrapper bug")
	}
	if s.createErr != nil {
		return nil, s.createErr
	}
	return s.snaps, nil
}

// fakeSnaps serves each disk's bytes; read runs before every Read.
type fakeSnaps struct {
	ev       *events
	data     map[string][]byte
	read     func(disk string) error
	checkErr error
	peak     float64

	removes     int
	removeCtxOK bool
}

func (s *fakeSnaps) Open(_ context.Context, disk, _ string) (io.ReadCloser, int64, error) {
	s.ev.add("open " + disk)
	b, ok := s.data[disk]
	if !ok {
		return nil, 0, fmt.Errorf("no snapshot of %s", disk)
	}
	return &fakeReader{s: s, disk: disk, r: bytes.NewReader(b)}, int64(len(b)), nil
}

func (s *fakeSnaps) Check(context.Context) (snapshot.Report, error) {
	s.ev.add("check")
	return snapshot.Report{Peak: s.peak}, s.checkErr
}

func (s *fakeSnaps) RemoveAll(ctx context.Context) error {
	s.ev.add("remove")
	s.removes++
	s.removeCtxOK = ctx.Err() == nil
	return nil
}

type fakeReader struct {
	s      *fakeSnaps
	disk   string
	r      *bytes.Reader
	closed bool
}

func (r *fakeReader) Read(p []byte) (int, error) {
	if r.s.read != nil {
		if err := r.s.read(r.disk); err != nil {
			return 0, err
		}
	}
	return r.r.Read(p)
}

func (r *fakeReader) Close() error {
	if !r.closed {
		r.s.ev.add("close " + r.disk)
	}
	r.closed = true
	return nil
}

// fixture is a real repository, real host locks and the fakes of one VM
// with two snapshotted disks in one volume group.
type fixture struct {
	t     *testing.T
	dir   string
	r     *repo.Repository
	ev    *events
	q     *fakeQuiescer
	snap  *fakeSnapshotter
	snaps *fakeSnaps
	vm    VM
	opts  Options
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	dir := t.TempDir()
	be, err := local.Create(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := repo.Init(context.Background(), be, []byte("pw"), repo.Options{KDF: crypto.MinKDFParams, CacheDir: filepath.Join(dir, "cache"), SegmentSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); be.Close() })
	ev := &events{}
	snaps := &fakeSnaps{ev: ev, data: map[string][]byte{
		"hda": bytes.Repeat([]byte("vm01 hda "), 40000),
		"hdb": bytes.Repeat([]byte("vm01 hdb!"), 30000),
	}}
	f := &fixture{t: t, dir: dir, r: r, ev: ev, snaps: snaps,
		q:    &fakeQuiescer{ev: ev, report: quiesce.Report{VM: "vm01", Synced: true}},
		snap: &fakeSnapshotter{ev: ev, snaps: snaps},
	}
	f.vm = VM{Name: "vm01", Quiescer: f.q, Snapshotter: f.snap, Disks: []Disk{
		{Name: "hda", Volume: &Volume{Origin: snapshot.LV{VG: "vg0", Name: "vm01-hda"}, SnapshotSize: 64 << 20}},
		{Name: "hdb", Volume: &Volume{Origin: snapshot.LV{VG: "vg0", Name: "vm01-hdb"}, SnapshotSize: 64 << 20}},
	}}
	f.opts = Options{Locks: FileLocks{Dir: filepath.Join(dir, "locks")}}
	return f
}

func (f *fixture) run(ctx context.Context) (Outcome, error) {
	return Run(ctx, Repo(f.r, 0), f.vm, f.opts)
}

// generations returns how many generations of vm01 were committed.
func (f *fixture) generations() int {
	f.t.Helper()
	ms, err := f.r.Manifests(context.Background(), "vm01")
	if err != nil {
		f.t.Fatal(err)
	}
	return len(ms)
}

// mustNotCommit checks the rules every failed run keeps: nothing
// committed, snapshots removed on a live context, readers closed first.
func (f *fixture) mustNotCommit(err error, want string) {
	f.t.Helper()
	if err == nil || !strings.Contains(err.Error(), want) {
		f.t.Fatalf("error %v, want one saying %q", err, want)
	}
	if n := f.generations(); n != 0 {
		f.t.Fatalf("%d generations committed after: %v", n, err)
	}
	f.snapshotsRemoved()
}

func (f *fixture) snapshotsRemoved() {
	f.t.Helper()
	if created := f.ev.index("create") >= 0 && f.snap.createErr == nil; !created {
		if f.snaps.removes != 0 {
			f.t.Fatalf("snapshots that were never created removed: %v", f.ev.list())
		}
		return
	}
	if f.snaps.removes != 1 || !f.snaps.removeCtxOK {
		f.t.Fatalf("snapshots removed %d times (live context %v); events %v", f.snaps.removes, f.snaps.removeCtxOK, f.ev.list())
	}
	ev := f.ev.list()
	if ev[len(ev)-1] != "remove" {
		f.t.Fatalf("snapshots not removed last (after the readers closed): %v", ev)
	}
}

func TestRunOrder(t *testing.T) {
	f := newFixture(t)
	o, err := f.run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"leftovers vg0", "hold", "create 2", "release", "open hda", "open hdb", "check", "close hda", "close hdb", "remove"}
	if got := f.ev.list(); !slices.Equal(got, want) {
		t.Fatalf("steps %v, want %v", got, want)
	}
	if f.generations() != 1 || o.Manifest == nil || len(o.Manifest.Disks) != 2 {
		t.Fatalf("committed %d generations, outcome %+v", f.generations(), o)
	}
	if o.Manifest.Disks[0].Size != int64(len(f.snaps.data["hda"])) || o.Manifest.Disks[0].Source != "vg0/vm01-hda" {
		t.Fatalf("disk hda recorded as %+v", o.Manifest.Disks[0])
	}
	if !o.Quiesced || !o.Snapshotted || len(o.Warnings) != 0 {
		t.Fatalf("outcome %+v", o)
	}
	if !strings.Contains(string(o.Manifest.Quiesce), `"synced":true`) || !strings.Contains(string(o.Manifest.Quiesce), `"snapshots"`) {
		t.Fatalf("generation's consistency record: %s", o.Manifest.Quiesce)
	}
}

// The outcome says how long the snapshots existed: from their creation
// to their removal, within the run.
func TestRunSnapshotWindow(t *testing.T) {
	f := newFixture(t)
	start := time.Now()
	o, err := f.run(context.Background())
	elapsed := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if o.SnapshotWindow <= 0 || o.SnapshotWindow > elapsed {
		t.Fatalf("snapshot window %v for a run of %v", o.SnapshotWindow, elapsed)
	}
}

// The guest is released before any disk is read, even when a snapshot
// fails; then nothing is opened.
func TestRunCreateFailsReleasesGuest(t *testing.T) {
	f := newFixture(t)
	f.snap.createErr = errors.New("lvcreate: insufficient free space")
	_, err := f.run(context.Background())
	f.mustNotCommit(err, "insufficient free space")
	if got, want := f.ev.list(), []string{"leftovers vg0", "hold", "create 2", "release"}; !slices.Equal(got, want) {
		t.Fatalf("steps %v, want %v", got, want)
	}
}

func TestRunHoldFails(t *testing.T) {
	f := newFixture(t)
	f.q.holdErr = errors.New("ssh: connection refused")
	_, err := f.run(context.Background())
	f.mustNotCommit(err, "connection refused")
	if f.ev.index("create") >= 0 {
		t.Fatalf("snapshots created without a hold: %v", f.ev.list())
	}
}

func TestRunReadErrorRemovesSnapshots(t *testing.T) {
	f := newFixture(t)
	f.snaps.read = func(disk string) error {
		if disk == "hdb" {
			return fmt.Errorf("read /dev/vg0/vm01-hdb-vmvault: %w", syscall.EIO)
		}
		return nil
	}
	_, err := f.run(context.Background())
	f.mustNotCommit(err, "input/output error")
}

// SIGINT/SIGTERM cancel the context (signal.NotifyContext in main): the
// run unwinds, removes the snapshots on a context that still works, and
// commits nothing.
func TestRunCancelled(t *testing.T) {
	f := newFixture(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	f.snaps.read = func(disk string) error {
		cancel()
		return nil
	}
	_, err := f.run(ctx)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v, want context.Canceled", err)
	}
	f.mustNotCommit(err, "")
}

func TestRunOverflowCommitsNothing(t *testing.T) {
	f := newFixture(t)
	f.snaps.checkErr = &snapshot.OverflowError{LV: snapshot.LV{VG: "vg0", Name: "vm01-hda-vmvault"}, Percent: 100, Size: 64 << 20}
	_, err := f.run(context.Background())
	f.mustNotCommit(err, "overflowed")
	if !strings.Contains(err.Error(), "nothing was committed") {
		t.Fatalf("error does not say nothing was committed: %v", err)
	}
}

// An overflow while reading shows as EIO; the error names the overflow.
func TestRunOverflowDuringRead(t *testing.T) {
	f := newFixture(t)
	f.snaps.read = func(string) error { return syscall.EIO }
	f.snaps.checkErr = &snapshot.OverflowError{LV: snapshot.LV{VG: "vg0", Name: "vm01-hda-vmvault"}, Percent: 100, Size: 64 << 20}
	_, err := f.run(context.Background())
	f.mustNotCommit(err, "raise snapshot_size")
	var oe *snapshot.OverflowError
	if !errors.As(err, &oe) {
		t.Fatalf("error %v is not an *OverflowError", err)
	}
}

// A repository lock that disappears while the disks are read (removed by
// `unlock`, or judged stale by a prune) stops the commit.
func TestRunLockLostCommitsNothing(t *testing.T) {
	f := newFixture(t)
	var once sync.Once
	f.snaps.read = func(string) error {
		once.Do(func() {
			locks, _ := filepath.Glob(filepath.Join(f.dir, "repo", "locks", "*"))
			if len(locks) == 0 {
				t.Error("no repository lock while reading")
			}
			for _, l := range locks {
				os.Remove(l)
			}
		})
		return nil
	}
	_, err := f.run(context.Background())
	f.mustNotCommit(err, "nothing was committed")
	if !errors.Is(err, ErrLockLost) {
		t.Fatalf("error %v, want ErrLockLost", err)
	}
}

func TestRunHoldExpired(t *testing.T) {
	f := newFixture(t)
	f.q.report.Expired = true
	_, err := f.run(context.Background())
	f.mustNotCommit(err, "not consistent")
	if f.ev.index("open") >= 0 {
		t.Fatalf("inconsistent snapshots were read: %v", f.ev.list())
	}
}

func TestRunVMLocked(t *testing.T) {
	f := newFixture(t)
	unlock, err := f.opts.Locks.Lock("vm01")
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.run(context.Background())
	unlock()
	if !errors.Is(err, ErrVMLocked) || !strings.Contains(err.Error(), "already running") {
		t.Fatalf("error %v, want ErrVMLocked", err)
	}
	if ev := f.ev.list(); len(ev) != 0 {
		t.Fatalf("a locked VM was touched: %v", ev)
	}
	if _, err := f.run(context.Background()); err != nil {
		t.Fatalf("after unlock: %v", err)
	}
}

func TestRunLeftovers(t *testing.T) {
	f := newFixture(t)
	f.snap.left = []string{"vg0/vm01-hda-vmvault"}
	if _, err := f.run(context.Background()); err != nil {
		t.Fatal(err)
	}
	f = newFixture(t)
	f.snap.leftErr = errors.New("remove leftover snapshot vg0/vm01-hda-vmvault: busy")
	_, err := f.run(context.Background())
	f.mustNotCommit(err, "busy")
	if f.ev.index("hold") >= 0 {
		t.Fatalf("guest held although leftovers remain: %v", f.ev.list())
	}
}

func TestRunWarnings(t *testing.T) {
	f := newFixture(t)
	f.q.report.Err = errors.New("thaw /var:\nno such mount")
	f.q.report.Databases = []quiesce.DBOutcome{{Name: "main", Status: quiesce.DBLocked}, {Name: "stats", Status: quiesce.DBDown}}
	f.snaps.peak = 85
	o, err := f.run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"release: thaw /var:;no such mount", "database stats down", "snapshot 85% full"}
	if !slices.Equal(o.Warnings, want) {
		t.Fatalf("warnings %q, want %q", o.Warnings, want)
	}
}

// A plain source (a --source file, stdin) runs without hold or snapshots
// but under the same host lock.
func TestRunPlainSource(t *testing.T) {
	f := newFixture(t)
	img := filepath.Join(f.dir, "disk.raw")
	if err := os.WriteFile(img, bytes.Repeat([]byte{7}, 300000), 0o600); err != nil {
		t.Fatal(err)
	}
	vm := VM{Name: "vm01", Disks: []Disk{{Name: "disk", Source: File(img)}}}
	o, err := Run(context.Background(), Repo(f.r, 0), vm, f.opts)
	if err != nil {
		t.Fatal(err)
	}
	if o.Quiesced || o.Snapshotted || o.Manifest.Disks[0].Size != 300000 || len(o.Manifest.Quiesce) != 0 || o.SnapshotWindow != 0 {
		t.Fatalf("outcome %+v", o)
	}
}

func TestRunRejectsBadVMName(t *testing.T) {
	f := newFixture(t)
	for _, name := range []string{"bad/name", "a b", "-x", "", "vm\x1b[31m"} {
		f.vm.Name = name
		if _, err := f.run(context.Background()); err == nil || !strings.Contains(err.Error(), "invalid VM name") {
			t.Fatalf("VM %q: %v", name, err)
		}
	}
	if ev := f.ev.list(); len(ev) != 0 {
		t.Fatalf("steps ran for invalid names: %v", ev)
	}
}

// leaseLosing is a repository whose lease is lost (its context cancelled
// with ErrLockLost, as repo does on a failed refresh) once lose is called.
type leaseLosing struct {
	Repository
	lose func()
}

type losingLease struct {
	Lease
	ctx context.Context
}

func (l losingLease) Context() context.Context { return l.ctx }

func (r *leaseLosing) Lock(ctx context.Context, command string) (Lease, error) {
	l, err := r.Repository.Lock(ctx, command)
	if err != nil {
		return nil, err
	}
	lctx, cancel := context.WithCancelCause(l.Context())
	r.lose = func() { cancel(fmt.Errorf("%w: refresh failed", ErrLockLost)) }
	return losingLease{Lease: l, ctx: lctx}, nil
}

// A lease lost while the disks are read stops the run at once; the error
// names the lost lock, not a bare "context canceled".
func TestRunLeaseLostMidway(t *testing.T) {
	f := newFixture(t)
	r := &leaseLosing{Repository: Repo(f.r, 0)}
	f.snaps.read = func(string) error {
		r.lose()
		return nil
	}
	_, err := Run(context.Background(), r, f.vm, f.opts)
	f.mustNotCommit(err, "refresh failed")
	if !errors.Is(err, ErrLockLost) {
		t.Fatalf("error %v, want ErrLockLost", err)
	}
}

// A bug that panics while the guest is held still releases it: a frozen
// guest file system is the worst outcome of all.
func TestRunPanicWhileHeldReleasesGuest(t *testing.T) {
	f := newFixture(t)
	f.snap.panics = true
	func() {
		defer func() {
			if recover() == nil {
				t.Error("the panic was swallowed")
			}
		}()
		f.run(context.Background())
	}()
	if got, want := f.ev.list(), []string{"leftovers vg0", "hold", "create 2", "release"}; !slices.Equal(got, want) {
		t.Fatalf("steps %v, want %v", got, want)
	}
	if f.generations() != 0 {
		t.Fatal("committed after a panic")
	}
	// The host lock went with the panic: the next run is not refused.
	f.snap.panics = false
	if _, err := f.run(context.Background()); err != nil {
		t.Fatalf("run after the panic: %v", err)
	}
}
