package repo

// Changed-block tracking: a backup of a disk whose source says which byte
// ranges can differ from the same disk in an earlier generation (the
// base) reads only what it must and takes every other segment from the
// base, and the generation it commits is exactly the one a full read of
// the same image would commit (same segments, same digest).
//
// Rules the code keeps:
//   - A segment's end depends only on its own bytes and on the image size
//     (docs/format.md, "Segments"). So where the new image and the base
//     share a boundary, a base segment lying wholly outside the changed
//     ranges is cut the same way in the new image and has the same ID:
//     it is taken from the base (ID and length) without being read.
//   - Around each changed range the image is read and cut again from the
//     start of the base segment holding the range's first byte, segment
//     after segment, until a cut falls on a base boundary: from there the
//     two images are in step again.
//   - A base segment whose list is not in the index (removed by repair) is
//     cut again as if it had changed, so the new generation never names a
//     segment the repository lacks.
//   - The base is checked (present, same VM, the disk, its size and
//     segment size) before anything is read or stored: a refusal
//     (ErrNoBase) leaves nothing behind, and the caller reads the disk
//     whole instead.
//   - VerifyUnchanged re-reads a random share of the segments taken from
//     the base and compares their IDs: a change the tracker missed fails
//     the backup (ErrTrackerMismatch) and nothing is committed.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"sort"
	"time"

	"vmvault/backend"
	"vmvault/chunk"
	"vmvault/crypto"
)

// ErrNoBase means a disk's Changes cannot be used: the base generation is
// missing or damaged, has no disk of that name, a different size or
// segment size, or the ranges are malformed. Backup returns it before
// reading or storing anything; the caller backs the disk up whole instead.
var ErrNoBase = errors.New("change tracking unusable: read the disk whole")

// ErrTrackerMismatch means a segment the change tracker reported
// unchanged differs from the base generation: the tracker missed a change.
// The backup failed and committed nothing.
var ErrTrackerMismatch = errors.New("the change tracker missed a change")

// cbtBase is a disk's base generation for changed-block tracking.
type cbtBase struct {
	gen  *Manifest
	disk *Disk // its segments resolved
	// fullRead is when the disk was last read whole.
	fullRead time.Time
}

// loadBase checks src.Changes against the image and the repository and
// returns the base disk, its segments resolved. Refusals wrap ErrNoBase.
func (r *Repository) loadBase(ctx context.Context, vm string, src DiskSource) (*cbtBase, error) {
	ch := src.Changes
	refuse := func(format string, a ...any) error {
		return fmt.Errorf("disk %s: %s: %w", src.Name, fmt.Sprintf(format, a...), ErrNoBase)
	}
	if ch.Kind == "" || ch.Kind == CBTNone {
		return nil, refuse("change tracker kind %q is not a tracker's name", ch.Kind)
	}
	if _, ok := src.Reader.(io.ReaderAt); !ok || src.Size < 0 {
		return nil, refuse("change tracking needs a source of known size that can be read at any offset")
	}
	var end int64
	for i, rg := range ch.Ranges {
		if rg.Off < end || rg.Len <= 0 || rg.Off > src.Size-rg.Len {
			return nil, refuse("changed range %d (offset %d, %d bytes) is empty, overlaps the one before, is out of order or beyond the %d-byte image", i, rg.Off, rg.Len, src.Size)
		}
		end = rg.Off + rg.Len
	}
	short := ch.Base
	if len(short) > 8 {
		short = short[:8]
	}
	unusable := func(err error) bool {
		return errors.Is(err, backend.ErrNotExist) || errors.Is(err, ErrCorrupt) || errors.Is(err, crypto.ErrAuth)
	}
	if _, err := parseID(ch.Base); err != nil {
		return nil, refuse("base generation %q: %v", ch.Base, err)
	}
	gen, err := r.LoadManifest(ctx, ch.Base)
	if err != nil {
		if unusable(err) {
			return nil, fmt.Errorf("disk %s: base generation %s: %w: %w", src.Name, short, ErrNoBase, err)
		}
		return nil, err
	}
	if gen.VM != vm {
		return nil, refuse("base generation %s is of VM %s, not %s", short, gen.VM, vm)
	}
	if gen.Version != ManifestVersion {
		// Its segment IDs follow another rule: taken unread, they
		// would mix two rules in one generation.
		return nil, refuse("base generation %s has version-%d segment IDs, this vmvault writes version %d", short, gen.Version, ManifestVersion)
	}
	var bd *Disk
	for i := range gen.Disks {
		if gen.Disks[i].Name == src.Name {
			bd = &gen.Disks[i]
		}
	}
	switch {
	case bd == nil:
		return nil, refuse("base generation %s has no disk %s", short, src.Name)
	case bd.Size != src.Size:
		return nil, refuse("the image is %d bytes, the disk in base generation %s %d", src.Size, short, bd.Size)
	case bd.SegmentSize != r.cfg.SegmentSize:
		return nil, refuse("base generation %s was cut into segments of %d bytes, the repository now uses %d", short, bd.SegmentSize, r.cfg.SegmentSize)
	}
	if err := r.resolveSegments(ctx, bd); err != nil {
		if unusable(err) {
			return nil, fmt.Errorf("disk %s: base generation %s: %w: %w", src.Name, short, ErrNoBase, err)
		}
		return nil, err
	}
	b := &cbtBase{gen: gen, disk: bd, fullRead: bd.FullRead}
	if b.fullRead.IsZero() {
		// A base written before FullRead existed was read whole.
		b.fullRead = gen.Time
	}
	return b, nil
}

// staleSegments marks the base segments that must be cut again: those
// holding a byte of a changed range, and those (not all zero) whose
// segment list the index does not know.
func (r *Repository) staleSegments(bd *Disk, ranges []Range) []bool {
	n := bd.segmentCount()
	stale := make([]bool, n)
	for _, rg := range ranges {
		i, _ := bd.segmentAt(rg.Off)
		for ; i < n && bd.segmentStart(i) < rg.Off+rg.Len; i++ {
			stale[i] = true
		}
	}
	for i := range n {
		if id, zero := bd.SegmentID(i); !zero && !stale[i] && !r.idx.Has(id) {
			stale[i] = true
		}
	}
	return stale
}

// backupDiskChanged backs up a disk whose Changes were checked by loadBase:
// it reads and cuts again only around the changed ranges, takes every
// other segment from the base, and re-reads req.VerifyUnchanged percent
// of the segments it took.
func (st *backupState) backupDiskChanged(ctx context.Context, src DiskSource, req BackupRequest, base *cbtBase) (Disk, error) {
	bd := base.disk
	nw := workers()
	w := st.startSegmentWorkers(ctx, nw, st.r.segmenter.Max(), src.Source)
	w.prev = st.r.prevDiskOf(bd)
	ir := newImageReader(src, nw)
	ir.limit = st.readLimit
	rc := &recutter{w: w, ir: ir, cut: st.r.segmenter, base: bd, minSeg: st.r.cfg.SegmentSize / 2, ranges: src.Changes.Ranges}
	stale := st.r.staleSegments(bd, src.Changes.Ranges)
	n := bd.segmentCount()

	var lens []int64
	var taken []int // base segments taken unread
	readErr := func() error {
		i := 0 // the first base segment starting at or after pos
		for pos := int64(0); pos < src.Size; {
			for i < n && bd.segmentStart(i) < pos {
				i++
			}
			if i < n && bd.segmentStart(i) == pos && !stale[i] {
				// In step with the base, and its segment unchanged.
				id, zero := bd.SegmentID(i)
				l := bd.segmentLen(i)
				w.setID(len(lens), id)
				lens = append(lens, l)
				taken = append(taken, i)
				st.stats.segs.Add(1)
				if zero {
					st.stats.zero.Add(l)
				}
				rc.drop()
				pos += l
			} else {
				l, err := rc.next(ctx, pos, len(lens))
				if err != nil {
					return err
				}
				lens = append(lens, l)
				pos += l
			}
			if req.Progress != nil {
				req.Progress(src.Name, pos)
			}
		}
		rc.drop()
		return st.verifyUnchanged(ctx, w, ir, src, base, taken, req.VerifyUnchanged)
	}()
	segs, err := st.endRead(w, ir, len(lens), readErr)
	if err != nil {
		return Disk{}, err
	}
	d, err := st.finishDisk(ctx, src, src.Size, segs, lens)
	if err != nil {
		return Disk{}, err
	}
	d.CBT, d.CBTBase, d.BytesRead, d.FullRead = src.Changes.Kind, base.gen.ID, ir.read, base.fullRead
	return d, nil
}

// recutter reads and cuts an image again from given positions, as a full
// read would cut it, carrying the bytes read past one cut into the next
// segment.
type recutter struct {
	w      *segmentWorkers
	ir     *imageReader
	cut    *chunk.Segmenter
	base   *Disk
	minSeg int64
	ranges []Range // the changed ranges
	buf    []byte  // holds have bytes of the image from the next position
	have   int
}

// next cuts the segment at pos, hands it to the workers as segment i (a
// hole, as a full read does, records an all-zero segment unread), and
// returns its length.
func (rc *recutter) next(ctx context.Context, pos int64, i int) (int64, error) {
	size := rc.ir.src.Size
	want := int(min(int64(rc.cut.Max()), size-pos))
	if rc.have == 0 && rc.ir.isHole(pos, int64(want)) || rc.knownZeros(pos, pos+int64(want)) {
		// Zeros, and no boundary falls inside zeros: a full read cuts
		// the whole window as one all-zero segment.
		rc.drop()
		rc.w.setID(i, crypto.ID{})
		rc.w.st.stats.segs.Add(1)
		rc.w.st.stats.zero.Add(int64(want))
		return int64(want), nil
	}
	if rc.buf == nil {
		var err error
		if rc.buf, err = rc.w.getBuf(); err != nil {
			return 0, err
		}
	}
	// Read up to one candidate past the first base boundary where this
	// segment may end: the cut most likely falls there. A cut before the
	// end of what was read is final; one at its end may need the rest of
	// the window.
	guess := min(nextBoundary(rc.base, pos+rc.minSeg)+chunk.SegmentAlign, pos+int64(want))
	var c int
	for {
		if target := int(guess - pos); rc.have < target {
			if _, err := rc.ir.fill(ctx, rc.buf[rc.have:target], pos+int64(rc.have)); err != nil {
				return 0, err
			}
			rc.have = target
		}
		c = rc.cut.Cut(rc.buf[:rc.have], pos+int64(rc.have) == size)
		if c < rc.have || rc.have == want {
			break
		}
		guess = pos + int64(want)
	}
	var err error
	if rc.buf, err = rc.w.submitCut(i, pos, rc.buf, rc.have, c); err != nil {
		return 0, err
	}
	rc.have -= c
	return int64(c), nil
}

// knownZeros reports whether the image holds only zeros in [off, end)
// without reading it: no changed range touches it, and the base's
// segments there are all zero. Cuts that are out of step with the base's
// in a long run of zeros (on a thin LV, most of it) fall back into step
// only where data comes again, so without this they would read every
// zero up to there.
func (rc *recutter) knownZeros(off, end int64) bool {
	rs := rc.ranges
	k := sort.Search(len(rs), func(k int) bool { return rs[k].Off+rs[k].Len > off })
	if k < len(rs) && rs[k].Off < end {
		return false
	}
	i, start := rc.base.segmentAt(off)
	for ; start < end; i++ {
		if _, zero := rc.base.SegmentID(i); !zero {
			return false
		}
		start += rc.base.segmentLen(i)
	}
	return true
}

// drop forgets the bytes read past the last cut: the next position is
// taken from the base.
func (rc *recutter) drop() {
	if rc.buf != nil {
		rc.w.putBuf(rc.buf)
		rc.buf, rc.have = nil, 0
	}
}

// nextBoundary returns the first segment boundary of bd at or after off
// (the image's end if none).
func nextBoundary(bd *Disk, off int64) int64 {
	if off >= bd.Size {
		return bd.Size
	}
	i, start := bd.segmentAt(off)
	if start < off {
		return start + bd.segmentLen(i)
	}
	return start
}

// verifyUnchanged re-reads pct percent (at least one, if pct > 0) of the
// base segments taken unread, chosen at random, and fails with
// ErrTrackerMismatch if one differs from the base.
func (st *backupState) verifyUnchanged(ctx context.Context, w *segmentWorkers, ir *imageReader, src DiskSource, base *cbtBase, taken []int, pct float64) error {
	k := verifyCount(pct, len(taken))
	if k == 0 {
		return nil
	}
	buf, err := w.getBuf()
	if err != nil {
		return err
	}
	defer w.putBuf(buf)
	sp, err := chunk.NewSplitter(st.r.cfg.ChunkerPolynomial)
	if err != nil {
		return err
	}
	bd := base.disk
	for _, t := range rand.Perm(len(taken))[:k] {
		i := taken[t]
		off, l := bd.segmentStart(i), bd.segmentLen(i)
		seg := buf[:l]
		if _, err := ir.fill(ctx, seg, off); err != nil {
			return err
		}
		// The segment's ID as a backup derives it: split guided by the
		// base's chunks (one hash pass where it is unchanged).
		var entries []SegmentEntry
		if err := st.splitGuided(sp, seg, nil, w.prev.guide(ctx, off, seg), nil, nil, func(p chunk.Piece, id crypto.ID, _ []byte) error {
			entries = append(entries, SegmentEntry{Zero: p.Zero, Length: uint32(p.Length), ID: id})
			return nil
		}); err != nil {
			return err
		}
		id, _ := st.r.segmentID(entries)
		if want, _ := bd.SegmentID(i); id != want {
			return fmt.Errorf("segment at offset %d (%d bytes) differs from base generation %s, but the change tracker (%s) reported it unchanged: %w",
				off, l, base.gen.ShortID(), src.Changes.Kind, ErrTrackerMismatch)
		}
	}
	return nil
}

// verifyCount is how many of n segments pct percent is: rounded up, so at
// least one when pct > 0 and n > 0.
func verifyCount(pct float64, n int) int {
	if pct <= 0 || n == 0 {
		return 0
	}
	return min(n, int(math.Ceil(pct*float64(n)/100)))
}
