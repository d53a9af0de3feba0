package chunk

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// imageGuide proposes the chunks a plain split of a segment of the old
// image cut, by image offset, for a segment of the new image starting at
// start; Same compares the bytes themselves.
type imageGuide struct {
	old, new []byte
	start    int
	chunks   map[int]guideChunk // by image offset
	taken    int                // bytes taken from the old split
}

type guideChunk struct {
	n          int
	endsExtent bool
}

// newImageGuide makes a guide from ps, the pieces of the old segment
// starting at oldStart.
func newImageGuide(old, new []byte, ps []Piece, oldStart, start int) *imageGuide {
	g := &imageGuide{old: old, new: new, start: start, chunks: map[int]guideChunk{}}
	for i, p := range ps {
		if !p.Zero {
			g.chunks[oldStart+p.Offset] = guideChunk{p.Length, i+1 == len(ps) || ps[i+1].Zero}
		}
	}
	return g
}

func (g *imageGuide) Chunk(off int) (int, bool, bool) {
	c, ok := g.chunks[g.start+off]
	return c.n, c.endsExtent, ok
}

func (g *imageGuide) Same(off, n int) bool {
	a := g.start + off
	if a+n > len(g.old) || !bytes.Equal(g.old[a:a+n], g.new[a:a+n]) {
		return false
	}
	g.taken += n
	return true
}

func guidedPieces(t *testing.T, s *Splitter, seg []byte, g Guide) []Piece {
	t.Helper()
	var out []Piece
	err := s.SplitGuided(seg, g, func(p Piece) error {
		if !p.Zero && !bytes.Equal(p.Data, seg[p.Offset:p.Offset+p.Length]) {
			t.Fatalf("piece at %d carries other bytes than the segment's", p.Offset)
		}
		p.Data = nil
		out = append(out, p)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// A guided split cuts exactly what a plain split cuts, whatever changed
// between the earlier data and the new, and takes the earlier chunks
// where nothing changed.
func TestSplitGuidedEqualsSplit(t *testing.T) {
	s, err := NewSplitter(testPol(t))
	if err != nil {
		t.Fatal(err)
	}
	const size = 20 << 20
	old := randomBytes(7, size)
	clear(old[6<<20 : 7<<20])             // a zero run
	clear(old[12<<20+4096 : 12<<20+9000]) // zeros inside data, no zero block
	clear(old[size-(256<<10):])           // a zero tail
	base := pieces(t, s, old[1<<20:17<<20])
	var cuts []int // image offsets of the old split's chunk ends inside data
	for i, p := range base {
		if !p.Zero && i+1 < len(base) && !base[i+1].Zero {
			cuts = append(cuts, 1<<20+p.Offset+p.Length)
		}
	}
	if len(cuts) < 8 {
		t.Fatalf("only %d cuts in the old split: the test tests little", len(cuts))
	}
	rng := rand.New(rand.NewPCG(8, 9))
	write := func(img []byte, off, n int) {
		for i := off; i < off+n && i < len(img); i++ {
			img[i] = byte(rng.Uint32())
		}
	}
	type change struct {
		name       string
		edit       func(img []byte)
		start, end int  // the new segment
		mostly     bool // most bytes must be taken from the old split
	}
	changes := []change{
		{"unchanged", func([]byte) {}, 1 << 20, 17 << 20, true},
		{"one block", func(img []byte) { write(img, 9<<20+12345, 4096) }, 1 << 20, 17 << 20, true},
		{"at a chunk start", func(img []byte) { write(img, cuts[2], 512) }, 1 << 20, 17 << 20, true},
		{"just before a cut (moves it)", func(img []byte) { write(img, cuts[3]-40, 40) }, 1 << 20, 17 << 20, true},
		{"at the segment start", func(img []byte) { write(img, 1<<20, 100) }, 1 << 20, 17 << 20, true},
		{"at the segment end", func(img []byte) { write(img, 17<<20-100, 100) }, 1 << 20, 17 << 20, true},
		{"zero run grows", func(img []byte) { clear(img[7<<20 : 7<<20+128<<10]) }, 1 << 20, 17 << 20, true},
		{"zero run shrinks", func(img []byte) { write(img, 6<<20+512<<10, 64<<10) }, 1 << 20, 17 << 20, true},
		{"new zero run in data", func(img []byte) { clear(img[cuts[4] : cuts[4]+256<<10]) }, 1 << 20, 17 << 20, true},
		{"unaligned zeros in data", func(img []byte) { clear(img[cuts[5]+1000 : cuts[5]+70000]) }, 1 << 20, 17 << 20, true},
		{"segment ends later", func(img []byte) { write(img, 3<<20, 8) }, 1 << 20, 18 << 20, true},
		{"segment ends earlier", func([]byte) {}, 1 << 20, 15<<20 + 4096, true},
		{"segment starts later (4 KiB)", func([]byte) {}, 1<<20 + 4096, 17 << 20, true},
		{"segment starts later (64 KiB)", func([]byte) {}, 1<<20 + 64<<10, 17 << 20, true},
		{"segment starts earlier", func([]byte) {}, 1<<20 - 8192, 17 << 20, true},
		{"everything new", func(img []byte) { write(img, 0, size) }, 1 << 20, 17 << 20, false},
	}
	for k := range 24 {
		start := 1<<20 + (rng.IntN(64)-32)*4096
		end := 17<<20 + (rng.IntN(256)-128)*4096
		n := rng.IntN(6)
		changes = append(changes, change{fmt.Sprintf("random %d", k), func(img []byte) {
			for range n {
				off, l := rng.IntN(size), 1+rng.IntN(128<<10)
				switch rng.IntN(3) {
				case 0:
					write(img, off, l)
				case 1:
					clear(img[off:min(size, off+l)])
				default:
					off = cuts[rng.IntN(len(cuts))] - rng.IntN(128)
					write(img, off, 1+rng.IntN(256))
				}
			}
		}, start, end, false})
	}
	for _, c := range changes {
		t.Run(c.name, func(t *testing.T) {
			img := slices.Clone(old)
			c.edit(img)
			seg := img[c.start:c.end]
			want := pieces(t, s, seg)
			g := newImageGuide(old, img, base, 1<<20, c.start)
			got := guidedPieces(t, s, seg, g)
			if !samePieces(got, want) {
				t.Fatalf("guided split differs from a plain split:\n got %v\nwant %v", got, want)
			}
			if c.mostly && g.taken < len(seg)/2 {
				t.Fatalf("took %d of %d bytes from the old split", g.taken, len(seg))
			}
		})
	}
}

// A guide that proposes chunks no split by this rule cuts (another
// chunker's) is refused where the rule shows it: a chunk shorter than
// MinSize that did not end its extent, or longer than MaxSize.
func TestSplitGuidedRefusesForeignCuts(t *testing.T) {
	s, err := NewSplitter(testPol(t))
	if err != nil {
		t.Fatal(err)
	}
	seg := randomBytes(11, 12<<20)
	want := pieces(t, s, seg)
	for _, n := range []int{64 << 10, MinSize - 1, MaxSize + 4096} {
		g := &fixedGuide{n: n, seg: seg}
		if got := guidedPieces(t, s, seg, g); !samePieces(got, want) {
			t.Fatalf("a proposed %d-byte chunk changed the split:\n got %v\nwant %v", n, got, want)
		}
	}
}

// fixedGuide proposes a chunk of n bytes at every offset, and says the
// bytes are the same.
type fixedGuide struct {
	n   int
	seg []byte
}

func (g *fixedGuide) Chunk(int) (int, bool, bool) { return g.n, false, true }
func (g *fixedGuide) Same(off, n int) bool        { return off+n <= len(g.seg) }

// samePieces compares pieces by place and kind.
func samePieces(a, b []Piece) bool {
	return slices.EqualFunc(a, b, func(x, y Piece) bool {
		return x.Offset == y.Offset && x.Length == y.Length && x.Zero == y.Zero
	})
}
