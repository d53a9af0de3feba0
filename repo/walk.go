package repo

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"golang.org/x/sync/errgroup"

	"vmvault/crypto"
)

// The one walk of the repository: manifest → disks → segment tables →
// segment lists → chunks. Prune's mark phase, Stats and Check are its
// callers; a reader of one generation (mount, serve) follows the same
// path. Keeping it in one place keeps the three from drifting apart.
//
// Rules the walker keeps:
//   - Every object is yielded with its Origin (the generation and the
//     object that referenced it), so an error names both.
//   - Generations are visited one at a time, in ID order; all of a
//     generation's tables are resolved (and verified against the image
//     digest) before any of its segments is yielded.
//   - Callbacks are never called concurrently, so callers need no locks;
//     segment lists are fetched in parallel underneath.
//   - The walker keeps no set of its own: SegmentRef decides whether a
//     segment list is loaded, so a caller with a bounded (on-disk) set
//     keeps its memory bounded.

// Origin says where the walker found an object: which generation
// references it and through which object.
type Origin struct {
	Generation string // "vm/shortid", or "?/xxxxxxxx" before the manifest opened
	Disk       string // disk name; empty for a manifest
	Object     string // the object holding the reference ("manifests/…", a table, a segment list)
}

func (o Origin) String() string {
	s := "generation " + o.Generation
	if o.Disk != "" {
		s += " disk " + o.Disk
	}
	if o.Object != "" {
		s += " via " + o.Object
	}
	return s
}

// Walk is one walk over the repository. Every callback is optional; one
// returning an error stops the walk with that error, unless OnError
// turns it into a skip.
type Walk struct {
	// VM limits the walk to one VM's generations (empty: all).
	VM string
	// Skip lists manifest IDs to treat as already forgotten.
	Skip map[string]bool

	// Generation is called once per generation whose manifest opened,
	// before its disks.
	Generation func(m *Manifest) error
	// Disk is called for each disk of a generation, before its tables.
	Disk func(m *Manifest, d *Disk) error
	// Table is called for each segment table a disk references.
	Table func(id crypto.ID, from Origin) error
	// SegmentRef is called for every segment of every disk, in order,
	// zero segments included (id is the zero ID, zero is true). It
	// returns whether the walker should load the segment list (only
	// asked for non-zero segments); nil means load each distinct list
	// once per disk.
	SegmentRef func(id crypto.ID, zero bool, length int64, from Origin) (load bool, err error)
	// SegmentList is called with a loaded segment list's entries.
	SegmentList func(id crypto.ID, entries []SegmentEntry, from Origin) error
	// Chunk is called for each non-zero entry of a loaded segment list;
	// from.Object is the segment list.
	Chunk func(e SegmentEntry, from Origin) error

	// OnError is called for an object that cannot be read or verified
	// (manifest, table, segment list); returning nil skips it (and, for a
	// manifest or table, the rest of that generation or disk) and goes
	// on. Nil stops the walk at the first such error.
	OnError func(object string, err error, from Origin) error
}

// Run walks the repository.
func (w *Walk) Run(ctx context.Context, r *Repository) error {
	ids, err := r.ManifestIDs(ctx)
	if err != nil {
		return err
	}
	for _, id := range ids {
		if w.Skip[id] {
			continue
		}
		if err := w.generation(ctx, r, id); err != nil {
			return err
		}
	}
	return ctx.Err()
}

func (w *Walk) fail(ctx context.Context, object string, err error, from Origin) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if w.OnError == nil {
		return fmt.Errorf("%s: %w", from, err)
	}
	return w.OnError(object, err, from)
}

func (w *Walk) generation(ctx context.Context, r *Repository, id string) error {
	name := "manifests/" + id
	m, err := r.LoadManifest(ctx, id)
	if err != nil {
		return w.fail(ctx, name, err, Origin{Generation: "?/" + id[:8]})
	}
	if w.VM != "" && m.VM != w.VM {
		return nil
	}
	gen := m.VM + "/" + m.ShortID()
	if w.Generation != nil {
		if err := w.Generation(m); err != nil {
			return err
		}
	}
	for di := range m.Disks {
		d := &m.Disks[di]
		from := Origin{Generation: gen, Disk: d.Name, Object: name}
		if w.Disk != nil {
			if err := w.Disk(m, d); err != nil {
				return err
			}
		}
		if w.Table != nil {
			for _, tid := range d.Tables {
				if err := w.Table(crypto.ID(tid), from); err != nil {
					return err
				}
			}
		}
		if err := r.resolveSegments(ctx, d); err != nil {
			return w.fail(ctx, tableObjectOf(err, d), err, from)
		}
	}
	for di := range m.Disks {
		if err := w.segments(ctx, r, gen, &m.Disks[di]); err != nil {
			return err
		}
	}
	return nil
}

// segments yields one disk's segments and loads the lists asked for, in
// parallel, delivering them one at a time.
func (w *Walk) segments(ctx context.Context, r *Repository, gen string, d *Disk) error {
	origin := func(i int) Origin {
		t := min(i/r.tableSegments, len(d.Tables)-1) // the table holding segment i
		return Origin{Generation: gen, Disk: d.Name, Object: dataName(crypto.ID(d.Tables[t]))}
	}
	var load []int
	queued := map[crypto.ID]bool{}
	for i := range d.segmentCount() {
		sid, zero := d.SegmentID(i)
		want := !zero && !queued[sid]
		if w.SegmentRef != nil {
			ok, err := w.SegmentRef(sid, zero, d.segmentLen(i), origin(i))
			if err != nil {
				return err
			}
			want = want && ok
		}
		if want {
			queued[sid] = true
			load = append(load, i)
		}
	}
	if len(load) == 0 || (w.SegmentList == nil && w.Chunk == nil) {
		return nil
	}
	var mu sync.Mutex // serialises callbacks
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for _, i := range load {
		g.Go(func() error {
			sid, _ := d.SegmentID(i)
			from := origin(i)
			raw, err := r.getData(gctx, TypeSegment, sid)
			var entries []SegmentEntry
			if err == nil {
				entries, err = decodeSegmentList(raw)
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				return w.fail(gctx, dataName(sid), err, from)
			}
			if w.SegmentList != nil {
				if err := w.SegmentList(sid, entries, from); err != nil {
					return err
				}
			}
			if w.Chunk != nil {
				from.Object = dataName(sid)
				for _, e := range entries {
					if e.Zero {
						continue
					}
					if err := w.Chunk(e, from); err != nil {
						return err
					}
				}
			}
			return nil
		})
	}
	return g.Wait()
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
