package repo

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"vmvault/backend/local"
	"vmvault/chunk"
)

// writeSparse writes img to a new file at path, leaving every all-zero
// 64 KiB block a hole, and returns it open.
func writeSparse(t testing.TB, path string, img []byte) *os.File {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(int64(len(img))); err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(img); off += chunk.ZeroBlock {
		b := img[off:min(off+chunk.ZeroBlock, len(img))]
		if chunk.IsZero(b) {
			continue
		}
		if _, err := f.WriteAt(b, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// readerAtOnly hides every interface but io.ReaderAt (and io.Reader),
// as a block device offers no hole information.
type readerAtOnly struct{ *bytes.Reader }

func (r readerAtOnly) Read(p []byte) (int, error)              { return r.Reader.Read(p) }
func (r readerAtOnly) ReadAt(p []byte, off int64) (int, error) { return r.Reader.ReadAt(p, off) }

// cbtImage is the day-1 image of the change-tracking tests: random data,
// text and zero runs, with a size that is no multiple of 4096.
func cbtImage() []byte { return testImage(51, 32<<20+12345) }

// randomWrite overwrites img[off:off+n] with random non-zero bytes and
// returns the range.
func randomWrite(rng *rand.Rand, img []byte, off, n int) Range {
	for i := off; i < off+n; i++ {
		img[i] = byte(rng.Uint32()) | 1
	}
	return Range{int64(off), int64(n)}
}

// cbtPattern is one day-2 change: it edits img (a copy of day 1, whose
// base disk bd is resolved) and returns the ranges it changed.
type cbtPattern struct {
	name   string
	change func(rng *rand.Rand, img []byte, bd *Disk) []Range
	// maxRead bounds bytes_read (0: no bound beyond the image size).
	maxRead int64
}

func cbtPatterns() []cbtPattern {
	const maxSeg = 6 << 20 // 3/2 of the tests' 4 MiB segments
	return []cbtPattern{
		{"one 4 KiB write", func(rng *rand.Rand, img []byte, _ *Disk) []Range {
			return []Range{randomWrite(rng, img, 20<<20+4096, 4096)}
		}, 2*maxSeg + 4096},
		{"scattered writes", func(rng *rand.Rand, img []byte, _ *Disk) []Range {
			blocks := map[int]bool{}
			for len(blocks) < 40 {
				blocks[rng.IntN(len(img)/4096)] = true
			}
			var rs []Range
			for _, b := range slices.Sorted(func(yield func(int) bool) {
				for b := range blocks {
					if !yield(b) {
						return
					}
				}
			}) {
				rs = append(rs, randomWrite(rng, img, b*4096, 4096))
			}
			return rs
		}, 0},
		{"write at offset 0", func(rng *rand.Rand, img []byte, _ *Disk) []Range {
			return []Range{randomWrite(rng, img, 0, 4096)}
		}, 2*maxSeg + 4096},
		{"write at the end", func(rng *rand.Rand, img []byte, _ *Disk) []Range {
			return []Range{randomWrite(rng, img, len(img)-1000, 1000)}
		}, 2*maxSeg + 4096},
		{"write before a boundary", func(rng *rand.Rand, img []byte, bd *Disk) []Range {
			// Zeros in the 64 bytes before a boundary the segmenter
			// chose (not one forced at the longest length) unmake it:
			// the cuts after it are out of step with the base's until
			// they meet one of its boundaries again.
			for i := 1; i < bd.segmentCount(); i++ {
				if bd.segmentLen(i-1) < bd.maxSegmentLen() {
					b := int(bd.segmentStart(i))
					rg := randomWrite(rng, img, b-4096, 4096)
					clear(img[b-64 : b])
					return []Range{rg}
				}
			}
			panic("no boundary chosen by content")
		}, 0},
		{"range spanning several segments", func(rng *rand.Rand, img []byte, _ *Disk) []Range {
			return []Range{randomWrite(rng, img, 9<<20+512, 13<<20)}
		}, 0},
		{"range covering a whole segment", func(rng *rand.Rand, img []byte, bd *Disk) []Range {
			return []Range{randomWrite(rng, img, int(bd.segmentStart(2)), int(bd.segmentLen(2)))}
		}, 0},
		{"adjacent ranges", func(rng *rand.Rand, img []byte, _ *Disk) []Range {
			return []Range{randomWrite(rng, img, 10<<20, 4096), randomWrite(rng, img, 10<<20+4096, 8192)}
		}, 2*maxSeg + 4096},
		{"nothing changed", func(*rand.Rand, []byte, *Disk) []Range { return nil }, 0},
		{"zeros over data", func(_ *rand.Rand, img []byte, bd *Disk) []Range {
			// A discard: the biggest non-zero 2 MiB block becomes a hole.
			best := 0
			for off := 0; off+2<<20 <= len(img); off += 2 << 20 {
				if !chunk.IsZero(img[off : off+2<<20]) {
					best = off
				}
			}
			clear(img[best : best+2<<20])
			return []Range{{int64(best), 2 << 20}}
		}, 2*maxSeg + 4096},
	}
}

// A backup with Changes gives exactly the generation a full read of the
// same image gives (same segment IDs and lengths, same tables, same
// digest), restores byte-identical, and reads only around the changes.
func TestBackupChangesEqualsFullRead(t *testing.T) {
	ctx := context.Background()
	tr := newTestRepo(t)
	dir := t.TempDir()
	img := cbtImage()
	f1 := writeSparse(t, filepath.Join(dir, "day1.raw"), img)
	m1, err := tr.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Source: "day1", Reader: f1, Size: int64(len(img)), Tracker: "t1"}}})
	if err != nil {
		t.Fatal(err)
	}
	if d := m1.Disks[0]; d.CBT != CBTNone || d.CBTBase != "" || !d.FullRead.Equal(m1.Time) || d.Tracker != "t1" || d.BytesRead != m1.Stats.BytesRead {
		t.Fatalf("full read recorded cbt %q base %q full_read %v (time %v) tracker %q bytes_read %d", d.CBT, d.CBTBase, d.FullRead, m1.Time, d.Tracker, d.BytesRead)
	}
	bd := &m1.Disks[0]
	var smallChunked, smallData int64 // over the patterns of small changes
	for k, p := range cbtPatterns() {
		t.Run(p.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(k), 9))
			img2 := bytes.Clone(img)
			ranges := p.change(rng, img2, bd)
			// A sparse file, or (every other pattern) a source like a
			// block device: no hole information.
			var rd io.Reader = writeSparse(t, filepath.Join(dir, "day2-"+strconv.Itoa(k)+".raw"), img2)
			if k%2 == 1 {
				rd = readerAtOnly{bytes.NewReader(img2)}
			}
			src := DiskSource{Name: "d", Source: "day2", Reader: rd, Size: int64(len(img2)), Tracker: "t2",
				Changes: &Changes{Base: m1.ID, Ranges: ranges, Kind: "test"}}
			mc, err := tr.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{src}})
			if err != nil {
				t.Fatal(err)
			}
			src.Changes = nil
			mf, err := tr.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{src}})
			if err != nil {
				t.Fatal(err)
			}
			c, full := mc.Disks[0], mf.Disks[0]
			t.Logf("%d ranges: read %d of %d bytes (full read %d), %d of %d segments cut again",
				len(ranges), c.BytesRead, c.Size, full.BytesRead, mc.Stats.SegmentsNew, c.SegmentCount)
			if c.Digest != full.Digest || !bytes.Equal(c.Segments, full.Segments) || !slices.Equal(c.segmentLens(), full.segmentLens()) || !slices.Equal(c.Tables, full.Tables) {
				t.Fatalf("with changes: %d segments, digest %x; full read: %d segments, digest %x", c.SegmentCount, c.Digest[:4], full.SegmentCount, full.Digest[:4])
			}
			if c.CBT != "test" || c.CBTBase != m1.ID || !c.FullRead.Equal(m1.Time) || c.Tracker != "t2" || c.BytesRead != mc.Stats.BytesRead {
				t.Fatalf("recorded cbt %q base %q full_read %v tracker %q bytes_read %d (stats %d)", c.CBT, c.CBTBase, c.FullRead, c.Tracker, c.BytesRead, mc.Stats.BytesRead)
			}
			if full.CBT != CBTNone || !full.FullRead.Equal(mf.Time) {
				t.Fatalf("full read recorded cbt %q full_read %v", full.CBT, full.FullRead)
			}
			if p.name == "write before a boundary" && bytes.Equal(c.Segments, bd.Segments) {
				t.Fatal("the unmade boundary left the segments as they were: the test tests nothing")
			}
			if len(ranges) == 0 && c.BytesRead != 0 {
				t.Fatalf("nothing changed, yet %d bytes read", c.BytesRead)
			}
			if p.maxRead > 0 && c.BytesRead > p.maxRead {
				t.Fatalf("read %d bytes, more than %d", c.BytesRead, p.maxRead)
			}
			if c.BytesRead > full.BytesRead {
				t.Fatalf("read %d bytes, more than the full read's %d", c.BytesRead, full.BytesRead)
			}
			// The segments cut again are split guided by the base's
			// chunks: exactly as a plain split, and where a small range
			// changed, the chunker ran over little of them.
			checkPlainSplit(t, tr.Repository, mc, img2)
			if p.maxRead > 0 {
				smallChunked += mc.Stats.BytesChunked
				smallData += chunkData(t, tr.Repository, &mc.Disks[0], bd)
			}
		})
	}
	t.Logf("small changes: %d of the new segments' %d data bytes chunked", smallChunked, smallData)
	if smallData == 0 || smallChunked*4 > smallData*3 {
		t.Fatalf("small changes: %d of the new segments' %d data bytes chunked", smallChunked, smallData)
	}
}

// chunkData returns the bytes of the chunks (not zero runs) of the
// segments of d that old lacks: what a plain split runs the chunker over.
func chunkData(t *testing.T, r *Repository, d, old *Disk) int64 {
	t.Helper()
	known := map[string]bool{}
	for i := range old.segmentCount() {
		id, _ := old.SegmentID(i)
		known[string(id[:])] = true
	}
	var n int64
	for i := range d.segmentCount() {
		id, zero := d.SegmentID(i)
		if zero || known[string(id[:])] {
			continue
		}
		for _, e := range segmentEntries(t, r, id) {
			if !e.Zero {
				n += int64(e.Length)
			}
		}
	}
	return n
}

// An incremental based on an incremental keeps the time of the last full
// read, and the chain restores byte-identical.
func TestBackupChangesChain(t *testing.T) {
	ctx := context.Background()
	tr := newTestRepo(t)
	dir := t.TempDir()
	img := cbtImage()
	m := backupBytes(t, tr.Repository, "vm", img) // SHA256 set: a full read
	fullRead := m.Disks[0].FullRead
	rng := rand.New(rand.NewPCG(3, 3))
	for day := range 3 {
		img = bytes.Clone(img)
		rs := []Range{randomWrite(rng, img, (day*7+3)<<20, 64<<10)}
		f := writeSparse(t, filepath.Join(dir, strconv.Itoa(day)), img)
		next, err := tr.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "disk", Reader: f, Size: int64(len(img)),
			Changes: &Changes{Base: m.ID, Ranges: rs, Kind: "test"}}}})
		if err != nil {
			t.Fatal(err)
		}
		if d := next.Disks[0]; d.CBTBase != m.ID || !d.FullRead.Equal(fullRead) {
			t.Fatalf("day %d: base %s full_read %v, want %s and %v", day, d.CBTBase, d.FullRead, m.ID, fullRead)
		}
		m = next
	}
	r := tr.reopen(t)
	if got := restoreBytes(t, r, mustFind(t, r, "vm", "latest")); !bytes.Equal(got, img) {
		t.Fatal("the last of a chain of incrementals restores differently")
	}
	// A base written before full_read existed was read whole at its time.
	old := *m
	old.Disks = slices.Clone(m.Disks)
	old.Disks[0].FullRead, old.Disks[0].CBT, old.Disks[0].CBTBase = time.Time{}, "", ""
	old.Time = m.Time.Add(time.Hour)
	if err := tr.commitManifest(ctx, &old, 0); err != nil {
		t.Fatal(err)
	}
	f := writeSparse(t, filepath.Join(dir, "last"), img)
	next, err := tr.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "disk", Reader: f, Size: int64(len(img)),
		Changes: &Changes{Base: old.ID, Kind: "test"}}}})
	if err != nil {
		t.Fatal(err)
	}
	if d := next.Disks[0]; !d.FullRead.Equal(old.Time) {
		t.Fatalf("based on a generation without full_read: full_read %v, want its time %v", d.FullRead, old.Time)
	}
}

// countFiles counts the files under dir.
func countFiles(t *testing.T, dir string) int {
	t.Helper()
	n := 0
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			n++
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// Changes that cannot be used are refused with ErrNoBase, naming the disk
// and the base, before anything is read or stored.
func TestBackupChangesRefused(t *testing.T) {
	ctx := context.Background()
	tr := newTestRepo(t)
	img := cbtImage()
	f := writeSparse(t, filepath.Join(t.TempDir(), "img"), img)
	m1 := backupBytes(t, tr.Repository, "vm", img)
	size := int64(len(img))
	other := backupBytes(t, tr.Repository, "other", img)
	cases := []struct {
		name string
		src  DiskSource
		want string
	}{
		{"missing base", DiskSource{Changes: &Changes{Base: strings.Repeat("ab", 32)}}, "base generation abababab"},
		{"malformed base", DiskSource{Changes: &Changes{Base: "xyz"}}, `base generation "xyz"`},
		{"base of another VM", DiskSource{Changes: &Changes{Base: other.ID}}, "of VM other"},
		{"no such disk", DiskSource{Name: "e", Changes: &Changes{Base: m1.ID}}, "has no disk e"},
		{"size differs", DiskSource{Size: size + 4096, Changes: &Changes{Base: m1.ID}}, "disk in base generation " + m1.ID[:8]},
		{"ranges overlap", DiskSource{Changes: &Changes{Base: m1.ID, Ranges: []Range{{0, 8192}, {4096, 10}}}}, "overlaps"},
		{"range beyond the end", DiskSource{Changes: &Changes{Base: m1.ID, Ranges: []Range{{size - 10, 11}}}}, "beyond"},
		{"empty range", DiskSource{Changes: &Changes{Base: m1.ID, Ranges: []Range{{5, 0}}}}, "empty"},
		{"no kind", DiskSource{Changes: &Changes{Base: m1.ID, Kind: CBTNone}}, "kind"},
		{"a stream", DiskSource{Reader: streamOnly{bytes.NewReader(img)}, Changes: &Changes{Base: m1.ID}}, "read at any offset"},
	}
	before := countFiles(t, tr.dir)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			src := c.src
			if src.Name == "" {
				src.Name = "disk"
			}
			if src.Reader == nil {
				src.Reader = f
			}
			if src.Size == 0 {
				src.Size = size
			}
			if src.Changes.Kind == "" {
				src.Changes.Kind = "test"
			}
			_, err := tr.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "ok", Reader: bytes.NewReader(img), Size: size}, src}})
			if !errors.Is(err, ErrNoBase) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "disk "+src.Name+":") {
				t.Fatalf("got %v, want ErrNoBase naming disk %s and %q", err, src.Name, c.want)
			}
		})
	}
	if after := countFiles(t, tr.dir); after != before {
		t.Fatalf("refused backups left %d objects behind", after-before)
	}
}

// A change outside the ranges the tracker reported is caught by
// VerifyUnchanged at 100 %: the backup fails with ErrTrackerMismatch
// naming the offset of the segment, and commits nothing.
func TestVerifyUnchangedCatchesMissedChange(t *testing.T) {
	ctx := context.Background()
	tr := newTestRepo(t)
	dir := t.TempDir()
	img := cbtImage()
	m1 := backupBytes(t, tr.Repository, "vm", img)
	bd := &m1.Disks[0]
	img2 := bytes.Clone(img)
	rng := rand.New(rand.NewPCG(5, 5))
	reported := randomWrite(rng, img2, 1<<20, 4096)
	const planted = 25<<20 + 8192
	randomWrite(rng, img2, planted, 4096)
	f := writeSparse(t, filepath.Join(dir, "day2"), img2)
	seg, start := bd.segmentAt(planted)
	if seg == 0 {
		t.Fatal("the planted change must lie outside the reported one's segment")
	}
	src := DiskSource{Name: "disk", Reader: f, Size: int64(len(img2)), Changes: &Changes{Base: m1.ID, Ranges: []Range{reported}, Kind: "test"}}
	gens := len(listGenerations(t, tr.Repository))
	_, err := tr.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{src}, VerifyUnchanged: 100})
	if !errors.Is(err, ErrTrackerMismatch) || !strings.Contains(err.Error(), "offset "+strconv.FormatInt(start, 10)+" ") || !strings.Contains(err.Error(), "disk disk") {
		t.Fatalf("got %v, want ErrTrackerMismatch naming disk disk and offset %d", err, start)
	}
	if n := len(listGenerations(t, tr.Repository)); n != gens {
		t.Fatalf("a failed verification committed a generation (%d, was %d)", n, gens)
	}
	// A small share verifies at least one segment and reads it.
	m, err := tr.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "disk", Reader: writeSparse(t, filepath.Join(dir, "day1"), img), Size: int64(len(img)),
		Changes: &Changes{Base: m1.ID, Kind: "test"}}}, VerifyUnchanged: 0.001})
	if err != nil {
		t.Fatal(err)
	}
	if m.Disks[0].BytesRead == 0 {
		t.Fatal("verify-unchanged 0.001 % read nothing")
	}
	if _, err := tr.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{src}, VerifyUnchanged: 101}); err == nil || !strings.Contains(err.Error(), "percentage") {
		t.Fatalf("verify-unchanged 101: %v", err)
	}
}

func listGenerations(t *testing.T, r *Repository) []*Manifest {
	t.Helper()
	ms, err := r.Manifests(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	return ms
}

// With SHA256 the disk is read whole despite Changes (a plain SHA-256
// needs every byte), and recorded so.
func TestBackupChangesWithSHA256ReadsWhole(t *testing.T) {
	tr := newTestRepo(t)
	img := cbtImage()
	m1 := backupBytes(t, tr.Repository, "vm", img)
	m, err := tr.Backup(context.Background(), BackupRequest{VM: "vm", SHA256: true, Disks: []DiskSource{{Name: "disk", Reader: bytes.NewReader(img), Size: int64(len(img)),
		Changes: &Changes{Base: m1.ID, Kind: "test"}}}})
	if err != nil {
		t.Fatal(err)
	}
	if d := m.Disks[0]; d.CBT != CBTNone || d.CBTBase != "" || d.BytesRead != int64(len(img)) || d.SHA256 != sha256hex(img) {
		t.Fatalf("cbt %q base %q bytes_read %d sha256 %s", d.CBT, d.CBTBase, d.BytesRead, d.SHA256)
	}
}

func TestVerifyCount(t *testing.T) {
	for _, c := range []struct {
		pct  float64
		n, k int
	}{{0, 10, 0}, {1, 0, 0}, {0.01, 10, 1}, {1, 100, 1}, {1, 150, 2}, {50, 3, 2}, {100, 7, 7}} {
		if k := verifyCount(c.pct, c.n); k != c.k {
			t.Errorf("verifyCount(%v, %d) = %d, want %d", c.pct, c.n, k, c.k)
		}
	}
}

// newSmallSegmentRepo returns a repository with the smallest segments
// (1 MiB on average), so that a small image has many boundaries.
func newSmallSegmentRepo(t *testing.T) *Repository {
	t.Helper()
	be, err := local.Create(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := Init(context.Background(), be, []byte("secret"), Options{KDF: fastKDF, CacheDir: t.TempDir(), SegmentSize: MinSegmentSize})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// Random change patterns on a small image with 1 MiB segments (so many
// boundaries): writes of data or zeros of any length and alignment,
// boundaries unmade, ranges reported larger than the change. The tracked
// backup always equals the full read.
func TestBackupChangesRandom(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	r := newSmallSegmentRepo(t)
	img := testImage(61, 12<<20+777)
	m1, err := r.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Reader: writeSparse(t, filepath.Join(dir, "day1"), img), Size: int64(len(img))}}})
	if err != nil {
		t.Fatal(err)
	}
	bd := &m1.Disks[0]
	rng := rand.New(rand.NewPCG(rand.Uint64(), 1))
	for round := range 25 {
		img2 := bytes.Clone(img)
		var changed []Range
		for range rng.IntN(5) {
			off := rng.IntN(len(img2))
			n := min(len(img2)-off, 1+rng.IntN(1<<uint(rng.IntN(22))))
			switch rng.IntN(3) {
			case 0:
				randomWrite(rng, img2, off, n)
			case 1:
				clear(img2[off : off+n])
			default: // unmake the boundary after the segment holding off
				i, _ := bd.segmentAt(int64(off))
				b := int(bd.segmentStart(i) + bd.segmentLen(i))
				off, n = b-64, 64
				clear(img2[off:b])
			}
			// Trackers may report more than changed.
			if rng.IntN(4) == 0 {
				grow := rng.IntN(1 << 20)
				off = max(0, off-grow)
				n = min(len(img2)-off, n+2*grow)
			}
			changed = append(changed, Range{int64(off), int64(n)})
		}
		ranges := mergeRanges(changed)
		var rd io.Reader = writeSparse(t, filepath.Join(dir, "day2"), img2)
		if rng.IntN(2) == 0 {
			rd = readerAtOnly{bytes.NewReader(img2)}
		}
		src := DiskSource{Name: "d", Reader: rd, Size: int64(len(img2)), Changes: &Changes{Base: m1.ID, Ranges: ranges, Kind: "test"}}
		mc, err := r.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{src}, VerifyUnchanged: 100})
		if err != nil {
			t.Fatalf("round %d, ranges %v: %v", round, ranges, err)
		}
		src.Changes = nil
		mf, err := r.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{src}})
		if err != nil {
			t.Fatal(err)
		}
		if c, f := mc.Disks[0], mf.Disks[0]; c.Digest != f.Digest || !bytes.Equal(c.Segments, f.Segments) || !slices.Equal(c.segmentLens(), f.segmentLens()) {
			t.Fatalf("round %d, ranges %v: the tracked backup's %d segments differ from the full read's %d", round, ranges, c.SegmentCount, f.SegmentCount)
		}
	}
}

// mergeRanges sorts rs and merges those that overlap.
func mergeRanges(rs []Range) []Range {
	slices.SortFunc(rs, func(a, b Range) int { return int(a.Off - b.Off) })
	var out []Range
	for _, r := range rs {
		if k := len(out) - 1; k >= 0 && r.Off < out[k].Off+out[k].Len {
			out[k].Len = max(out[k].Off+out[k].Len, r.Off+r.Len) - out[k].Off
			continue
		}
		out = append(out, r)
	}
	return out
}

// Data written into a long run of zeros of a source without hole
// information (a thin LV: most of it unmapped) costs a read of about the
// segments it touches, not of the zeros after it. Zeros hold no
// content-defined boundary, so once the write moved the cuts, those after
// it cannot fall back into step with the base's until data comes again;
// but segments of known zeros (the base's segments there are all zero, and
// no changed range touches them) are cut as a full read cuts them, unread.
func TestBackupChangesIntoZeros(t *testing.T) {
	ctx := context.Background()
	r := newSmallSegmentRepo(t)
	img := append(append(testImage(71, 4<<20), make([]byte, 40<<20)...), testImage(72, 4<<20)...)
	m1, err := r.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Reader: readerAtOnly{bytes.NewReader(img)}, Size: int64(len(img))}}})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(7, 7))
	// A write moves the cuts after it only if it makes a boundary (likely
	// for 2 MiB of data, not certain: boundaries are keyed per repository).
	for try := range 4 {
		img2 := bytes.Clone(img)
		rg := randomWrite(rng, img2, 10<<20+try*8<<20+4096, 2<<20)
		src := DiskSource{Name: "d", Reader: readerAtOnly{bytes.NewReader(img2)}, Size: int64(len(img2))}
		mf, err := r.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{src}})
		if err != nil {
			t.Fatal(err)
		}
		if slices.Equal(mf.Disks[0].segmentLens()[len(mf.Disks[0].segmentLens())-8:], m1.Disks[0].segmentLens()[len(m1.Disks[0].segmentLens())-8:]) {
			continue // the cuts after the write stayed in step
		}
		src.Changes = &Changes{Base: m1.ID, Ranges: []Range{rg}, Kind: "test"}
		mc, err := r.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{src}})
		if err != nil {
			t.Fatal(err)
		}
		if mc.Disks[0].Digest != mf.Disks[0].Digest {
			t.Fatal("the tracked backup differs from the full read")
		}
		// The write, the segments before and after it, and the windows
		// read past the cuts (4–8 MB were seen; 38 MB before known zeros
		// were cut unread).
		const bound = 12 << 20
		t.Logf("a 2 MiB write into 40 MiB of zeros: read %d bytes", mc.Disks[0].BytesRead)
		if read := mc.Disks[0].BytesRead; read > bound {
			t.Fatalf("a 2 MiB write into 40 MiB of zeros read %d bytes (more than %d)", read, bound)
		}
		return
	}
	t.Fatal("no write moved the cuts after it: the test tests nothing")
}
