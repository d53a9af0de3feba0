package repo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	"vmvault/backend"
	"vmvault/crypto"
)

// ErrAppendOnly means the repository refuses deletion: an append-only
// account (SFTP) or credential (S3). Prune and unlock must run with an
// account that may delete: on the SFTP server against the local path, or
// with the bucket administrator's credential.
var ErrAppendOnly = errors.New("this repository is append-only for this account: run prune/unlock where deletion is allowed (on the backup server against the local path, or with an S3 credential that may delete)")

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
// an exclusive lock. The data they referenced stays until a prune.
func (r *Repository) Forget(ctx context.Context, ids []string) error {
	for _, id := range ids {
		mid, err := parseID(id)
		if err != nil {
			return err
		}
		if err := r.be.Delete(ctx, manifestName(mid)); err != nil && !errors.Is(err, backend.ErrNotExist) {
			if errors.Is(err, backend.ErrReadOnly) {
				return ErrAppendOnly
			}
			return fmt.Errorf("forget %s: %w", id[:8], err)
		}
	}
	return nil
}

// PruneStats reports what a prune plan does (or did).
type PruneStats struct {
	Generations    int   `json:"generations"`           // generations kept, whose objects were marked
	Forgotten      int   `json:"forgotten"`             // generations the plan forgets first
	ObjectsKept    int   `json:"objects_kept"`          // referenced data objects
	BytesKept      int64 `json:"bytes_kept"`            // their stored size
	ObjectsRemoved int   `json:"objects_removed"`       // unreferenced data objects older than the margin
	BytesRemoved   int64 `json:"bytes_removed"`         // their stored size
	YoungKept      int   `json:"young_kept"`            // unreferenced objects kept: younger than the margin
	YoungBytesKept int64 `json:"young_bytes_kept"`      // their stored size
	IndexWritten   int   `json:"index_written"`         // consolidated index objects written
	IndexRemoved   int   `json:"index_removed"`         // index objects they replace
	IndexYoungKept int   `json:"index_young_kept"`      // index objects younger than the margin, left alone
	LocksRemoved   int   `json:"locks_removed"`         // stale lock objects (and released markers) removed
	TempRemoved    int   `json:"temporary_removed"`     // leftovers of interrupted uploads (known after execution)
	Retained       int   `json:"retained"`              // unreferenced objects an S3 object lock still retains, kept (known after execution)
	MarginSeconds  int64 `json:"safety_margin_seconds"` // the safety margin the plan used
}

// markSet is the set of live object IDs during prune. It lives in a
// temporary bbolt file, so prune's memory does not grow with the
// repository: a batch of IDs is buffered in memory and flushed per
// transaction. The plan's garbage (name → size) and live entries (the
// new index) live there too.
type markSet struct {
	db      *bolt.DB
	path    string
	batch   map[crypto.ID]ObjectType
	garbage map[string]int64
	live    []IndexEntry
}

var (
	bucketMarks   = []byte("marks")
	bucketGarbage = []byte("garbage")
	bucketLive    = []byte("live")
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
		for _, b := range [][]byte{bucketMarks, bucketGarbage, bucketLive} {
			if _, err := tx.CreateBucket(b); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		db.Close()
		return nil, err
	}
	return &markSet{db: db, path: path, batch: map[crypto.ID]ObjectType{}, garbage: map[string]int64{}}, nil
}

func (m *markSet) add(id crypto.ID, t ObjectType) error {
	m.batch[id] = t
	if len(m.batch) >= markBatch {
		return m.flush()
	}
	return nil
}

func (m *markSet) flush() error {
	if len(m.batch) == 0 && len(m.garbage) == 0 && len(m.live) == 0 {
		return nil
	}
	// Keys go in in order: bbolt splits nodes only at commit, so random
	// keys into one transaction's node cost a memmove each, quadratic in
	// the batch (BenchmarkMarkSet: 200,000 marks took 97 s).
	ids := slices.SortedFunc(maps.Keys(m.batch), func(a, b crypto.ID) int { return bytes.Compare(a[:], b[:]) })
	names := slices.Sorted(maps.Keys(m.garbage))
	slices.SortFunc(m.live, func(a, b IndexEntry) int { return bytes.Compare(a.ID[:], b.ID[:]) })
	err := m.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketMarks)
		for _, id := range ids {
			if err := b.Put(id[:], []byte{byte(m.batch[id])}); err != nil {
				return err
			}
		}
		g := tx.Bucket(bucketGarbage)
		for _, name := range names {
			if err := g.Put([]byte(name), []byte(strconv.FormatInt(m.garbage[name], 10))); err != nil {
				return err
			}
		}
		l := tx.Bucket(bucketLive)
		for _, e := range m.live {
			if err := l.Put(e.ID[:], encodeEntryValue(e)); err != nil {
				return err
			}
		}
		return nil
	})
	clear(m.batch)
	clear(m.garbage)
	m.live = m.live[:0]
	return err
}

// addGarbage records an object the plan deletes.
func (m *markSet) addGarbage(name string, size int64) error {
	m.garbage[name] = size
	if len(m.garbage) >= markBatch {
		return m.flush()
	}
	return nil
}

// addLive records a live object for the new index.
func (m *markSet) addLive(e IndexEntry) error {
	m.live = append(m.live, e)
	if len(m.live) >= markBatch {
		return m.flush()
	}
	return nil
}

// each calls fn for every key/value of bucket, in key order, in batches
// read from disk (fn runs outside any transaction: it may take long).
func (m *markSet) each(bucket []byte, fn func(k, v []byte) error) error {
	var after []byte
	for {
		var keys, vals [][]byte
		m.db.View(func(tx *bolt.Tx) error {
			c := tx.Bucket(bucket).Cursor()
			k, v := c.First()
			if after != nil {
				k, v = c.Seek(after)
				if k != nil && string(k) == string(after) {
					k, v = c.Next()
				}
			}
			for ; k != nil && len(keys) < 4096; k, v = c.Next() {
				keys = append(keys, append([]byte(nil), k...))
				vals = append(vals, append([]byte(nil), v...))
			}
			return nil
		})
		if len(keys) == 0 {
			return nil
		}
		for i := range keys {
			if err := fn(keys[i], vals[i]); err != nil {
				return err
			}
		}
		after = keys[len(keys)-1]
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

// DefaultPruneMargin is how young (by the store's clock) an unreferenced
// object must be for prune to leave it alone: it may belong to a backup
// still running, even one whose lock prune cannot see. It is longer than
// a lease (LockStale), so a backup that has not committed within it has
// lost its lease and will not commit (see Lock).
const DefaultPruneMargin = 2 * time.Hour

// PruneOptions configure PlanPrune.
type PruneOptions struct {
	// Forget lists the manifest IDs the plan removes first (the verdict
	// of a retention policy); their data counts as unreferenced.
	Forget []string
	// Margin is the safety margin: unreferenced objects younger than it
	// are kept. Zero is allowed (tests, a repository nothing writes to).
	Margin time.Duration
}

// PrunePlan is what a prune will do, decided before anything is
// deleted: restic's plan-then-execute. A dry run prints the plan; Execute
// carries out exactly this plan. Close releases it.
type PrunePlan struct {
	Stats PruneStats
	// Forget lists the manifest IDs removed first.
	Forget []string
	// StoreNow is the store's clock when the plan was made: the margin
	// is measured from it against each object's ModTime.
	StoreNow time.Time
	// Margin is the safety margin the plan keeps young objects by.
	Margin time.Duration
	// OldIndex lists the index objects the new index replaces.
	OldIndex []string
	// Locks lists stale lock objects and released markers to remove.
	Locks []string

	r     *Repository
	marks *markSet
}

// Close releases the plan's temporary files.
func (p *PrunePlan) Close() {
	if p != nil && p.marks != nil {
		p.marks.close()
		p.marks = nil
	}
}

// Garbage calls fn for every data object the plan deletes, by name.
func (p *PrunePlan) Garbage(fn func(name string, size int64) error) error {
	return p.marks.each(bucketGarbage, func(k, v []byte) error {
		size, _ := strconv.ParseInt(string(v), 10, 64)
		return fn(string(k), size)
	})
}

// young reports whether an object written at mod is within the margin
// of now (by the store's clock). A store that cannot tell (zero mod)
// proves nothing: the object counts as young. A margin of zero turns the
// protection off: the store's clock is known only to its resolution (S3
// LastModified has whole seconds), so an object written a moment ago may
// seem newer than now, and must not be kept for that.
func young(mod, now time.Time, margin time.Duration) bool {
	if margin <= 0 {
		return false
	}
	return mod.IsZero() || now.Sub(mod) < margin
}

// PlanPrune marks every object the remaining generations reference (one
// walk of the repository) and lists what to delete: unreferenced data
// objects older than the margin, the index objects a consolidated index
// replaces, stale locks. It deletes nothing. The caller holds a lock:
// exclusive to execute the plan, shared is enough for a dry run.
func (r *Repository) PlanPrune(ctx context.Context, opts PruneOptions) (*PrunePlan, error) {
	now, err := r.storeNow(ctx)
	if err != nil {
		return nil, err
	}
	marks, err := newMarkSet(r.cacheDir)
	if err != nil {
		return nil, fmt.Errorf("prune: mark set: %w", err)
	}
	p := &PrunePlan{r: r, marks: marks, StoreNow: now, Margin: opts.Margin, Forget: opts.Forget}
	p.Stats.Forgotten = len(opts.Forget)
	p.Stats.MarginSeconds = int64(opts.Margin / time.Second)
	ok := false
	defer func() {
		if !ok {
			p.Close()
		}
	}()
	skip := map[string]bool{}
	for _, id := range opts.Forget {
		skip[id] = true
	}
	w := Walk{
		Skip:       skip,
		Generation: func(*Manifest) error { p.Stats.Generations++; return nil },
		Table:      func(id crypto.ID, _ Origin) error { return marks.add(id, TypeTable) },
		SegmentRef: func(id crypto.ID, zero bool, _ int64, _ Origin) (bool, error) {
			return !zero && marks.get(id) == 0, nil
		},
		SegmentList: func(id crypto.ID, _ []SegmentEntry, _ Origin) error { return marks.add(id, TypeSegment) },
		Chunk:       func(e SegmentEntry, _ Origin) error { return marks.add(e.ID, TypeChunk) },
	}
	if err := w.Run(ctx, r); err != nil {
		// A generation prune cannot read may still reference data: it
		// stops rather than delete that data (restic does the same).
		hint := "run check"
		if errors.Is(err, ErrCorrupt) {
			hint = "run check; a damaged or foreign manifest blocks prune until vmvault repair moves it to quarantine/"
		}
		return nil, fmt.Errorf("prune stopped, nothing deleted: %w (%s)", err, hint)
	}
	if err := marks.flush(); err != nil {
		return nil, err
	}
	// The index objects to replace: listed before the sweep, so an index
	// object written later (by a backup prune cannot see) stays.
	err = r.be.List(ctx, "index/", func(o backend.ObjectInfo) error {
		if young(o.ModTime, now, opts.Margin) {
			p.Stats.IndexYoungKept++
			return nil
		}
		p.OldIndex = append(p.OldIndex, o.Name)
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Strings(p.OldIndex)
	p.Stats.IndexRemoved = len(p.OldIndex)
	live := 0
	err = r.be.List(ctx, "data/", func(o backend.ObjectInfo) error {
		id, err := parseID(shortName(o.Name))
		if err == nil {
			if t := marks.get(id); t != 0 {
				p.Stats.ObjectsKept++
				p.Stats.BytesKept += o.Size
				live++
				return marks.addLive(IndexEntry{ID: id, Type: t, Size: uint32(o.Size)})
			}
		}
		if young(o.ModTime, now, opts.Margin) {
			p.Stats.YoungKept++
			p.Stats.YoungBytesKept += o.Size
			return nil
		}
		p.Stats.ObjectsRemoved++
		p.Stats.BytesRemoved += o.Size
		return marks.addGarbage(o.Name, o.Size)
	})
	if err == nil {
		err = marks.flush()
	}
	if err != nil {
		return nil, err
	}
	p.Stats.IndexWritten = (live + indexObjectEntries - 1) / indexObjectEntries
	if p.Locks, err = r.staleLocks(ctx, StaleLocks); err != nil {
		return nil, err
	}
	p.Stats.LocksRemoved = len(p.Locks)
	ok = true
	return p, nil
}

// Execute carries out the plan. The caller holds an exclusive lock.
//
// Order makes a crash at any instant safe: the forgotten manifests go
// first (their data is unreferenced either way), then the new index
// (live objects only) is written, then the old index objects are
// removed, and only then unreferenced data; so no index ever lists a
// deleted object, and a rerun finishes the job.
func (p *PrunePlan) Execute(ctx context.Context) (*PruneStats, error) {
	r := p.r
	if err := r.CheckDeletable(ctx); err != nil {
		return nil, err
	}
	if err := r.Forget(ctx, p.Forget); err != nil {
		return nil, err
	}
	st := p.Stats
	live := make([]IndexEntry, 0, min(p.Stats.ObjectsKept, indexObjectEntries))
	flushLive := func() error {
		if len(live) == 0 {
			return nil
		}
		name := indexName(randomID())
		if err := r.be.Put(ctx, name, r.codec.seal(TypeIndex, name, encodeIndex(live))); err != nil {
			return fmt.Errorf("write index: %w", err)
		}
		live = live[:0]
		return nil
	}
	err := p.marks.each(bucketLive, func(k, v []byte) error {
		e, ok := decodeEntryValue(k, v)
		if !ok {
			return errors.New("prune: damaged plan file")
		}
		live = append(live, e)
		if len(live) == indexObjectEntries {
			return flushLive()
		}
		return nil
	})
	if err == nil {
		err = flushLive()
	}
	if err != nil {
		return nil, err
	}
	// Old index objects go only now that the new ones are durable. An
	// object under S3 object-lock retention cannot go (the backend says
	// so without trying, backend.ErrRetained) and is counted instead.
	indexRetained := false
	for _, name := range p.OldIndex {
		err := r.be.Delete(ctx, name)
		switch {
		case errors.Is(err, backend.ErrRetained):
			indexRetained = true
			st.IndexRemoved--
			st.Retained++
		case err != nil && !errors.Is(err, backend.ErrNotExist):
			return nil, fmt.Errorf("remove old index %s: %w", name, err)
		}
	}
	// Then the garbage, which no index lists any more — unless an old
	// index that may list it is retained: then none goes this time, so
	// no index ever names an object that is gone.
	err = p.Garbage(func(name string, size int64) error {
		err := backend.ErrRetained
		if !indexRetained {
			err = r.be.Delete(ctx, name)
		}
		switch {
		case errors.Is(err, backend.ErrRetained):
			st.ObjectsRemoved--
			st.BytesRemoved -= size
			st.Retained++
		case err != nil && !errors.Is(err, backend.ErrNotExist):
			return fmt.Errorf("remove %s: %w", name, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if st.Retained > 0 {
		r.log.Warn("objects under retention (S3 object lock) kept; a later prune removes them once it has expired", "objects", st.Retained)
	}
	if tr, ok := r.be.(interface {
		RemoveTemporary(context.Context, time.Time) (int, error)
	}); ok {
		// Temporary files younger than the margin may be uploads in progress.
		n, err := tr.RemoveTemporary(ctx, p.StoreNow.Add(-p.Margin))
		if err != nil {
			return nil, fmt.Errorf("remove temporary files: %w", err)
		}
		st.TempRemoved = n
	}
	for _, name := range p.Locks {
		if err := r.be.Delete(ctx, name); err != nil && !errors.Is(err, backend.ErrNotExist) {
			r.log.Warn("removing a stale lock failed", "lock", name, "err", err)
		}
	}
	// The local cache is now stale; drop it so the next open rebuilds.
	if r.idx != nil {
		r.idx.Close()
		r.idx = nil
	}
	os.Remove(filepath.Join(r.cacheDir, "index.db"))
	return &st, nil
}

// Stats describes the repository's contents: one VM's, or the total.
type Stats struct {
	VM              string  `json:"vm"` // "total" for the sum over all VMs
	Generations     int     `json:"generations"`
	LogicalBytes    int64   `json:"logical_bytes"`     // sum of image sizes over generations
	UniqueBytes     int64   `json:"unique_bytes"`      // distinct chunk bytes (after dedup, before compression)
	StoredBytes     int64   `json:"stored_bytes"`      // sealed bytes of those chunks, segment lists and tables
	DedupRatio      float64 `json:"dedup_ratio"`       // logical non-zero / unique
	CompressionRate float64 `json:"compression_ratio"` // unique / stored
	ZeroBytes       int64   `json:"zero_bytes"`        // zero segments and zero runs (not stored)
}

// indexObjectEntries bounds one consolidated index object (~40 bytes per entry).
const indexObjectEntries = 100_000

// indexedSize returns a data object's stored size, 0 if not indexed.
func indexedSize(ix *Index, id crypto.ID) int64 {
	if e, ok := ix.Lookup(id); ok {
		return int64(e.Size)
	}
	return 0
}

// statsAcc accumulates one Stats, counting each object once.
type statsAcc struct {
	s    Stats
	seen map[crypto.ID]bool
}

func (a *statsAcc) object(id crypto.ID, size int64) bool {
	if a.seen[id] {
		return false
	}
	a.seen[id] = true
	a.s.StoredBytes += size
	return true
}

// segment adds one reference to a segment list with these entries: its
// zero runs count every time, its objects once.
func (a *statsAcc) segment(id crypto.ID, entries []SegmentEntry, ix *Index) {
	first := a.object(id, indexedSize(ix, id))
	for _, e := range entries {
		if e.Zero {
			a.s.ZeroBytes += int64(e.Length)
			continue
		}
		if first && a.object(e.ID, indexedSize(ix, e.ID)) {
			a.s.UniqueBytes += int64(e.Length)
		}
	}
}

// Stats computes per-VM statistics (vm empty: every VM), sorted by VM,
// and a total, which is the last element (VM "total"). Stored sizes come
// from the index. Segment lists are kept in memory while it runs.
func (r *Repository) Stats(ctx context.Context, vm string) ([]Stats, error) {
	ix, err := r.LoadIndex(ctx)
	if err != nil {
		return nil, err
	}
	groups := map[string]*statsAcc{}
	total := &statsAcc{s: Stats{VM: "total"}, seen: map[crypto.ID]bool{}}
	lists := map[crypto.ID][]SegmentEntry{}
	pending := map[crypto.ID]int{}
	var cur *statsAcc
	both := func(fn func(a *statsAcc)) { fn(cur); fn(total) }
	w := Walk{
		VM: vm,
		Generation: func(m *Manifest) error {
			cur = groups[m.VM]
			if cur == nil {
				cur = &statsAcc{s: Stats{VM: m.VM}, seen: map[crypto.ID]bool{}}
				groups[m.VM] = cur
			}
			both(func(a *statsAcc) { a.s.Generations++ })
			for _, d := range m.Disks {
				both(func(a *statsAcc) { a.s.LogicalBytes += d.Size })
			}
			return nil
		},
		Table: func(id crypto.ID, _ Origin) error {
			both(func(a *statsAcc) { a.object(id, indexedSize(ix, id)) })
			return nil
		},
		SegmentRef: func(id crypto.ID, zero bool, length int64, _ Origin) (bool, error) {
			if zero {
				both(func(a *statsAcc) { a.s.ZeroBytes += length })
				return false, nil
			}
			if entries, ok := lists[id]; ok {
				both(func(a *statsAcc) { a.segment(id, entries, ix) })
				return false, nil
			}
			pending[id]++ // a segment may repeat within a disk: loaded once
			return true, nil
		},
		SegmentList: func(id crypto.ID, entries []SegmentEntry, _ Origin) error {
			lists[id] = entries
			for range pending[id] {
				both(func(a *statsAcc) { a.segment(id, entries, ix) })
			}
			delete(pending, id)
			return nil
		},
	}
	if err := w.Run(ctx, r); err != nil {
		return nil, err
	}
	out := make([]Stats, 0, len(groups)+1)
	for _, g := range groups {
		out = append(out, g.s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VM < out[j].VM })
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
