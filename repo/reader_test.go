package repo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"vmvault/backend"
	"vmvault/backend/local"
)

// readerImage is testImage with a long zero range (whole segments when
// they fall inside it) and a shorter zero run inside data, so both kinds
// of hole are present.
func readerImage() []byte {
	img := testImage(7, 21<<20+777)
	clear(img[8<<20 : 12<<20])
	clear(img[13<<20+4096 : 15<<20])
	return img
}

func openTestReader(t *testing.T, r *Repository, m *Manifest, opts ReaderOptions) *DiskReader {
	t.Helper()
	dr, err := r.OpenDisk(context.Background(), m, "", opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dr.Close() })
	return dr
}

func TestDiskReaderRandomAccess(t *testing.T) {
	tr := newTestRepo(t)
	img := readerImage()
	m := backupBytes(t, tr.Repository, "vm01", img)
	r := tr.reopen(t)
	m = mustFind(t, r, "vm01", m.ID)
	dr := openTestReader(t, r, m, ReaderOptions{CacheSize: 8 << 20})
	if dr.Size() != int64(len(img)) {
		t.Fatalf("Size %d, image %d", dr.Size(), len(img))
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for range 200 {
		off := rng.Int64N(int64(len(img)))
		n := 1 + rng.IntN(3<<20)
		p := make([]byte, n)
		k, err := dr.ReadAt(p, off)
		wantN := min(n, len(img)-int(off))
		if k != wantN {
			t.Fatalf("ReadAt(%d, %d) = %d bytes, want %d (err %v)", n, off, k, wantN, err)
		}
		if (err == io.EOF) != (wantN < n) || (err != nil && err != io.EOF) {
			t.Fatalf("ReadAt(%d, %d): err %v", n, off, err)
		}
		if !bytes.Equal(p[:k], img[off:off+int64(k)]) {
			t.Fatalf("ReadAt(%d, %d) returned wrong bytes", n, off)
		}
		// ReadSlices gives the same bytes and errors, in slices that
		// cannot be appended to in place (they are shared).
		v, err2 := dr.ReadSlices(context.Background(), off, n)
		if v.N != k || err2 != err || !bytes.Equal(bytes.Join(v.Bufs, nil), p[:k]) {
			t.Fatalf("ReadSlices(%d, %d) = %d bytes, %v; ReadAt %d, %v", off, n, v.N, err2, k, err)
		}
		for _, b := range v.Bufs {
			if cap(b) != len(b) {
				t.Fatalf("ReadSlices(%d, %d): a slice of %d bytes has room for %d", off, n, len(b), cap(b))
			}
		}
		v.Release()
	}
	if k, err := dr.ReadAt(make([]byte, 10), int64(len(img))); k != 0 || err != io.EOF {
		t.Fatalf("read at the end: %d, %v", k, err)
	}
	// Concurrent readers see the same bytes (run with -race too).
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Go(func() {
			p := make([]byte, 256<<10)
			for off := int64(g) * 64 << 10; off < int64(len(img)); off += 8 * 256 << 10 {
				k, err := dr.ReadAt(p, off)
				if err != nil && err != io.EOF {
					errs <- err
					return
				}
				if !bytes.Equal(p[:k], img[off:off+int64(k)]) {
					errs <- errors.New("concurrent read returned wrong bytes")
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// A sequential read through the reader returns the image, with read-ahead
// fetching each chunk about once: fetched bytes stay near the image's
// stored size, however small the read size.
func TestDiskReaderSequential(t *testing.T) {
	tr := newTestRepo(t)
	img := readerImage()
	m := backupBytes(t, tr.Repository, "vm01", img)
	dr := openTestReader(t, tr.Repository, m, ReaderOptions{})
	got, err := io.ReadAll(io.NewSectionReader(dr, 0, dr.Size()))
	if err != nil {
		t.Fatal(err)
	}
	if sha256hex(got) != sha256hex(img) {
		t.Fatal("sequential read differs from the image")
	}
	st := dr.Stats()
	if st.FetchedBytes > int64(len(img)) || st.ChunksFetched == 0 {
		t.Fatalf("sequential read fetched %d bytes in %d chunks for a %d-byte image", st.FetchedBytes, st.ChunksFetched, len(img))
	}
	again := dr.Stats()
	if _, err := dr.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if dr.Stats().ChunksFetched != again.ChunksFetched {
		t.Fatal("a re-read of a cached range fetched again")
	}
}

// Read-ahead counts the bytes it must fetch, not the bytes it passes: a
// sequential reader about to cross a hole longer than the window already
// has the data behind the hole on its way.
func TestDiskReaderReadAheadCrossesHoles(t *testing.T) {
	tr := newTestRepo(t)
	img := make([]byte, 28<<20)
	rng := rand.New(rand.NewPCG(5, 5))
	for _, r := range [][2]int{{0, 4 << 20}, {24 << 20, 28 << 20}} {
		for i := r[0]; i < r[1]; i++ {
			img[i] = byte(rng.Uint32())
		}
	}
	m := backupBytes(t, tr.Repository, "vm01", img)
	const head = 5 << 20 // the data and the first MiB of the hole
	// How many chunks the head alone needs.
	plain := openTestReader(t, tr.Repository, m, ReaderOptions{ReadAhead: -1})
	if _, err := plain.ReadAt(make([]byte, head), 0); err != nil {
		t.Fatal(err)
	}
	headChunks := plain.Stats().ChunksFetched

	dr := openTestReader(t, tr.Repository, m, ReaderOptions{ReadAhead: 2 << 20, CacheSize: 16 << 20})
	p := make([]byte, 1<<20)
	for off := int64(0); off < head; off += int64(len(p)) {
		if _, err := dr.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	// The window (2 MiB) ends inside the 20 MiB hole if it counts bytes
	// passed; counting bytes to fetch, it reaches the data at 24 MiB.
	deadline := time.Now().Add(10 * time.Second)
	for dr.Stats().ChunksFetched <= headChunks {
		if time.Now().After(deadline) {
			t.Fatalf("read-ahead fetched %d chunks, the head alone needs %d: it stopped in the hole", dr.Stats().ChunksFetched, headChunks)
		}
		time.Sleep(10 * time.Millisecond)
	}
	got := make([]byte, 4<<20)
	if _, err := dr.ReadAt(got, 24<<20); err != nil || !bytes.Equal(got, img[24<<20:]) {
		t.Fatalf("data behind the hole: %v", err)
	}
}

// Extents tiles the image exactly; zero extents are zeros; reading only
// the zero extents fetches no chunk.
func TestDiskReaderExtents(t *testing.T) {
	tr := newTestRepo(t)
	img := readerImage()
	m := backupBytes(t, tr.Repository, "vm01", img)
	dr := openTestReader(t, tr.Repository, m, ReaderOptions{ReadAhead: -1})
	ext, err := dr.Extents(context.Background(), 0, dr.Size())
	if err != nil {
		t.Fatal(err)
	}
	var pos int64
	var zero int64
	for _, e := range ext {
		if e.Off != pos || e.Length <= 0 {
			t.Fatalf("extents do not tile the image: %+v at %d", e, pos)
		}
		pos += e.Length
		if e.Zero {
			zero += e.Length
			if !isZero(img[e.Off : e.Off+e.Length]) {
				t.Fatalf("zero extent %+v holds data", e)
			}
		}
	}
	if pos != int64(len(img)) {
		t.Fatalf("extents end at %d, image at %d", pos, len(img))
	}
	if zero < 4<<20+(2<<20-4096) {
		t.Fatalf("only %d zero bytes reported; the image has at least %d", zero, 4<<20+(2<<20-4096))
	}
	// A sub-range is clipped.
	sub, err := dr.Extents(context.Background(), 9<<20, 5<<20)
	if err != nil || len(sub) == 0 || sub[0].Off != 9<<20 || !sub[0].Zero {
		t.Fatalf("sub-range extents %+v, %v", sub, err)
	}
	before := dr.Stats().ChunksFetched
	for _, e := range ext {
		if e.Zero {
			p := make([]byte, e.Length)
			if _, err := dr.ReadAt(p, e.Off); err != nil {
				t.Fatal(err)
			}
			if !isZero(p) {
				t.Fatal("a zero extent read back non-zero")
			}
		}
	}
	if got := dr.Stats().ChunksFetched; got != before {
		t.Fatalf("reading zero extents fetched %d chunks", got-before)
	}
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// A flipped byte in a chunk: reads touching that chunk fail with an error
// naming the object and wrapping ErrCorrupt, never with other bytes;
// ranges elsewhere still read correctly.
func TestDiskReaderDamagedChunk(t *testing.T) {
	tr := newTestRepo(t)
	img := readerImage()
	m := backupBytes(t, tr.Repository, "vm01", img)
	dr := openTestReader(t, tr.Repository, m, ReaderOptions{ReadAhead: -1})
	const at = 17<<20 + 100 // random data
	i, start := dr.d.segmentAt(at)
	pieces, err := dr.segmentPieces(context.Background(), i)
	if err != nil {
		t.Fatal(err)
	}
	var bad piece
	for _, pc := range pieces {
		if start+pc.off <= at && at < start+pc.off+pc.len {
			bad = pc
		}
	}
	if bad.zero || bad.len == 0 {
		t.Fatalf("offset %d is not in a chunk: %+v", at, bad)
	}
	name := dataName(bad.id)
	flipByte(t, filepath.Join(tr.dir, name), 100)

	p := make([]byte, 4096)
	k, err := dr.ReadAt(p, at)
	if err == nil || !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), name) {
		t.Fatalf("read of a damaged chunk: %d bytes, err %v; want ErrCorrupt naming %s", k, err, name)
	}
	if !bytes.Equal(p[:k], img[at:at+int64(k)]) {
		t.Fatal("bytes returned before the error are wrong")
	}
	// The chunk's last byte too, and again (not cached as good).
	if _, err := dr.ReadAt(p[:1], start+bad.off+bad.len-1); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("second read of the damaged chunk: %v", err)
	}
	// Elsewhere all is well.
	q := make([]byte, 1<<20)
	if _, err := dr.ReadAt(q, 1<<20); err != nil || !bytes.Equal(q, img[1<<20:2<<20]) {
		t.Fatalf("read away from the damage: %v", err)
	}
}

func flipByte(t *testing.T, path string, at int64) {
	t.Helper()
	if err := os.Chmod(path, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, at); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x40
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
}

// The cache stays within its bound: re-reading a range larger than the
// cache fetches again, a range within it does not.
func TestDiskReaderCacheBound(t *testing.T) {
	tr := newTestRepo(t)
	img := readerImage()
	m := backupBytes(t, tr.Repository, "vm01", img)
	dr := openTestReader(t, tr.Repository, m, ReaderOptions{CacheSize: 2 << 20, ReadAhead: -1})
	p := make([]byte, 64<<10)
	for off := int64(0); off < int64(len(img)); off += int64(len(p)) {
		if _, err := dr.ReadAt(p, off); err != nil && err != io.EOF {
			t.Fatal(err)
		}
	}
	dr.mu.Lock()
	size := dr.chunks.size
	dr.mu.Unlock()
	if size > 2<<20+8<<20 { // at most one chunk beyond the bound
		t.Fatalf("cache holds %d bytes, bound 2 MiB", size)
	}
	n := dr.Stats().ChunksFetched
	if _, err := dr.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	if dr.Stats().ChunksFetched == n {
		t.Fatal("the first chunk was still cached after reading 21 MiB through a 2 MiB cache")
	}
}

// stallBackend holds Get and GetAll of one object until the caller's
// context is cancelled, and completes every read whatever its context: a
// backend whose reads in flight finish after an interrupt, as a local
// disk does.
type stallBackend struct {
	backend.Backend
	name    string
	stalled chan struct{}
}

func (b *stallBackend) Get(ctx context.Context, name string, off, length int64) ([]byte, error) {
	b.stall(ctx, name)
	return b.Backend.Get(context.Background(), name, off, length)
}

func (b *stallBackend) GetAll(ctx context.Context, name string, limit int64) ([]byte, error) {
	b.stall(ctx, name)
	return b.Backend.GetAll(context.Background(), name, limit)
}

func (b *stallBackend) stall(ctx context.Context, name string) {
	if name == b.name {
		close(b.stalled)
		<-ctx.Done()
	}
}

// Issue 9 item 1: a restore cancelled (SIGINT/SIGTERM) while its fetches
// still succeed reported success over a partial image. It must fail with
// context.Canceled, and RestoreTo must say the target is incomplete.
func TestRestoreCancelledFails(t *testing.T) {
	tr := newTestRepo(t)
	img := readerImage()
	m := backupBytes(t, tr.Repository, "vm01", img)
	dr := openTestReader(t, tr.Repository, m, ReaderOptions{ReadAhead: -1})
	// Stall on a chunk of the last segment (boundaries are chosen by
	// content): earlier segments are restored meanwhile.
	last, _ := dr.d.segmentAt(dr.Size() - 1)
	pieces, err := dr.segmentPieces(context.Background(), last)
	if err != nil {
		t.Fatal(err)
	}
	pieces = slices.DeleteFunc(pieces, func(p piece) bool { return p.zero })
	if len(pieces) == 0 {
		t.Fatal("the last segment holds no chunk")
	}
	for _, toTarget := range []bool{false, true} {
		be, err := local.Open(tr.dir)
		if err != nil {
			t.Fatal(err)
		}
		sb := &stallBackend{Backend: be, name: dataName(pieces[0].id), stalled: make(chan struct{})}
		r, err := Open(context.Background(), sb, []byte("secret"), Options{CacheDir: tr.cache})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		go func() { <-sb.stalled; cancel() }()
		if toTarget {
			_, err = r.RestoreTo(ctx, m, "", filepath.Join(t.TempDir(), "t.raw"))
			if !errors.Is(err, ErrTargetIncomplete) {
				t.Fatalf("cancelled RestoreTo: %v, want ErrTargetIncomplete", err)
			}
		} else {
			_, err = r.Restore(ctx, m, "", io.Discard)
		}
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled restore (target %v) returned %v, want context.Canceled", toTarget, err)
		}
		r.Close()
	}
}

// A view's bytes stay as they were read however long it is held, while
// other reads push its chunks out of the cache and reuse the freed
// buffers: a buffer is reused only once no view refers to it.
func TestDiskReaderViewOutlivesEviction(t *testing.T) {
	tr := newTestRepo(t)
	img := readerImage()
	m := backupBytes(t, tr.Repository, "vm01", img)
	dr := openTestReader(t, tr.Repository, m, ReaderOptions{CacheSize: 2 << 20, ReadAhead: -1})
	ctx := context.Background()
	const n = 1 << 20
	var held []*View
	for _, off := range []int64{0, 3 << 20, 16 << 20} {
		v, err := dr.ReadSlices(ctx, off, n)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, v)
	}
	// Read everything twice through the small cache.
	p := make([]byte, 256<<10)
	for range 2 {
		for off := int64(0); off < int64(len(img)); off += int64(len(p)) {
			k, err := dr.ReadAt(p, off)
			if err != nil && err != io.EOF {
				t.Fatal(err)
			}
			if !bytes.Equal(p[:k], img[off:off+int64(k)]) {
				t.Fatalf("read at %d returned wrong bytes", off)
			}
		}
	}
	if dr.Stats().BuffersReused == 0 {
		t.Fatal("no buffer was reused: the test evicted nothing")
	}
	for i, off := range []int64{0, 3 << 20, 16 << 20} {
		if got := bytes.Join(held[i].Bufs, nil); !bytes.Equal(got, img[off:off+n]) {
			t.Fatalf("the view of offset %d changed while held", off)
		}
		held[i].Release()
	}
}

// A sequential read through a cache smaller than the image decodes into
// recycled buffers: it allocates a fraction of what it reads, where it
// once allocated every chunk anew.
func TestDiskReaderRecyclesBuffers(t *testing.T) {
	tr := newTestRepo(t)
	img := readerImage()
	m := backupBytes(t, tr.Repository, "vm01", img)
	dr := openTestReader(t, tr.Repository, m, ReaderOptions{CacheSize: 4 << 20, ReadAhead: -1})
	ctx := context.Background()
	read := func() {
		for off := int64(0); off < int64(len(img)); off += 1 << 20 {
			v, err := dr.ReadSlices(ctx, off, 1<<20)
			if err != nil && err != io.EOF {
				t.Fatal(err)
			}
			v.Release()
		}
	}
	read() // fills the free list
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	read()
	runtime.ReadMemStats(&after)
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > uint64(len(img))/4 {
		t.Fatalf("reading %d bytes allocated %d bytes: buffers are not recycled (%+v)", len(img), alloc, dr.Stats())
	}
}

// Reads that give up while their chunk is being fetched drop their claim
// on it exactly once: concurrent readers with contexts cancelled at random
// moments never see wrong bytes, and no buffer is released more often than
// it was referenced (which panics).
func TestDiskReaderCancelledWaiters(t *testing.T) {
	tr := newTestRepo(t)
	img := readerImage()
	m := backupBytes(t, tr.Repository, "vm01", img)
	dr := openTestReader(t, tr.Repository, m, ReaderOptions{CacheSize: 2 << 20})
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := range 4 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 9))
			for range 60 {
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rng.IntN(400))*time.Microsecond)
				off := rng.Int64N(int64(len(img)))
				v, err := dr.ReadSlices(ctx, off, 1+rng.IntN(2<<20))
				got := bytes.Join(v.Bufs, nil)
				if !bytes.Equal(got, img[off:off+int64(len(got))]) || len(got) != v.N {
					errs <- fmt.Errorf("read at %d returned wrong bytes (err %v)", off, err)
				}
				v.Release()
				cancel()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// Read-ahead survives the read patterns of real clients: qemu-img keeps 8
// requests of 2 MiB in flight, which reach the reader out of order across
// 16 MiB, and a hole-aware copier (SEEK_DATA, NBD block status) jumps over
// holes. Neither is a jump elsewhere; both used to reset the window, so
// every read waited for its own chunks.
func TestDiskReaderReadAheadClientPatterns(t *testing.T) {
	tr := newTestRepo(t)
	img := make([]byte, 96<<20)
	rng := rand.New(rand.NewPCG(8, 8))
	for _, r := range [][2]int{{0, 40 << 20}, {72 << 20, 96 << 20}} { // a 32 MiB hole between
		for i := r[0]; i < r[1]; i++ {
			img[i] = byte(rng.Uint32())
		}
	}
	m := backupBytes(t, tr.Repository, "vm01", img)
	dr := openTestReader(t, tr.Repository, m, ReaderOptions{ReadAhead: 24 << 20, CacheSize: 64 << 20})
	window := func() int64 {
		dr.mu.Lock()
		defer dr.mu.Unlock()
		return dr.raWindow
	}
	read := func(off int64) {
		t.Helper()
		p := make([]byte, 1<<20)
		if _, err := dr.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, img[off:off+int64(len(p))]) {
			t.Fatalf("read at %d returned wrong bytes", off)
		}
	}
	// 8 streams of 2 MiB requests, each served as two 1 MiB reads: the
	// first halves arrive first, then the second halves.
	for batch := int64(0); batch < 32<<20; batch += 16 << 20 {
		for half := int64(0); half < 2<<20; half += 1 << 20 {
			for s := int64(0); s < 8; s++ {
				off := batch + s*2<<20 + half
				read(off)
				if batch > 0 && window() == 0 {
					t.Fatalf("read at %d MiB of 8 parallel streams reset read-ahead", off>>20)
				}
			}
		}
	}
	for off := int64(32 << 20); off < 40<<20; off += 1 << 20 {
		read(off)
	}
	// Past the hole, as SEEK_DATA answers.
	read(72 << 20)
	if window() == 0 {
		t.Fatal("jumping over the hole reset read-ahead")
	}
}
