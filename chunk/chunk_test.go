package chunk

import (
	"bytes"
	"errors"
	"io"
	"math/bits"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/restic/chunker"
)

func testPol(t testing.TB) uint64 {
	p, err := NewPolynomial()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func pieces(t *testing.T, s *Splitter, seg []byte) []Piece {
	t.Helper()
	var out []Piece
	var rebuilt []byte
	err := s.Split(seg, func(p Piece) error {
		if p.Zero {
			if p.Data != nil {
				t.Fatal("zero piece carries data")
			}
			rebuilt = append(rebuilt, make([]byte, p.Length)...)
		} else {
			if len(p.Data) != p.Length {
				t.Fatalf("data length %d != %d", len(p.Data), p.Length)
			}
			if p.Length > MaxSize {
				t.Fatalf("chunk of %d bytes exceeds max", p.Length)
			}
			rebuilt = append(rebuilt, p.Data...)
		}
		if p.Offset != len(rebuilt)-p.Length {
			t.Fatalf("piece offset %d, expected %d", p.Offset, len(rebuilt)-p.Length)
		}
		p.Data = nil
		out = append(out, p)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(rebuilt, seg) {
		t.Fatal("pieces do not reassemble the segment")
	}
	return out
}

func TestSplitCoversAndFindsZeros(t *testing.T) {
	s, err := NewSplitter(testPol(t))
	if err != nil {
		t.Fatal(err)
	}
	seg := randomBytes(1, 16<<20)
	// A 4 MiB aligned zero hole in the middle, a short unaligned zero run
	// that must stay inside data, and a zero tail.
	clear(seg[4<<20 : 8<<20])
	clear(seg[9<<20+100 : 9<<20+5000])
	clear(seg[15<<20:])
	ps := pieces(t, s, seg)
	var zeroBytes int
	for _, p := range ps {
		if p.Zero {
			zeroBytes += p.Length
		}
	}
	if zeroBytes != 5<<20 {
		t.Fatalf("zero runs cover %d bytes, want %d", zeroBytes, 5<<20)
	}
	// All zero: one zero piece.
	ps = pieces(t, s, make([]byte, 3<<20+17))
	if len(ps) != 1 || !ps[0].Zero {
		t.Fatalf("all-zero segment gave %+v", ps)
	}
	// Empty segment: nothing.
	if ps = pieces(t, s, nil); len(ps) != 0 {
		t.Fatalf("empty segment gave %d pieces", len(ps))
	}
}

// Content-defined: a change in one place leaves chunks elsewhere alone.
func TestSplitLocality(t *testing.T) {
	pol := testPol(t)
	s, _ := NewSplitter(pol)
	seg := randomBytes(2, 16<<20)
	before := pieces(t, s, seg)
	seg2 := bytes.Clone(seg)
	copy(seg2[8<<20:], []byte("a small edit in the middle"))
	after := pieces(t, s, seg2)
	same := 0
	set := map[[2]int]bool{}
	for _, p := range before {
		set[[2]int{p.Offset, p.Length}] = true
	}
	for _, p := range after {
		if set[[2]int{p.Offset, p.Length}] {
			same++
		}
	}
	if same < len(before)-3 {
		t.Fatalf("only %d of %d chunk boundaries survived a small edit", same, len(before))
	}
}

// The chunker cuts with probability 1/AverageSize per byte once a chunk
// has MinSize bytes, so chunks average MinSize + AverageSize (768 KiB):
// about 85 in 64 MiB of random data. The count varies with the
// repository's random polynomial (74–100 seen over 25 polynomials), so
// the bound is wide; the former 1 MiB setting (about 43) fails it.
func TestSplitAverage(t *testing.T) {
	s, _ := NewSplitter(testPol(t))
	n := len(pieces(t, s, randomBytes(2, 64<<20)))
	if want := (64 << 20) / (MinSize + AverageSize); n < want*7/10 || n > want*14/10 {
		t.Fatalf("64 MiB gave %d chunks, want about %d (average %d KiB)", n, want, (MinSize+AverageSize)>>10)
	}
}

func TestBadPolynomial(t *testing.T) {
	if _, err := NewSplitter(4); err == nil {
		t.Fatal("reducible polynomial accepted")
	}
}

func BenchmarkSplit(b *testing.B) {
	s, _ := NewSplitter(testPol(b))
	seg := randomBytes(3, 32<<20)
	b.SetBytes(int64(len(seg)))
	for b.Loop() {
		s.Split(seg, func(Piece) error { return nil })
	}
}

func BenchmarkIsZero(b *testing.B) {
	seg := make([]byte, 32<<20)
	b.SetBytes(int64(len(seg)))
	for b.Loop() {
		IsZero(seg)
	}
}

// restic's chunker is the reference: the Splitter must cut every data
// extent exactly where chunker.Chunker (with our sizes) cuts it, or
// repositories would stop deduplicating against what they hold. Extents
// of random data, of low-entropy data that reaches MaxSize, shorter than
// MinSize and of exactly MinSize, under several polynomials.
func TestSplitMatchesRestic(t *testing.T) {
	repeat := bytes.Repeat([]byte{1, 2, 3, 5, 8, 13, 21}, 3<<20) // 21 MiB, no cut before MaxSize
	extents := [][]byte{randomBytes(5, 24<<20), repeat, randomBytes(6, MinSize), randomBytes(7, MinSize-1), randomBytes(8, MinSize+1), randomBytes(9, 3<<20+12345)}
	buf := make([]byte, MaxSize)
	for range 4 {
		pol := testPol(t)
		s, err := NewSplitter(pol)
		if err != nil {
			t.Fatal(err)
		}
		for i, ext := range extents {
			want, got := resticChunks(t, pol, ext, buf), ourChunks(s, ext)
			if !slices.Equal(got, want) {
				t.Fatalf("polynomial %#x, extent %d (%d bytes): chunks %v, restic's chunker %v", pol, i, len(ext), got, want)
			}
			if i == 1 && (len(got) < 2 || got[0] != MaxSize) {
				t.Fatalf("low-entropy extent: chunks %v, want MaxSize cuts", got)
			}
		}
	}
}

// next tests candidates in blocks of four lanes: cuts that fall in any
// lane, at a lane's first or last byte, in the partial block at the end
// and nowhere (MaxSize) are where restic's chunker puts them. Extents of
// many lengths, data mixing random bytes with runs that push cuts to
// block edges, under fresh polynomials.
func TestSplitLanesMatchRestic(t *testing.T) {
	rng := rand.New(rand.NewPCG(12, 34))
	buf := make([]byte, MaxSize)
	for round := range 3 {
		pol := testPol(t)
		s, err := NewSplitter(pol)
		if err != nil {
			t.Fatal(err)
		}
		for i := range 12 {
			n := MinSize + rng.IntN(6<<20)
			if i%4 == 0 {
				// Ends exactly on a block edge or one byte either side.
				n = MinSize + (1+rng.IntN(30))*4*laneSize + rng.IntN(3) - 1
			}
			ext := randomBytes(uint64(100*round+i), n)
			if i%3 == 1 {
				// Low-entropy stretches: long runs without cuts, so cuts
				// land late in blocks or reach MaxSize.
				for k := 0; k < 8; k++ {
					at := rng.IntN(len(ext))
					run := min(len(ext)-at, rng.IntN(1<<20))
					for j := range run {
						ext[at+j] = byte(j % 7)
					}
				}
			}
			want, got := resticChunks(t, pol, ext, buf), ourChunks(s, ext)
			if !slices.Equal(got, want) {
				t.Fatalf("polynomial %#x, extent %d (%d bytes): chunks %v, restic's chunker %v", pol, i, len(ext), got, want)
			}
		}
	}
}

// resticChunks returns the chunk lengths restic's chunker cuts ext into
// with our sizes; buf holds MaxSize bytes.
func resticChunks(t *testing.T, pol uint64, ext, buf []byte) []int {
	t.Helper()
	c := chunker.NewWithBoundaries(bytes.NewReader(ext), chunker.Pol(pol), MinSize, MaxSize)
	c.SetAverageBits(bits.TrailingZeros(AverageSize))
	var out []int
	for {
		ch, err := c.Next(buf)
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, int(ch.Length))
	}
}

// ourChunks returns the chunk lengths next cuts ext into.
func ourChunks(s *Splitter, ext []byte) []int {
	var out []int
	for off := 0; off < len(ext); {
		n := s.next(ext[off:])
		out = append(out, n)
		off += n
	}
	return out
}
