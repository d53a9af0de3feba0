package repo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"vmvault/backend"
	"vmvault/crypto"
)

// Index answers "is this data object stored?" for deduplication. It is the
// union of the repository's index objects, cached locally in a bbolt file
// (cacheDir/index.db) that is brought up to date on open and rebuilt when
// the repository's index objects no longer match it (after a prune) or the
// file is damaged.
//
// While a backup runs the cache is held read-only (a shared lock), so
// several vmvault processes on one host can use it at once; entries it
// lacks live in an in-memory overlay.
type Index struct {
	db  *bolt.DB // read-only; nil when the cache could not be used
	mu  sync.RWMutex
	mem map[crypto.ID]IndexEntry
}

var (
	bucketMeta    = []byte("meta")
	bucketFiles   = []byte("files")
	bucketObjects = []byte("objects")
	keyRepoID     = []byte("repo-id")
)

const cacheLockTimeout = 3 * time.Second

// listIndexNames returns the names of the repository's index objects.
func (r *Repository) listIndexNames(ctx context.Context) (map[string]bool, error) {
	names := map[string]bool{}
	err := r.be.List(ctx, "index/", func(o backend.ObjectInfo) error {
		names[o.Name] = true
		return nil
	})
	return names, err
}

// loadIndexObject fetches and parses one index object.
func (r *Repository) loadIndexObject(ctx context.Context, name string) ([]IndexEntry, error) {
	sealed, err := getBounded(ctx, r.be, name, maxIndexObject)
	if err != nil {
		return nil, err
	}
	raw, err := r.codec.open(TypeIndex, name, sealed)
	if err != nil {
		return nil, err
	}
	return decodeIndex(raw)
}

// LoadIndex brings the local index cache up to date and opens it. Backup,
// prune and check call it after taking their lock.
func (r *Repository) LoadIndex(ctx context.Context) (*Index, error) {
	if r.idx != nil {
		return r.idx, nil
	}
	names, err := r.listIndexNames(ctx)
	if err != nil {
		return nil, fmt.Errorf("list index: %w", err)
	}
	ix := &Index{mem: map[crypto.ID]IndexEntry{}}
	if err := os.MkdirAll(r.cacheDir, 0o700); err != nil {
		r.log.Warn("cache directory unusable, keeping the index in memory", "dir", r.cacheDir, "err", err)
		return r.finishIndex(ctx, ix, names, nil)
	}
	path := filepath.Join(r.cacheDir, "index.db")
	if err := r.syncCache(ctx, path, names); err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if !errors.Is(err, bolterrors.ErrTimeout) {
			r.log.Warn("index cache damaged, rebuilding", "file", path, "err", err)
			os.Remove(path)
			if err := r.syncCache(ctx, path, names); err != nil && !errors.Is(err, bolterrors.ErrTimeout) {
				r.log.Warn("index cache unusable, keeping the index in memory", "file", path, "err", err)
				return r.finishIndex(ctx, ix, names, nil)
			}
		}
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: cacheLockTimeout})
	if err != nil {
		r.log.Debug("index cache busy, keeping the index in memory", "err", err)
		return r.finishIndex(ctx, ix, names, nil)
	}
	return r.finishIndex(ctx, ix, names, db)
}

// finishIndex loads into memory every index object that db (possibly nil)
// lacks. A db that lists index objects no longer in the repository is
// stale and not used at all.
func (r *Repository) finishIndex(ctx context.Context, ix *Index, names map[string]bool, db *bolt.DB) (*Index, error) {
	known := map[string]bool{}
	if db != nil {
		err := db.View(func(tx *bolt.Tx) error {
			if err := checkCacheMeta(tx, r.cfg.ID); err != nil {
				return err
			}
			return tx.Bucket(bucketFiles).ForEach(func(k, _ []byte) error {
				known[string(k)] = true
				return nil
			})
		})
		stale := err != nil
		for n := range known {
			if !names[n] {
				stale = true
			}
		}
		if stale {
			db.Close()
			db = nil
			known = map[string]bool{}
		}
	}
	ix.db = db
	err := r.loadMissingIndex(ctx, names, known, func(_ string, entries []IndexEntry) error {
		for _, e := range entries {
			ix.mem[e.ID] = e
		}
		return nil
	})
	if err != nil {
		ix.Close()
		return nil, err
	}
	r.idx = ix
	return ix, nil
}

func checkCacheMeta(tx *bolt.Tx, repoID string) error {
	m := tx.Bucket(bucketMeta)
	if m == nil || tx.Bucket(bucketFiles) == nil || tx.Bucket(bucketObjects) == nil {
		return errors.New("cache schema missing")
	}
	if string(m.Get(keyRepoID)) != repoID {
		return errors.New("cache belongs to another repository")
	}
	return nil
}

// syncCache opens the cache read-write (briefly) and adds the index
// objects it lacks; if it lists objects the repository no longer has, it
// is emptied and rebuilt.
func (r *Repository) syncCache(ctx context.Context, path string, names map[string]bool) error {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: cacheLockTimeout})
	if err != nil {
		return err
	}
	defer db.Close()
	known := map[string]bool{}
	err = db.Update(func(tx *bolt.Tx) error {
		rebuild := checkCacheMeta(tx, r.cfg.ID) != nil
		if !rebuild {
			tx.Bucket(bucketFiles).ForEach(func(k, _ []byte) error {
				known[string(k)] = true
				if !names[string(k)] {
					rebuild = true
				}
				return nil
			})
		}
		if !rebuild {
			return nil
		}
		known = map[string]bool{}
		for _, b := range [][]byte{bucketMeta, bucketFiles, bucketObjects} {
			if tx.Bucket(b) != nil {
				if err := tx.DeleteBucket(b); err != nil {
					return err
				}
			}
		}
		for _, b := range [][]byte{bucketMeta, bucketFiles, bucketObjects} {
			if _, err := tx.CreateBucket(b); err != nil {
				return err
			}
		}
		return tx.Bucket(bucketMeta).Put(keyRepoID, []byte(r.cfg.ID))
	})
	if err != nil {
		return err
	}
	return r.loadMissingIndex(ctx, names, known, func(n string, entries []IndexEntry) error {
		// In key order: bbolt splits nodes only at commit, so random keys
		// into one transaction's node cost a memmove each, quadratic in
		// an index object's 100,000 entries (BenchmarkIndexScale).
		slices.SortFunc(entries, func(a, b IndexEntry) int { return bytes.Compare(a.ID[:], b.ID[:]) })
		return db.Update(func(tx *bolt.Tx) error {
			objs := tx.Bucket(bucketObjects)
			for _, e := range entries {
				if err := objs.Put(e.ID[:], encodeEntryValue(e)); err != nil {
					return err
				}
			}
			return tx.Bucket(bucketFiles).Put([]byte(n), nil)
		})
	})
}

// loadMissingIndex calls fn with the entries of every index object in
// names that is not in known. A damaged index object only costs
// deduplication (its objects are uploaded again and found present), so it
// is skipped with a warning; check reports it.
func (r *Repository) loadMissingIndex(ctx context.Context, names, known map[string]bool, fn func(string, []IndexEntry) error) error {
	for n := range names {
		if known[n] {
			continue
		}
		entries, err := r.loadIndexObject(ctx, n)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			r.log.Warn("skipping unreadable index object", "name", n, "err", err)
			continue
		}
		if err := fn(n, entries); err != nil {
			return err
		}
	}
	return nil
}

func encodeEntryValue(e IndexEntry) []byte {
	return []byte{byte(e.Type), byte(e.Size >> 24), byte(e.Size >> 16), byte(e.Size >> 8), byte(e.Size)}
}

func decodeEntryValue(id []byte, v []byte) (IndexEntry, bool) {
	if len(v) != 5 || len(id) != 32 {
		return IndexEntry{}, false
	}
	e := IndexEntry{Type: ObjectType(v[0]), Size: uint32(v[1])<<24 | uint32(v[2])<<16 | uint32(v[3])<<8 | uint32(v[4])}
	copy(e.ID[:], id)
	return e, true
}

// Lookup returns the index entry of a data object, if stored.
func (ix *Index) Lookup(id crypto.ID) (IndexEntry, bool) {
	ix.mu.RLock()
	e, ok := ix.mem[id]
	ix.mu.RUnlock()
	if ok || ix.db == nil {
		return e, ok
	}
	ix.db.View(func(tx *bolt.Tx) error {
		e, ok = decodeEntryValue(id[:], tx.Bucket(bucketObjects).Get(id[:]))
		return nil
	})
	return e, ok
}

// Has reports whether a data object is stored.
func (ix *Index) Has(id crypto.ID) bool {
	_, ok := ix.Lookup(id)
	return ok
}

func (ix *Index) add(e IndexEntry) {
	ix.mu.Lock()
	ix.mem[e.ID] = e
	ix.mu.Unlock()
}

// Close releases the cache file.
func (ix *Index) Close() error {
	if ix.db != nil {
		return ix.db.Close()
	}
	return nil
}

// indexWriter accumulates the objects a backup stored and writes them as
// index objects, so that an interrupted backup's uploads are reused by the
// next run.
type indexWriter struct {
	r       *Repository
	j       *journal // local record of every stored object; may be nil
	mu      sync.Mutex
	pending []IndexEntry
	lost    bool // a flush failed: its entries live only in the journal
}

// flushEvery bounds how many stored objects an interruption can leave
// out of index objects (the journal lets the next run index them).
const flushEvery = 2048

func (w *indexWriter) add(ctx context.Context, e IndexEntry) error {
	w.j.record(e)
	return w.addRecorded(ctx, e)
}

// addRecorded is add for an entry already in the journal (a batched
// upload journals its objects before they appear under their names).
func (w *indexWriter) addRecorded(ctx context.Context, e IndexEntry) error {
	w.r.idx.add(e)
	w.mu.Lock()
	w.pending = append(w.pending, e)
	full := len(w.pending) >= flushEvery
	w.mu.Unlock()
	if full {
		return w.flush(ctx)
	}
	return nil
}

func (w *indexWriter) flush(ctx context.Context) error {
	w.mu.Lock()
	entries := w.pending
	w.pending = nil
	w.mu.Unlock()
	if len(entries) == 0 {
		return nil
	}
	name := indexName(randomID())
	if err := w.r.be.Put(ctx, name, w.r.codec.seal(TypeIndex, name, encodeIndex(entries))); err != nil {
		w.mu.Lock()
		w.lost = true
		w.mu.Unlock()
		return fmt.Errorf("write index: %w", err)
	}
	return nil
}

// finish flushes what is pending and closes the journal, removing it only
// if every object it lists is now in an index object.
func (w *indexWriter) finish(ctx context.Context) error {
	err := w.flush(ctx)
	w.mu.Lock()
	done := err == nil && !w.lost
	w.mu.Unlock()
	w.j.close(done)
	return err
}

func shortName(name string) string {
	return name[strings.LastIndexByte(name, '/')+1:]
}
