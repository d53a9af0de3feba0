package chunk

import "encoding/binary"

// Segment boundaries are chosen by content, so that data which moves
// within an image (a qcow2 rewritten by qemu-img convert, a file system
// relocating blocks) keeps its segments: a boundary depends only on the
// 64 bytes before it and on where the previous boundary is, so two images
// that share content at different offsets cut it the same way from the
// first shared boundary on.
//
// Rules a second implementation must keep (docs/format.md, "Segments"):
//   - boundaries fall only at multiples of SegmentAlign from the segment's
//     start (so from the image start: every boundary is one), or at the
//     image's end;
//   - a segment of average size S is at least S/2 and at most S + S/2 long
//     (only the last one may be shorter);
//   - candidate p (S/2 ≤ p−start ≤ S+S/2) is a boundary if the 64 bytes
//     before it are not all zero and their gear hash is below
//     2⁶⁴ / (S/2 / SegmentAlign); the first such candidate wins, else the
//     segment is S+S/2 long;
//   - so a window of zeros never holds a boundary: a hole's segments are
//     known without reading it.

// SegmentAlign is the granularity of segment boundaries: the block size of
// file systems and a divisor of qcow2's cluster size, so that moved blocks
// keep their boundaries.
const SegmentAlign = 4096

// gearWindow is how many bytes before a candidate decide whether it is a
// boundary (a 64-bit gear hash shifts older bytes out).
const gearWindow = 64

// Segmenter finds content-defined segment boundaries. It is safe for
// concurrent use.
type Segmenter struct {
	gear      [256]uint64
	min, max  int
	threshold uint64
}

// MaxSegment returns the longest segment for average size avg.
func MaxSegment(avg int) int { return avg + avg/2 }

// NewSegmenter returns a Segmenter for segments of average size avg (a
// multiple of SegmentAlign, at least 2·SegmentAlign) whose gear table is
// derived from key: gear[i] is the little-endian uint64 at the start of
// key(i), a keyed hash of the byte i, so boundaries reveal nothing about
// content to someone without the key.
func NewSegmenter(avg int, key func(b byte) [32]byte) *Segmenter {
	s := &Segmenter{min: avg / 2, max: MaxSegment(avg)}
	for i := range s.gear {
		k := key(byte(i))
		s.gear[i] = binary.LittleEndian.Uint64(k[:8])
	}
	candidates := uint64(max(1, s.min/SegmentAlign))
	s.threshold = ^uint64(0) / candidates
	return s
}

// Max is the longest segment: callers read windows of this size.
func (s *Segmenter) Max() int { return s.max }

// Cut returns the length of the segment at the start of w. w holds Max
// bytes of the image, or fewer when it reaches the image's end (eof).
func (s *Segmenter) Cut(w []byte, eof bool) int {
	return s.CutHoles(w, eof, nil)
}

// CutHoles is Cut for a window whose holes are known: a candidate whose
// 64 bytes lie in a hole is zeros, so never a boundary, and is not read.
// (Reading each candidate is a first touch of its page, which on a mapped
// window costs far more than the 64 bytes; a hole's page would also have
// to be allocated and zeroed by the kernel.)
func (s *Segmenter) CutHoles(w []byte, eof bool, holes []Hole) int {
	if len(w) <= s.min {
		return len(w) // only at the image's end
	}
	last := min(len(w), s.max)
	for p := s.min; p <= last; p += SegmentAlign {
		for len(holes) > 0 && holes[0].End < p {
			holes = holes[1:]
		}
		if len(holes) > 0 && holes[0].Off <= p-gearWindow && p <= holes[0].End {
			continue
		}
		if s.boundary(w[p-gearWindow : p]) {
			return p
		}
	}
	return last
}

// boundary reports whether the window ending at a candidate makes it a
// boundary.
func (s *Segmenter) boundary(win []byte) bool {
	var h uint64
	zero := true
	for _, b := range win {
		h = h<<1 + s.gear[b]
		zero = zero && b == 0
	}
	return !zero && h < s.threshold
}
