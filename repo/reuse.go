package repo

// Re-chunking only around a change: every segment is split with the
// previous generation's chunks of the same disk as a guide
// (chunk.SplitGuided). Where the bytes over a previous chunk's range hash
// in place to that chunk's ID, the chunk is taken as it is (no chunker, no
// copy; the hash is the chunk's ID, needed anyway); the chunker runs only
// from the first chunk that differs until one of its cuts lands on a
// previous cut. A segment's ID is the hash of its list (docs/format.md),
// so a segment whose chunks are all taken is the previous segment: one
// hash pass over its bytes, nothing stored.
//
// Rules the code keeps:
//   - The segment list comes out exactly as a plain split makes it
//     (chunk/guided.go says why; TestBackupGuidedEqualsPlainSplit checks
//     it against a plain full read): the guide only saves work. That
//     needs the previous lists cut by this rule, as every list this
//     vmvault writes is. A list cut by another rule (another writer, or
//     a vmvault of another chunk size) may lend a chunk this rule would
//     have cut elsewhere: the list is then still valid and restores the
//     same bytes (docs/format.md lets a writer chunk as it likes), it
//     only differs from a plain split there.
//   - A chunk is taken only if the index knows it (stored, or being
//     stored by this backup): one the repository lost is stored again
//     from a private copy of its bytes, as a changed chunk is.
//   - The previous generation is the VM's latest (FindManifest), its disk
//     of the same name; with change tracking, the tracker's base. Where it
//     has a segment of the same length at the same offset, that segment
//     guides. Elsewhere boundaries moved, and content may have moved with
//     them (a qcow2 rewritten by qemu-img convert): a segment that moved
//     whole keeps its content-defined length, so up to
//     maxLengthCandidates previous segments of that length, nearest
//     first, are tried by hashing their first chunks in place; failing
//     that, the previous chunks at the same offsets guide.
//   - The previous generation is loaded once per disk, in the background,
//     and each previous segment list when a segment first needs it. Anything
//     that cannot be loaded (no generation, a damaged or missing object, a
//     list that does not fit its segment) leaves that part unguided: a
//     plain split, never a failed backup. The rules of a version-2
//     previous generation do not matter: only its chunk lists guide.

import (
	"context"
	"sort"
	"sync"

	"vmvault/chunk"
	"vmvault/crypto"
)

// previousGen loads, once and in the background, the generation whose
// disks guide the splitting of new segments.
type previousGen struct {
	r     *Repository
	ready chan struct{}
	m     *Manifest // nil: none, or it could not be loaded
	mu    sync.Mutex
	disks map[string]*prevDisk
}

// startPreviousGen starts loading vm's latest generation.
func (r *Repository) startPreviousGen(ctx context.Context, vm string) *previousGen {
	p := &previousGen{r: r, ready: make(chan struct{}), disks: map[string]*prevDisk{}}
	go func() {
		defer close(p.ready)
		m, err := r.FindManifest(ctx, vm, "latest")
		if err != nil {
			r.log.Debug("no previous generation to guide chunking", "vm", vm, "err", err)
			return
		}
		p.m = m
	}()
	return p
}

// disk returns the guide of the disk named name (resolved on first use).
func (p *previousGen) disk(name string) *prevDisk {
	p.mu.Lock()
	defer p.mu.Unlock()
	d := p.disks[name]
	if d == nil {
		d = &prevDisk{r: p.r, gen: p, name: name}
		p.disks[name] = d
	}
	return d
}

// prevDisk is one disk of the previous generation, its segments resolved
// on first use. A nil *prevDisk guides nothing.
type prevDisk struct {
	r    *Repository
	gen  *previousGen // nil when d is given
	name string
	once sync.Once
	d    *Disk // nil: no such disk, or unusable

	lenOnce sync.Once
	byLen   map[int64][]int // d's data segments by length (lengthGuide)
}

// prevDiskOf returns the guide of d, a disk whose segments are resolved.
func (r *Repository) prevDiskOf(d *Disk) *prevDisk {
	return &prevDisk{r: r, name: d.Name, d: d}
}

// resolved waits for the previous generation and returns its disk, or nil.
func (p *prevDisk) resolved(ctx context.Context) *Disk {
	if p == nil {
		return nil
	}
	if p.gen == nil {
		return p.d
	}
	p.once.Do(func() {
		select {
		case <-p.gen.ready:
		case <-ctx.Done():
			return
		}
		m := p.gen.m
		if m == nil {
			return
		}
		for i := range m.Disks {
			if m.Disks[i].Name != p.name {
				continue
			}
			// A copy: the manifest may be shared with other disks'
			// guides, and resolving fills the disk in.
			d := m.Disks[i]
			if err := p.r.resolveSegments(ctx, &d); err != nil {
				p.r.log.Debug("previous generation's disk unusable to guide chunking", "disk", p.name, "generation", m.ShortID(), "err", err)
				return
			}
			p.d = &d
		}
	})
	return p.d
}

// guide returns a guide for splitting seg, the segment at image offset
// off, from the previous generation's chunks, or nil if there are none.
// Where the previous generation has a segment of seg's length at off, the
// two are in step and that segment guides. Elsewhere segment boundaries
// moved, and content may have moved with them: a segment keeps its
// content-defined length where it moves whole, so the previous segments
// of seg's length nearest to off are tried (lengthGuide) before the
// previous chunks that overlap off.
func (p *prevDisk) guide(ctx context.Context, off int64, seg []byte) *chunkGuide {
	d := p.resolved(ctx)
	if d == nil {
		return nil
	}
	if off < d.Size {
		if i, start := d.segmentAt(off); start == off && d.segmentLen(i) == int64(len(seg)) {
			return p.offsetGuide(ctx, d, off, seg)
		}
	}
	if g := p.lengthGuide(ctx, d, off, seg); g != nil {
		return g
	}
	if off >= d.Size {
		return nil
	}
	return p.offsetGuide(ctx, d, off, seg)
}

// offsetGuide returns a guide of d's chunks in seg's range of the image.
func (p *prevDisk) offsetGuide(ctx context.Context, d *Disk, off int64, seg []byte) *chunkGuide {
	end := off + int64(len(seg))
	g := &chunkGuide{h: p.r.chunkH, seg: seg, last: -1}
	i, start := d.segmentAt(off)
	for ; i < d.segmentCount() && start < end; i++ {
		l := d.segmentLen(i)
		if id, zero := d.SegmentID(i); !zero {
			g.add(p.r.prevChunks(ctx, id, l), start, off, end)
		}
		start += l
	}
	if len(g.chunks) == 0 {
		return nil
	}
	return g
}

// maxLengthCandidates bounds the previous segments lengthGuide tries for
// one segment: each costs a list to load and a first chunk to hash.
const maxLengthCandidates = 3

// lengthProbes is how many of a candidate's first chunks lengthGuide
// hashes: a change in the first does not hide a moved segment.
const lengthProbes = 2

// lengthGuide returns a guide of the chunks of a previous segment as long
// as seg one of whose first lengthProbes chunks seg holds at the same
// place (hashed in place), trying at most maxLengthCandidates of them,
// nearest to off first, and hashing at most about a quarter of seg; or
// nil.
func (p *prevDisk) lengthGuide(ctx context.Context, d *Disk, off int64, seg []byte) *chunkGuide {
	p.lenOnce.Do(func() {
		p.byLen = map[int64][]int{}
		for i := range d.segmentCount() {
			if _, zero := d.SegmentID(i); !zero {
				l := d.segmentLen(i)
				p.byLen[l] = append(p.byLen[l], i)
			}
		}
	})
	cands := p.byLen[int64(len(seg))] // by offset
	// The nearest: around the first one at or after off.
	k := sort.Search(len(cands), func(k int) bool { return d.segmentStart(cands[k]) >= off })
	lo, hi := k-1, k
	// A segment that moved is found at the first probe; new content
	// costs every probe, so they are bounded by a quarter of its bytes.
	budget := len(seg) / 4
	for range maxLengthCandidates {
		var i int
		switch {
		case lo < 0 && hi >= len(cands):
			return nil
		case hi >= len(cands) || lo >= 0 && off-d.segmentStart(cands[lo]) < d.segmentStart(cands[hi])-off:
			i, lo = cands[lo], lo-1
		default:
			i, hi = cands[hi], hi+1
		}
		id, _ := d.SegmentID(i)
		entries := p.r.prevChunks(ctx, id, int64(len(seg)))
		pos, tried := 0, 0
		for _, e := range entries {
			if !e.Zero {
				if budget <= 0 {
					return nil
				}
				budget -= int(e.Length)
				if id := p.r.chunkH.Sum(seg[pos : pos+int(e.Length)]); id == e.ID {
					g := &chunkGuide{h: p.r.chunkH, seg: seg, last: -1, pre: pos, preLen: int(e.Length), preID: id}
					g.add(entries, 0, 0, int64(len(seg)))
					return g
				}
				if tried++; tried == lengthProbes {
					break
				}
			}
			pos += int(e.Length)
		}
	}
	return nil
}

// prevChunks loads the segment list of a previous segment of length l,
// or returns nil if it cannot be used.
func (r *Repository) prevChunks(ctx context.Context, id crypto.ID, l int64) []SegmentEntry {
	raw, err := r.getData(ctx, TypeSegment, id)
	if err != nil {
		r.log.Debug("previous segment list unusable to guide chunking", "object", dataName(id), "err", err)
		return nil
	}
	entries, err := decodeSegmentList(raw)
	var sum int64
	for _, e := range entries {
		sum += int64(e.Length)
	}
	if err != nil || sum != l {
		r.log.Debug("previous segment list does not fit its segment", "object", dataName(id), "err", err)
		return nil
	}
	return entries
}

// chunkGuide proposes a previous generation's chunks for one new segment
// (chunk.Guide), and remembers the chunk ID it hashed last, so the chunk
// the split then cuts there is not hashed twice.
type chunkGuide struct {
	h      *crypto.Hasher
	seg    []byte
	chunks []prevChunk // by offset
	next   int         // chunks before it lie before the split's position

	last    int // offset and length of the range hashed last (-1: none)
	lastLen int
	lastID  crypto.ID
	same    bool // whether it equalled the previous chunk

	// pre, preLen and preID: a range hashed before the split (lengthGuide),
	// or preLen 0.
	pre, preLen int
	preID       crypto.ID
}

// prevChunk is a previous chunk at an offset of the new segment.
type prevChunk struct {
	off, n     int
	endsExtent bool
	id         crypto.ID
}

// add adds the chunks of entries, a previous segment starting at image
// offset start, that start in [off, end), the new segment at off.
func (g *chunkGuide) add(entries []SegmentEntry, start, off, end int64) {
	pos := start
	for k, e := range entries {
		if !e.Zero && pos >= off && pos < end {
			g.chunks = append(g.chunks, prevChunk{off: int(pos - off), n: int(e.Length),
				endsExtent: k+1 == len(entries) || entries[k+1].Zero, id: e.ID})
		}
		pos += int64(e.Length)
	}
}

// Chunk implements chunk.Guide.
func (g *chunkGuide) Chunk(off int) (n int, endsExtent, ok bool) {
	for g.next < len(g.chunks) && g.chunks[g.next].off < off {
		g.next++
	}
	if g.next == len(g.chunks) || g.chunks[g.next].off != off {
		return 0, false, false
	}
	c := g.chunks[g.next]
	return c.n, c.endsExtent, true
}

// Same implements chunk.Guide: the bytes are the chunk's if they hash to
// its ID.
func (g *chunkGuide) Same(off, n int) bool {
	g.last, g.lastLen = off, n
	if off == g.pre && n == g.preLen {
		g.lastID = g.preID
	} else {
		g.lastID = g.h.Sum(g.seg[off : off+n])
	}
	g.same = g.lastID == g.chunks[g.next].id
	return g.same
}

// hashed returns the ID Same computed for piece p, if it hashed exactly
// p's bytes (ok), and whether they were the previous chunk's (same). g may
// be nil.
func (g *chunkGuide) hashed(p chunk.Piece) (id crypto.ID, ok, same bool) {
	if g != nil && p.Offset == g.last && p.Length == g.lastLen {
		return g.lastID, true, g.same
	}
	return crypto.ID{}, false, false
}

// splitGuided splits seg with g (nil: plainly), calling fn with each
// piece and, for data, its chunk ID. A chunk whose bytes hashed in place
// to a previous chunk's ID, stored already, is taken as that chunk; any
// other chunk's ID is computed over its bytes, in a private copy when
// private is set (seg can change while read: see storeSegment), and the
// piece's Data is then the copy.
//
// With a lease (repo/lease.go), seg is a mapped window of the leased file
// and private is set: a chunk not yet stored is hashed and sealed in
// place, and fn gets the sealed object, if the lease still holds after
// the seal; if not, the chunk goes the private way. fn's sealed is nil
// otherwise.
func (st *backupState) splitGuided(sp *chunk.Splitter, seg []byte, holes []chunk.Hole, g *chunkGuide, private func() []byte, lease *readLease, fn func(p chunk.Piece, id crypto.ID, sealed []byte) error) error {
	var guide chunk.Guide
	if g != nil {
		guide = g
	}
	var priv []byte
	return sp.SplitGuidedHoles(seg, holes, guide, func(p chunk.Piece) error {
		if p.Zero {
			return fn(p, crypto.ID{}, nil)
		}
		id, hashed, taken := g.hashed(p)
		if !taken {
			st.stats.chunked.Add(int64(p.Length))
		} else if !st.known(id) {
			// Not stored (any more): stored from its bytes, below.
			taken = false
		}
		if taken {
			return fn(p, id, nil)
		}
		if lease != nil {
			if !hashed {
				id = st.r.chunkH.Sum(p.Data)
			}
			if st.known(id) {
				return fn(p, id, nil) // stored: nothing to seal
			}
			sealed := st.r.codec.seal(TypeChunk, dataName(id), p.Data)
			if lease.held() {
				chunksSealedInPlace.Add(1)
				return fn(p, id, sealed)
			}
			// Written meanwhile, perhaps: the private way.
			st.r.codec.recycle(sealed)
			inPlaceRedone.Add(1)
		}
		switch {
		case private != nil:
			if priv == nil {
				priv = private()
			}
			b := priv[p.Offset : p.Offset+p.Length]
			id = st.r.chunkH.CopySum(b, p.Data)
			p.Data = b
		case !hashed:
			id = st.r.chunkH.Sum(p.Data)
		}
		return fn(p, id, nil)
	})
}
