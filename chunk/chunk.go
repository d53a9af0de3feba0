// Package chunk splits a segment of a disk image into zero runs and
// content-defined chunks.
//
// A segment is first cut at runs of all-zero blocks (ZeroBlock-aligned
// within the segment); the data extents between them are split by
// content-defined chunking under the repository's secret polynomial. Zero
// runs are never chunks: they are stored as lengths and restored as holes.
//
// The chunking is restic's (github.com/restic/chunker, with MinSize,
// MaxSize and AverageSize below), and must cut exactly where restic's
// chunker cuts the same extent: the Splitter works on the segment in
// memory instead of through restic's reader (which copied every byte
// twice), with restic's tables and the same rule (TestSplitMatchesRestic).
// A chunk's end depends only on where it starts and on its bytes:
//   - a cut falls at the first p ≥ MinSize (p counted from the chunk's
//     start) where the Rabin fingerprint of the 64 bytes before p, modulo
//     the polynomial, has its low log2(AverageSize) bits zero;
//   - else at MaxSize, or at the extent's end.
package chunk

import (
	"bytes"
	"fmt"

	"github.com/restic/chunker"
)

// ZeroBlock is the granularity of zero-run detection. A zero run shorter
// than this, or not aligned to it within the segment, stays inside a chunk.
const ZeroBlock = 64 << 10

// Chunk sizes: at least MinSize (except at the end of a data extent), at
// most MaxSize. Past MinSize a cut falls with probability 1/AverageSize per
// byte, so chunks average MinSize + AverageSize (768 KiB). Measured on two realistic images
// (docs/performance.md): an average of 512 KiB instead of restic's 1 MiB
// stored 32 % less on a day of random block writes, 6 % less on file
// system edits and on moved content, for about the same CPU time. MaxSize is
// also the format's bound on a chunk that readers accept.
const (
	MinSize     = 256 << 10
	AverageSize = 512 << 10 // a power of two
	MaxSize     = 8 << 20
)

var zeros [ZeroBlock]byte

// IsZero reports whether b consists only of zero bytes.
func IsZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeros))
		if !bytes.Equal(b[:n], zeros[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// Piece is one part of a segment: either a zero run (Data nil) or a chunk.
type Piece struct {
	Offset int    // within the segment
	Length int    // bytes
	Zero   bool   // a zero run
	Data   []byte // chunk content (nil for zero runs); valid only during the callback
}

// Splitter cuts segments. It is not safe for concurrent use: give each
// worker its own.
type Splitter struct {
	// out[b] removes byte b leaving the 64-byte window; mod[i] reduces
	// the top byte i of a shifted fingerprint (restic's tables).
	out, mod [256]uint64
	shift    uint // degree k of the polynomial − 8
	// For two bytes a step (next): out8[b] is out[b]·x⁸, hi[i] and lo[i]
	// are i·x^(k+8) and i·x^k, all reduced.
	out8, hi, lo [256]uint64
	lowMask      uint64 // the k−16 low bits of a fingerprint
}

// windowSize is the number of bytes a fingerprint covers.
const windowSize = 64

// NewSplitter returns a Splitter for the repository's polynomial.
func NewSplitter(pol uint64) (*Splitter, error) {
	p := chunker.Pol(pol)
	if !p.Irreducible() {
		return nil, fmt.Errorf("chunker polynomial %#x is not irreducible", pol)
	}
	k := p.Deg()
	if k < 16 || k > 53 {
		return nil, fmt.Errorf("chunker polynomial %#x: degree %d, must be 16 to 53", pol, k)
	}
	s := &Splitter{shift: uint(k - 8), lowMask: 1<<(k-16) - 1}
	for b := range 256 {
		// b followed by 63 zero bytes, reduced.
		h := chunker.Pol(b).Mod(p)
		for range windowSize - 1 {
			h = (h << 8).Mod(p)
		}
		s.out[b] = uint64(h)
		xk := (chunker.Pol(b) << uint(k)).Mod(p)
		s.mod[b] = uint64(xk | chunker.Pol(b)<<uint(k))
		s.lo[b] = uint64(xk)
		s.hi[b] = uint64((xk << 8).Mod(p))
		s.out8[b] = uint64((h << 8).Mod(p))
	}
	return s, nil
}

// next returns the length of the first chunk of data, the rest of a data
// extent from a chunk's start.
//
// Whether p is a cut depends only on the 64 bytes before p (the
// fingerprint of a window starting from zero is a function of the window
// alone), so candidates can be tested in any order: next tests blocks of
// four lanes at once, each lane a fingerprint chain of its own primed
// with the 64 bytes before it. The chains are independent, so the
// processor overlaps their table lookups, where one chain waits for each
// of its own; the first lane with a cut holds the first cut. The last
// partial block is scanned as one chain.
func (s *Splitter) next(data []byte) int {
	if len(data) <= MinSize {
		return len(data)
	}
	end := min(len(data), MaxSize)
	p := MinSize
	for ; p+4*laneSize <= end; p += 4 * laneSize {
		a, b, c, d := p, p+laneSize, p+2*laneSize, p+3*laneSize
		da, db, dc, dd := s.prime(data[a-windowSize:a]), s.prime(data[b-windowSize:b]), s.prime(data[c-windowSize:c]), s.prime(data[d-windowSize:d])
		// Lane k's bytes entering and leaving its window.
		ina, inb, inc, ind := data[a:b], data[b:c], data[c:d], data[d:d+laneSize]
		outa, outb, outc, outd := data[a-windowSize:b-windowSize], data[b-windowSize:c-windowSize], data[c-windowSize:d-windowSize], data[d-windowSize:d+laneSize-windowSize]
		fa, fb, fc, fd := -1, -1, -1, -1
		for j := range laneSize {
			if (da&cutMask == 0 || db&cutMask == 0 || dc&cutMask == 0 || dd&cutMask == 0) && s.first(&fa, &fb, &fc, &fd, j, da, db, dc, dd) {
				break // lane a has its cut: nothing later can come first
			}
			da ^= s.out[outa[j]]
			db ^= s.out[outb[j]]
			dc ^= s.out[outc[j]]
			dd ^= s.out[outd[j]]
			da = (da<<8 | uint64(ina[j])) ^ s.mod[byte(da>>s.shift)]
			db = (db<<8 | uint64(inb[j])) ^ s.mod[byte(db>>s.shift)]
			dc = (dc<<8 | uint64(inc[j])) ^ s.mod[byte(dc>>s.shift)]
			dd = (dd<<8 | uint64(ind[j])) ^ s.mod[byte(dd>>s.shift)]
		}
		switch {
		case fa >= 0:
			return a + fa
		case fb >= 0:
			return b + fb
		case fc >= 0:
			return c + fc
		case fd >= 0:
			return d + fd
		}
	}
	return s.scan(data, p, end)
}

// cutMask selects the fingerprint bits that are all zero at a cut: one
// position in AverageSize past MinSize is one.
const cutMask = AverageSize - 1

// laneSize is how many candidates each of next's four lanes tests per
// block: a chunk's cut is found within a block, so up to three lanes'
// work past it is spent for nothing (at most 3 × 8 KiB against the
// 512 KiB a chunk's search runs on average).
const laneSize = 8 << 10

// first records, for each lane whose fingerprint marks a cut at step j,
// the step if it has none yet; it reports whether lane a has one.
func (s *Splitter) first(fa, fb, fc, fd *int, j int, da, db, dc, dd uint64) bool {
	if da&cutMask == 0 && *fa < 0 {
		*fa = j
	}
	if db&cutMask == 0 && *fb < 0 {
		*fb = j
	}
	if dc&cutMask == 0 && *fc < 0 {
		*fc = j
	}
	if dd&cutMask == 0 && *fd < 0 {
		*fd = j
	}
	return *fa >= 0
}

// prime returns the fingerprint of a 64-byte window.
func (s *Splitter) prime(win []byte) uint64 {
	var d uint64
	for _, b := range win {
		d = (d<<8 | uint64(b)) ^ s.mod[byte(d>>s.shift)]
	}
	return d
}

// scan tests candidates from..end−1 in order as one chain and returns the
// first cut, or end (MaxSize, or the extent's end).
func (s *Splitter) scan(data []byte, from, end int) int {
	if from >= end {
		return end
	}
	d := s.prime(data[from-windowSize : from])
	// in[j] enters the window as leave[j] leaves it; d covers the 64
	// bytes before from+j.
	in := data[from:end]
	leave := data[from-windowSize : end-windowSize]
	leave = leave[:len(in)]
	j := 0
	// Two bytes a step: each fingerprint depends on the one before, and
	// reducing sixteen bits at once (two table lookups side by side)
	// halves that chain; the fingerprint in between, needed only for its
	// test, is computed off the chain.
	for ; j+1 < len(in); j += 2 {
		if d&cutMask == 0 {
			return from + j
		}
		i0, i1, l0, l1 := in[j], in[j+1], leave[j], leave[j+1]
		e := d ^ s.out[l0]
		if ((e<<8|uint64(i0))^s.mod[byte(e>>s.shift)])&cutMask == 0 {
			return from + j + 1
		}
		h := e >> (s.shift - 8)
		d = (e&s.lowMask)<<16 ^ (uint64(i0)<<8 | uint64(i1)) ^ s.hi[byte(h>>8)] ^ s.lo[byte(h)] ^ s.out8[l1]
	}
	for ; j < len(in); j++ {
		if d&cutMask == 0 {
			return from + j
		}
		d ^= s.out[leave[j]]
		d = (d<<8 | uint64(in[j])) ^ s.mod[byte(d>>s.shift)]
	}
	return end // MaxSize, or the extent's end
}

// Split calls fn for each piece of seg in order. The pieces cover seg
// exactly.
func (s *Splitter) Split(seg []byte, fn func(Piece) error) error {
	return s.SplitGuided(seg, nil, fn)
}

// SplitGuided is Split, taking chunks an earlier split proposes where g
// (nil: none) shows they are cut the same way (see Guide).
func (s *Splitter) SplitGuided(seg []byte, g Guide, fn func(Piece) error) error {
	return s.SplitGuidedHoles(seg, nil, g, fn)
}

// Hole is a range [Off, End) of a segment or window known to hold zeros
// without reading it: a hole of a sparse file (SEEK_HOLE). The ranges a
// function is given are sorted and do not overlap.
type Hole struct{ Off, End int }

// zeroRange reports whether seg[a:b] is all zeros, reading only the parts
// that lie outside holes.
func zeroRange(seg []byte, a, b int, holes []Hole) bool {
	for _, h := range holes {
		if h.End <= a {
			continue
		}
		if h.Off >= b {
			break
		}
		if h.Off > a && !IsZero(seg[a:h.Off]) {
			return false
		}
		if a = h.End; a >= b {
			return true
		}
	}
	return IsZero(seg[a:b])
}

// SplitGuidedHoles is SplitGuided for a segment whose holes are known:
// it cuts exactly as SplitGuided does, but never reads the bytes inside
// holes to find zero runs (a mapped window of a sparse file: reading a
// hole would make the kernel allocate zeroed pages for it). Bytes of a
// hole that end up inside a chunk are read as the chunk is.
func (s *Splitter) SplitGuidedHoles(seg []byte, holes []Hole, g Guide, fn func(Piece) error) error {
	off := 0
	for off < len(seg) {
		// Drop holes behind off: each zero test starts at or after it.
		for len(holes) > 0 && holes[0].End <= off {
			holes = holes[1:]
		}
		// Extend a zero run as far as whole zero blocks go.
		z := off
		for z < len(seg) {
			end := min(z+ZeroBlock, len(seg))
			if !zeroRange(seg, z, end, holes) {
				break
			}
			z = end
		}
		if z > off {
			if err := fn(Piece{Offset: off, Length: z - off, Zero: true}); err != nil {
				return err
			}
			off = z
			continue
		}
		// A data extent runs to the next aligned zero block.
		d := off + ZeroBlock
		for d < len(seg) {
			end := min(d+ZeroBlock, len(seg))
			if zeroRange(seg, d, end, holes) {
				break
			}
			d = end
		}
		d = min(d, len(seg))
		if err := s.splitData(seg, off, d, g, fn); err != nil {
			return err
		}
		off = d
	}
	return nil
}

// NewPolynomial returns a random irreducible polynomial for a new repository.
func NewPolynomial() (uint64, error) {
	p, err := chunker.RandomPolynomial()
	return uint64(p), err
}
