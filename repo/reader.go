package repo

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"vmvault/backend"
	"vmvault/crypto"
)

// A DiskReader is one disk of a generation as a random-access, read-only,
// authenticated view: the reader that mount, serve and dump share.
//
// Rules it keeps:
//   - No byte leaves it unauthenticated. The segment table was checked
//     against the image digest when the reader opened; a segment list is
//     authenticated by its seal (its name is associated data); a chunk by
//     its seal and by its keyed chunk ID, recomputed over the plaintext.
//     A read that touches a damaged object fails with an error naming the
//     object and wrapping ErrCorrupt; it never returns other bytes.
//   - Zero runs and all-zero segments are answered without fetching.
//   - Memory is bounded: decoded chunks live in an LRU cache of
//     ReaderOptions.CacheSize bytes, segment lists in a small LRU by count.
//     Nothing is cached on failure, so a transient backend error is
//     retried by the next read.
//   - A chunk's buffer is reused for another chunk only once nothing refers
//     to it: it counts one reference for the cache and one for every View
//     that hands out slices of it, and goes back to the free list when the
//     last is dropped (see chunkBuf). A reply being sent from a View never
//     sees its bytes change, however the cache moves meanwhile.
//   - The repository is never written.
//
// Segments are located only through Disk.segmentAt, segmentStart and
// segmentLen, so the reader follows whatever layout the format uses.
type DiskReader struct {
	r       *Repository
	d       Disk // private copy with Segments resolved
	name    string
	opts    ReaderOptions
	ctx     context.Context // the reader's lifetime: fetches and read-ahead
	cancel  context.CancelFunc
	wg      sync.WaitGroup // read-ahead goroutines
	sem     chan struct{}  // bounds concurrent fetches
	raSlots chan struct{}  // bounds read-ahead goroutines
	free    *freeBuffers   // buffers for sealed and decoded chunks, for reuse

	mu     sync.Mutex
	chunks lru // decoded chunks, bounded by bytes
	lists  lru // segment pieces by segment ID, bounded by count
	// Sequential detection and read-ahead state: seqEnd is where the
	// last read ended, raDone how far read-ahead has been issued, raWant
	// how far it should go.
	seqEnd, raDone, raWant, raWindow int64
	raRunning                        bool

	stats readerCounters
}

// ReaderOptions tune a DiskReader. Zero values mean the defaults.
type ReaderOptions struct {
	// CacheSize bounds the decoded chunk bytes kept in memory.
	CacheSize int64
	// ReadAhead is how many bytes beyond a sequential read are fetched
	// in the background; negative turns read-ahead off.
	ReadAhead int64
	// Fetchers bounds concurrent object fetches (demand and read-ahead).
	Fetchers int
}

// Reader defaults: a cache several read-ahead windows deep, so chunks
// fetched ahead are still there when the reader arrives.
const (
	DefaultReaderCache     = 64 << 20
	DefaultReaderReadAhead = 16 << 20
	DefaultReaderFetchers  = 8
	// segmentListCache is how many decoded segment lists a reader keeps
	// (each a few KiB).
	segmentListCache = 4096
)

func (o ReaderOptions) withDefaults() ReaderOptions {
	if o.CacheSize <= 0 {
		o.CacheSize = DefaultReaderCache
	}
	if o.ReadAhead == 0 {
		o.ReadAhead = DefaultReaderReadAhead
	}
	// Read-ahead beyond a quarter of the cache would evict what it
	// fetched before it is read: the cache also holds what clients still
	// read behind the newest request (qemu-img keeps 16 MiB in flight), and
	// it counts buffer capacities, up to 1.5 times the chunks' lengths.
	// With a 64 MiB cache and a 24 MiB window, qemu-img convert of image B
	// fetched 62 chunks twice.
	o.ReadAhead = min(o.ReadAhead, o.CacheSize/4)
	if o.Fetchers <= 0 {
		o.Fetchers = DefaultReaderFetchers
	}
	return o
}

// Memory is about the most a reader with these options keeps in chunk
// buffers: its cache and its free list.
func (o ReaderOptions) Memory() int64 {
	o = o.withDefaults()
	return o.CacheSize + max(o.CacheSize/4, minFreeBuffers)
}

// ReaderStats counts what a DiskReader fetched and served.
type ReaderStats struct {
	BytesRead     int64 // bytes returned to callers
	FetchedBytes  int64 // sealed bytes fetched from the backend (chunks and segment lists)
	ChunksFetched int64 // chunk objects fetched
	ListsFetched  int64 // segment list objects fetched
	CacheHits     int64 // chunk lookups answered from the cache
	// Waits counts the chunks a read found missing (not fetched ahead)
	// and had to wait for; WaitTime is the time reads spent waiting.
	Waits    int64
	WaitTime time.Duration
	// BuffersReused counts chunks decoded into a buffer an earlier chunk
	// had given back, rather than into a new one.
	BuffersReused int64
}

type readerCounters struct {
	bytesRead, fetchedBytes, chunksFetched, listsFetched, cacheHits, waits, waitNanos atomic.Int64
}

// Extent is a range of a disk image: data, or zeros that need no fetch.
type Extent struct {
	Off    int64
	Length int64
	Zero   bool
}

// piece is one entry of a segment list, located within its segment.
type piece struct {
	off, len int64 // relative to the segment's start
	zero     bool
	id       crypto.ID
}

// fetchCall is a fetch in progress that later callers wait for. The
// reader's mutex guards waiters and finished.
type fetchCall struct {
	done  chan struct{}
	value any
	err   error
	// waiters counts the callers that take a reference to the value
	// (a *chunkBuf) when it arrives; finished is set when it has.
	waiters  int32
	finished bool
}

// A chunkBuf is one decoded chunk in a buffer that is reused once nothing
// refers to it. refs counts the cache's reference (while the chunk is
// cached) and one per View holding slices of it; whoever drops the last
// returns data to the free list.
type chunkBuf struct {
	data []byte
	refs atomic.Int32
	free *freeBuffers
}

// release drops one reference.
func (b *chunkBuf) release() {
	switch n := b.refs.Add(-1); {
	case n == 0:
		b.free.put(b.data)
	case n < 0:
		panic("repo: chunk buffer released more often than referenced")
	}
}

// freeBuffers keeps chunk buffers for reuse, up to max bytes in all; when
// full, the oldest go to the garbage collector, so the list follows the
// chunk sizes in use.
type freeBuffers struct {
	mu        sync.Mutex
	bufs      [][]byte // oldest first
	size, max int64
	reused    atomic.Int64
}

// minFreeBuffers is the least the free list may keep: enough for a few
// buffers of each size a sequential read cycles through, even with a small
// cache.
const minFreeBuffers = 16 << 20

// bufferStep is the capacity granularity of chunk buffers. A free buffer
// is reused for any length it holds with at most a third of it unused, and
// the cache counts capacities, not lengths.
const bufferStep = 128 << 10

func newFreeBuffers(max int64) *freeBuffers {
	return &freeBuffers{max: max}
}

// get returns a buffer of n bytes, reused when a free one fits. Its
// content is arbitrary.
func (f *freeBuffers) get(n int) []byte {
	want := (n + bufferStep - 1) / bufferStep * bufferStep
	f.mu.Lock()
	best := -1
	for i, b := range f.bufs {
		if c := cap(b); c >= want && c <= want+want/2 && (best < 0 || c < cap(f.bufs[best])) {
			best = i
		}
	}
	if best < 0 {
		f.mu.Unlock()
		return make([]byte, n, want)
	}
	b := f.bufs[best]
	f.bufs = slices.Delete(f.bufs, best, best+1)
	f.size -= int64(cap(b))
	f.mu.Unlock()
	f.reused.Add(1)
	return b[:n]
}

// put keeps b for reuse.
func (f *freeBuffers) put(b []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.bufs = append(f.bufs, b[:0])
	f.size += int64(cap(b))
	for f.size > f.max {
		f.size -= int64(cap(f.bufs[0]))
		f.bufs = slices.Delete(f.bufs, 0, 1)
	}
}

// A View is the result of ReadSlices: bytes of the image as read-only
// slices of the reader's buffers, valid until Release. Release must be
// called exactly once, also after an error; until then no buffer a slice
// lies in is reused.
type View struct {
	// Bufs holds the bytes in order; N is their total length.
	Bufs [][]byte
	N    int
	held []*chunkBuf
}

// Release gives the view's buffers back to the reader. The slices must
// not be used afterwards.
func (v *View) Release() {
	for i, b := range v.held {
		b.release()
		v.held[i] = nil
	}
	v.held = v.held[:0]
	v.Bufs = nil
}

// OpenDisk opens disk diskName of generation m (the only disk when the
// name is empty) for random access. The segment tables are fetched and
// checked against the image digest before it returns. Close releases it.
func (r *Repository) OpenDisk(ctx context.Context, m *Manifest, diskName string, opts ReaderOptions) (*DiskReader, error) {
	d, err := m.Disk(diskName)
	if err != nil {
		return nil, err
	}
	dc := *d
	if err := r.resolveSegments(ctx, &dc); err != nil {
		return nil, fmt.Errorf("generation %s/%s: %w", m.VM, m.ShortID(), err)
	}
	opts = opts.withDefaults()
	rctx, cancel := context.WithCancel(context.Background())
	dr := &DiskReader{r: r, d: dc, name: m.VM + "/" + m.ShortID() + "/" + dc.Name, opts: opts,
		ctx: rctx, cancel: cancel, sem: make(chan struct{}, opts.Fetchers), raSlots: make(chan struct{}, opts.Fetchers),
		free:   newFreeBuffers(max(opts.CacheSize/4, minFreeBuffers)),
		chunks: newLRU(opts.CacheSize), lists: newLRU(segmentListCache)}
	return dr, nil
}

// Size is the disk image's size in bytes.
func (dr *DiskReader) Size() int64 { return dr.d.Size }

// Name is "VM/generation/disk", for messages.
func (dr *DiskReader) Name() string { return dr.name }

// Stats returns the reader's counters so far.
func (dr *DiskReader) Stats() ReaderStats {
	c := &dr.stats
	return ReaderStats{BytesRead: c.bytesRead.Load(), FetchedBytes: c.fetchedBytes.Load(),
		ChunksFetched: c.chunksFetched.Load(), ListsFetched: c.listsFetched.Load(), CacheHits: c.cacheHits.Load(),
		Waits: c.waits.Load(), WaitTime: time.Duration(c.waitNanos.Load()), BuffersReused: dr.free.reused.Load()}
}

// Close stops read-ahead and drops the cache. Reads after Close fail.
func (dr *DiskReader) Close() error {
	dr.cancel()
	dr.wg.Wait()
	dr.mu.Lock()
	dr.chunks, dr.lists = newLRU(1), newLRU(1)
	dr.mu.Unlock()
	return nil
}

// ReadAt implements io.ReaderAt; it is ReadAtContext with the reader's
// own lifetime as context.
func (dr *DiskReader) ReadAt(p []byte, off int64) (int, error) {
	return dr.ReadAtContext(dr.ctx, p, off)
}

// ReadAtContext reads len(p) bytes at off. Like io.ReaderAt it returns
// io.EOF when the read reaches beyond the end of the image. It is safe
// for concurrent use.
func (dr *DiskReader) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	v, err := dr.ReadSlices(ctx, off, len(p))
	k := 0
	for _, b := range v.Bufs {
		k += copy(p[k:], b)
	}
	v.Release()
	return k, err
}

// ReadSlices returns the length bytes at off without copying them: as
// slices of the reader's decoded chunks and of a shared block of zeros.
// The slices are read-only (other reads share them) and stay valid until
// the view is released, which the caller must do, also after an error.
// Errors are as for ReadAtContext: the view then holds the bytes before
// the failure, and io.EOF means the image ended first.
func (dr *DiskReader) ReadSlices(ctx context.Context, off int64, length int) (*View, error) {
	v := &View{}
	if off < 0 {
		return v, fmt.Errorf("%s: negative offset %d", dr.name, off)
	}
	if off >= dr.d.Size {
		return v, io.EOF
	}
	if err := ctx.Err(); err != nil {
		return v, err
	}
	want := min(int64(length), dr.d.Size-off)
	// Read-ahead is told before the read waits, so the chunks beyond it are
	// fetched while this one is.
	dr.noteRead(off, off+want, length)
	var n int64
	for n < want {
		pos := off + n
		k, err := dr.readSegment(ctx, v, want-n, pos)
		n += k
		if err != nil {
			v.N = int(n)
			dr.stats.bytesRead.Add(n)
			return v, fmt.Errorf("%s at offset %d: %w", dr.name, pos, err)
		}
	}
	v.N = int(n)
	dr.stats.bytesRead.Add(n)
	if n < int64(length) {
		return v, io.EOF
	}
	return v, nil
}

// zeroBlock answers zero runs in ReadSlices. Nothing writes to it after
// newZeroBlock.
var zeroBlock = newZeroBlock(256 << 10)

// newZeroBlock returns n zero bytes backed by memory of their own. Fresh
// memory that was never written is mapped to the kernel's shared zero
// page, and a write of it to a FUSE device (or a socket, or anything that
// pins the source pages) then takes the kernel's slow path under the
// process's page-table lock for every page: with several replies at once
// that lock, not the copy, limited a read of zeros through the mount.
func newZeroBlock(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = 1
	}
	clear(b)
	return b
}

// appendZeros appends n zero bytes to bufs as slices of zeroBlock.
func appendZeros(bufs [][]byte, n int64) [][]byte {
	for n > 0 {
		k := min(n, int64(len(zeroBlock)))
		bufs = append(bufs, zeroBlock[:k:k])
		n -= k
	}
	return bufs
}

// readSegment appends up to want bytes at pos to v, from the one segment
// holding pos, as far as that segment reaches; it returns how many.
func (dr *DiskReader) readSegment(ctx context.Context, v *View, want, pos int64) (int64, error) {
	i, start := dr.d.segmentAt(pos)
	want = min(want, start+dr.d.segmentLen(i)-pos)
	pieces, err := dr.segmentPieces(ctx, i)
	if err != nil {
		return 0, err
	}
	if pieces == nil { // all-zero segment
		v.Bufs = appendZeros(v.Bufs, want)
		return want, nil
	}
	rel := pos - start
	var n int64
	j := sort.Search(len(pieces), func(j int) bool { return pieces[j].off+pieces[j].len > rel })
	for ; n < want && j < len(pieces); j++ {
		pc := pieces[j]
		from := rel + n - pc.off
		k := min(want-n, pc.len-from)
		if pc.zero {
			v.Bufs = appendZeros(v.Bufs, k)
		} else {
			b, err := dr.demandChunk(ctx, pc.id, pc.len)
			if err != nil {
				return n, err
			}
			v.held = append(v.held, b)
			v.Bufs = append(v.Bufs, b.data[from:from+k:from+k])
		}
		n += k
	}
	return n, nil
}

// Extents describes [off, off+length) as data and zero ranges, adjacent
// ranges of one kind merged. Zero ranges need no fetch; answering costs
// at most the segment lists of the range.
func (dr *DiskReader) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	end := min(off+length, dr.d.Size)
	var out []Extent
	add := func(o, l int64, zero bool) {
		if l <= 0 {
			return
		}
		if k := len(out) - 1; k >= 0 && out[k].Zero == zero && out[k].Off+out[k].Length == o {
			out[k].Length += l
			return
		}
		out = append(out, Extent{Off: o, Length: l, Zero: zero})
	}
	for pos := max(off, 0); pos < end; {
		i, start := dr.d.segmentAt(pos)
		segEnd := min(start+dr.d.segmentLen(i), end)
		pieces, err := dr.segmentPieces(ctx, i)
		if err != nil {
			return out, fmt.Errorf("%s at offset %d: %w", dr.name, pos, err)
		}
		if pieces == nil {
			add(pos, segEnd-pos, true)
			pos = segEnd
			continue
		}
		for _, pc := range pieces {
			o, e := max(start+pc.off, pos), min(start+pc.off+pc.len, segEnd)
			add(o, e-o, pc.zero)
		}
		pos = segEnd
	}
	return out, nil
}

// segmentPieces returns segment i's pieces, or nil for an all-zero
// segment.
func (dr *DiskReader) segmentPieces(ctx context.Context, i int) ([]piece, error) {
	id, zero := dr.d.SegmentID(i)
	if zero {
		return nil, nil
	}
	v, err := dr.cached(ctx, &dr.lists, id, false, func() (int64, any, error) {
		return dr.fetchSegmentList(id, dr.d.segmentLen(i))
	})
	if err != nil {
		return nil, err
	}
	return v.([]piece), nil
}

func (dr *DiskReader) fetchSegmentList(id crypto.ID, size int64) (int64, any, error) {
	raw, err := dr.fetch(TypeSegment, id)
	if err != nil {
		return 0, nil, err
	}
	dr.stats.listsFetched.Add(1)
	entries, err := decodeSegmentList(raw)
	if err != nil {
		return 0, nil, dr.damaged(id, fmt.Errorf("segment %s: %w", dataName(id), err))
	}
	pieces := make([]piece, len(entries))
	var off int64
	for k, e := range entries {
		pieces[k] = piece{off: off, len: int64(e.Length), zero: e.Zero, id: e.ID}
		off += int64(e.Length)
	}
	if off != size {
		return 0, nil, dr.damaged(id, fmt.Errorf("segment %s: lists %d bytes, expected %d: %w", dataName(id), off, size, ErrCorrupt))
	}
	return 1, pieces, nil
}

// demandChunk returns chunk id's authenticated plaintext, length bytes,
// with a reference the caller must release. The time a read waits for a
// chunk that was not in the cache counts in the reader's stats.
func (dr *DiskReader) demandChunk(ctx context.Context, id crypto.ID, length int64) (*chunkBuf, error) {
	dr.mu.Lock()
	v, ok := dr.chunks.get(id)
	if ok {
		b := v.(*chunkBuf)
		b.refs.Add(1)
		dr.mu.Unlock()
		dr.stats.cacheHits.Add(1)
		return b, nil
	}
	dr.mu.Unlock()
	t := time.Now()
	v, err := dr.cached(ctx, &dr.chunks, id, true, func() (int64, any, error) {
		return dr.fetchChunk(id, length)
	})
	dr.stats.waits.Add(1)
	dr.stats.waitNanos.Add(int64(time.Since(t)))
	if err != nil {
		return nil, err
	}
	return v.(*chunkBuf), nil
}

// prefetch fetches chunk id into the cache unless it is there or on its
// way, and returns once it is (or failed: the read of the range will say
// why).
func (dr *DiskReader) prefetch(id crypto.ID, length int64) {
	dr.cached(dr.ctx, &dr.chunks, id, false, func() (int64, any, error) {
		return dr.fetchChunk(id, length)
	})
}

func (dr *DiskReader) fetchChunk(id crypto.ID, length int64) (int64, any, error) {
	if err := dr.acquire(); err != nil {
		return 0, nil, err
	}
	defer dr.release()
	// As restore does: the sealed chunk is read into a recycled buffer,
	// decrypted in place and decoded straight into the chunk's own
	// buffer, itself recycled once no one refers to it. Sealed, a chunk
	// is at most its length plus the header and the AEAD's overhead.
	name := dataName(id)
	sealed := dr.free.get(int(length) + headerSize + crypto.Overhead + 1)
	defer dr.free.put(sealed)
	n, err := backend.GetInto(dr.ctx, dr.r.be, name, sealed)
	if errors.Is(err, backend.ErrTooLarge) {
		err = fmt.Errorf("%w: %w", err, ErrCorrupt)
	}
	if err != nil {
		return 0, nil, dr.damaged(id, fmt.Errorf("%s %s: %w", TypeChunk, name, err))
	}
	dr.stats.fetchedBytes.Add(int64(n))
	dr.stats.chunksFetched.Add(1)
	data := dr.free.get(int(length))
	if err := dr.r.codec.openInto(TypeChunk, name, sealed[:n], data); err != nil {
		dr.free.put(data)
		return 0, nil, dr.damaged(id, err)
	}
	if dr.r.chunkH.Sum(data) != id {
		dr.free.put(data)
		return 0, nil, dr.damaged(id, fmt.Errorf("chunk %s: content does not match its ID: %w", name, ErrCorrupt))
	}
	b := &chunkBuf{data: data, free: dr.free}
	b.refs.Store(1) // the cache's
	return int64(cap(data)), b, nil
}

// acquire takes one of the reader's fetch slots; release gives it back.
func (dr *DiskReader) acquire() error {
	select {
	case dr.sem <- struct{}{}:
		return nil
	case <-dr.ctx.Done():
		return dr.ctx.Err()
	}
}

func (dr *DiskReader) release() { <-dr.sem }

// fetch gets and opens one data object under the fetch bound.
func (dr *DiskReader) fetch(t ObjectType, id crypto.ID) ([]byte, error) {
	if err := dr.acquire(); err != nil {
		return nil, err
	}
	defer dr.release()
	name := dataName(id)
	sealed, err := getBounded(dr.ctx, dr.r.be, name, maxDataObject)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", t, name, err)
	}
	dr.stats.fetchedBytes.Add(int64(len(sealed)))
	data, err := dr.r.codec.open(t, name, sealed)
	if err != nil {
		return nil, dr.damaged(id, err)
	}
	return data, nil
}

// damaged logs an object that failed authentication or parsing, once per
// failure, naming it, and returns err.
func (dr *DiskReader) damaged(id crypto.ID, err error) error {
	if errors.Is(err, ErrCorrupt) {
		dr.r.log.Error("object failed authentication", "object", dataName(id), "disk", dr.name, "err", err)
	}
	return err
}

// cached returns the value for id from c, fetching it once however many
// callers ask at the same time. fetch returns the value and what it
// counts against the cache's size. The fetch runs under the reader's
// lifetime, not a caller's ctx. With take, the value is a *chunkBuf and
// the caller gets a reference to it, to release.
func (dr *DiskReader) cached(ctx context.Context, c *lru, id crypto.ID, take bool, fetch func() (int64, any, error)) (any, error) {
	dr.mu.Lock()
	if v, ok := c.get(id); ok {
		if take {
			v.(*chunkBuf).refs.Add(1)
		}
		dr.mu.Unlock()
		return v, nil
	}
	call, ok := c.inflight[id]
	if !ok {
		call = &fetchCall{done: make(chan struct{})}
		c.inflight[id] = call
		// The fetch runs on its own, so a caller that gives up returns at
		// once while the fetch completes for the cache and other waiters.
		go func() {
			cost, v, err := fetch()
			dr.mu.Lock()
			delete(c.inflight, id)
			call.value, call.err, call.finished = v, err, true
			if err == nil {
				b, counted := v.(*chunkBuf)
				if counted {
					// One reference per waiter, handed over with the value.
					b.refs.Add(call.waiters)
				}
				stored, evicted := c.put(id, v, cost)
				dr.releaseAll(evicted)
				if counted && !stored {
					b.release() // the cache's, which it did not take
				}
			}
			dr.mu.Unlock()
			close(call.done)
		}()
	}
	if take {
		call.waiters++
	}
	dr.mu.Unlock()
	select {
	case <-call.done:
		return call.value, call.err
	case <-ctx.Done():
	}
	if take {
		// Given up: the reference counted for this caller is dropped now
		// if the value came meanwhile, or never handed out.
		dr.mu.Lock()
		if !call.finished {
			call.waiters--
		} else if call.err == nil {
			call.value.(*chunkBuf).release()
		}
		dr.mu.Unlock()
	}
	return nil, ctx.Err()
}

// releaseAll drops the cache's reference to every chunk in evicted.
func (dr *DiskReader) releaseAll(evicted []any) {
	for _, v := range evicted {
		if b, ok := v.(*chunkBuf); ok {
			b.release()
		}
	}
}

// noteRead records a read of [off, end) of a request for length bytes
// and, when reads are sequential, extends the read-ahead window past end.
func (dr *DiskReader) noteRead(off, end int64, length int) {
	if dr.opts.ReadAhead < 0 {
		return
	}
	dr.mu.Lock()
	defer dr.mu.Unlock()
	// Concurrent readers (the kernel's own read-ahead, direct I/O split
	// into several requests, several NBD requests) arrive slightly out of
	// order: within a few requests of the last end counts as sequential.
	// The window starts small and doubles with each sequential read, as
	// the kernel's does, so scattered small reads (a file system walking
	// its metadata) fetch little beyond what they touch.
	// A client reading with several requests at once (qemu-img runs 8)
	// lands anywhere in the window; and a reader that skips holes
	// (SEEK_DATA, NBD block status) jumps over zeros. Both are still
	// sequential, and the window stays.
	slack := max(256<<10, 4*int64(length))
	ahead := max(dr.seqEnd+slack, dr.raWant)
	if off < dr.seqEnd-max(slack, dr.raWindow) || off > ahead && !dr.knownZeroLocked(ahead, off) {
		dr.seqEnd, dr.raDone, dr.raWant, dr.raWindow = end, end, end, 0
		return
	}
	dr.seqEnd = max(dr.seqEnd, end)
	dr.raWindow = min(max(2*dr.raWindow, end-off, 256<<10), dr.opts.ReadAhead)
	dr.raDone = max(dr.raDone, dr.seqEnd)
	dr.raWant = max(dr.raWant, min(dr.seqEnd+dr.raWindow, dr.d.Size))
	if dr.raRunning || dr.raDone >= dr.raWant || dr.ctx.Err() != nil {
		return
	}
	dr.raRunning = true
	dr.wg.Add(1)
	go dr.readAhead()
}

// knownZeroLocked reports whether [from, to) holds only zeros, judged
// from the segment table and the segment lists already cached (it never
// fetches): where it cannot tell, it says no. Called with dr.mu held.
func (dr *DiskReader) knownZeroLocked(from, to int64) bool {
	// A bound on the work under the lock: a jump over more segments than
	// this counts as a jump elsewhere.
	const maxSegments = 1 << 14
	pos := from
	for n := 0; pos < to && n < maxSegments; n++ {
		i, start := dr.d.segmentAt(pos)
		end := min(start+dr.d.segmentLen(i), to)
		id, zero := dr.d.SegmentID(i)
		if !zero {
			v, ok := dr.lists.get(id)
			if !ok {
				return false
			}
			for _, pc := range v.([]piece) {
				if !pc.zero && start+pc.off < end && start+pc.off+pc.len > pos {
					return false
				}
			}
		}
		pos = end
	}
	return pos >= to
}

// readAhead starts fetches for the chunks in [raDone, raWant), one
// segment at a time, until it catches up with raWant, which moves on by
// the zero bytes it passes. At most Fetchers fetches run at once; the
// chunks land in the cache.
func (dr *DiskReader) readAhead() {
	defer dr.wg.Done()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		dr.mu.Lock()
		from, to := dr.raDone, dr.raWant
		if from >= to || dr.ctx.Err() != nil {
			dr.raRunning = false
			dr.mu.Unlock()
			return
		}
		dr.mu.Unlock()
		i, start := dr.d.segmentAt(from)
		segEnd := min(start+dr.d.segmentLen(i), to)
		pieces, err := dr.segmentPieces(dr.ctx, i)
		var zeros int64 // bytes of [from, segEnd) that need no fetch
		if err == nil && pieces == nil {
			zeros = segEnd - from
		}
		if err == nil {
			for _, pc := range pieces {
				if start+pc.off+pc.len <= from || start+pc.off >= segEnd {
					continue
				}
				if pc.zero {
					zeros += min(start+pc.off+pc.len, segEnd) - max(start+pc.off, from)
					continue
				}
				dr.mu.Lock()
				_, have := dr.chunks.get(pc.id)
				_, busy := dr.chunks.inflight[pc.id]
				dr.mu.Unlock()
				if have || busy {
					continue
				}
				// A slot per read-ahead goroutine: never more than
				// Fetchers of them, whatever the window.
				select {
				case dr.raSlots <- struct{}{}:
				case <-dr.ctx.Done():
					dr.mu.Lock()
					dr.raRunning = false
					dr.mu.Unlock()
					return
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer func() { <-dr.raSlots }()
					dr.prefetch(pc.id, pc.len) // errors surface when the range is read
				}()
			}
		}
		dr.mu.Lock()
		// A jump elsewhere reset the window meanwhile: start over from it.
		if dr.raDone == from {
			dr.raDone = segEnd
			// Zeros cost the cache nothing and the reader only a copy:
			// the window counts the bytes to fetch, so fetching runs on
			// past a hole while the reader is still crossing it.
			dr.raWant = min(dr.raWant+zeros, dr.d.Size)
		}
		dr.mu.Unlock()
	}
}

// lru is a cache of values by ID, bounded by the sum of their costs, with
// the fetches in flight for it. The reader's mutex guards it.
type lru struct {
	max, size int64
	ll        *list.List
	items     map[crypto.ID]*list.Element
	inflight  map[crypto.ID]*fetchCall
}

type lruEntry struct {
	id    crypto.ID
	value any
	cost  int64
}

func newLRU(max int64) lru {
	return lru{max: max, ll: list.New(), items: make(map[crypto.ID]*list.Element),
		inflight: make(map[crypto.ID]*fetchCall)}
}

func (c *lru) get(id crypto.ID) (any, bool) {
	e, ok := c.items[id]
	if !ok {
		return nil, false
	}
	c.ll.MoveToFront(e)
	return e.Value.(*lruEntry).value, true
}

// put adds v under id unless id is there already (stored is false then)
// and returns the values it evicted to stay within its bound.
func (c *lru) put(id crypto.ID, v any, cost int64) (stored bool, evicted []any) {
	if e, ok := c.items[id]; ok {
		c.ll.MoveToFront(e)
		return false, nil
	}
	c.items[id] = c.ll.PushFront(&lruEntry{id: id, value: v, cost: cost})
	c.size += cost
	for c.size > c.max && c.ll.Len() > 1 {
		e := c.ll.Back()
		le := e.Value.(*lruEntry)
		c.ll.Remove(e)
		delete(c.items, le.id)
		c.size -= le.cost
		evicted = append(evicted, le.value)
	}
	return true, evicted
}
