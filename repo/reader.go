package repo

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
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
	sealed  *chunkFetcher  // only its buffers: sealed chunks are read into them

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
	DefaultReaderReadAhead = 24 << 20
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
	// Read-ahead beyond half the cache would evict what it fetched.
	o.ReadAhead = min(o.ReadAhead, o.CacheSize/2)
	if o.Fetchers <= 0 {
		o.Fetchers = DefaultReaderFetchers
	}
	return o
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

// fetchCall is a fetch in progress that later callers wait for.
type fetchCall struct {
	done  chan struct{}
	value any
	err   error
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
		sealed: &chunkFetcher{},
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
		Waits: c.waits.Load(), WaitTime: time.Duration(c.waitNanos.Load())}
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
	bufs, n, err := dr.ReadSlices(ctx, off, len(p), nil)
	k := 0
	for _, b := range bufs {
		k += copy(p[k:], b)
	}
	return n, err
}

// ReadSlices returns the length bytes at off without copying them: as
// slices of the reader's decoded chunks and of a shared block of zeros,
// appended to bufs, and their total length n. The slices are read-only
// (other reads share them) and stay valid however long the caller keeps
// them. Errors are as for ReadAtContext: the slices then hold the n bytes
// before the failure, and io.EOF means the image ended first.
func (dr *DiskReader) ReadSlices(ctx context.Context, off int64, length int, bufs [][]byte) ([][]byte, int, error) {
	if off < 0 {
		return bufs, 0, fmt.Errorf("%s: negative offset %d", dr.name, off)
	}
	if off >= dr.d.Size {
		return bufs, 0, io.EOF
	}
	if err := ctx.Err(); err != nil {
		return bufs, 0, err
	}
	want := min(int64(length), dr.d.Size-off)
	// Read-ahead is told before the read waits, so the chunks beyond it are
	// fetched while this one is.
	dr.noteRead(off, off+want, length)
	var n int64
	for n < want {
		pos := off + n
		var k int64
		var err error
		bufs, k, err = dr.readSegment(ctx, bufs, want-n, pos)
		n += k
		if err != nil {
			dr.stats.bytesRead.Add(n)
			return bufs, int(n), fmt.Errorf("%s at offset %d: %w", dr.name, pos, err)
		}
	}
	dr.stats.bytesRead.Add(n)
	if n < int64(length) {
		return bufs, int(n), io.EOF
	}
	return bufs, int(n), nil
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

// readSegment appends up to want bytes at pos, from the one segment
// holding pos, as far as that segment reaches; it returns how many.
func (dr *DiskReader) readSegment(ctx context.Context, bufs [][]byte, want, pos int64) ([][]byte, int64, error) {
	i, start := dr.d.segmentAt(pos)
	want = min(want, start+dr.d.segmentLen(i)-pos)
	pieces, err := dr.segmentPieces(ctx, i)
	if err != nil {
		return bufs, 0, err
	}
	if pieces == nil { // all-zero segment
		return appendZeros(bufs, want), want, nil
	}
	rel := pos - start
	var n int64
	j := sort.Search(len(pieces), func(j int) bool { return pieces[j].off+pieces[j].len > rel })
	for ; n < want && j < len(pieces); j++ {
		pc := pieces[j]
		from := rel + n - pc.off
		k := min(want-n, pc.len-from)
		if pc.zero {
			bufs = appendZeros(bufs, k)
		} else {
			data, err := dr.demandChunk(ctx, pc.id, pc.len)
			if err != nil {
				return bufs, n, err
			}
			bufs = append(bufs, data[from:from+k:from+k])
		}
		n += k
	}
	return bufs, n, nil
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
	v, err := dr.cached(ctx, &dr.lists, id, func() ([]byte, any, error) {
		return dr.fetchSegmentList(id, dr.d.segmentLen(i))
	})
	if err != nil {
		return nil, err
	}
	return v.([]piece), nil
}

func (dr *DiskReader) fetchSegmentList(id crypto.ID, size int64) ([]byte, any, error) {
	raw, err := dr.fetch(TypeSegment, id)
	if err != nil {
		return nil, nil, err
	}
	dr.stats.listsFetched.Add(1)
	entries, err := decodeSegmentList(raw)
	if err != nil {
		return nil, nil, dr.damaged(id, fmt.Errorf("segment %s: %w", dataName(id), err))
	}
	pieces := make([]piece, len(entries))
	var off int64
	for k, e := range entries {
		pieces[k] = piece{off: off, len: int64(e.Length), zero: e.Zero, id: e.ID}
		off += int64(e.Length)
	}
	if off != size {
		return nil, nil, dr.damaged(id, fmt.Errorf("segment %s: lists %d bytes, expected %d: %w", dataName(id), off, size, ErrCorrupt))
	}
	return nil, pieces, nil
}

// chunk returns chunk id's authenticated plaintext, length bytes.
func (dr *DiskReader) chunk(ctx context.Context, id crypto.ID, length int64) ([]byte, error) {
	v, err := dr.cached(ctx, &dr.chunks, id, func() ([]byte, any, error) {
		return dr.fetchChunk(id, length)
	})
	if err != nil {
		return nil, err
	}
	return v.([]byte), nil
}

// demandChunk is chunk for a caller's read: the time it waits for a
// chunk that was not in the cache counts in the reader's stats.
func (dr *DiskReader) demandChunk(ctx context.Context, id crypto.ID, length int64) ([]byte, error) {
	dr.mu.Lock()
	v, ok := dr.chunks.get(id)
	dr.mu.Unlock()
	if ok {
		dr.stats.cacheHits.Add(1)
		return v.([]byte), nil
	}
	t := time.Now()
	data, err := dr.chunk(ctx, id, length)
	dr.stats.waits.Add(1)
	dr.stats.waitNanos.Add(int64(time.Since(t)))
	return data, err
}

func (dr *DiskReader) fetchChunk(id crypto.ID, length int64) ([]byte, any, error) {
	if err := dr.acquire(); err != nil {
		return nil, nil, err
	}
	defer dr.release()
	// As restore does: the sealed chunk is read into a recycled buffer,
	// decrypted in place and decoded straight into the chunk's own
	// buffer, the one the cache keeps, so a chunk costs one allocation.
	name := dataName(id)
	bp := dr.sealed.buffer(int(length) + headerSize + crypto.Overhead + 1)
	defer dr.sealed.bufs.Put(bp)
	n, err := backend.GetInto(dr.ctx, dr.r.be, name, *bp)
	if errors.Is(err, backend.ErrTooLarge) {
		err = fmt.Errorf("%w: %w", err, ErrCorrupt)
	}
	if err != nil {
		return nil, nil, dr.damaged(id, fmt.Errorf("%s %s: %w", TypeChunk, name, err))
	}
	dr.stats.fetchedBytes.Add(int64(n))
	dr.stats.chunksFetched.Add(1)
	data := make([]byte, length)
	if err := dr.r.codec.openInto(TypeChunk, name, (*bp)[:n], data); err != nil {
		return nil, nil, dr.damaged(id, err)
	}
	if dr.r.chunkH.Sum(data) != id {
		return nil, nil, dr.damaged(id, fmt.Errorf("chunk %s: content does not match its ID: %w", name, ErrCorrupt))
	}
	return data, data, nil
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
// callers ask at the same time. fetch returns the value and, for chunks,
// the bytes that count against the cache's size (nil counts 1). The fetch
// runs under the reader's lifetime, not a caller's ctx.
func (dr *DiskReader) cached(ctx context.Context, c *lru, id crypto.ID, fetch func() ([]byte, any, error)) (any, error) {
	dr.mu.Lock()
	if v, ok := c.get(id); ok {
		if c == &dr.chunks {
			dr.stats.cacheHits.Add(1)
		}
		dr.mu.Unlock()
		return v, nil
	}
	call, ok := c.inflight[id]
	if ok {
		dr.mu.Unlock()
		select {
		case <-call.done:
			return call.value, call.err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	call = &fetchCall{done: make(chan struct{})}
	c.inflight[id] = call
	dr.mu.Unlock()
	// The fetch runs on its own, so a caller that gives up returns at
	// once while the fetch completes for the cache and other waiters.
	go func() {
		b, v, err := fetch()
		call.value, call.err = v, err
		dr.mu.Lock()
		delete(c.inflight, id)
		if err == nil {
			c.put(id, v, int64(max(len(b), 1)))
		}
		dr.mu.Unlock()
		close(call.done)
	}()
	select {
	case <-call.done:
		return call.value, call.err
	case <-ctx.Done():
		return nil, ctx.Err()
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
	slack := max(256<<10, 4*int64(length))
	if off < dr.seqEnd-slack || off > dr.seqEnd+slack {
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
					dr.chunk(dr.ctx, pc.id, pc.len) // errors surface when the range is read
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

func (c *lru) put(id crypto.ID, v any, cost int64) {
	if e, ok := c.items[id]; ok {
		c.ll.MoveToFront(e)
		return
	}
	c.items[id] = c.ll.PushFront(&lruEntry{id: id, value: v, cost: cost})
	c.size += cost
	for c.size > c.max && c.ll.Len() > 1 {
		e := c.ll.Back()
		le := e.Value.(*lruEntry)
		c.ll.Remove(e)
		delete(c.items, le.id)
		c.size -= le.cost
	}
}
