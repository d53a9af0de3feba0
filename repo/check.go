package repo

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"

	"golang.org/x/sync/errgroup"

	"vmvault/backend"
	"vmvault/crypto"
)

// CheckOptions select how deep check goes.
type CheckOptions struct {
	// ReadData decrypts and verifies every referenced chunk.
	ReadData bool
	// Subset, in (0,1], decrypts and verifies that random fraction of the
	// referenced chunks (ignored when ReadData is set).
	Subset float64
}

// Damage is one damaged or missing object and the generations it breaks.
type Damage struct {
	Object      string   `json:"object"`
	Problem     string   `json:"problem"`
	Generations []string `json:"generations,omitempty"` // "vm/shortid"
}

// CheckReport is the outcome of Check.
type CheckReport struct {
	Manifests  int   `json:"manifests"`
	Tables     int   `json:"tables"`
	Segments   int   `json:"segments"`
	Chunks     int   `json:"chunks"`
	Objects    int   `json:"objects"`
	ChunksRead int   `json:"chunks_read"`
	BytesRead  int64 `json:"bytes_read"`
	// SegmentsRead counts the segment lists whose assembled content was
	// hashed and compared with their ID (ReadData only).
	SegmentsRead int      `json:"segments_read"`
	Unreferenced int      `json:"unreferenced"`
	Damage       []Damage `json:"damage"`
}

// OK reports whether no damage was found.
func (c *CheckReport) OK() bool { return len(c.Damage) == 0 }

type checker struct {
	r          *Repository
	tablesSeen map[crypto.ID]bool
	mu         sync.Mutex
	damage     map[string]*Damage
	objects    map[string]int64 // data objects present

	// Who references what, for naming the generations damage affects.
	segGens   map[crypto.ID][]string // segment list → generations
	chunkSegs map[crypto.ID][]crypto.ID

	// With ReadData: each loaded segment list's entries, in walk order,
	// and which chunks were verified (true) or found damaged (false).
	segOrder   []crypto.ID
	segEntries map[crypto.ID][]SegmentEntry
	chunkOK    map[crypto.ID]bool

	// The rule of each segment's ID: bit v set if a generation of
	// manifest version v references it (version is the generation being
	// walked); and the ID each loaded list has by the rule of version 3.
	version  int
	segRules map[crypto.ID]uint8
	listIDs  map[crypto.ID]crypto.ID
}

// rule reports whether a generation of manifest version v references
// segment id.
func (c *checker) rule(id crypto.ID, v int) bool { return c.segRules[id]&(1<<v) != 0 }

func (c *checker) report(object, problem string, gens ...string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	d := c.damage[object]
	if d == nil {
		d = &Damage{Object: object, Problem: problem}
		c.damage[object] = d
	}
	d.Generations = append(d.Generations, gens...)
}

// chunkGens returns the generations that reference a chunk.
func (c *checker) chunkGens(id crypto.ID) []string {
	var gens []string
	for _, sid := range c.chunkSegs[id] {
		gens = mergeGens(gens, c.segGens[sid])
	}
	return gens
}

// Check verifies the repository: every manifest opens, every object a
// manifest references exists and has a sane header, every index object
// opens; with ReadData or Subset it also decrypts chunks and verifies
// their content against their IDs (a subset reads at least one chunk).
// The caller holds a shared lock.
func (r *Repository) Check(ctx context.Context, opts CheckOptions) (*CheckReport, error) {
	c := &checker{r: r, damage: map[string]*Damage{}, objects: map[string]int64{}, tablesSeen: map[crypto.ID]bool{},
		segGens: map[crypto.ID][]string{}, chunkSegs: map[crypto.ID][]crypto.ID{},
		segEntries: map[crypto.ID][]SegmentEntry{}, chunkOK: map[crypto.ID]bool{},
		segRules: map[crypto.ID]uint8{}, listIDs: map[crypto.ID]crypto.ID{}}
	rep := &CheckReport{}
	if err := r.be.List(ctx, "data/", func(o backend.ObjectInfo) error {
		c.objects[o.Name] = o.Size
		return nil
	}); err != nil {
		return nil, err
	}
	rep.Objects = len(c.objects)

	// Index objects.
	names, err := r.listIndexNames(ctx)
	if err != nil {
		return nil, err
	}
	for n := range names {
		if _, err := r.loadIndexObject(ctx, n); err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			c.report(n, err.Error())
		}
	}

	// Manifests → tables → segment lists → chunks, remembering who
	// references what.
	var chunkOrder []crypto.ID
	w := Walk{
		Generation: func(m *Manifest) error {
			rep.Manifests++
			c.version = m.Version
			return nil
		},
		Table: func(id crypto.ID, from Origin) error {
			c.tablesSeen[id] = true
			if _, present := c.objects[dataName(id)]; !present {
				c.report(dataName(id), "missing segment table", from.Generation)
			}
			return nil
		},
		SegmentRef: func(id crypto.ID, zero bool, _ int64, from Origin) (bool, error) {
			if zero {
				return false, nil
			}
			c.segRules[id] |= 1 << c.version
			g, seen := c.segGens[id]
			if len(g) == 0 || g[len(g)-1] != from.Generation {
				c.segGens[id] = append(g, from.Generation)
			}
			if seen {
				return false, nil
			}
			if _, present := c.objects[dataName(id)]; !present {
				c.report(dataName(id), "missing segment list")
				return false, nil
			}
			return true, nil
		},
		SegmentList: func(id crypto.ID, entries []SegmentEntry, _ Origin) error {
			// Decoding accepts only the canonical encoding, so the
			// payload is the entries encoded again.
			c.listIDs[id], _ = r.segmentID(entries)
			if opts.ReadData {
				if _, seen := c.segEntries[id]; !seen {
					c.segOrder = append(c.segOrder, id)
					c.segEntries[id] = entries
				}
			}
			return nil
		},
		Chunk: func(e SegmentEntry, from Origin) error {
			sid, _ := parseID(shortName(from.Object))
			segs, seen := c.chunkSegs[e.ID]
			if !seen {
				chunkOrder = append(chunkOrder, e.ID)
			}
			if len(segs) == 0 || segs[len(segs)-1] != sid {
				c.chunkSegs[e.ID] = append(segs, sid)
			}
			return nil
		},
		OnError: func(object string, err error, from Origin) error {
			c.report(object, err.Error(), from.Generation)
			return nil
		},
	}
	if err := w.Run(ctx, r); err != nil {
		return nil, err
	}
	// Since version 3 a segment's ID is the keyed hash of its list: a
	// list stored under another ID restores other data than its
	// generations recorded (their image digests cover the IDs).
	for id, lid := range c.listIDs {
		if c.rule(id, ManifestVersion) && lid != id {
			c.report(dataName(id), "segment list does not match its ID")
		}
	}
	rep.Tables = len(c.tablesSeen)
	rep.Segments = len(c.segGens)
	rep.Chunks = len(chunkOrder)

	var err2 error
	if opts.ReadData {
		rep.ChunksRead, rep.BytesRead, rep.SegmentsRead, err2 = c.readSegments(ctx, chunkOrder)
	} else {
		rep.ChunksRead, rep.BytesRead, err2 = c.readChunks(ctx, chunkOrder, opts.Subset)
	}
	if err2 != nil {
		return nil, err2
	}
	rep.Unreferenced = max(0, len(c.objects)-rep.Segments-rep.Chunks-len(c.tablesSeen))
	for _, d := range c.damage {
		// Segment lists and chunks affect every generation that
		// references them, known only once the walk is complete.
		if id, err := parseID(shortName(d.Object)); err == nil && strings.HasPrefix(d.Object, "data/") {
			d.Generations = mergeGens(d.Generations, c.segGens[id])
			d.Generations = mergeGens(d.Generations, c.chunkGens(id))
		}
		sort.Strings(d.Generations)
		d.Generations = mergeGens(nil, d.Generations)
		rep.Damage = append(rep.Damage, *d)
	}
	sort.Slice(rep.Damage, func(i, j int) bool { return rep.Damage[i].Object < rep.Damage[j].Object })
	return rep, nil
}

// header fetches an object's cleartext header and checks it.
func (c *checker) header(ctx context.Context, name string, want ObjectType) {
	if size := c.objects[name]; size < headerSize+crypto.Overhead {
		c.report(name, fmt.Sprintf("truncated (%d bytes)", size))
		return
	}
	hdr, err := c.r.be.Get(ctx, name, 0, headerSize)
	if err != nil {
		if ctx.Err() == nil {
			c.report(name, err.Error())
		}
		return
	}
	switch h, err := parseHeaderBytes(hdr); {
	case err != nil:
		c.report(name, err.Error())
	case h.Type != want:
		c.report(name, fmt.Sprintf("is a %s, expected a %s", h.Type, want))
	}
}

func mergeGens(a, b []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, s := range append(append([]string(nil), a...), b...) {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

// ErrDamaged is returned by callers that turn a CheckReport with damage
// into an error.
var ErrDamaged = errors.New("repository damaged")

// String summarises a damage entry on one line.
func (d Damage) String() string {
	s := d.Object + ": " + d.Problem
	if len(d.Generations) > 0 {
		s += " (affects " + strings.Join(d.Generations, ", ") + ")"
	}
	return s
}

// readChunks checks every referenced chunk's header, and decrypts and
// verifies a random subset (a fraction, 0 for none) of them.
func (c *checker) readChunks(ctx context.Context, chunkOrder []crypto.ID, subset float64) (chunks int, bytes int64, err error) {
	verify := make([]bool, len(chunkOrder))
	picked := false
	for i := range verify {
		verify[i] = subset > 0 && rand.Float64() < subset
		picked = picked || verify[i]
	}
	if !picked && subset > 0 && len(verify) > 0 {
		verify[rand.IntN(len(verify))] = true // a subset reads at least one chunk
	}
	r := c.r
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	var cmu sync.Mutex
	var read, readBytes int64
	for i, cid := range chunkOrder {
		name := dataName(cid)
		if _, ok := c.objects[name]; !ok {
			c.report(name, "missing chunk")
			continue
		}
		g.Go(func() error {
			if !verify[i] {
				c.header(gctx, name, TypeChunk)
				return gctx.Err()
			}
			data, err := r.getData(gctx, TypeChunk, cid)
			if err != nil {
				if gctx.Err() != nil {
					return gctx.Err()
				}
				c.report(name, err.Error())
				return nil
			}
			if r.chunkH.Sum(data) != cid {
				c.report(name, "content does not match its ID")
			}
			cmu.Lock()
			read++
			readBytes += int64(len(data))
			cmu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return 0, 0, err
	}
	return int(read), readBytes, nil
}

// readSegments reads every segment list's chunks in order and verifies
// each chunk against its ID once. A segment a version-2 generation
// references has its assembled content (zero runs included) hashed and
// compared with its ID: a segment list naming sound chunks in a wrong
// order or of wrong lengths restores wrong data, and only this finds it.
// (Since version 3 the ID is the hash of the list itself, checked by
// Check for every list it loads.) A chunk shared by several segments is
// fetched once per segment.
func (c *checker) readSegments(ctx context.Context, chunkOrder []crypto.ID) (chunks int, bytes int64, segs int, err error) {
	for _, cid := range chunkOrder {
		if _, ok := c.objects[dataName(cid)]; !ok {
			c.report(dataName(cid), "missing chunk")
			c.chunkOK[cid] = false
		}
	}
	var zeros [64 << 10]byte
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for _, sid := range c.segOrder {
		g.Go(func() error {
			var h *crypto.Digest // nil: the ID does not name the content
			if c.rule(sid, manifestVersionContentIDs) {
				h = c.r.segH.New()
			}
			sound := true
			for _, e := range c.segEntries[sid] {
				if e.Zero {
					for n := int(e.Length); h != nil && n > 0; n -= min(n, len(zeros)) {
						h.Write(zeros[:min(n, len(zeros))])
					}
					continue
				}
				mu.Lock()
				ok, checked := c.chunkOK[e.ID]
				mu.Unlock()
				if checked && (!ok || h == nil) {
					// Damaged, or verified and not needed again.
					sound = sound && ok
					continue
				}
				name := dataName(e.ID)
				data, err := c.r.getData(gctx, TypeChunk, e.ID)
				if err != nil {
					if gctx.Err() != nil {
						return gctx.Err()
					}
					ok = false
					mu.Lock()
					c.chunkOK[e.ID] = false
					mu.Unlock()
					c.report(name, err.Error())
				} else if !checked {
					ok = c.r.chunkH.Sum(data) == e.ID
					mu.Lock()
					if _, again := c.chunkOK[e.ID]; !again {
						chunks++
					}
					c.chunkOK[e.ID] = ok
					mu.Unlock()
					if !ok {
						c.report(name, "content does not match its ID")
					}
				}
				mu.Lock()
				bytes += int64(len(data))
				mu.Unlock()
				sound = sound && ok
				if sound && h != nil {
					h.Write(data)
				}
			}
			var got crypto.ID
			if h != nil {
				h.Sum(got[:0])
			}
			mu.Lock()
			segs++
			mu.Unlock()
			if sound && h != nil && got != sid {
				c.report(dataName(sid), "assembled content does not match the segment's ID")
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return 0, 0, 0, err
	}
	return chunks, bytes, segs, nil
}
