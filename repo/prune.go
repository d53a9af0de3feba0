package repo

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	bolt "go.etcd.io/bbolt"

	"vmvault/backend"
	"vmvault/crypto"
)

// ErrAppendOnly means the repository refuses deletion: an append-only
// account. Prune and unlock must run on the server against the local path.
var ErrAppendOnly = errors.New("this repository is append-only for this account: run prune/unlock on the backup server against the repository's local path")

// CheckDeletable fails with ErrAppendOnly when the backend refuses deletes.
// It deletes nothing: it asks to delete a name that does not exist.
func (r *Repository) CheckDeletable(ctx context.Context) error {
	probe := "locks/" + fmt.Sprintf("%x", randomID()) + ".probe"
	err := r.be.Delete(ctx, probe)
	switch {
	case err == nil, errors.Is(err, backend.ErrNotExist):
		return nil
	case errors.Is(err, backend.ErrReadOnly):
		return ErrAppendOnly
	}
	return fmt.Errorf("probe deletion: %w", err)
}

// Forget removes the manifests with the given full IDs. The caller holds
// an exclusive lock. The data they referenced stays until Prune.
func (r *Repository) Forget(ctx context.Context, ids []string) error {
	for _, id := range ids {
		mid, err := parseID(id)
		if err != nil {
			return err
		}
		if err := r.be.Delete(ctx, manifestName(mid)); err != nil {
			if errors.Is(err, backend.ErrReadOnly) {
				return ErrAppendOnly
			}
			return fmt.Errorf("forget %s: %w", id[:8], err)
		}
	}
	return nil
}

// PruneStats reports what Prune removed (or would remove).
type PruneStats struct {
	Generations    int   `json:"generations"`
	ObjectsKept    int   `json:"objects_kept"`
	BytesKept      int64 `json:"bytes_kept"`
	ObjectsRemoved int   `json:"objects_removed"`
	BytesRemoved   int64 `json:"bytes_removed"`
	IndexWritten   int   `json:"index_written"`
	IndexRemoved   int   `json:"index_removed"`
	TempRemoved    int   `json:"temporary_removed"`
}

// markSet is the set of live object IDs during prune. It lives in a
// temporary bbolt file, so prune's memory does not grow with the
// repository: a batch of IDs is buffered in memory and flushed per
// transaction.
type markSet struct {
	db      *bolt.DB
	path    string
	batch   map[crypto.ID]ObjectType
	garbage []string
}

var (
	bucketMarks   = []byte("marks")
	bucketGarbage = []byte("garbage")
)

const markBatch = 1 << 16

func newMarkSet(dir string) (*markSet, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(dir, "prune-marks-*.db")
	if err != nil {
		return nil, err
	}
	path := f.Name()
	f.Close()
	os.Remove(path)
	db, err := bolt.Open(path, 0o600, &bolt.Options{NoSync: true, NoFreelistSync: true})
	if err != nil {
		return nil, err
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucket(bucketMarks); err != nil {
			return err
		}
		_, err := tx.CreateBucket(bucketGarbage)
		return err
	}); err != nil {
		db.Close()
		return nil, err
	}
	return &markSet{db: db, path: path, batch: map[crypto.ID]ObjectType{}}, nil
}

func (m *markSet) add(id crypto.ID, t ObjectType) error {
	m.batch[id] = t
	if len(m.batch) >= markBatch {
		return m.flush()
	}
	return nil
}

func (m *markSet) flush() error {
	if len(m.batch) == 0 && len(m.garbage) == 0 {
		return nil
	}
	err := m.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketMarks)
		for id, t := range m.batch {
			if err := b.Put(id[:], []byte{byte(t)}); err != nil {
				return err
			}
		}
		g := tx.Bucket(bucketGarbage)
		for _, name := range m.garbage {
			if err := g.Put([]byte(name), nil); err != nil {
				return err
			}
		}
		return nil
	})
	clear(m.batch)
	m.garbage = m.garbage[:0]
	return err
}

// addGarbage records an object to delete once the new index is durable.
func (m *markSet) addGarbage(name string) error {
	m.garbage = append(m.garbage, name)
	if len(m.garbage) >= markBatch {
		return m.flush()
	}
	return nil
}

// eachGarbage calls fn for every recorded garbage object, in batches read
// from disk (fn runs outside any transaction: it may take long).
func (m *markSet) eachGarbage(fn func(string) error) error {
	var after []byte
	for {
		var names []string
		m.db.View(func(tx *bolt.Tx) error {
			c := tx.Bucket(bucketGarbage).Cursor()
			k, _ := c.First()
			if after != nil {
				k, _ = c.Seek(after)
				if k != nil && string(k) == string(after) {
					k, _ = c.Next()
				}
			}
			for ; k != nil && len(names) < 4096; k, _ = c.Next() {
				names = append(names, string(k))
			}
			return nil
		})
		if len(names) == 0 {
			return nil
		}
		for _, n := range names {
			if err := fn(n); err != nil {
				return err
			}
		}
		after = []byte(names[len(names)-1])
	}
}

// get returns the marked type of id (0 if unmarked).
func (m *markSet) get(id crypto.ID) ObjectType {
	if t, ok := m.batch[id]; ok {
		return t
	}
	var t ObjectType
	m.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMarks).Get(id[:]); len(v) == 1 {
			t = ObjectType(v[0])
		}
		return nil
	})
	return t
}

func (m *markSet) close() {
	m.db.Close()
	os.Remove(m.path)
}

// Prune deletes every data object no manifest references, consolidates
// the index, and removes leftovers of interrupted uploads. The caller
// holds an exclusive lock. With dryRun it only counts. Manifests whose IDs
// are in exclude are treated as already forgotten (for a dry run of
// forget + prune).
//
// Order makes a crash at any instant safe: the new index (live objects
// only) is written first, then the old index objects are removed, and
// only then unreferenced data; so no index ever lists a deleted object.
func (r *Repository) Prune(ctx context.Context, dryRun bool, exclude map[string]bool) (*PruneStats, error) {
	if !dryRun {
		if err := r.CheckDeletable(ctx); err != nil {
			return nil, err
		}
	}
	st := &PruneStats{}
	marks, err := newMarkSet(r.cacheDir)
	if err != nil {
		return nil, fmt.Errorf("prune: mark set: %w", err)
	}
	defer marks.close()

	// Mark.
	ids, err := r.ManifestIDs(ctx)
	if err != nil {
		return nil, err
	}
	for _, id := range ids {
		if exclude[id] {
			continue
		}
		m, err := r.LoadManifest(ctx, id)
		if err != nil {
			return nil, fmt.Errorf("prune stopped, nothing deleted: %w (run check)", err)
		}
		st.Generations++
		if err := r.resolveManifest(ctx, m); err != nil {
			return nil, fmt.Errorf("prune stopped, nothing deleted: %w (run check)", err)
		}
		for di := range m.Disks {
			d := &m.Disks[di]
			for _, tid := range d.Tables {
				if err := marks.add(crypto.ID(tid), TypeTable); err != nil {
					return nil, err
				}
			}
			for i := range d.segmentCount() {
				sid, zero := d.SegmentID(i)
				if zero || marks.get(sid) != 0 {
					continue
				}
				raw, err := r.getData(ctx, TypeSegment, sid)
				if err != nil {
					return nil, fmt.Errorf("prune stopped, nothing deleted: generation %s/%s: %w (run check)", m.VM, m.ShortID(), err)
				}
				entries, err := decodeSegmentList(raw)
				if err != nil {
					return nil, fmt.Errorf("prune stopped, nothing deleted: %w", err)
				}
				if err := marks.add(sid, TypeSegment); err != nil {
					return nil, err
				}
				for _, e := range entries {
					if !e.Zero {
						if err := marks.add(e.ID, TypeChunk); err != nil {
							return nil, err
						}
					}
				}
			}
		}
	}
	if err := marks.flush(); err != nil {
		return nil, err
	}

	// The index objects to replace: listed before any new one is written.
	oldIndex, err := r.listIndexNames(ctx)
	if err != nil {
		return nil, err
	}
	st.IndexRemoved = len(oldIndex)

	// Sweep list: live objects go to new index objects, written as each
	// fills up; garbage names go to the on-disk set. Memory stays bounded
	// by one index object's entries, whatever the repository's size.
	live := make([]IndexEntry, 0, indexObjectEntries)
	flushLive := func() error {
		if len(live) == 0 {
			return nil
		}
		st.IndexWritten++
		if !dryRun {
			name := indexName(randomID())
			if err := r.be.Put(ctx, name, r.codec.seal(TypeIndex, name, encodeIndex(live))); err != nil {
				return fmt.Errorf("write index: %w", err)
			}
		}
		live = live[:0]
		return nil
	}
	err = r.be.List(ctx, "data/", func(o backend.ObjectInfo) error {
		id, err := parseID(shortName(o.Name))
		if err == nil {
			if t := marks.get(id); t != 0 {
				live = append(live, IndexEntry{ID: id, Type: t, Size: uint32(o.Size)})
				st.ObjectsKept++
				st.BytesKept += o.Size
				if len(live) == indexObjectEntries {
					return flushLive()
				}
				return nil
			}
		}
		st.ObjectsRemoved++
		st.BytesRemoved += o.Size
		if dryRun {
			return nil
		}
		return marks.addGarbage(o.Name)
	})
	if err == nil {
		err = flushLive()
	}
	if err == nil {
		err = marks.flush()
	}
	if err != nil {
		return nil, err
	}
	if dryRun {
		return st, nil
	}
	// Old index objects go only now that the new ones are durable.
	for name := range oldIndex {
		if err := r.be.Delete(ctx, name); err != nil && !errors.Is(err, backend.ErrNotExist) {
			return nil, fmt.Errorf("remove old index: %w", err)
		}
	}
	// Then the garbage, which no index lists any more.
	err = marks.eachGarbage(func(name string) error {
		if err := r.be.Delete(ctx, name); err != nil && !errors.Is(err, backend.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", name, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if tr, ok := r.be.(interface {
		RemoveTemporary(context.Context) (int, error)
	}); ok {
		n, err := tr.RemoveTemporary(ctx)
		if err != nil {
			return nil, fmt.Errorf("remove temporary files: %w", err)
		}
		st.TempRemoved = n
	}
	// Stale locks and the released markers append-only clients leave.
	if _, err := r.RemoveLocks(ctx, false); err != nil {
		r.log.Warn("removing stale locks failed", "err", err)
	}
	// The local cache is now stale; drop it so the next open rebuilds.
	if r.idx != nil {
		r.idx.Close()
		r.idx = nil
	}
	os.Remove(filepath.Join(r.cacheDir, "index.db"))
	return st, nil
}

// indexObjectEntries bounds one consolidated index object (~40 bytes per entry).
const indexObjectEntries = 100_000

// Stats describes the repository's contents.
type Stats struct {
	Group           string  `json:"vm"`
	Generations     int     `json:"generations"`
	LogicalBytes    int64   `json:"logical_bytes"`     // sum of image sizes over generations
	UniqueBytes     int64   `json:"unique_bytes"`      // distinct chunk bytes (after dedup, before compression)
	StoredBytes     int64   `json:"stored_bytes"`      // sealed bytes of those chunks and segment lists
	DedupRatio      float64 `json:"dedup_ratio"`       // logical non-zero / unique
	CompressionRate float64 `json:"compression_ratio"` // unique / stored
	ZeroBytes       int64   `json:"zero_bytes"`        // zero runs (not stored)
}

// Stats computes per-VM statistics (vm empty: every VM) and a total,
// which is the last element (Group "total").
func (r *Repository) Stats(ctx context.Context, vm string) ([]Stats, error) {
	ix, err := r.LoadIndex(ctx)
	if err != nil {
		return nil, err
	}
	ms, err := r.Manifests(ctx, vm)
	if err != nil {
		return nil, err
	}
	type acc struct {
		s     Stats
		seen  map[crypto.ID]bool
		order int
	}
	groups := map[string]*acc{}
	total := &acc{s: Stats{Group: "total"}, seen: map[crypto.ID]bool{}}
	segCache := map[crypto.ID][]SegmentEntry{}
	for _, m := range ms {
		g := groups[m.VM]
		if g == nil {
			g = &acc{s: Stats{Group: m.VM}, seen: map[crypto.ID]bool{}, order: len(groups)}
			groups[m.VM] = g
		}
		for _, a := range []*acc{g, total} {
			a.s.Generations++
		}
		if err := r.resolveManifest(ctx, m); err != nil {
			return nil, err
		}
		for di := range m.Disks {
			d := &m.Disks[di]
			for _, a := range []*acc{g, total} {
				a.s.LogicalBytes += d.Size
			}
			for i := range d.segmentCount() {
				sid, zero := d.SegmentID(i)
				if zero {
					for _, a := range []*acc{g, total} {
						a.s.ZeroBytes += d.segmentLen(i)
					}
					continue
				}
				entries, ok := segCache[sid]
				if !ok {
					raw, err := r.getData(ctx, TypeSegment, sid)
					if err != nil {
						return nil, err
					}
					if entries, err = decodeSegmentList(raw); err != nil {
						return nil, err
					}
					segCache[sid] = entries
				}
				for _, a := range []*acc{g, total} {
					if !a.seen[sid] {
						a.seen[sid] = true
						if e, ok := ix.Lookup(sid); ok {
							a.s.StoredBytes += int64(e.Size)
						}
					}
					for _, e := range entries {
						if e.Zero {
							a.s.ZeroBytes += int64(e.Length)
							continue
						}
						if a.seen[e.ID] {
							continue
						}
						a.seen[e.ID] = true
						a.s.UniqueBytes += int64(e.Length)
						if ie, ok := ix.Lookup(e.ID); ok {
							a.s.StoredBytes += int64(ie.Size)
						}
					}
				}
			}
		}
	}
	var out []Stats
	for _, g := range groups {
		out = append(out, g.s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Group < out[j].Group })
	out = append(out, total.s)
	for i := range out {
		s := &out[i]
		if s.UniqueBytes > 0 {
			s.DedupRatio = float64(s.LogicalBytes-s.ZeroBytes) / float64(s.UniqueBytes)
		}
		if s.StoredBytes > 0 {
			s.CompressionRate = float64(s.UniqueBytes) / float64(s.StoredBytes)
		}
	}
	return out, nil
}

// GroupKey is the retention group of a generation: its VM and disk set.
func GroupKey(m *Manifest) string {
	names := make([]string, len(m.Disks))
	for i, d := range m.Disks {
		names[i] = d.Name
	}
	sort.Strings(names)
	return m.VM + " [" + strings.Join(names, ",") + "]"
}
