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

// uploadWindow bounds the memory of the sealed objects queued for upload
// (their buffers' capacity). Together with the segment buffers it bounds
// a backup's memory.
const uploadWindow = 32 << 20

// maxWorkers bounds segment workers (and so segment buffers) regardless
// of core count.
const maxWorkers = 8

// workers returns how many segment workers a backup runs (and restore
// twice as many fetchers). The count follows the processors the process
// started with (one per core unless GOMAXPROCS says otherwise), not the
// current GOMAXPROCS: a backup runs with more processors than cores
// (cmd/vmvault), so that a goroutine blocked in the kernel on an upload
// never idles a core, while the CPU-bound workers stay one per core.
func workers() int { return min(startProcs, maxWorkers) }

// startProcs is the processor count the process started with.
var startProcs = runtime.GOMAXPROCS(0)

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
		read, zero, bytesNew, stored, chunksNew, segs, segsNew, found, chunked atomic.Int64
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

// known reports whether id is stored or being stored (a hint: claim decides).
func (st *backupState) known(id crypto.ID) bool {
	if st.r.idx.Has(id) {
		return true
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	_, ok := st.inFly[id]
	return ok
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
	return st.uploadSealed(ctx, t, id, payload, nil, p)
}

// uploadSealed is upload of payload already sealed (sealed; nil: seal it
// here).
func (st *backupState) uploadSealed(ctx context.Context, t ObjectType, id crypto.ID, payload, sealed []byte, p *pendingObject) error {
	name := dataName(id)
	if sealed == nil {
		sealed = st.r.codec.seal(t, name, payload)
	}
	// A segment list's payload is its own allocation; a chunk's is the
	// caller's segment buffer, reused once storeSegment returns.
	var list []byte
	if t == TypeSegment {
		list = payload
	}
	// The window counts the buffer, not the object: a sealed object
	// lies in a buffer rounded up to whole MiB (codec.buffer), and the
	// buffer is what stays live until the store has it.
	weight := min(int64(cap(sealed)), uploadWindow)
	if err := st.sem.Acquire(ctx, weight); err != nil {
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
		st.sem.Release(weight)
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
	if math.IsNaN(req.VerifyUnchanged) || req.VerifyUnchanged < 0 || req.VerifyUnchanged > 100 {
		return nil, fmt.Errorf("backup: verify-unchanged %v: not a percentage between 0 and 100", req.VerifyUnchanged)
	}
	ix, err := r.LoadIndex(ctx)
	if err != nil {
		return nil, err
	}
	// Every disk's change-tracking base is checked before anything is
	// read or stored, so a refusal (ErrNoBase) costs nothing.
	bases := make([]*cbtBase, len(req.Disks))
	for i, src := range req.Disks {
		if src.Changes == nil {
			continue
		}
		if req.SHA256 {
			// A plain SHA-256 needs every byte of the image.
			r.log.Info("reading the disk whole: a plain SHA-256 needs every byte", "vm", req.VM, "disk", src.Name)
			continue
		}
		if bases[i], err = r.loadBase(ctx, req.VM, src); err != nil {
			return nil, err
		}
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
	m := &Manifest{Version: ManifestVersion, VM: req.VM, Time: req.Time, Host: req.Host, Tags: req.Tags, Started: started.UTC()}
	if m.Time.IsZero() {
		m.Time = started
	}
	m.Time = m.Time.UTC()
	if m.Host == "" {
		m.Host, _ = os.Hostname()
	}
	prev := r.startPreviousGen(ctx, req.VM)
	for i, src := range req.Disks {
		var d Disk
		var err error
		if bases[i] != nil {
			d, err = st.backupDiskChanged(ctx, src, req, bases[i])
		} else {
			d, err = st.backupDisk(ctx, src, req, prev.disk(src.Name))
			d.FullRead = m.Time
		}
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
		SegmentsSeen: st.stats.segs.Load(), SegmentsNew: st.stats.segsNew.Load(), ObjectsFound: st.stats.found.Load(),
		BytesChunked: st.stats.chunked.Load()}
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
// free buffers. A mapped job's slot is the buffer its window holds the
// place of (nil until needed): a new segment is copied into it before it
// is stored (see storeSegment).
type segmentJob struct {
	i       int
	off     int64 // the segment's image offset
	buf     []byte
	n       int
	release func()
	// holes are the segment's holes (relative to it), never to be read
	// (a mapped window of a sparse file).
	holes   []chunk.Hole
	mapped  bool
	lease   *readLease // the mapped file's, if held when submitted (repo/lease.go)
	slot    *[]byte
	slotLen int // the size of a buffer to allocate for the slot
}

// segmentWorkers hash and store a disk's segments in parallel: a reader
// cuts the image into segments and submits each with its index in the
// disk; the workers record each segment's ID under that index.
type segmentWorkers struct {
	st     *backupState
	ctx    context.Context
	bufLen int
	free   chan []byte
	jobs   chan segmentJob
	wg     sync.WaitGroup
	mu     sync.Mutex
	ids    [][32]byte
	err    error
	source string // names the disk in errors
	// prev guides the splitting of new segments (nil: plain splits).
	prev *prevDisk
}

// startSegmentWorkers starts nw workers; bufLen is the size of the buffers
// getBuf hands out (the longest segment), source names the disk in errors.
func (st *backupState) startSegmentWorkers(ctx context.Context, nw, bufLen int, source string) *segmentWorkers {
	w := &segmentWorkers{st: st, ctx: ctx, bufLen: bufLen, source: source, jobs: make(chan segmentJob, 1),
		// Buffers: one per worker, the one being filled, and one to
		// carry a window's tail into the next segment while the workers
		// are busy.
		free: make(chan []byte, nw+2)}
	for range nw + 2 {
		w.free <- nil // allocated on first use
	}
	for range nw {
		w.wg.Add(1)
		go w.run()
	}
	return w
}

func (w *segmentWorkers) run() {
	defer w.wg.Done()
	sp, err := chunk.NewSplitter(w.st.r.cfg.ChunkerPolynomial)
	if err != nil {
		w.fail(err)
		// Drain, so the reader never blocks on a worker that quit.
		for job := range w.jobs {
			if job.release != nil {
				job.release()
			} else {
				w.free <- job.buf
			}
		}
		return
	}
	for job := range w.jobs {
		id, err := w.st.storeJob(w.ctx, sp, w.source, job, w.prev)
		if job.release != nil {
			job.release()
		} else {
			w.free <- job.buf
		}
		if err != nil {
			w.fail(err)
			continue
		}
		w.setID(job.i, id)
	}
}

func (w *segmentWorkers) fail(err error) {
	w.mu.Lock()
	if w.err == nil {
		w.err = err
	}
	w.mu.Unlock()
	w.st.fail(err)
}

// setID records segment i's ID.
func (w *segmentWorkers) setID(i int, id crypto.ID) {
	w.mu.Lock()
	for len(w.ids) <= i {
		w.ids = append(w.ids, [32]byte{})
	}
	w.ids[i] = id
	w.mu.Unlock()
}

// getBuf returns a free segment buffer, waiting for a worker to release
// one.
func (w *segmentWorkers) getBuf() ([]byte, error) {
	buf, err := w.takeSlot()
	if err == nil && buf == nil {
		buf = make([]byte, w.bufLen)
	}
	return buf, err
}

// takeSlot takes one of the slots that bound the windows in flight,
// waiting for a worker to release one; the buffer in it may be nil (not
// allocated yet). A mapped window holds a slot instead of a buffer.
func (w *segmentWorkers) takeSlot() ([]byte, error) {
	select {
	case buf := <-w.free:
		return buf, nil
	case <-w.ctx.Done():
		return nil, context.Cause(w.ctx)
	}
}

// submitMapped hands segment i at image offset off, the first c bytes of
// a window mapped in slot, with its holes, to the workers, which unmap it
// and free the slot when done.
func (w *segmentWorkers) submitMapped(i int, off int64, mem []byte, c int, holes []chunk.Hole, slot []byte, lease *readLease) error {
	job := segmentJob{i: i, off: off, buf: mem, n: c, holes: holes, mapped: true, slot: &slot, slotLen: w.bufLen}
	if lease.held() {
		job.lease = lease
	}
	job.release = func() { unmapWindow(mem); w.free <- slot }
	return w.send(job)
}

// send hands job to the workers; if the backup ends first, it releases
// what the job holds.
func (w *segmentWorkers) send(job segmentJob) error {
	select {
	case w.jobs <- job:
		return nil
	case <-w.ctx.Done():
		if job.release != nil {
			job.release()
		}
		return context.Cause(w.ctx)
	}
}

// putBuf returns a buffer from getBuf unused.
func (w *segmentWorkers) putBuf(buf []byte) { w.free <- buf }

// submit hands buf[:n], segment i at image offset off, to the workers,
// which own buf from now on.
func (w *segmentWorkers) submit(i int, off int64, buf []byte, n int) error {
	return w.send(segmentJob{i: i, off: off, buf: buf, n: n})
}

// submitCut hands the first c of the have bytes in buf to the workers as
// segment i at image offset off, and returns a new buffer that holds the
// have-c bytes after the cut (nil if there are none).
func (w *segmentWorkers) submitCut(i int, off int64, buf []byte, have, c int) ([]byte, error) {
	var next []byte
	if c < have {
		var err error
		if next, err = w.getBuf(); err != nil {
			return nil, err
		}
		copy(next, buf[c:have])
	}
	if err := w.submit(i, off, buf, c); err != nil {
		return nil, err
	}
	return next, nil
}

// endRead ends reading a disk of n segments: it waits for the workers,
// counts the bytes read, and returns the segment IDs or the first error
// (the reader's, readErr, first).
func (st *backupState) endRead(w *segmentWorkers, ir *imageReader, n int, readErr error) ([]byte, error) {
	segs, workErr := w.wait(n)
	st.stats.read.Add(ir.read)
	if readErr != nil {
		st.fail(readErr)
		return nil, readErr
	}
	return segs, workErr
}

// wait stops the workers once every submitted segment is stored and
// returns the segment IDs in order (n of them), or the first error.
func (w *segmentWorkers) wait(n int) ([]byte, error) {
	close(w.jobs)
	w.wg.Wait()
	if w.err != nil {
		return nil, w.err
	}
	if len(w.ids) != n {
		return nil, fmt.Errorf("internal error: %d segment IDs for %d segments", len(w.ids), n)
	}
	segs := make([]byte, 0, 32*n)
	for _, id := range w.ids {
		segs = append(segs, id[:]...)
	}
	return segs, nil
}

func (st *backupState) backupDisk(ctx context.Context, src DiskSource, req BackupRequest, prev *prevDisk) (Disk, error) {
	// A source blocked in Read (a pipe whose writer stalls) would never
	// see a cancellation; a read deadline wakes it, where the reader
	// supports one (pollable files: pipes, sockets).
	if d, ok := src.Reader.(interface{ SetReadDeadline(time.Time) error }); ok {
		stop := context.AfterFunc(ctx, func() { d.SetReadDeadline(time.Now()) })
		defer stop()
	}
	cut := st.r.segmenter
	nw := workers()
	w := st.startSegmentWorkers(ctx, nw, cut.Max(), src.Source)
	w.prev = prev

	var sum hash.Hash
	if req.SHA256 {
		sum = sha256.New()
	}
	ir := newImageReader(src, nw)
	ir.limit = st.readLimit
	var lease *readLease // nil: no lease
	if ir.mappable() && ir.file != nil {
		// Read in place while no one can write the file (repo/lease.go).
		lease = takeReadLease(ir.file)
		defer lease.release()
		if lease != nil {
			st.r.log.Debug("reading under a read lease: chunks sealed in place", "source", src.Source)
		}
	}
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
		// The reader touches mapped windows too (cut, SHA-256).
		defer catchFault(src.Source, &err)()
		// advance records segment c bytes long, handed to the workers.
		advance := func(c int) {
			lens = append(lens, int64(c))
			total += int64(c)
			if req.Progress != nil {
				req.Progress(src.Name, total)
			}
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
				w.setID(len(lens), crypto.ID{})
				st.stats.segs.Add(1)
				st.stats.zero.Add(int64(want))
				if sum != nil {
					writeZeros(sum, int64(want))
				}
				advance(want)
				continue
			}
			if have == 0 && ir.mappable() {
				slot, err := w.takeSlot()
				if err != nil {
					return err
				}
				mem, holes, ok, err := ir.mapWindow(ctx, total, want)
				if err != nil {
					w.putBuf(slot)
					return err
				}
				if ok {
					// Holes are never read: not for the cut, not to
					// find zero runs, not for the SHA-256.
					c := cut.CutHoles(mem, total+int64(want) == src.Size, holes)
					holes = clipHoles(holes, c)
					if sum != nil {
						writeHoled(sum, mem[:c], holes)
					}
					if err := w.submitMapped(len(lens), total, mem, c, holes, slot, lease); err != nil {
						return err
					}
					if holes != nil {
						holedSegmentsMapped.Add(1)
					}
					ir.read += int64(c) - holeBytes(holes) // the tail is mapped again
					advance(c)
					continue
				}
				// Not mappable after all: read into a buffer.
				if buf = slot; buf == nil {
					buf = make([]byte, cut.Max())
				}
			}
			if buf == nil {
				if buf, err = w.getBuf(); err != nil {
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
			if sum != nil {
				sum.Write(buf[:c])
			}
			if ir.mappable() {
				// The tail is mapped again, not carried: not read twice.
				ir.read -= ir.dataBytes(total+int64(c), total+int64(have))
				// The buffer goes back to its slot, for the next window
				// with holes or a private copy (storeJob): a slot holds
				// at most one buffer either way.
				if err := w.submit(len(lens), total, buf, c); err != nil {
					return err
				}
				buf, have = nil, 0
				advance(c)
				continue
			}
			if buf, err = w.submitCut(len(lens), total, buf, have, c); err != nil {
				return err
			}
			have -= c
			advance(c)
			if ir.eof && have == 0 {
				return nil
			}
		}
	}()
	if readErr == nil {
		readErr = ir.checkStreamEnd()
	}
	segs, err := st.endRead(w, ir, len(lens), readErr)
	if err != nil {
		return Disk{}, err
	}
	if src.Size >= 0 && total != src.Size {
		err := fmt.Errorf("source %s ended early: read %d of %d bytes", src.Source, total, src.Size)
		st.fail(err)
		return Disk{}, err
	}
	d, err := st.finishDisk(ctx, src, total, segs, lens)
	if err != nil {
		return Disk{}, err
	}
	d.CBT, d.BytesRead = CBTNone, ir.read
	if sum != nil {
		d.SHA256 = hex.EncodeToString(sum.Sum(nil))
	}
	return d, nil
}

// CBTNone is a disk's CBT when it was read whole.
const CBTNone = "none"

// finishDisk stores the segment tables of a disk of total bytes whose
// segments are segs (32-byte IDs) and lens, and returns its manifest entry.
func (st *backupState) finishDisk(ctx context.Context, src DiskSource, total int64, segs []byte, lens []int64) (Disk, error) {
	tables, err := st.storeTables(ctx, segs, lens)
	if err != nil {
		return Disk{}, err
	}
	segSize := st.r.cfg.SegmentSize
	d := Disk{Name: src.Name, Source: src.Source, Size: total, SegmentSize: segSize, SegmentCount: len(lens), Tables: tables, Tracker: src.Tracker}
	if err := d.setSegments(segs, lens); err != nil {
		return Disk{}, fmt.Errorf("internal error: %w", err)
	}
	d.Digest = HexID(imageDigest(st.r.imageH, total, segSize, segs, lens))
	return d, nil
}

// holedSegmentsMapped counts the segments, of any backup in this process,
// cut from a mapped window with holes (a test checks such windows are
// mapped, not copied into a buffer).
var holedSegmentsMapped atomic.Int64

// writeHoled writes b to w, zeros in place of its holes (not read).
func writeHoled(w io.Writer, b []byte, holes []chunk.Hole) {
	at := 0
	for _, h := range holes {
		w.Write(b[at:h.Off])
		writeZeros(w, int64(h.End-h.Off))
		at = h.End
	}
	w.Write(b[at:])
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
func (st *backupState) storeJob(ctx context.Context, sp *chunk.Splitter, source string, job segmentJob, prev *prevDisk) (id crypto.ID, err error) {
	defer catchFault(source, &err)()
	var private func() []byte
	if job.mapped {
		// The slot's buffer, allocated on first use.
		private = func() []byte {
			if len(*job.slot) < job.n {
				*job.slot = make([]byte, max(job.n, job.slotLen))
			}
			return (*job.slot)[:job.n]
		}
	}
	return st.storeSegment(ctx, sp, job.buf[:job.n], job.holes, private, job.lease, prev, job.off)
}

// segmentID returns the ID of a segment split into entries and its
// segment list's payload: the keyed hash ("segment-list") of the payload,
// or the zero ID and no list for a segment that is one zero run.
func (r *Repository) segmentID(entries []SegmentEntry) (crypto.ID, []byte) {
	if len(entries) == 1 && entries[0].Zero {
		return crypto.ID{}, nil
	}
	list := encodeSegmentList(entries)
	return r.segListH.Sum(list), list
}

// storeSegment chunks one segment, at image offset off, and queues its
// new chunks and its segment list for upload. It returns the segment ID:
// the keyed hash of its segment list (all zeros for an all-zero segment).
// seg may be reused by the caller once it returns. The segment is split
// guided by prev's chunks (repo/reuse.go): a chunk whose bytes hash in
// place to a previous chunk's ID is taken unchunked, and a segment all of
// whose chunks are taken so is the previous segment, its ID the same.
//
// private is nil when seg is the caller's own memory. Otherwise seg can
// change while it is read (a mapped window of a file someone writes), and
// private returns a buffer as long as seg: every chunk that is stored is
// copied into it first, hashed over the copy and sealed from the copy, so
// that a stored chunk always holds the bytes its ID names. A chunk taken
// by a hash in place is not stored (it already is): the list then names
// it, a torn read of a changing source, never an inconsistent object
// (TestBackupMappedFileWrittenMeanwhile). The segment ID describes the
// list, which is exactly what is stored, whatever the source did.
func (st *backupState) storeSegment(ctx context.Context, sp *chunk.Splitter, seg []byte, holes []chunk.Hole, private func() []byte, lease *readLease, prev *prevDisk, off int64) (crypto.ID, error) {
	st.stats.segs.Add(1)
	var entries []SegmentEntry
	var waits []*pendingObject
	var zero int64
	err := st.splitGuided(sp, seg, holes, prev.guide(ctx, off, seg), private, lease, func(p chunk.Piece, id crypto.ID, sealed []byte) error {
		if p.Zero {
			zero += int64(p.Length)
			entries = append(entries, SegmentEntry{Zero: true, Length: uint32(p.Length)})
			return nil
		}
		entries = append(entries, SegmentEntry{Length: uint32(p.Length), ID: id})
		pend, mine := st.claim(id)
		if !mine {
			if sealed != nil {
				st.r.codec.recycle(sealed)
			}
			if pend != nil {
				waits = append(waits, pend)
			}
			return nil
		}
		st.stats.bytesNew.Add(int64(p.Length))
		st.stats.chunksNew.Add(1)
		waits = append(waits, pend)
		return st.uploadSealed(ctx, TypeChunk, id, p.Data, sealed, pend)
	})
	if err != nil {
		return crypto.ID{}, err
	}
	segID, list := st.r.segmentID(entries)
	if list == nil {
		st.stats.zero.Add(zero)
		return crypto.ID{}, nil
	}
	segPending, mine := st.claim(segID)
	if !mine {
		// Stored before, or being stored by another worker.
		return segID, nil
	}
	st.stats.segsNew.Add(1)
	st.stats.zero.Add(zero)
	// The segment list may only become durable (and indexed) after every
	// chunk it names: a later backup that reuses the segment trusts that
	// its chunks exist.
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
