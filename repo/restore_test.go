package repo

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"vmvault/backend"
	"vmvault/backend/local"
)

// An existing larger target with other content becomes exactly the image
// (cut only at the end); an unaligned image size takes the buffered path
// for its tail while the aligned runs go through O_DIRECT; a block of
// zeros over old data becomes zero.
func TestRestoreToOverLargerTarget(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(12, 13<<20+1234)
	clear(img[2<<20 : 3<<20])
	m := backupBytes(t, tr.Repository, "vm01", img)
	target := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(target, bytes.Repeat([]byte{0x5a}, 20<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := tr.RestoreTo(context.Background(), m, "", target)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(target)
	if !bytes.Equal(got, img) {
		t.Fatalf("target (%d bytes) differs from the image (%d bytes)", len(got), len(img))
	}
	if st.Bytes != int64(len(img)) || st.Written != int64(len(img)) {
		t.Fatalf("stats %+v: every byte differed and had to be written", st)
	}
	// Again: nothing differs, nothing is written.
	st, err = tr.RestoreTo(context.Background(), m, "", target)
	if err != nil || st.Written != 0 || st.Skipped != int64(len(img)) {
		t.Fatalf("second restore over an equal target: %+v, %v", st, err)
	}
}

// fetchRecorder is a backend that records, for every GetInto of a data
// object, the buffer it was given and the object's size.
type fetchRecorder struct {
	backend.Backend
	mu          sync.Mutex
	calls       int
	bufBytes    int64
	storedBytes int64
	inFlight    int
	maxInFlight int
}

func (f *fetchRecorder) GetInto(ctx context.Context, name string, buf []byte) (int, error) {
	f.mu.Lock()
	f.inFlight++
	f.maxInFlight = max(f.maxInFlight, f.inFlight)
	f.mu.Unlock()
	n, err := backend.GetInto(ctx, f.Backend, name, buf)
	f.mu.Lock()
	f.inFlight--
	if err == nil && strings.HasPrefix(name, "data/") {
		f.calls++
		f.bufBytes += int64(len(buf))
		f.storedBytes += int64(n) + 1
	}
	f.mu.Unlock()
	return n, err
}

// openRecorded opens tr's repository again through a fetchRecorder.
func openRecorded(t *testing.T, tr *testRepo) (*Repository, *fetchRecorder) {
	t.Helper()
	be, err := local.Open(tr.dir)
	if err != nil {
		t.Fatal(err)
	}
	rec := &fetchRecorder{Backend: be}
	r, err := Open(context.Background(), rec, []byte("secret"), Options{CacheDir: tr.cache})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r, rec
}

// A restore sizes each chunk's fetch (its buffer, and so its weight in
// the budget of bytes in flight) by the chunk's stored size from the
// index, not by what its length allows: compressible chunks take a
// fraction of that, and as many more fetches fit in flight. Before, every
// buffer was the chunk's length plus overhead (4.6 times the stored bytes
// of this text).
func TestRestoreSizesFetchesFromIndex(t *testing.T) {
	tr := newTestRepo(t)
	rng := rand.New(rand.NewPCG(21, 1))
	words := strings.Fields("backup restore chunk segment index manifest prune check mount serve repository snapshot volume guest host disk")
	var text []byte // compresses about 3:1
	for len(text) < 24<<20 {
		text = append(text, words[rng.IntN(len(words))]...)
		text = append(text, " \n"[rng.IntN(2)])
	}
	img := text[:24<<20]
	m := backupBytes(t, tr.Repository, "vm01", img)
	r, rec := openRecorded(t, tr)
	if got := restoreBytes(t, r, m); !bytes.Equal(got, img) {
		t.Fatal("restored image differs")
	}
	t.Logf("%d fetches: %d buffer bytes for %d stored, at most %d in flight", rec.calls, rec.bufBytes, rec.storedBytes, rec.maxInFlight)
	if rec.calls == 0 || rec.bufBytes != rec.storedBytes {
		t.Fatalf("%d fetches took buffers of %d bytes for %d stored bytes: not sized by the index", rec.calls, rec.bufBytes, rec.storedBytes)
	}
}

// The index only hints: a restore whose index understates every chunk's
// size (damaged or forged) still restores the image, reading each chunk
// again into the buffer its length allows; one that overstates them
// reads them all the same.
func TestRestoreIndexSizesWrong(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(22, 9<<20)
	m := backupBytes(t, tr.Repository, "vm01", img)
	for _, tc := range []struct {
		name   string
		adjust func(uint32) uint32
	}{
		{"understated", func(n uint32) uint32 { return n / 2 }},
		{"overstated", func(n uint32) uint32 { return n * 2 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, rec := openRecorded(t, tr)
			ix, err := r.LoadIndex(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			wrong := 0
			d, err := m.Disk("")
			if err != nil {
				t.Fatal(err)
			}
			if err := r.resolveSegments(context.Background(), d); err != nil {
				t.Fatal(err)
			}
			for i := range d.segmentCount() {
				id, zero := d.SegmentID(i)
				if zero {
					continue
				}
				raw, err := r.getData(context.Background(), TypeSegment, id)
				if err != nil {
					t.Fatal(err)
				}
				entries, err := decodeSegmentList(raw)
				if err != nil {
					t.Fatal(err)
				}
				for _, e := range entries {
					if ie, ok := ix.Lookup(e.ID); ok && !e.Zero {
						ie.Size = tc.adjust(ie.Size)
						ix.add(ie)
						wrong++
					}
				}
			}
			if wrong == 0 {
				t.Fatal("no index entry changed")
			}
			if got := restoreBytes(t, r, m); !bytes.Equal(got, img) {
				t.Fatal("restored image differs")
			}
			t.Logf("%d entries wrong, %d fetches", wrong, rec.calls)
		})
	}
}
