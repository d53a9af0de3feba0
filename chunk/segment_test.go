package chunk

import (
	"bytes"
	"crypto/sha256"
	"testing"
)

func testSegmenter(avg int) *Segmenter {
	return NewSegmenter(avg, func(b byte) [32]byte { return sha256.Sum256([]byte{'k', b}) })
}

// cuts returns every boundary offset of img, cut window by window as a
// backup does.
func cuts(s *Segmenter, img []byte) []int {
	var out []int
	for off := 0; off < len(img); {
		w := img[off:min(len(img), off+s.Max())]
		n := s.Cut(w, off+len(w) == len(img))
		if n <= 0 || n > len(w) {
			panic("cut outside the window")
		}
		off += n
		out = append(out, off)
	}
	return out
}

func TestSegmenterBounds(t *testing.T) {
	const avg = 1 << 20
	s := testSegmenter(avg)
	img := randomBytes(11, 96<<20)
	cs := cuts(s, img)
	prev := 0
	for i, c := range cs {
		l := c - prev
		if c != len(img) && (l < avg/2 || l > MaxSegment(avg) || c%SegmentAlign != 0) {
			t.Fatalf("segment %d: %d bytes ending at %d", i, l, c)
		}
		prev = c
	}
	if mean := len(img) / len(cs); mean < avg*3/4 || mean > avg*5/4 {
		t.Fatalf("mean segment %d bytes for average %d", mean, avg)
	}
	// Zeros never hold a boundary: all segments of a zero image are as
	// long as allowed.
	for i, c := range cuts(s, make([]byte, 10<<20)) {
		if c != min((i+1)*MaxSegment(avg), 10<<20) {
			t.Fatalf("zero image cut at %d", c)
		}
	}
}

// Content that moves by whole blocks keeps its boundaries: after a
// 64 KiB insertion near the start, every boundary from the first one past
// the insertion's neighbourhood reappears, shifted.
func TestSegmenterShift(t *testing.T) {
	const avg = 1 << 20
	s := testSegmenter(avg)
	img := randomBytes(12, 64<<20)
	ins := randomBytes(13, 64<<10)
	moved := append(append(bytes.Clone(img[:3<<20]), ins...), img[3<<20:]...)
	before := map[int]bool{}
	for _, c := range cuts(s, img) {
		before[c+len(ins)] = true
	}
	after := cuts(s, moved)
	kept := 0
	for _, c := range after {
		if before[c] {
			kept++
		}
	}
	if kept < len(after)-4 {
		t.Fatalf("only %d of %d boundaries survived a 64 KiB insertion", kept, len(after))
	}
}
