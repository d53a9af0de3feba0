package repo

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"vmvault/chunk"
)

// checkPlainSplit fails unless every segment list of the disk of m holds
// exactly what a plain split of the segment's bytes in img gives, and the
// disk restores byte-identical to img.
func checkPlainSplit(t *testing.T, r *Repository, m *Manifest, img []byte) {
	t.Helper()
	ctx := context.Background()
	d := &m.Disks[0]
	if err := r.resolveSegments(ctx, d); err != nil {
		t.Fatal(err)
	}
	sp, err := chunk.NewSplitter(r.cfg.ChunkerPolynomial)
	if err != nil {
		t.Fatal(err)
	}
	for i := range d.segmentCount() {
		id, zero := d.SegmentID(i)
		if zero {
			continue
		}
		seg := img[d.segmentStart(i) : d.segmentStart(i)+d.segmentLen(i)]
		var want []SegmentEntry
		sp.Split(seg, func(p chunk.Piece) error {
			e := SegmentEntry{Zero: p.Zero, Length: uint32(p.Length)}
			if !p.Zero {
				e.ID = r.chunkH.Sum(p.Data)
			}
			want = append(want, e)
			return nil
		})
		got, err := r.getData(ctx, TypeSegment, id)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, encodeSegmentList(want)) {
			entries, _ := decodeSegmentList(got)
			t.Fatalf("segment %d at offset %d: list %v, a plain split gives %v", i, d.segmentStart(i), lens(entries), lens(want))
		}
	}
	var out bytes.Buffer
	if _, err := r.Restore(ctx, m, "", &out); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), img) {
		t.Fatal("restored image differs")
	}
}

// lens shows a segment list as its pieces' lengths (zero runs negative).
func lens(entries []SegmentEntry) []int {
	var out []int
	for _, e := range entries {
		if e.Zero {
			out = append(out, -int(e.Length))
		} else {
			out = append(out, int(e.Length))
		}
	}
	return out
}

// chunkStarts returns the image offsets where the disk's chunks start
// (its segments resolved), for changes placed at chunk boundaries.
func chunkStarts(t *testing.T, r *Repository, d *Disk) []int {
	t.Helper()
	var out []int
	forChunks(t, r, d, func(_, a int, e SegmentEntry, _ bool) {
		if !e.Zero && a > 0 {
			out = append(out, a)
		}
	})
	return out
}

// forChunks calls fn with every piece of the disk (its segments
// resolved): the start of its segment, its image offset, its entry, and
// whether a chunk follows it in the segment.
func forChunks(t *testing.T, r *Repository, d *Disk, fn func(s, a int, e SegmentEntry, chunkNext bool)) {
	t.Helper()
	for i := range d.segmentCount() {
		id, zero := d.SegmentID(i)
		if zero {
			continue
		}
		entries := segmentEntries(t, r, id)
		s := int(d.segmentStart(i))
		pos := s
		for k, e := range entries {
			fn(s, pos, e, k+1 < len(entries) && !entries[k+1].Zero)
			pos += int(e.Length)
		}
	}
}

// The generation a backup commits after changes is exactly the one a
// plain split of every new segment gives (the guide from the previous
// generation only saves work), it restores byte-identical, and where
// little changed, little is chunked.
func TestBackupGuidedEqualsPlainSplit(t *testing.T) {
	ctx := context.Background()
	tr := newTestRepo(t)
	dir := t.TempDir()
	img := testImage(61, 40<<20+4321)
	m1, err := tr.Backup(ctx, BackupRequest{VM: "day1", Disks: []DiskSource{{Name: "d", Source: "day1", Reader: bytes.NewReader(img), Size: int64(len(img))}}})
	if err != nil {
		t.Fatal(err)
	}
	checkPlainSplit(t, tr.Repository, m1, img)
	bd := &m1.Disks[0]
	starts := chunkStarts(t, tr.Repository, bd)
	if len(starts) < 20 {
		t.Fatalf("only %d chunk starts: the test tests little", len(starts))
	}
	type pattern struct {
		name string
		edit func(rng *rand.Rand, img []byte)
		// maxChunked bounds bytes_chunked (0: no bound).
		maxChunked int64
	}
	write := func(rng *rand.Rand, img []byte, off, n int) { randomWrite(rng, img, off, min(n, len(img)-off)) }
	patterns := []pattern{
		{"one 4 KiB write", func(rng *rand.Rand, img []byte) { write(rng, img, 20<<20+4096, 4096) }, 2 * chunk.MaxSize},
		{"write at a chunk start", func(rng *rand.Rand, img []byte) { write(rng, img, starts[5], 100) }, 2 * chunk.MaxSize},
		{"write at a chunk end (moves the cut)", func(rng *rand.Rand, img []byte) { write(rng, img, starts[9]-64, 64) }, 2 * chunk.MaxSize},
		{"zeros at a chunk end", func(_ *rand.Rand, img []byte) { clear(img[starts[12]-200 : starts[12]]) }, 2 * chunk.MaxSize},
		{"zero run grows", func(_ *rand.Rand, img []byte) {
			for off := chunk.ZeroBlock; off+chunk.ZeroBlock < len(img); off += chunk.ZeroBlock {
				if chunk.IsZero(img[off:off+chunk.ZeroBlock]) && !chunk.IsZero(img[off-chunk.ZeroBlock:off]) {
					clear(img[off-3*chunk.ZeroBlock : off])
					return
				}
			}
			panic("no zero run")
		}, 0},
		{"zero run shrinks", func(rng *rand.Rand, img []byte) {
			for off := chunk.ZeroBlock; off+4*chunk.ZeroBlock < len(img); off += chunk.ZeroBlock {
				if chunk.IsZero(img[off:off+4*chunk.ZeroBlock]) && !chunk.IsZero(img[off-chunk.ZeroBlock:off]) {
					write(rng, img, off+2*chunk.ZeroBlock, 5000)
					return
				}
			}
			panic("no zero run")
		}, 0},
		{"write before a segment boundary (moves it)", func(rng *rand.Rand, img []byte) {
			for i := 1; i < bd.segmentCount(); i++ {
				if bd.segmentLen(i-1) < bd.maxSegmentLen() {
					b := int(bd.segmentStart(i))
					write(rng, img, b-4096, 4096)
					clear(img[b-64 : b])
					return
				}
			}
			panic("no boundary chosen by content")
		}, 0},
		{"scattered 4 KiB writes", func(rng *rand.Rand, img []byte) {
			for range 30 {
				write(rng, img, rng.IntN(len(img)/4096)*4096, 4096)
			}
		}, 0},
		{"everything new", func(rng *rand.Rand, img []byte) { write(rng, img, 0, len(img)) }, 0},
	}
	for k := range 12 {
		patterns = append(patterns, pattern{"random " + strconv.Itoa(k), func(rng *rand.Rand, img []byte) {
			for range 1 + rng.IntN(8) {
				off := rng.IntN(len(img))
				switch rng.IntN(4) {
				case 0:
					clear(img[off:min(len(img), off+rng.IntN(300<<10))])
				case 1:
					off = starts[rng.IntN(len(starts))] - rng.IntN(100)
					write(rng, img, off, 1+rng.IntN(200))
				default:
					write(rng, img, off, 1+rng.IntN(64<<10))
				}
			}
		}, 0})
	}
	for k, p := range patterns {
		t.Run(p.name, func(t *testing.T) {
			vm := fmt.Sprint("vm", k)
			// Day 1 again under this VM: every segment known, nothing
			// split; it is the previous generation of day 2.
			if _, err := tr.Backup(ctx, BackupRequest{VM: vm, Disks: []DiskSource{{Name: "d", Source: "day1", Reader: bytes.NewReader(img), Size: int64(len(img))}}}); err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(uint64(k), 5))
			img2 := bytes.Clone(img)
			p.edit(rng, img2)
			// A sparse file (mapped windows) or, every other pattern,
			// a reader of unknown layout.
			var rd io.Reader = bytes.NewReader(img2)
			if k%2 == 0 {
				rd = writeSparse(t, filepath.Join(dir, "day2-"+strconv.Itoa(k)+".raw"), img2)
			}
			m2, err := tr.Backup(ctx, BackupRequest{VM: vm, Disks: []DiskSource{{Name: "d", Source: "day2", Reader: rd, Size: int64(len(img2))}}})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%d of %d segments new, %d bytes chunked", m2.Stats.SegmentsNew, m2.Stats.SegmentsSeen, m2.Stats.BytesChunked)
			checkPlainSplit(t, tr.Repository, m2, img2)
			if p.maxChunked > 0 && (m2.Stats.SegmentsNew == 0 || m2.Stats.BytesChunked > p.maxChunked) {
				t.Fatalf("%d segments new, %d bytes chunked: want at least one and at most %d bytes", m2.Stats.SegmentsNew, m2.Stats.BytesChunked, p.maxChunked)
			}
		})
	}
}

// A previous generation whose segment lists cannot be read does not fail
// the backup: the new segments are split plainly, and come out the same.
func TestBackupGuideUnreadable(t *testing.T) {
	ctx := context.Background()
	tr := newTestRepo(t)
	img := testImage(62, 24<<20)
	m1, err := tr.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Source: "day1", Reader: bytes.NewReader(img), Size: int64(len(img))}}})
	if err != nil {
		t.Fatal(err)
	}
	bd := &m1.Disks[0]
	if err := tr.resolveSegments(ctx, bd); err != nil {
		t.Fatal(err)
	}
	img2 := bytes.Clone(img)
	rng := rand.New(rand.NewPCG(1, 2))
	// One write into each non-zero segment, whose list is then damaged.
	var damaged int64
	for i := range bd.segmentCount() {
		id, zero := bd.SegmentID(i)
		if zero {
			continue
		}
		// Segment boundaries depend on the repository's random
		// chunker polynomial: a short last segment must not push
		// the write past the image's end.
		off := int(bd.segmentStart(i) + bd.segmentLen(i)/2)
		randomWrite(rng, img2, off, min(4096, len(img2)-off))
		path := filepath.Join(tr.dir, dataName(id))
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		raw[len(raw)/2] ^= 1
		if err := os.WriteFile(path, raw, 0o600); err != nil {
			t.Fatal(err)
		}
		damaged += bd.segmentLen(i)
	}
	m2, err := tr.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Source: "day2", Reader: bytes.NewReader(img2), Size: int64(len(img2))}}})
	if err != nil {
		t.Fatalf("a damaged previous segment list failed the backup: %v", err)
	}
	checkPlainSplit(t, tr.Repository, m2, img2)
	if m2.Stats.BytesChunked+m2.Stats.BytesZero < damaged {
		t.Fatalf("%d bytes chunked (and %d zero) of %d whose guide was damaged", m2.Stats.BytesChunked, m2.Stats.BytesZero, damaged)
	}
}

// A chunk that ended only because its data extent ended (a zero run came
// next) is not taken when the extent now runs on: a plain split may cut
// it elsewhere, and the guided split must too.
func TestBackupGuidedExtentGrows(t *testing.T) {
	ctx := context.Background()
	tr := newTestRepo(t)
	img := testImage(63, 24<<20)
	backup := func(vm string, img []byte) *Manifest {
		m, err := tr.Backup(ctx, BackupRequest{VM: vm, Disks: []DiskSource{{Name: "d", Source: vm, Reader: bytes.NewReader(img), Size: int64(len(img))}}})
		if err != nil {
			t.Fatal(err)
		}
		checkPlainSplit(t, tr.Repository, m, img)
		return m
	}
	// Find a chunk [a, a+n) cut by content, long enough that zeros from a
	// 64 KiB block of its segment past a+MinSize make it end there.
	m0 := backup("probe", img)
	a, p := -1, -1
	forChunks(t, tr.Repository, &m0.Disks[0], func(s, at int, e SegmentEntry, chunkNext bool) {
		q := s + (at+chunk.MinSize-s+chunk.ZeroBlock-1)/chunk.ZeroBlock*chunk.ZeroBlock
		if a < 0 && !e.Zero && chunkNext && q < at+int(e.Length) {
			a, p = at, q
		}
	})
	if a < 0 {
		t.Fatal("no chunk long enough: the test tests nothing")
	}
	// Day 1: the chunk at a ends at p, where a zero run starts.
	day1 := bytes.Clone(img)
	clear(day1[p : p+4*chunk.ZeroBlock])
	m1 := backup("vm", day1)
	ended := false
	forChunks(t, tr.Repository, &m1.Disks[0], func(_, at int, e SegmentEntry, chunkNext bool) {
		ended = ended || at == a && !e.Zero && at+int(e.Length) == p && !chunkNext
	})
	if !ended {
		t.Fatal("day 1 has no chunk ending at the zero run: the test tests nothing")
	}
	// Day 2: data in the zero run's first block; the chunk at a has the
	// same bytes as on day 1, but its extent runs on.
	day2 := bytes.Clone(day1)
	randomWrite(rand.New(rand.NewPCG(3, 3)), day2, p, 4096)
	m2 := backup("vm", day2)
	if m2.Stats.SegmentsNew == 0 {
		t.Fatal("no new segment on day 2")
	}
}
