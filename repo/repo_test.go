package repo

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"vmvault/backend"
	"vmvault/backend/local"
	"vmvault/crypto"
)

// fastKDF keeps tests quick; real repositories use crypto.DefaultKDFParams.
var fastKDF = crypto.MinKDFParams

type testRepo struct {
	*Repository
	dir   string
	cache string
}

func newTestRepo(t *testing.T) *testRepo {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "repo")
	be, err := local.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	cache := t.TempDir()
	r, err := Init(context.Background(), be, []byte("secret"), Options{KDF: fastKDF, CacheDir: cache, SegmentSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return &testRepo{Repository: r, dir: dir, cache: cache}
}

func (tr *testRepo) reopen(t *testing.T) *Repository {
	t.Helper()
	be, _ := local.Open(tr.dir)
	r, err := Open(context.Background(), be, []byte("secret"), Options{CacheDir: tr.cache})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// testImage returns a disk-like image: random data, compressible text,
// zero holes, and a repeated region.
func testImage(seed uint64, size int) []byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	img := make([]byte, size)
	for i := 0; i < size; {
		n := min(size-i, 1<<20+int(rng.IntN(1<<20)))
		switch rng.IntN(4) {
		case 0: // zeros
		case 1:
			for j := range n {
				img[i+j] = "abcdefgh ijk\n"[rng.IntN(13)]
			}
		default:
			for j := range n {
				img[i+j] = byte(rng.Uint32())
			}
		}
		i += n
	}
	return img
}

// segmentEntries fetches and decodes the segment list id.
func segmentEntries(t *testing.T, r *Repository, id crypto.ID) []SegmentEntry {
	t.Helper()
	raw, err := r.getData(context.Background(), TypeSegment, id)
	if err != nil {
		t.Fatal(err)
	}
	entries, err := decodeSegmentList(raw)
	if err != nil {
		t.Fatalf("segment %s: %v", dataName(id), err)
	}
	return entries
}

func backupBytes(t *testing.T, r *Repository, vm string, img []byte) *Manifest {
	t.Helper()
	m, err := r.Backup(context.Background(), BackupRequest{VM: vm, Disks: []DiskSource{{Name: "disk", Source: "test", Reader: bytes.NewReader(img), Size: int64(len(img))}}, SHA256: true})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func restoreBytes(t *testing.T, r *Repository, m *Manifest) []byte {
	t.Helper()
	var out bytes.Buffer
	if _, err := r.Restore(context.Background(), m, "", &out); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func TestBackupRestoreRoundTrip(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(1, 37<<20+12345)
	m1 := backupBytes(t, tr.Repository, "vm01", img)
	if m1.Disks[0].SHA256 != sha256hex(img) {
		t.Fatal("recorded SHA-256 differs from the image's")
	}
	if m1.Stats.BytesRead != int64(len(img)) || m1.Stats.BytesZero == 0 {
		t.Fatalf("stats %+v", m1.Stats)
	}
	r2 := tr.reopen(t)
	got := restoreBytes(t, r2, mustFind(t, r2, "vm01", "latest"))
	if sha256hex(got) != sha256hex(img) {
		t.Fatal("restored image differs")
	}

	// Next day: a few small edits. Only changed segments are re-chunked
	// and only changed chunks stored.
	img2 := bytes.Clone(img)
	copy(img2[5<<20:], []byte("changed block"))
	copy(img2[30<<20:], bytes.Repeat([]byte{7}, 8192))
	m2 := backupBytes(t, r2, "vm01", img2)
	if m2.Stats.SegmentsNew > 2 || m2.Stats.BytesNew > 10<<20 || m2.Stats.BytesNew == 0 {
		t.Fatalf("incremental stored too much or nothing: %+v", m2.Stats)
	}
	r3 := tr.reopen(t)
	if got := restoreBytes(t, r3, mustFind(t, r3, "vm01", m2.ID[:6])); !bytes.Equal(got, img2) {
		t.Fatal("second generation restores wrong")
	}
	if got := restoreBytes(t, r3, mustFind(t, r3, "vm01", m1.ID)); !bytes.Equal(got, img) {
		t.Fatal("first generation no longer restores")
	}
	// Unchanged: nothing new at all.
	m3 := backupBytes(t, r3, "vm01", img2)
	if m3.Stats.SegmentsNew != 0 || m3.Stats.ChunksNew != 0 {
		t.Fatalf("unchanged image stored data: %+v", m3.Stats)
	}
	rep, err := r3.Check(context.Background(), CheckOptions{ReadData: true})
	if err != nil || !rep.OK() {
		t.Fatalf("check: %v %+v", err, rep)
	}
	if rep.Manifests != 3 || rep.ChunksRead == 0 {
		t.Fatalf("check report %+v", rep)
	}
}

func TestEmptyAndZeroImages(t *testing.T) {
	tr := newTestRepo(t)
	for _, img := range [][]byte{{}, make([]byte, 9<<20+1), {1}} {
		m := backupBytes(t, tr.Repository, "vmz", img)
		if got := restoreBytes(t, tr.Repository, m); !bytes.Equal(got, img) {
			t.Fatalf("image of %d bytes restores as %d bytes", len(img), len(got))
		}
	}
}

func TestWrongPasswordAndNotRepository(t *testing.T) {
	tr := newTestRepo(t)
	be, _ := local.Open(tr.dir)
	if _, err := Open(context.Background(), be, []byte("wrong"), Options{}); !errors.Is(err, ErrWrongPassword) {
		t.Fatalf("wrong password: %v", err)
	}
	be2, _ := local.Open(t.TempDir())
	if _, err := Open(context.Background(), be2, []byte("secret"), Options{}); !errors.Is(err, ErrNotRepository) {
		t.Fatalf("empty dir: %v", err)
	}
}

func TestKeys(t *testing.T) {
	tr := newTestRepo(t)
	ctx := context.Background()
	id, err := tr.AddKey(ctx, []byte("second"), fastKDF)
	if err != nil {
		t.Fatal(err)
	}
	be, _ := local.Open(tr.dir)
	r2, err := Open(ctx, be, []byte("second"), Options{CacheDir: tr.cache})
	if err != nil {
		t.Fatal(err)
	}
	keys, _ := r2.Keys(ctx)
	if len(keys) != 2 {
		t.Fatalf("%d keys", len(keys))
	}
	if err := r2.RemoveKey(ctx, id); err == nil {
		t.Fatal("removed the key in use")
	}
	if _, err := r2.ChangePassword(ctx, []byte("third"), fastKDF); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, be, []byte("second"), Options{}); !errors.Is(err, ErrWrongPassword) {
		t.Fatal("old password still works after passwd")
	}
	if _, err := Open(ctx, be, []byte("third"), Options{CacheDir: tr.cache}); err != nil {
		t.Fatal(err)
	}
}

func TestCorruptionDetected(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(2, 9<<20)
	m := backupBytes(t, tr.Repository, "vm01", img)
	// Flip one byte in the largest chunk.
	var victim string
	var size int64
	tr.be.List(context.Background(), "data/", func(o backend.ObjectInfo) error {
		if o.Size > size {
			victim, size = o.Name, o.Size
		}
		return nil
	})
	path := filepath.Join(tr.dir, victim)
	data, _ := os.ReadFile(path)
	data[len(data)/2] ^= 0x40
	os.Chmod(path, 0o600)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	r := tr.reopen(t)
	var out bytes.Buffer
	_, err := r.Restore(context.Background(), m, "", &out)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), shortName(victim)) {
		t.Fatalf("restore of corrupt repo: %v", err)
	}
	// Nothing of the damaged segment (nor after it) was written.
	if int64(out.Len()) > m.Disks[0].Size-1 {
		t.Fatal("restore emitted the whole image despite corruption")
	}
	rep, err := r.Check(context.Background(), CheckOptions{ReadData: true})
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() || rep.Damage[0].Object != victim || len(rep.Damage[0].Generations) != 1 || !strings.Contains(rep.Damage[0].Generations[0], m.ShortID()) {
		t.Fatalf("check did not name the damage: %+v", rep.Damage)
	}
	// Deleted object: structural check finds it without reading data.
	os.Remove(path)
	rep, _ = r.Check(context.Background(), CheckOptions{})
	if rep.OK() || !strings.Contains(rep.Damage[0].Problem, "missing") {
		t.Fatalf("check of a missing object: %+v", rep.Damage)
	}
}

func TestSourceShrinksOrFails(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(3, 6<<20)
	_, err := tr.Backup(context.Background(), BackupRequest{VM: "vm01", Disks: []DiskSource{{Name: "d", Source: "img", Reader: bytes.NewReader(img[:5<<20]), Size: int64(len(img))}}})
	if err == nil || !strings.Contains(err.Error(), "ended early") {
		t.Fatalf("shrunk source: %v", err)
	}
	_, err = tr.Backup(context.Background(), BackupRequest{VM: "vm01", Disks: []DiskSource{{Name: "d", Source: "img", Reader: &failingReader{data: img, failAt: 3 << 20}, Size: -1}}})
	if err == nil || !strings.Contains(err.Error(), "input/output error") {
		t.Fatalf("failing source: %v", err)
	}
	ids, _ := tr.ManifestIDs(context.Background())
	if len(ids) != 0 {
		t.Fatalf("failed backups committed %d manifests", len(ids))
	}
	// The next run reuses what the failed ones stored.
	m := backupBytes(t, tr.Repository, "vm01", img)
	if got := restoreBytes(t, tr.Repository, m); !bytes.Equal(got, img) {
		t.Fatal("restore after failed runs differs")
	}
}

func TestRestoreToTarget(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(4, 13<<20)
	m := backupBytes(t, tr.Repository, "vm01", img)
	target := filepath.Join(t.TempDir(), "disk.raw")
	st, err := tr.RestoreTo(context.Background(), m, "", target)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(target)
	if !bytes.Equal(got, img) {
		t.Fatal("target differs")
	}
	if st.Skipped == 0 {
		t.Fatal("zero ranges were written into a new file instead of left as holes")
	}
	// Damage the target in one place: only that block is rewritten.
	f, _ := os.OpenFile(target, os.O_RDWR, 0)
	f.WriteAt([]byte("garbage"), 7<<20+5)
	f.Close()
	st, err = tr.RestoreTo(context.Background(), m, "", target)
	if err != nil {
		t.Fatal(err)
	}
	got, _ = os.ReadFile(target)
	if !bytes.Equal(got, img) || st.Written != 64<<10 {
		t.Fatalf("in-place restore: equal=%v written=%d", bytes.Equal(got, img), st.Written)
	}
}

func TestConcurrentBackupsDifferentVMs(t *testing.T) {
	tr := newTestRepo(t)
	imgs := [][]byte{testImage(5, 9<<20), testImage(6, 9<<20)}
	errs := make(chan error, 2)
	for i, img := range imgs {
		go func() {
			be, _ := local.Open(tr.dir)
			r, err := Open(context.Background(), be, []byte("secret"), Options{CacheDir: tr.cache})
			if err != nil {
				errs <- err
				return
			}
			defer r.Close()
			l, err := r.Lock(context.Background(), SharedLock, "backup", time.Minute)
			if err != nil {
				errs <- err
				return
			}
			defer l.Unlock()
			_, err = r.Backup(context.Background(), BackupRequest{VM: []string{"a", "b"}[i], Disks: []DiskSource{{Name: "d", Reader: bytes.NewReader(img), Size: -1}}})
			errs <- err
		}()
	}
	for range imgs {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	r := tr.reopen(t)
	for i, vm := range []string{"a", "b"} {
		if got := restoreBytes(t, r, mustFind(t, r, vm, "latest")); !bytes.Equal(got, imgs[i]) {
			t.Fatalf("vm %s restores wrong", vm)
		}
	}
}

func TestLocks(t *testing.T) {
	tr := newTestRepo(t)
	ctx := context.Background()
	s1, err := tr.Lock(ctx, SharedLock, "backup", 0)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := tr.Lock(ctx, SharedLock, "backup", 0)
	if err != nil {
		t.Fatal("two shared locks conflict:", err)
	}
	if _, err := tr.Lock(ctx, ExclusiveLock, "prune", 0); !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "backup") {
		t.Fatalf("exclusive lock under shared: %v", err)
	}
	s1.Unlock()
	s2.Unlock()
	x, err := tr.Lock(ctx, ExclusiveLock, "prune", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Lock(ctx, SharedLock, "backup", 0); !errors.Is(err, ErrLocked) {
		t.Fatalf("shared lock under exclusive: %v", err)
	}
	x.Unlock()
	locks, _ := tr.Locks(ctx)
	if len(locks) != 0 {
		t.Fatalf("%d locks left", len(locks))
	}
}

type failingReader struct {
	data   []byte
	off    int
	failAt int
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.off >= f.failAt {
		return 0, errors.New("input/output error")
	}
	n := copy(p, f.data[f.off:min(len(f.data), f.failAt)])
	f.off += n
	return n, nil
}

func mustFind(t *testing.T, r *Repository, vm, ref string) *Manifest {
	t.Helper()
	m, err := r.FindManifest(context.Background(), vm, ref)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func sha256hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}
