package chunk

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// Where a segment ends depends only on its own bytes (and on how many
// bytes the image has left): bytes after the cut never move it. Changed-
// block tracking relies on this (docs/format.md, "Backing up with change
// tracking"): a base segment whose bytes did not change is cut the same
// way once a cut is in step with the base again.
func TestCutDependsOnlyOnItsSegment(t *testing.T) {
	const avg = 1 << 20
	s := testSegmenter(avg)
	rng := rand.New(rand.NewPCG(3, 4))
	img := randomBytes(12, 64<<20)
	seen := map[bool]int{} // whether the cut was chosen by content
	for off := 0; off+s.Max() <= len(img); {
		w := bytes.Clone(img[off : off+s.Max()])
		c := s.Cut(w, false)
		seen[c < len(w)]++
		// Anything after the cut: other data, zeros, or nothing at all
		// when the segment ends the image.
		for i := c; i < len(w); i++ {
			w[i] = byte(rng.Uint32())
		}
		if got := s.Cut(w, false); got != c {
			t.Fatalf("segment at %d: cut at %d, at %d once the bytes after it changed", off, c, got)
		}
		clear(w[c:])
		if got := s.Cut(w, false); got != c {
			t.Fatalf("segment at %d: cut at %d, at %d once the bytes after it were zeros", off, c, got)
		}
		if c < len(w) {
			if got := s.Cut(w[:c], true); got != c {
				t.Fatalf("segment at %d: cut at %d, at %d when the image ends there", off, c, got)
			}
		}
		off += c
	}
	if seen[true] < 10 {
		t.Fatalf("only %d cuts chosen by content: the test tests little", seen[true])
	}
}
