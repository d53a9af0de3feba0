package chunk

import (
	"math/rand/v2"
	"testing"
)

// sparseImage returns random data with zero runs of many shapes (aligned
// and not, shorter and longer than ZeroBlock, at the ends) and, as holes,
// a random choice of sub-ranges of those runs: what a sparse file's
// SEEK_HOLE reports is always zeros, but not every zero run is a hole.
func sparseImage(seed uint64, size int) ([]byte, []Hole) {
	img := randomBytes(seed, size)
	rng := rand.New(rand.NewPCG(seed, 77))
	var zeros []Hole
	for off := 0; off < size; {
		n := []int{100, 4096, 60 << 10, 64 << 10, 200 << 10, 1 << 20, 3 << 20}[rng.IntN(7)]
		if rng.IntN(3) == 0 {
			n += rng.IntN(5000)
		}
		if rng.IntN(2) == 0 {
			end := min(size, off+n)
			clear(img[off:end])
			zeros = append(zeros, Hole{off, end})
		}
		off += n + []int{0, 4096, 70 << 10, 300 << 10}[rng.IntN(4)]
	}
	var holes []Hole
	for _, z := range zeros {
		switch rng.IntN(4) {
		case 0: // not a hole: zeros written
		case 1:
			holes = append(holes, z)
		default: // a part of it, page-aligned inside
			a := (z.Off + 4095) &^ 4095
			b := z.End &^ 4095
			if a < b {
				holes = append(holes, Hole{a, b})
			}
		}
	}
	return img, holes
}

// Knowing the holes changes no cut: CutHoles and SplitGuidedHoles give
// what Cut and SplitGuided give reading every byte.
func TestHolesCutTheSame(t *testing.T) {
	s, err := NewSplitter(testPol(t))
	if err != nil {
		t.Fatal(err)
	}
	seg := testSegmenter(1 << 20)
	for seed := uint64(1); seed <= 6; seed++ {
		img, holes := sparseImage(seed, 24<<20)
		if len(holes) < 4 {
			t.Fatalf("seed %d: only %d holes", seed, len(holes))
		}
		// Segments cut window by window, as a backup does, with the
		// window's holes made relative to it.
		nSegs, skipped := 0, 0
		for off := 0; off < len(img); {
			w := img[off:min(len(img), off+seg.Max())]
			rel := relHoles(holes, off, off+len(w))
			want := seg.Cut(w, off+len(w) == len(img))
			if got := seg.CutHoles(w, off+len(w) == len(img), rel); got != want {
				t.Fatalf("seed %d, window at %d: CutHoles %d, Cut %d", seed, off, got, want)
			}
			segment := img[off : off+want]
			segHoles := relHoles(holes, off, off+want)
			for _, h := range segHoles {
				skipped += h.End - h.Off
			}
			var plain, hinted []Piece
			if err := s.SplitGuided(segment, nil, collect(&plain)); err != nil {
				t.Fatal(err)
			}
			if err := s.SplitGuidedHoles(segment, segHoles, nil, collect(&hinted)); err != nil {
				t.Fatal(err)
			}
			if !samePieces(plain, hinted) {
				t.Fatalf("seed %d, segment at %d: pieces differ with the holes known:\n%v\n%v", seed, off, plain, hinted)
			}
			off += want
			nSegs++
		}
		if nSegs < 8 || skipped == 0 {
			t.Fatalf("seed %d: %d segments, %d hole bytes: the test tests little", seed, nSegs, skipped)
		}
	}
}

// The hole bytes are never read: poisoned (non-zero) hole bytes that a
// read would notice change nothing, except inside chunks, which are read.
func TestHolesNotReadForZeroRuns(t *testing.T) {
	s, err := NewSplitter(testPol(t))
	if err != nil {
		t.Fatal(err)
	}
	seg := testSegmenter(1 << 20)
	// A zero run over every candidate boundary of the first segment.
	img := randomBytes(3, 8<<20)
	clear(img[256<<10 : 3<<20])
	want := seg.Cut(img[:seg.Max()], false)
	var plain []Piece
	if err := s.SplitGuided(img[:want], nil, collect(&plain)); err != nil {
		t.Fatal(err)
	}
	// The same zero run, now a hole whose bytes are poison.
	copy(img[256<<10:3<<20], randomBytes(4, 3<<20-256<<10))
	holes := []Hole{{256 << 10, 3 << 20}}
	if got := seg.CutHoles(img[:seg.Max()], false, holes); got != want {
		t.Fatalf("CutHoles read the hole: %d, want %d", got, want)
	}
	var hinted []Piece
	if err := s.SplitGuidedHoles(img[:want], holes, nil, collect(&hinted)); err != nil {
		t.Fatal(err)
	}
	if !samePieces(plain, hinted) {
		t.Fatalf("SplitGuidedHoles read the hole:\n%v\n%v", plain, hinted)
	}
}

// collect returns a split callback that appends each piece, without its
// data, to out.
func collect(out *[]Piece) func(Piece) error {
	return func(p Piece) error {
		p.Data = nil
		*out = append(*out, p)
		return nil
	}
}

// relHoles returns the parts of holes inside [a, b), relative to a.
func relHoles(holes []Hole, a, b int) []Hole {
	var out []Hole
	for _, h := range holes {
		lo, hi := max(h.Off, a), min(h.End, b)
		if lo < hi {
			out = append(out, Hole{lo - a, hi - a})
		}
	}
	return out
}
