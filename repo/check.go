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
	Manifests    int      `json:"manifests"`
	Tables       int      `json:"tables"`
	Segments     int      `json:"segments"`
	Chunks       int      `json:"chunks"`
	Objects      int      `json:"objects"`
	ChunksRead   int      `json:"chunks_read"`
	BytesRead    int64    `json:"bytes_read"`
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
}

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

// Check verifies the repository: every manifest opens, every object a
// manifest references exists and has a sane header, every index object
// opens; with ReadData or Subset it also decrypts chunks and verifies
// their content against their IDs. The caller holds a shared lock.
func (r *Repository) Check(ctx context.Context, opts CheckOptions) (*CheckReport, error) {
	c := &checker{r: r, damage: map[string]*Damage{}, objects: map[string]int64{}, tablesSeen: map[crypto.ID]bool{}}
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

	// Manifests → segments → chunks, remembering who references what.
	ids, err := r.ManifestIDs(ctx)
	if err != nil {
		return nil, err
	}
	segGens := map[crypto.ID][]string{}
	var segOrder []crypto.ID
	for _, id := range ids {
		m, err := r.LoadManifest(ctx, id)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			c.report("manifests/"+id, err.Error(), "?/"+id[:8])
			continue
		}
		rep.Manifests++
		gen := m.VM + "/" + m.ShortID()
		for di := range m.Disks {
			d := &m.Disks[di]
			if !c.tables(ctx, d, gen) {
				continue
			}
			rep.Tables += len(d.Tables)
			for i := range d.segmentCount() {
				sid, zero := d.SegmentID(i)
				if zero {
					continue
				}
				if _, seen := segGens[sid]; !seen {
					segOrder = append(segOrder, sid)
				}
				if g := segGens[sid]; len(g) == 0 || g[len(g)-1] != gen {
					segGens[sid] = append(g, gen)
				}
			}
		}
	}
	rep.Segments = len(segOrder)

	chunkGens := map[crypto.ID][]string{}
	var chunkOrder []crypto.ID
	var cmu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for _, sid := range segOrder {
		gens := segGens[sid]
		g.Go(func() error {
			entries, ok := c.segment(gctx, sid, gens)
			if !ok {
				return gctx.Err()
			}
			cmu.Lock()
			defer cmu.Unlock()
			for _, e := range entries {
				if e.Zero {
					continue
				}
				if _, seen := chunkGens[e.ID]; !seen {
					chunkOrder = append(chunkOrder, e.ID)
				}
				chunkGens[e.ID] = mergeGens(chunkGens[e.ID], gens)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	rep.Chunks = len(chunkOrder)

	g, gctx = errgroup.WithContext(ctx)
	g.SetLimit(8)
	var read, readBytes int64
	for _, cid := range chunkOrder {
		gens := chunkGens[cid]
		name := dataName(cid)
		if _, ok := c.objects[name]; !ok {
			c.report(name, "missing chunk", gens...)
			continue
		}
		verify := opts.ReadData || (opts.Subset > 0 && rand.Float64() < opts.Subset)
		g.Go(func() error {
			if !verify {
				c.header(gctx, name, TypeChunk, gens)
				return gctx.Err()
			}
			data, err := r.getData(gctx, TypeChunk, cid)
			if err != nil {
				if gctx.Err() != nil {
					return gctx.Err()
				}
				c.report(name, err.Error(), gens...)
				return nil
			}
			if r.chunkH.Sum(data) != cid {
				c.report(name, "content does not match its ID", gens...)
			}
			cmu.Lock()
			read++
			readBytes += int64(len(data))
			cmu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	rep.ChunksRead, rep.BytesRead = int(read), readBytes
	rep.Unreferenced = len(c.objects) - rep.Segments - rep.Chunks - len(c.tablesSeen)
	if rep.Unreferenced < 0 {
		rep.Unreferenced = 0
	}
	for _, d := range c.damage {
		sort.Strings(d.Generations)
		d.Generations = mergeGens(nil, d.Generations)
		rep.Damage = append(rep.Damage, *d)
	}
	sort.Slice(rep.Damage, func(i, j int) bool { return rep.Damage[i].Object < rep.Damage[j].Object })
	return rep, nil
}

// tables checks that a disk's segment tables exist and resolve to its
// segment IDs; it reports damage and returns false if they do not.
func (c *checker) tables(ctx context.Context, d *Disk, gen string) bool {
	ok := true
	for _, tid := range d.Tables {
		name := dataName(crypto.ID(tid))
		c.tablesSeen[crypto.ID(tid)] = true
		if _, present := c.objects[name]; !present {
			c.report(name, "missing segment table", gen)
			ok = false
		}
	}
	if !ok {
		return false
	}
	if err := c.r.resolveSegments(ctx, d); err != nil {
		if ctx.Err() == nil {
			c.report(tableObjectOf(err, d), err.Error(), gen)
		}
		return false
	}
	return true
}

// tableObjectOf names the object an error from resolveSegments is about:
// the table it mentions, else the first table.
func tableObjectOf(err error, d *Disk) string {
	for _, tid := range d.Tables {
		if name := dataName(crypto.ID(tid)); strings.Contains(err.Error(), name) {
			return name
		}
	}
	return dataName(crypto.ID(d.Tables[0]))
}

// segment loads and checks one segment list.
func (c *checker) segment(ctx context.Context, sid crypto.ID, gens []string) ([]SegmentEntry, bool) {
	name := dataName(sid)
	if _, ok := c.objects[name]; !ok {
		c.report(name, "missing segment list", gens...)
		return nil, ctx.Err() == nil
	}
	raw, err := c.r.getData(ctx, TypeSegment, sid)
	if err == nil {
		var entries []SegmentEntry
		entries, err = decodeSegmentList(raw)
		if err == nil {
			return entries, true
		}
	}
	if ctx.Err() != nil {
		return nil, false
	}
	c.report(name, err.Error(), gens...)
	return nil, true
}

// header fetches an object's cleartext header and checks it.
func (c *checker) header(ctx context.Context, name string, want ObjectType, gens []string) {
	if size := c.objects[name]; size < headerSize+crypto.Overhead {
		c.report(name, fmt.Sprintf("truncated (%d bytes)", size), gens...)
		return
	}
	hdr, err := c.r.be.Get(ctx, name, 0, headerSize)
	if err != nil {
		if ctx.Err() == nil {
			c.report(name, err.Error(), gens...)
		}
		return
	}
	switch h, err := parseHeaderBytes(hdr); {
	case err != nil:
		c.report(name, err.Error(), gens...)
	case h.Type != want:
		c.report(name, fmt.Sprintf("is a %s, expected a %s", h.Type, want), gens...)
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
