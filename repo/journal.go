package repo

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sync/errgroup"

	"vmvault/backend"
	"vmvault/crypto"
)

// A journal is a local, append-only record of the objects a running backup
// has stored. Index objects are written only every flushEvery objects, so
// a backup killed (or cut off from the server) in between would leave its
// uploads unindexed, and the next run would send them again. The journal
// survives the process: the next backup finds it, confirms each object
// with the backend (prune may have run in between) and indexes the ones
// that are there, so nothing that arrived crosses the wire twice.
//
// Each record is 37 bytes: type, 32-byte ID, stored size (uint32 LE). A
// journal is flock'ed by its writer, so recovery never touches the
// journal of a backup that is still running.
type journal struct {
	mu   sync.Mutex
	f    *os.File
	path string
}

const journalRecord = 1 + 32 + 4

func (r *Repository) journalDir() string { return filepath.Join(r.cacheDir, "journal") }

// openJournal starts a journal for one backup. A journal that cannot be
// created only costs the resume optimisation: nil is returned and logged.
func (r *Repository) openJournal() *journal {
	dir := r.journalDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		r.log.Warn("cannot keep an upload journal", "err", err)
		return nil
	}
	f, err := os.CreateTemp(dir, fmt.Sprintf("%d-*.journal", os.Getpid()))
	if err == nil {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	}
	if err != nil {
		r.log.Warn("cannot keep an upload journal", "err", err)
		if f != nil {
			f.Close()
		}
		return nil
	}
	return &journal{f: f, path: f.Name()}
}

func (j *journal) record(e IndexEntry) {
	if j == nil {
		return
	}
	var rec [journalRecord]byte
	rec[0] = byte(e.Type)
	copy(rec[1:33], e.ID[:])
	binary.LittleEndian.PutUint32(rec[33:], e.Size)
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.f != nil {
		j.f.Write(rec[:]) // a lost record only costs a re-upload
	}
}

// close ends the journal; with done it is removed (everything it lists
// is in index objects), else it stays for the next run to recover.
func (j *journal) close(done bool) {
	if j == nil {
		return
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.f == nil {
		return
	}
	if done {
		os.Remove(j.path)
	}
	j.f.Close()
	j.f = nil
}

// recoverJournals indexes the objects that interrupted backups stored but
// did not index. It returns how many it recovered.
func (r *Repository) recoverJournals(ctx context.Context, ix *Index) (int, error) {
	files, _ := filepath.Glob(filepath.Join(r.journalDir(), "*.journal"))
	recovered := 0
	for _, path := range files {
		n, err := r.recoverJournal(ctx, ix, path)
		if err != nil {
			return recovered, err
		}
		recovered += n
	}
	return recovered, nil
}

func (r *Repository) recoverJournal(ctx context.Context, ix *Index, path string) (int, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return 0, nil // gone meanwhile
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return 0, nil // its backup is still running
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return 0, fmt.Errorf("read journal %s: %w", path, err)
	}
	var want []IndexEntry
	for ; len(data) >= journalRecord; data = data[journalRecord:] {
		e := IndexEntry{Type: ObjectType(data[0]), Size: binary.LittleEndian.Uint32(data[33:journalRecord])}
		copy(e.ID[:], data[1:33])
		if (e.Type == TypeChunk || e.Type == TypeSegment || e.Type == TypeTable) && !ix.Has(e.ID) {
			want = append(want, e)
		}
	}
	// Confirm each object: an interrupted run's objects may have been
	// pruned since, or be a different size than recorded.
	present := make([]bool, len(want))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for i, e := range want {
		g.Go(func() error {
			oi, err := r.be.Stat(gctx, dataName(e.ID))
			if errors.Is(err, backend.ErrNotExist) {
				return nil
			}
			if err != nil {
				return err
			}
			present[i] = oi.Size == int64(e.Size)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return 0, fmt.Errorf("recover journal: %w", err)
	}
	var found []IndexEntry
	for i, e := range want {
		if present[i] {
			found = append(found, e)
		}
	}
	// A segment list may be indexed only if all its chunks exist: a later
	// backup reuses an indexed segment whole. The journal records a
	// segment list after its chunks, but a prune interrupted while
	// deleting garbage may have removed a chunk and not yet the segment
	// list; so each recovered segment list is checked.
	have := map[crypto.ID]bool{}
	for _, e := range found {
		have[e.ID] = true
	}
	kept := found[:0]
	for _, e := range found {
		if e.Type == TypeSegment && !r.segmentComplete(ctx, ix, have, e.ID) {
			continue
		}
		kept = append(kept, e)
	}
	found = kept
	for off := 0; off < len(found); off += indexObjectEntries {
		part := found[off:min(len(found), off+indexObjectEntries)]
		name := indexName(randomID())
		if err := r.be.Put(ctx, name, r.codec.seal(TypeIndex, name, encodeIndex(part))); err != nil {
			return 0, fmt.Errorf("recover journal: write index: %w", err)
		}
	}
	for _, e := range found {
		ix.add(e)
	}
	if len(found) > 0 {
		r.log.Info("indexed objects an interrupted backup had stored", "objects", len(found), "journal", strings.TrimPrefix(path, r.cacheDir+"/"))
	}
	os.Remove(path)
	return len(found), nil
}

// segmentComplete reports whether every chunk of segment list id is
// indexed or in have.
func (r *Repository) segmentComplete(ctx context.Context, ix *Index, have map[crypto.ID]bool, id crypto.ID) bool {
	raw, err := r.getData(ctx, TypeSegment, id)
	if err != nil {
		return false
	}
	entries, err := decodeSegmentList(raw)
	if err != nil {
		return false
	}
	for _, e := range entries {
		if !e.Zero && !have[e.ID] && !ix.Has(e.ID) {
			return false
		}
	}
	return true
}
