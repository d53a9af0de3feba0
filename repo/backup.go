package repo

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"

	"vmvault/backend"
	"vmvault/backend/limit"
	"vmvault/chunk"
	"vmvault/crypto"
)

// DiskSource is one disk image to back up.
type DiskSource struct {
	Name   string // disk name within the VM, e.g. "hda"
	Source string // description for the manifest (path, LV), no secrets
	// Reader is the image. An io.ReaderAt of known Size (a file, a block
	// device) is read in parallel with pread, and if it is also an
	// io.Seeker that supports SEEK_DATA (a file), its holes are skipped
	// unread; any other reader is read sequentially once.
	Reader io.Reader
	// Size is the expected image size, or -1 if unknown (stdin). A source
	// that ends early or runs long fails the backup.
	Size int64
	// Changes, if not nil, says which ranges of the image can differ from
	// the same disk in an earlier generation (changed-block tracking):
	// Backup reads only those (plus what it needs to find segment
	// boundaries again) and takes every other segment from the base.
	Changes *Changes
	// Tracker is recorded as the disk's Tracker in the manifest: what the
	// change tracker needs to find its base next time (e.g. the thin
	// snapshot kept as base). Opaque to the repository; no secrets.
	Tracker string
}

// Changes describes, for one disk, what a change tracker reports as
// possibly different from a base generation.
type Changes struct {
	// Base is the ID of the generation whose disk of the same name holds
	// every byte outside Ranges.
	Base string
	// Ranges are the byte ranges that may differ from the base, sorted by
	// offset and not overlapping. Every byte outside them equals the
	// base's byte at the same offset; the image size equals the base's.
	Ranges []Range
	// Kind names the tracker for the manifest's cbt field, e.g. "thin".
	Kind string
}

// Range is a byte range of a disk image.
type Range struct{ Off, Len int64 }

// BackupRequest describes one generation to create.
type BackupRequest struct {
	VM    string
	Time  time.Time // recorded backup time; zero means now
	Host  string    // empty means os.Hostname
	Tags  []string
	Disks []DiskSource
	// SHA256 also records a plain SHA-256 of each image (serial, slower),
	// for comparison with sha256sum.
	SHA256 bool
	// BeforeCommit runs after every disk is stored and before the manifest
	// is written; an error aborts the backup with nothing committed. It
	// returns what the consistency step did, recorded in the manifest.
	BeforeCommit func(ctx context.Context) (json.RawMessage, error)
	// Progress, if set, is called from the reader with bytes read so far.
	Progress func(disk string, read int64)
	// ReadLimit caps reading the disks, in bytes per second (all disks
	// together); zero means no limit.
	ReadLimit int64
	// VerifyUnchanged is the percentage (0-100) of the segments a change
	// tracker reports unchanged that are read anyway and compared with the
	// base: a mismatch fails the backup.
	VerifyUnchanged float64
}

// uploadWindow bounds the sealed bytes queued for upload. Together with
// the segment buffers it bounds a backup's memory.
const uploadWindow = 32 << 20

// maxWorkers bounds segment workers (and so segment buffers) regardless
// of core count.
const maxWorkers = 8

func workers() int { return min(runtime.GOMAXPROCS(0), maxWorkers) }

// pendingObject is an upload in flight; done closes when it finished.
type pendingObject struct {
	done chan struct{}
}

type backupState struct {
	r     *Repository
	iw    *indexWriter
	sem   *semaphore.Weighted
	mu    sync.Mutex
	inFly map[crypto.ID]*pendingObject
	wg    sync.WaitGroup // uploads and segment-list writers
	batch *syncBatcher   // nil: every Put is durable on its own
	// readLimit paces reading the sources (nil: unlimited).
	readLimit *limit.Bucket
	fail      func(error)
	stats     struct {
		read, zero, bytesNew, stored, chunksNew, segs, segsNew, found atomic.Int64
	}
}

// drain waits for every upload and segment-list writer, and for the
// objects they stored to be durable.
func (st *backupState) drain() {
	st.wg.Wait()
	if st.batch != nil {
		st.batch.close()
		st.batch = nil
	}
}

// claim returns nil and registers id if the caller must store it, or the
// pending upload (possibly already done) to wait for.
func (st *backupState) claim(id crypto.ID) (p *pendingObject, mine bool) {
	if st.r.idx.Has(id) {
		return nil, false
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if p, ok := st.inFly[id]; ok {
		return p, false
	}
	p = &pendingObject{done: make(chan struct{})}
	st.inFly[id] = p
	return p, true
}

// upload seals payload and stores it in the background; p.done closes when
// the object is durable and recorded for the index (or the backup has
// failed).
func (st *backupState) upload(ctx context.Context, t ObjectType, id crypto.ID, payload []byte, p *pendingObject) error {
	name := dataName(id)
	sealed := st.r.codec.seal(t, name, payload)
	// A segment list's payload is its own allocation; a chunk's is the
	// caller's segment buffer, reused once storeSegment returns.
	var list []byte
	if t == TypeSegment {
		list = payload
	}
	if err := st.sem.Acquire(ctx, int64(len(sealed))); err != nil {
		close(p.done)
		return err
	}
	st.wg.Add(1)
	go func() {
		defer st.wg.Done()
		var err error
		if st.batch != nil {
			err = st.batch.be.PutDeferred(ctx, name, sealed)
		} else {
			err = st.r.be.Put(ctx, name, sealed)
		}
		st.sem.Release(int64(len(sealed)))
		e := IndexEntry{ID: id, Type: t, Size: uint32(len(sealed))}
		if err == nil || errors.Is(err, backend.ErrExist) {
			// The store has read all of it. (After another error an
			// HTTP transport may still be reading the body.)
			st.r.codec.recycle(sealed)
		}
		switch {
		case err == nil:
			st.stats.stored.Add(int64(len(sealed)))
			if st.batch != nil {
				// Durable, indexed and done only after the
				// batch's Sync.
				st.batch.add(e, p)
				return
			}
		case errors.Is(err, backend.ErrExist):
			// Stored by an interrupted earlier run or a concurrent
			// backup -- or damaged, or planted: confirmed before use.
			if err := st.r.confirmStored(ctx, t, id, list); err != nil {
				st.fail(err)
				return
			}
			st.stats.found.Add(1)
		default:
			st.fail(err)
			close(p.done)
			return
		}
		if err := st.iw.add(ctx, e); err != nil {
			st.fail(err)
		}
		close(p.done)
	}()
	return nil
}

// deferredSyncer is a backend (local) that can make many objects durable
// with one Sync instead of an fsync each: PutDeferred's object appears
// under its name only when Sync returns nil.
type deferredSyncer interface {
	PutDeferred(ctx context.Context, name string, data []byte) error
	Sync(ctx context.Context) error
}

// syncBatcher group-commits deferred uploads: one goroutine syncs whatever
// was uploaded while the previous Sync ran, then records those objects for
// the index and marks them done. So an object reaches the journal, an
// index object or a segment list that names it only once it is durable,
// as with a Put that fsyncs (docs/format.md, "Crash safety").
type syncBatcher struct {
	be      deferredSyncer
	st      *backupState
	mu      sync.Mutex
	items   []syncItem
	wake    chan struct{}
	stopped chan struct{}
	stop    chan struct{}
}

type syncItem struct {
	e IndexEntry
	p *pendingObject
}

func newSyncBatcher(ctx context.Context, st *backupState, be deferredSyncer) *syncBatcher {
	b := &syncBatcher{be: be, st: st, wake: make(chan struct{}, 1), stopped: make(chan struct{}), stop: make(chan struct{})}
	go b.run(ctx)
	return b
}

func (b *syncBatcher) add(e IndexEntry, p *pendingObject) {
	b.mu.Lock()
	b.items = append(b.items, syncItem{e, p})
	b.mu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

func (b *syncBatcher) run(ctx context.Context) {
	defer close(b.stopped)
	// After a failure, what was uploaded is still made durable and
	// indexed, for the next run to reuse.
	ctx = context.WithoutCancel(ctx)
	for {
		stopping := false
		select {
		case <-b.wake:
		case <-b.stop:
			stopping = true
		}
		b.mu.Lock()
		items := b.items
		b.items = nil
		b.mu.Unlock()
		if len(items) > 0 {
			// Journal the batch before Sync makes it appear under its
			// names, so a kill in between leaves no object the next run
			// cannot find in the journal; recovery confirms each journaled
			// object with the store before indexing it, so journaling an
			// object that never appears is harmless.
			for _, it := range items {
				b.st.iw.j.record(it.e)
			}
			// Fail before anything waiting on these objects runs on.
			err := b.be.Sync(ctx)
			if err != nil {
				b.st.fail(err)
			}
			for _, it := range items {
				if err == nil {
					if err = b.st.iw.addRecorded(ctx, it.e); err != nil {
						b.st.fail(err)
					}
				}
				close(it.p.done)
			}
		}
		if stopping {
			return
		}
	}
}

// close syncs what is left and stops the batcher; call it once every
// upload has returned.
func (b *syncBatcher) close() {
	close(b.stop)
	<-b.stopped
}

// Backup stores every disk of req and commits one manifest. The caller
// holds a (shared) repository lock for the duration.
func (r *Repository) Backup(ctx context.Context, req BackupRequest) (*Manifest, error) {
	started := time.Now()
	if req.VM == "" || len(req.Disks) == 0 {
		return nil, errors.New("backup: VM name and at least one disk required")
	}
	ix, err := r.LoadIndex(ctx)
	if err != nil {
		return nil, err
	}
	if _, err := r.recoverJournals(ctx, ix); err != nil {
		r.log.Warn("could not recover an interrupted backup's uploads; they will be sent again", "err", err)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	st := &backupState{r: r, iw: &indexWriter{r: r, j: r.openJournal()}, sem: semaphore.NewWeighted(uploadWindow),
		inFly: map[crypto.ID]*pendingObject{}, readLimit: limit.NewBucket(req.ReadLimit)}
	var failOnce sync.Once
	var firstErr error
	st.fail = func(err error) {
		failOnce.Do(func() { firstErr = err; cancel(err) })
	}
	if ds, ok := r.be.(deferredSyncer); ok {
		st.batch = newSyncBatcher(ctx, st, ds)
	}
	m := &Manifest{Version: FormatVersion, VM: req.VM, Time: req.Time, Host: req.Host, Tags: req.Tags, Started: started.UTC()}
	if m.Time.IsZero() {
		m.Time = started
	}
	m.Time = m.Time.UTC()
	if m.Host == "" {
		m.Host, _ = os.Hostname()
	}
	for _, src := range req.Disks {
		d, err := st.backupDisk(ctx, src, req)
		if err == nil {
			err = context.Cause(ctx)
		}
		if err != nil {
			st.drain()
			if firstErr != nil {
				err = firstErr
			}
			// Whatever was stored stays indexed for the next run.
			st.iw.finish(context.WithoutCancel(ctx))
			return nil, fmt.Errorf("disk %s: %w", src.Name, err)
		}
		m.Disks = append(m.Disks, d)
	}
	st.drain()
	if firstErr != nil {
		st.iw.finish(context.WithoutCancel(ctx))
		return nil, firstErr
	}
	if req.BeforeCommit != nil {
		q, err := req.BeforeCommit(ctx)
		if err != nil {
			st.iw.finish(context.WithoutCancel(ctx))
			return nil, err
		}
		m.Quiesce = q
	}
	if err := st.iw.finish(ctx); err != nil {
		return nil, err
	}
	m.Finished = time.Now().UTC()
	m.Stats = BackupStats{BytesRead: st.stats.read.Load(), BytesZero: st.stats.zero.Load(),
		BytesNew: st.stats.bytesNew.Load(), ChunksNew: st.stats.chunksNew.Load(),
		SegmentsSeen: st.stats.segs.Load(), SegmentsNew: st.stats.segsNew.Load(), ObjectsFound: st.stats.found.Load()}
	if err := r.commitManifest(ctx, m, st.stats.stored.Load()); err != nil {
		return nil, err
	}
	return m, nil
}

// commitManifest writes the manifest: the commit point of a backup.
func (r *Repository) commitManifest(ctx context.Context, m *Manifest, storedSoFar int64) error {
	id := randomID()
	name := manifestName(id)
	// The stored size includes the manifest itself; seal once to learn it.
	m.Stats.BytesStored = storedSoFar
	raw, err := json.Marshal(m)
	if err != nil {
		return err
	}
	m.Stats.BytesStored += int64(len(r.codec.seal(TypeManifest, name, raw)))
	raw, err = json.Marshal(m)
	if err != nil {
		return err
	}
	// The lease must still hold: a backup whose lock lapsed (stalled,
	// refresh failed, removed) may have lost objects to a prune.
	if err := r.checkLeases(ctx); err != nil {
		return err
	}
	if err := r.be.Put(ctx, name, r.codec.seal(TypeManifest, name, raw)); err != nil {
		return fmt.Errorf("commit manifest: %w", err)
	}
	m.ID = hex.EncodeToString(id[:])
	return nil
}

// segmentJob is segment i, buf[:n]. A job with release set holds a
// mapped window: the worker calls release instead of returning buf to the
// free buffers.
type segmentJob struct {
	i       int
	buf     []byte
	n       int
	release func()
}

func (st *backupState) backupDisk(ctx context.Context, src DiskSource, req BackupRequest) (Disk, error) {
	r := st.r
	// A source blocked in Read (a pipe whose writer stalls) would never
	// see a cancellation; a read deadline wakes it, where the reader
	// supports one (pollable files: pipes, sockets).
	if d, ok := src.Reader.(interface{ SetReadDeadline(time.Time) error }); ok {
		stop := context.AfterFunc(ctx, func() { d.SetReadDeadline(time.Now()) })
		defer stop()
	}
	cut := r.segmenter
	nw := workers()
	// Buffers: one per worker, the one being filled, and one to carry a
	// window's tail into the next segment while the workers are busy.
	free := make(chan []byte, nw+2)
	for range nw + 2 {
		free <- nil // allocated on first use
	}
	jobs := make(chan segmentJob, 1)
	var mu sync.Mutex
	var segIDs [][32]byte
	setID := func(i int, id crypto.ID) {
		mu.Lock()
		for len(segIDs) <= i {
			segIDs = append(segIDs, [32]byte{})
		}
		segIDs[i] = id
		mu.Unlock()
	}
	var workersWG sync.WaitGroup
	var workerErr error
	var werrOnce sync.Once
	for range nw {
		workersWG.Add(1)
		go func() {
			defer workersWG.Done()
			sp, err := chunk.NewSplitter(r.cfg.ChunkerPolynomial)
			if err != nil {
				werrOnce.Do(func() { workerErr = err })
				st.fail(err)
				return
			}
			for job := range jobs {
				id, err := st.storeJob(ctx, sp, src.Source, job)
				if job.release != nil {
					job.release()
				} else {
					free <- job.buf
				}
				if err != nil {
					werrOnce.Do(func() { workerErr = err })
					st.fail(err)
					continue
				}
				setID(job.i, id)
			}
		}()
	}

	var sum hash.Hash
	if req.SHA256 {
		sum = sha256.New()
	}
	ir := newImageReader(src, nw)
	ir.limit = st.readLimit
	if ir.mappable() {
		// Mapped windows take the place of the heap's segment buffers
		// but are memory the garbage collector does not see: a soft
		// memory limit (cmd/vmvault sets one) shrinks by their bound
		// while the disk is read, so the process keeps its bound.
		if lim := debug.SetMemoryLimit(-1); lim != math.MaxInt64 {
			defer debug.SetMemoryLimit(debug.SetMemoryLimit(max(lim/2, lim-int64((nw+2)*cut.Max()))))
		}
	}
	var lens []int64
	var total int64
	readErr := func() (err error) {
		defer close(jobs)
		// The reader touches mapped windows too (cut, SHA-256).
		defer catchFault(src.Source, &err)()
		// takeSlot takes one of the nw+2 buffer slots that bound the
		// windows in flight; the buffer in it may still be nil.
		takeSlot := func() ([]byte, error) {
			select {
			case buf := <-free:
				return buf, nil
			case <-ctx.Done():
				return nil, context.Cause(ctx)
			}
		}
		getBuf := func() ([]byte, error) {
			buf, err := takeSlot()
			if err == nil && buf == nil {
				buf = make([]byte, cut.Max())
			}
			return buf, err
		}
		// emit hands segment buf[:c] to the workers.
		emit := func(buf []byte, c int, release func()) error {
			if sum != nil {
				sum.Write(buf[:c])
			}
			select {
			case jobs <- segmentJob{i: len(lens), buf: buf, n: c, release: release}:
			case <-ctx.Done():
				if release != nil {
					release()
				}
				return context.Cause(ctx)
			}
			lens = append(lens, int64(c))
			total += int64(c)
			if req.Progress != nil {
				req.Progress(src.Name, total)
			}
			return nil
		}
		var buf []byte // holds have bytes of the image from offset total
		have := 0
		for {
			want := cut.Max()
			if src.Size >= 0 {
				want = int(min(int64(want), src.Size-total))
			}
			if want == 0 {
				return nil
			}
			if have == 0 && ir.isHole(total, int64(want)) {
				// Never read: zeros, and no boundary falls inside zeros.
				i := len(lens)
				lens = append(lens, int64(want))
				st.stats.segs.Add(1)
				st.stats.zero.Add(int64(want))
				setID(i, crypto.ID{})
				if sum != nil {
					writeZeros(sum, int64(want))
				}
				total += int64(want)
				if req.Progress != nil {
					req.Progress(src.Name, total)
				}
				continue
			}
			if have == 0 && ir.mappable() {
				slot, err := takeSlot()
				if err != nil {
					return err
				}
				mem, ok, err := ir.mapWindow(ctx, total, want)
				if err != nil {
					free <- slot
					return err
				}
				if ok {
					c := cut.Cut(mem, total+int64(want) == src.Size)
					ir.read += int64(c)
					if err := emit(mem, c, func() { unmapWindow(mem); free <- slot }); err != nil {
						return err
					}
					continue
				}
				// Holes inside: read into the slot's buffer.
				if slot == nil {
					slot = make([]byte, cut.Max())
				}
				buf = slot
			}
			if buf == nil {
				if buf, err = getBuf(); err != nil {
					return err
				}
			}
			n, err := ir.fill(ctx, buf[have:want], total+int64(have))
			have += n
			if err != nil {
				return err
			}
			if have == 0 {
				return nil // a stream ended at a segment boundary
			}
			eof := ir.eof || (src.Size >= 0 && total+int64(have) == src.Size)
			c := cut.Cut(buf[:have], eof)
			var next []byte
			if c < have && !ir.mappable() {
				if next, err = getBuf(); err != nil {
					return err
				}
				copy(next, buf[c:have])
			}
			var release func()
			if ir.mappable() {
				ir.read += ir.dataBytes(total, total+int64(c))
				// Drop the buffer when done: buffers and mapped windows
				// would otherwise both count against the memory bound.
				release = func() { free <- nil }
			}
			if err := emit(buf, c, release); err != nil {
				return err
			}
			// A mappable source maps the window's tail again instead.
			buf, have = next, have-c
			if next == nil {
				have = 0
			}
			if ir.eof && have == 0 {
				return nil
			}
		}
	}()
	if readErr == nil {
		readErr = ir.checkStreamEnd()
	}
	workersWG.Wait()
	st.stats.read.Add(ir.read)
	if readErr != nil {
		st.fail(readErr)
		return Disk{}, readErr
	}
	if workerErr != nil {
		return Disk{}, workerErr
	}
	if src.Size >= 0 && total != src.Size {
		err := fmt.Errorf("source %s ended early: read %d of %d bytes", src.Source, total, src.Size)
		st.fail(err)
		return Disk{}, err
	}
	if len(segIDs) != len(lens) {
		return Disk{}, fmt.Errorf("internal error: %d segment IDs for %d segments", len(segIDs), len(lens))
	}
	segs := make([]byte, 0, 32*len(lens))
	for _, id := range segIDs {
		segs = append(segs, id[:]...)
	}
	tables, err := st.storeTables(ctx, segs, lens)
	if err != nil {
		return Disk{}, err
	}
	segSize := r.cfg.SegmentSize
	d := Disk{Name: src.Name, Source: src.Source, Size: total, SegmentSize: segSize, SegmentCount: len(lens), Tables: tables}
	if err := d.setSegments(segs, lens); err != nil {
		return Disk{}, fmt.Errorf("internal error: %w", err)
	}
	d.Digest = HexID(imageDigest(r.imageH, total, segSize, segs, lens))
	if sum != nil {
		d.SHA256 = hex.EncodeToString(sum.Sum(nil))
	}
	return d, nil
}

// writeZeros writes n zero bytes to w.
func writeZeros(w io.Writer, n int64) {
	var z [64 << 10]byte
	for n > 0 {
		k := min(n, int64(len(z)))
		w.Write(z[:k])
		n -= k
	}
}

// newSegmenter returns the repository's segment boundary rule: content
// defined, around the configured segment size, with a gear table keyed
// by the ID key (docs/format.md, "Segments").
func newSegmenter(mk *crypto.MasterKey, segSize int64) *chunk.Segmenter {
	h := crypto.NewHasher(mk.ID, "segment-gear")
	return chunk.NewSegmenter(int(segSize), func(b byte) [32]byte { return h.Sum([]byte{b}) })
}

// storeJob stores one segment job; a memory fault while reading a mapped
// window becomes an error naming the source.
func (st *backupState) storeJob(ctx context.Context, sp *chunk.Splitter, source string, job segmentJob) (id crypto.ID, err error) {
	defer catchFault(source, &err)()
	return st.storeSegment(ctx, sp, job.buf[:job.n])
}

// storeSegment chunks one segment and queues its new chunks and its
// segment list for upload. It returns the segment ID (all zeros for an
// all-zero segment). seg may be reused by the caller once it returns.
func (st *backupState) storeSegment(ctx context.Context, sp *chunk.Splitter, seg []byte) (crypto.ID, error) {
	r := st.r
	st.stats.segs.Add(1)
	if chunk.IsZero(seg) {
		st.stats.zero.Add(int64(len(seg)))
		return crypto.ID{}, nil
	}
	segID := r.segH.Sum(seg)
	segPending, mine := st.claim(segID)
	if !mine {
		// Stored before, or being stored by another worker: reuse whole.
		return segID, nil
	}
	st.stats.segsNew.Add(1)
	var entries []SegmentEntry
	var waits []*pendingObject
	err := sp.Split(seg, func(p chunk.Piece) error {
		if p.Zero {
			st.stats.zero.Add(int64(p.Length))
			entries = append(entries, SegmentEntry{Zero: true, Length: uint32(p.Length)})
			return nil
		}
		id := r.chunkH.Sum(p.Data)
		entries = append(entries, SegmentEntry{Length: uint32(p.Length), ID: id})
		pend, mine := st.claim(id)
		if !mine {
			if pend != nil {
				waits = append(waits, pend)
			}
			return nil
		}
		st.stats.bytesNew.Add(int64(p.Length))
		st.stats.chunksNew.Add(1)
		waits = append(waits, pend)
		return st.upload(ctx, TypeChunk, id, p.Data, pend)
	})
	if err != nil {
		close(segPending.done)
		return segID, err
	}
	// The segment list may only become durable (and indexed) after every
	// chunk it names: a later backup that reuses the segment trusts that
	// its chunks exist.
	list := encodeSegmentList(entries)
	st.wg.Add(1)
	go func() {
		defer st.wg.Done()
		for _, w := range waits {
			select {
			case <-w.done:
			case <-ctx.Done():
				close(segPending.done)
				return
			}
		}
		if ctx.Err() != nil {
			close(segPending.done)
			return
		}
		if err := st.upload(ctx, TypeSegment, segID, list, segPending); err != nil {
			st.fail(err)
		}
	}()
	return segID, nil
}
