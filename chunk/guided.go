package chunk

// A guided split takes the chunks an earlier split of similar data made
// (the same segment in the previous generation of a disk) wherever it can
// show they are cut the same way, and runs the chunker only where they
// are not: a segment with a few changed blocks costs one keyed hash per
// byte instead of the chunker and the hash.
//
// Why a proposed chunk is the chunk a plain split cuts: the chunker's cut
// after a chunk start depends only on the bytes from that start and on
// where the data extent ends (see next). So if an earlier split of
// extent data ending at E' cut a chunk [a, a+n), the new data holds the
// same n bytes at a, a is a chunk start of the new split, and the new
// extent ends at E ≥ a+n, then the new split cuts [a, a+n) too, except
// when the earlier chunk ended at a+n only because its extent ended there
// (E' = a+n) and the new extent runs on (E > a+n): then a cut at a+n is
// not certain, and the chunker decides. Zero runs and extents are found
// exactly as Split finds them; only the chunker's answer is replaced.

// Guide proposes chunks from an earlier split of similar data by this
// rule and the same polynomial, with offsets relative to the segment
// being split. SplitGuided calls its methods in increasing order of off.
type Guide interface {
	// Chunk returns the length n of the chunk the earlier split cut
	// starting at off, and whether it ended there only because its data
	// extent ended (endsExtent: the next piece was a zero run, or the
	// segment ended); ok is false if no earlier chunk started at off.
	Chunk(off int) (n int, endsExtent, ok bool)
	// Same reports whether the n bytes of the segment at off are the
	// earlier chunk's bytes.
	Same(off, n int) bool
}

// splitData cuts seg[start:end], one data extent, into chunks.
func (s *Splitter) splitData(seg []byte, start, end int, g Guide, fn func(Piece) error) error {
	for off := start; off < end; {
		n := 0
		if g != nil {
			// A cut before the extent's end lies between MinSize and
			// MaxSize; a proposal that breaks this was not cut by
			// this rule.
			if k, endsExtent, ok := g.Chunk(off); ok && k > 0 && k <= MaxSize && off+k <= end &&
				(off+k == end || !endsExtent && k >= MinSize) && g.Same(off, k) {
				n = k
			}
		}
		if n == 0 {
			n = s.next(seg[off:end])
		}
		if err := fn(Piece{Offset: off, Length: n, Data: seg[off : off+n]}); err != nil {
			return err
		}
		off += n
	}
	return nil
}
