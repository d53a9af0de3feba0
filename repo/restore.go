package repo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/semaphore"
	"golang.org/x/sys/unix"

	"vmvault/backend"
	"vmvault/chunk"
	"vmvault/crypto"
)

// A restore assembles a window of segments at once and, within them,
// fetches chunks in order while the buffers of the fetches in flight
// (requested, not yet decoded) stay under a byte budget. Over a remote
// backend the budget is the fetch-ahead: a fetch weighs its chunk's
// stored size (from the index, see chunkFetcher), so at 18 MiB and chunks
// stored in 256 KiB on average it keeps dozens of requests in flight,
// spread over every connection; locally it keeps every core decoding.
//
// Window and budget come out of one share of memory, half the soft memory
// limit (cmd/vmvault sets 176 MiB) or restoreMemory without one. The other
// half is room for garbage: a remote backend makes some for every byte it
// fetches (SSH packets, the SFTP library's replies), and a live heap near
// the limit has the collector run without pause. With 9 segment buffers
// of up to 12 MiB and a 32 MiB budget (140 MiB), an SFTP restore ran 1,267
// collections for a 1.75 GiB image and used 60 % more CPU than with 6
// buffers and 20 chunks in flight before; planRestore keeps the two within
// the share.
const (
	restoreMemory  = 72 << 20
	minWindow      = 2 // one segment written while the next is fetched
	maxWindow      = 8
	minFetchBudget = 4 << 20
	maxFetchBudget = 32 << 20
	// listWeight is what a segment list (a few KiB) counts against the
	// budget: it is a request in flight all the same.
	listWeight = 64 << 10
)

// planRestore returns how many segments a restore assembles at once and
// its budget of bytes in flight, for a soft memory limit of limit bytes
// (math.MaxInt64: none) and segments of at most maxSeg bytes: window+1
// segment buffers and the budget fit in half the limit where they can;
// the window is never smaller than minWindow.
func planRestore(limit, maxSeg int64) (window int, budget int64) {
	share := int64(restoreMemory)
	if limit != math.MaxInt64 {
		share = limit / 2
	}
	budget = min(max(share/4, minFetchBudget), maxFetchBudget)
	window = int(min(max((share-budget)/(maxSeg+directAlign)-1, minWindow), maxWindow))
	return window, budget
}

// chunkFetcher is what a restore's chunk fetches share: the budget of
// bytes in flight and the buffers sealed chunks are read into, reused
// from fetch to fetch rather than allocated (and cleared) for each.
//
// stored, when set, gives a chunk's stored size as the index records it:
// a fetch's buffer and weight are then what the chunk takes sealed, not
// what its length allows (about half as much for compressible data, so
// twice the fetches in flight for the same memory). The index is a hint,
// never trusted: the buffer never exceeds what the length allows, and a
// chunk larger than its index entry says is read again into that.
type chunkFetcher struct {
	budget *semaphore.Weighted
	size   int64 // the budget's bytes
	bufs   sealedPool
	stored func(crypto.ID) (int64, bool)
}

func newChunkFetcher(budget int64) *chunkFetcher {
	return &chunkFetcher{budget: semaphore.NewWeighted(budget), size: budget}
}

// sealedSize is the buffer GetInto needs for a chunk of length bytes:
// sealed, a chunk is at most its length plus the header and the AEAD's
// overhead (compressed only when smaller), and a buffer the object fills
// proves it too large.
func sealedSize(length int) int { return length + headerSize + crypto.Overhead + 1 }

// weight is what a fetch into a buffer of n bytes takes from the budget:
// the buffer's whole capacity, so the budget bounds the memory in flight.
func (f *chunkFetcher) weight(n int) int64 {
	return min(int64(sealedClass(n)*sealedStep), f.size)
}

// buffer returns a pooled buffer of n bytes; put it back with f.bufs.put.
func (f *chunkFetcher) buffer(n int) *[]byte { return f.bufs.get(n) }

// sealedStep is the size step of sealedPool's classes.
const sealedStep = 256 << 10

// sealedClasses covers every buffer a chunk of at most chunk.MaxSize needs.
const sealedClasses = (chunk.MaxSize+headerSize+crypto.Overhead+1+sealedStep-1)/sealedStep + 1

// sealedClass is the class of a buffer of n bytes: its capacity in
// sealedSteps.
func sealedClass(n int) int { return (n + sealedStep - 1) / sealedStep }

// sealedPool recycles buffers by size class: a buffer is reused only for
// a request of its own class. One pool of mixed sizes hands large buffers
// to small chunks, so the memory it holds creeps above what the budget
// counts, and drops the small ones it finds too short for a large chunk,
// which is garbage.
type sealedPool struct {
	classes [sealedClasses]sync.Pool // *[]byte
}

func (p *sealedPool) get(n int) *[]byte {
	c := sealedClass(n)
	if c < len(p.classes) {
		if bp, _ := p.classes[c].Get().(*[]byte); bp != nil {
			*bp = (*bp)[:n]
			return bp
		}
	}
	b := make([]byte, n, c*sealedStep)
	return &b
}

// put returns a buffer from get to its class.
func (p *sealedPool) put(bp *[]byte) {
	if c := cap(*bp) / sealedStep; cap(*bp)%sealedStep == 0 && c < len(p.classes) {
		p.classes[c].Put(bp)
	}
}

// restoredSegment is one segment, authenticated, ready to write. data is
// nil for an all-zero segment.
type restoredSegment struct {
	index int
	off   int64
	size  int64
	data  []byte
	buf   []byte // the pooled buffer data lies in
}

// alignedFor returns size bytes inside raw (grown if too small) placed so
// that their address is congruent to off modulo directAlign: then a page
// of the file and a page of memory line up, whatever the segment's start,
// and the aligned middle of any run can be written with O_DIRECT. raw is
// returned for the pool.
func alignedFor(raw []byte, off int64, size int) (data, pooled []byte) {
	if cap(raw) < size+directAlign {
		raw = make([]byte, size+directAlign)
	}
	raw = raw[:cap(raw)]
	addr := uint64(uintptr(unsafe.Pointer(unsafe.SliceData(raw))))
	k := int((uint64(off)%directAlign + directAlign - addr%directAlign) % directAlign)
	return raw[k : k+size], raw
}

// fetchSegment assembles segment i of d, authenticated before it is
// returned: nothing unauthenticated leaves here. The segment list is
// sealed under its name, the segment ID (which the image digest covers);
// each chunk is sealed under its name and checked against its keyed chunk
// ID. Hashing chunks rather than the assembled segment skips the segment's
// zero runs: a sparse image's partly empty segments cost only their data.
// Chunks are decoded straight into buf; every request first takes its
// weight from the fetcher's budget, in order.
func (r *Repository) fetchSegment(ctx context.Context, d *Disk, i int, buf []byte, f *chunkFetcher) (restoredSegment, error) {
	seg := restoredSegment{index: i, off: d.segmentStart(i), size: d.segmentLen(i)}
	id, zero := d.SegmentID(i)
	if zero {
		return seg, nil
	}
	if err := f.budget.Acquire(ctx, listWeight); err != nil {
		return seg, err
	}
	raw, err := r.getData(ctx, TypeSegment, id)
	f.budget.Release(listWeight)
	if err != nil {
		return seg, err
	}
	entries, err := decodeSegmentList(raw)
	if err != nil {
		return seg, fmt.Errorf("segment %s: %w", dataName(id), err)
	}
	var total int64
	for _, e := range entries {
		total += int64(e.Length)
	}
	if total != seg.size {
		return seg, fmt.Errorf("segment %s: lists %d bytes, expected %d: %w", dataName(id), total, seg.size, ErrCorrupt)
	}
	buf = buf[:seg.size]
	g, gctx := errgroup.WithContext(ctx)
	var off int64
	for _, e := range entries {
		part := buf[off : off+int64(e.Length)]
		off += int64(e.Length)
		if e.Zero {
			clear(part)
			continue
		}
		size := sealedSize(int(e.Length))
		hinted := false
		if f.stored != nil {
			if n, ok := f.stored(e.ID); ok && n < int64(size)-1 {
				size, hinted = int(n)+1, true
			}
		}
		w := f.weight(size)
		if f.budget.Acquire(gctx, w) != nil {
			break // g.Wait or ctx says why
		}
		g.Go(func() error {
			defer f.budget.Release(w)
			name := dataName(e.ID)
			bp := f.buffer(size)
			defer func() { f.bufs.put(bp) }()
			n, err := backend.GetInto(gctx, r.be, name, *bp)
			if errors.Is(err, backend.ErrTooLarge) && hinted {
				// The index understates the chunk: read it again
				// into what its length allows (outside the budget,
				// which only a damaged or forged index costs).
				f.bufs.put(bp)
				bp = f.buffer(sealedSize(int(e.Length)))
				n, err = backend.GetInto(gctx, r.be, name, *bp)
			}
			if errors.Is(err, backend.ErrTooLarge) {
				err = fmt.Errorf("%w: %w", err, ErrCorrupt)
			}
			if err != nil {
				return fmt.Errorf("%s %s: %w", TypeChunk, name, err)
			}
			if err := r.codec.openInto(TypeChunk, name, (*bp)[:n], part); err != nil {
				return err
			}
			if r.chunkH.Sum(part) != e.ID {
				return fmt.Errorf("chunk %s: content does not match its ID: %w", name, ErrCorrupt)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return seg, err
	}
	if err := ctx.Err(); err != nil {
		return seg, err
	}
	seg.data = buf
	return seg, nil
}

// restoreSegments fetches d's segments with several workers and hands them
// to emit: strictly in order from one goroutine when inOrder is set (a
// stream), else from the workers as each segment is ready (positional
// writes), so writing runs on every core. emit must not keep seg.data.
func (r *Repository) restoreSegments(ctx context.Context, d *Disk, inOrder bool, emit func(restoredSegment) error) error {
	if err := r.resolveSegments(ctx, d); err != nil {
		return err
	}
	id := imageDigest(r.imageH, d.Size, d.SegmentSize, d.Segments, d.segmentLens())
	if HexID(id) != d.Digest {
		return fmt.Errorf("disk %s: segment list does not match the image digest: %w", d.Name, ErrCorrupt)
	}
	n := d.segmentCount()
	var maxSeg int64
	for i := range n {
		maxSeg = max(maxSeg, d.segmentLen(i))
	}
	nw, budget := planRestore(debug.SetMemoryLimit(-1), maxSeg)
	fetcher := newChunkFetcher(budget)
	if ix, err := r.LoadIndex(ctx); err == nil {
		fetcher.stored = func(id crypto.ID) (int64, bool) {
			e, ok := ix.Lookup(id)
			return int64(e.Size), ok && e.Type == TypeChunk
		}
	} else if ctx.Err() == nil {
		// Sizes are only a hint: restore without them.
		r.log.Debug("restore without the index's stored sizes", "err", err)
	}
	parent := ctx
	g, ctx := errgroup.WithContext(ctx)
	// Free segment buffers, allocated on first use to fit every segment
	// of the disk: at most nw+1 exist.
	free := make(chan []byte, nw+1)
	for range nw + 1 {
		free <- nil
	}
	segBuffer := func() []byte {
		if buf := <-free; buf != nil {
			return buf
		}
		return make([]byte, maxSeg+directAlign)
	}
	// One result slot per segment in flight; the window bounds memory to
	// nw+1 segment buffers.
	var results []chan restoredSegment
	if inOrder {
		results = make([]chan restoredSegment, n)
		for i := range results {
			results[i] = make(chan restoredSegment, 1)
		}
	}
	window := make(chan struct{}, nw)
	next := make(chan int)
	g.Go(func() error {
		defer close(next)
		for i := range n {
			select {
			case window <- struct{}{}:
			case <-ctx.Done():
				return ctx.Err()
			}
			select {
			case next <- i:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	})
	// Unordered: fetch workers hand segments to writers, so a worker
	// never waits for the disk while it could be fetching (over SFTP the
	// fetches are what keeps the restore busy). A fetched segment gives
	// its place in the window back at once: the window bounds the
	// segments being fetched, the nw+1 buffers those fetched and not yet
	// written. When a segment kept its place until written, the fetch
	// workers of a restore of image A into a new file sat idle, waiting
	// for a place, 3.5 s of a 5.8 s restore (a trace on a busy host),
	// against almost never into /dev/null. writeq holds at most nw
	// segments. There are twice as many writers as cores: a write waits
	// for the device while the cores decode.
	type queuedSegment struct {
		seg restoredSegment
		buf []byte // back to free once written
	}
	writeq := make(chan queuedSegment, nw)
	var fetching sync.WaitGroup
	if !inOrder {
		fetching.Add(nw)
		g.Go(func() error {
			fetching.Wait()
			close(writeq)
			return nil
		})
		for range 2 * workers() {
			g.Go(func() error {
				// Drain even after a failure elsewhere, writing nothing
				// more, so no fetch worker waits on a full queue.
				for q := range writeq {
					var err error
					if ctx.Err() == nil {
						err = emit(q.seg)
					}
					free <- q.buf
					if err != nil {
						return err
					}
				}
				return nil
			})
		}
	}
	for range nw {
		g.Go(func() error {
			if !inOrder {
				defer fetching.Done()
			}
			for i := range next {
				data, buf := alignedFor(segBuffer(), d.segmentStart(i), int(d.segmentLen(i)))
				seg, err := r.fetchSegment(ctx, d, i, data, fetcher)
				seg.buf = buf
				if err != nil {
					return fmt.Errorf("restore %s at offset %d: %w", d.Name, seg.off, err)
				}
				if !inOrder {
					<-window
					writeq <- queuedSegment{seg, buf}
					continue
				}
				if seg.data == nil {
					free <- buf
				}
				results[i] <- seg
			}
			return nil
		})
	}
	g.Go(func() error {
		for i := range len(results) {
			var seg restoredSegment
			select {
			case seg = <-results[i]:
			case <-ctx.Done():
				return ctx.Err()
			}
			err := emit(seg)
			if seg.data != nil {
				free <- seg.buf
			}
			<-window
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return err
	}
	// A cancelled restore is never a finished one, whichever goroutine
	// noticed first.
	return parent.Err()
}

// RestoreStats counts what a restore wrote.
type RestoreStats struct {
	Bytes   int64 `json:"bytes"`   // image size
	Written int64 `json:"written"` // bytes actually written to the target
	Skipped int64 `json:"skipped"` // bytes already equal (or holes)
	// Zeroed counts the bytes of all-zero segments a block device
	// zeroed itself (write-zeroes), without their being read back and
	// compared first.
	Zeroed int64 `json:"zeroed"`
}

// Restore streams disk d of manifest m to w, in order. Every segment is
// authenticated before any of it is written.
func (r *Repository) Restore(ctx context.Context, m *Manifest, diskName string, w io.Writer) (RestoreStats, error) {
	d, err := m.Disk(diskName)
	if err != nil {
		return RestoreStats{}, err
	}
	var st RestoreStats
	zeros := make([]byte, 1<<20)
	err = r.restoreSegments(ctx, d, true, func(seg restoredSegment) error {
		if seg.data != nil {
			if _, err := w.Write(seg.data); err != nil {
				return fmt.Errorf("write output: %w", err)
			}
		} else {
			for left := seg.size; left > 0; {
				k := min(left, int64(len(zeros)))
				if _, err := w.Write(zeros[:k]); err != nil {
					return fmt.Errorf("write output: %w", err)
				}
				left -= k
			}
		}
		st.Bytes += seg.size
		st.Written += seg.size
		return nil
	})
	return st, err
}

// compareBlock is the unit in which an existing target is compared and
// rewritten, and in which zeros become holes.
const compareBlock = chunk.ZeroBlock

// ErrTargetIncomplete marks a restore into a target that stopped before
// the whole image was written: the target holds a mix of old and restored
// data and must not be used.
var ErrTargetIncomplete = errors.New("target is incomplete")

// RestoreTo writes disk d of manifest m into target (a file, created if
// missing, or a block device) in place: ranges that already hold the right
// bytes are not written, and zero ranges of a regular file become holes.
// Only a restore that returns nil has written the whole image; any error
// wraps ErrTargetIncomplete, and an existing larger file is cut to the
// image's size only after the image is complete.
func (r *Repository) RestoreTo(ctx context.Context, m *Manifest, diskName, target string) (RestoreStats, error) {
	d, err := m.Disk(diskName)
	if err != nil {
		return RestoreStats{}, err
	}
	f, err := os.OpenFile(target, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return RestoreStats{}, fmt.Errorf("open target: %w", err)
	}
	defer f.Close()
	st, err := r.restoreInto(ctx, d, f, target)
	if err == nil {
		err = f.Close()
	}
	if err != nil {
		return st, fmt.Errorf("%w: %s: %w", ErrTargetIncomplete, target, err)
	}
	return st, nil
}

// RestoreToFile is RestoreTo into f, a file or block device already open
// for reading and writing, which stays open; name is what errors call it.
// The CLI restores to stdout this way when stdout is a new, empty file
// (`restore … > disk.raw`): holes, direct writes and the sync as with
// --target, instead of a stream of every zero through the page cache.
func (r *Repository) RestoreToFile(ctx context.Context, m *Manifest, diskName string, f *os.File, name string) (RestoreStats, error) {
	d, err := m.Disk(diskName)
	if err != nil {
		return RestoreStats{}, err
	}
	st, err := r.restoreInto(ctx, d, f, name)
	if err != nil {
		return st, fmt.Errorf("%w: %s: %w", ErrTargetIncomplete, name, err)
	}
	return st, nil
}

// restoreInto writes d into f in place and syncs it; f stays open. A
// successful return means the image is on stable storage as far as the
// kernel can tell: fsync has returned for f.
func (r *Repository) restoreInto(ctx context.Context, d *Disk, f *os.File, target string) (RestoreStats, error) {
	fi, err := f.Stat()
	if err != nil {
		return RestoreStats{}, err
	}
	tw := &targetWriter{f: f, regular: fi.Mode().IsRegular(), zeros: make([]byte, 1<<20), slots: make(chan struct{}, writeDepth), hook: r.beforeDirectWrite}
	// A second descriptor with O_DIRECT takes the aligned writes: no copy
	// into the page cache (which cost more than all decryption did) and no
	// flood of dirty pages for the final fsync to write. It is opened
	// through /proc, so it is the very file f is, whatever name f was
	// opened by (stdout has none). Where the file system refuses O_DIRECT,
	// everything goes through f.
	if df, err := os.OpenFile(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), os.O_RDWR|unix.O_DIRECT, 0); err == nil {
		tw.direct = df
		defer df.Close()
	}
	if tw.regular {
		tw.oldSize = fi.Size()
		// Grow now (a hole); shrink only once the image is complete, so
		// a failed restore never leaves a larger file silently cut.
		if tw.oldSize < d.Size {
			if err := f.Truncate(d.Size); err != nil {
				return RestoreStats{}, fmt.Errorf("size target: %w", err)
			}
		}
	} else {
		size, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			return RestoreStats{}, fmt.Errorf("target size: %w", err)
		}
		if size < d.Size {
			return RestoreStats{}, fmt.Errorf("target %s holds %d bytes, the image needs %d", target, size, d.Size)
		}
		tw.oldSize = size
	}
	if tw.regular && tw.direct != nil {
		if err := r.resolveSegments(ctx, d); err != nil {
			return RestoreStats{}, err
		}
		tw.preallocate(d)
	}
	if err := r.restoreSegments(ctx, d, false, tw.write); err != nil {
		return tw.st, err
	}
	for _, h := range tw.holes {
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, h[0], h[1]); err != nil {
			return tw.st, fmt.Errorf("punch hole at %d in target: %w", h[0], err)
		}
	}
	if tw.regular && tw.oldSize > d.Size {
		if err := f.Truncate(d.Size); err != nil {
			return tw.st, fmt.Errorf("size target: %w", err)
		}
	}
	if err := f.Sync(); err != nil {
		return tw.st, fmt.Errorf("sync target: %w", err)
	}
	return tw.st, nil
}

// targetWriter writes restored segments into a file or block device in
// place, in few large system calls: the existing content of a segment is
// read back in one pread (never beyond the target's old size: there it
// is a hole, known to be zero), runs of differing data are written with
// one pwrite each, runs of zeros punched as one hole. Segments don't
// overlap, so write is called from every restore worker at once: the
// copy into the page cache, which dominates a restore into a new file,
// runs on every core.
type targetWriter struct {
	f       *os.File
	regular bool
	oldSize int64     // bytes of the target that existed before the restore
	cur     sync.Pool // *[]byte read-back buffers
	zeros   []byte    // read-only
	// direct is the target opened with O_DIRECT, or nil; noDirect is set
	// once it refused a write.
	direct   *os.File
	noDirect atomic.Bool
	// slots holds a token for each direct write in flight, at most
	// writeDepth.
	slots chan struct{}
	hook  func() // Repository.beforeDirectWrite
	// preallocated is set when the file's new part was allocated ahead
	// (see preallocate); then the zero runs written into it are listed
	// in holes, to be punched once the image is complete.
	preallocated bool
	holes        [][2]int64 // offset, length
	// noPunch is set once the block device refused to zero a range
	// itself (see punchDevice).
	noPunch atomic.Bool

	mu sync.Mutex
	st RestoreStats
}

// blockAction is what one compareBlock of the target needs.
type blockAction byte

const (
	blockKeep  blockAction = iota // already right
	blockWrite                    // write restored data
	blockZero                     // make zero: punch a hole or write zeros
)

func (tw *targetWriter) write(seg restoredSegment) error {
	var st RestoreStats
	defer func() {
		tw.mu.Lock()
		tw.st.Bytes += st.Bytes
		tw.st.Written += st.Written
		tw.st.Skipped += st.Skipped
		tw.st.Zeroed += st.Zeroed
		tw.mu.Unlock()
	}()
	st.Bytes = seg.size
	if seg.data == nil && !tw.regular {
		ok, err := tw.punchDevice(seg.off, seg.size)
		if err != nil {
			return err
		}
		if ok {
			st.Zeroed += seg.size
			return nil
		}
	}
	// cur is the target's present content of the segment; nil where
	// beyond the old size (a hole).
	known := max(0, min(seg.size, tw.oldSize-seg.off))
	var cur []byte
	if known > 0 {
		bp, _ := tw.cur.Get().(*[]byte)
		if bp == nil || int64(cap(*bp)) < known+3*directAlign {
			b := make([]byte, known+3*directAlign)
			bp = &b
		}
		defer tw.cur.Put(bp)
		var err error
		if cur, err = tw.readBack(*bp, seg.off, known); err != nil {
			return err
		}
	}
	action := func(off, k int64) blockAction {
		var want []byte
		if seg.data != nil {
			want = seg.data[off : off+k]
		}
		wantZero := want == nil || chunk.IsZero(want)
		var have []byte
		if off < known {
			have = cur[off:min(off+k, known)]
		}
		switch {
		case wantZero && (have == nil || chunk.IsZero(have)):
			return blockKeep
		case wantZero:
			return blockZero
		case int64(len(have)) == k && bytes.Equal(have, want):
			return blockKeep
		}
		return blockWrite
	}
	// Walk the blocks, flushing each run of equal actions at once. The
	// direct writes of a run go on while the walk goes on; the segment's
	// buffer is free only once they all have ended.
	var pending errgroup.Group
	runStart, runAct := int64(0), blockKeep
	flush := func(end int64) error {
		if end <= runStart {
			return nil
		}
		k := end - runStart
		pos := seg.off + runStart
		switch runAct {
		case blockKeep:
			st.Skipped += k
			if from := max(runStart, known); tw.preallocated && from < end {
				tw.mu.Lock()
				tw.holes = append(tw.holes, [2]int64{seg.off + from, end - from})
				tw.mu.Unlock()
			}
			return nil
		case blockWrite:
			if err := tw.writeAt(seg.data[runStart:end], pos, &pending); err != nil {
				return err
			}
		case blockZero:
			if err := tw.zero(pos, k); err != nil {
				return err
			}
		}
		st.Written += k
		return nil
	}
	walk := func() error {
		for off := int64(0); off < seg.size; off += compareBlock {
			a := action(off, min(compareBlock, seg.size-off))
			if a != runAct {
				if err := flush(off); err != nil {
					return err
				}
				runStart, runAct = off, a
			}
		}
		return flush(seg.size)
	}
	err := walk()
	if werr := pending.Wait(); err == nil {
		err = werr
	}
	return err
}

// readBack reads the target's k bytes at off into buf (which has room for
// k bytes and three pages more) and returns them. The pages covering the
// range are read with O_DIRECT where the target allows it: a block
// device's whole content is read back, and through the page cache that
// would be a copy of every byte the restore then does not even write
// (and a device's worth of cached pages). The unaligned remainder, or
// everything where O_DIRECT is refused, is read through f.
func (tw *targetWriter) readBack(buf []byte, off, k int64) ([]byte, error) {
	if tw.direct != nil && !tw.noDirect.Load() {
		start := off / directAlign * directAlign
		end := (off + k + directAlign - 1) / directAlign * directAlign
		page, _ := alignedFor(buf, start, int(end-start))
		n, err := tw.direct.ReadAt(page, start)
		if err == nil || errors.Is(err, io.EOF) {
			// A short read ends at the target's end: the tail of a
			// device whose size is not a multiple of a page.
			cur := page[off-start : off-start+k]
			if got := int64(n) - (off - start); got < k {
				if err := tw.readBuffered(cur[max(got, 0):], off+max(got, 0)); err != nil {
					return nil, err
				}
			}
			return cur, nil
		}
		if !errors.Is(err, unix.EINVAL) {
			return nil, fmt.Errorf("read target at %d: %w", start, err)
		}
	}
	cur := buf[:k]
	return cur, tw.readBuffered(cur, off)
}

func (tw *targetWriter) readBuffered(p []byte, off int64) error {
	if _, err := tw.f.ReadAt(p, off); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read target at %d: %w", off, err)
	}
	return nil
}

// directAlign is the alignment O_DIRECT needs of offsets, lengths and
// buffer addresses: a page, which covers 512- and 4096-byte sectors.
const directAlign = 4096

// writeAt writes p at pos: the page-aligned middle with O_DIRECT (when
// memory and file offset are aligned alike, see alignedFor), the partial
// pages at either end through the page cache. A page is thus either
// wholly written directly or touched only by buffered writes (runs never
// overlap), so the two paths never disagree about a page's content.
//
// The direct middle goes out in pieces of writePiece bytes, each its own
// write in flight (see directWrite), added to pending: p must stay
// untouched until pending.Wait has returned.
func (tw *targetWriter) writeAt(p []byte, pos int64, pending *errgroup.Group) error {
	if tw.direct != nil && !tw.noDirect.Load() {
		head := int((directAlign - pos%directAlign) % directAlign)
		mid := (len(p) - head) / directAlign * directAlign
		addr := uintptr(unsafe.Pointer(unsafe.SliceData(p)))
		if head < len(p) && mid > 0 && (addr+uintptr(head))%directAlign == 0 {
			if err := tw.buffered(p[:head], pos); err != nil {
				return err
			}
			for k := head; k < head+mid; k += writePiece {
				tw.directWrite(p[k:min(k+writePiece, head+mid)], pos+int64(k), pending)
			}
			return tw.buffered(p[head+mid:], pos+int64(head+mid))
		}
	}
	return tw.buffered(p, pos)
}

// A restore keeps up to writeDepth direct writes of writePiece bytes in
// flight, from every segment being written. With one write per run, a
// segment's write was one request after another at the device, at most
// one per writer (four on two cores), and the segment held its buffer
// until the last of them; in pieces, every segment being written has all
// of its pieces queued at once. A write blocks a thread, not a core. On
// this host's virtio disk the device itself took 1.8 GB into allocated
// blocks at 1.5-2 GB/s both ways (12 MiB writes four at a time, 1 MiB
// writes sixteen at a time); whole restores into a new file did not
// measurably change (docs/performance.md, session 12).
const (
	writePiece = 1 << 20
	writeDepth = 16
)

// directWrite starts writing p (whole pages, page-aligned in memory and
// file alike) at pos with O_DIRECT once one of the writeDepth slots is
// free, and adds it to pending. Where the file system refuses the direct
// write after all, p goes through the page cache, and so does every
// write after it.
func (tw *targetWriter) directWrite(p []byte, pos int64, pending *errgroup.Group) {
	tw.slots <- struct{}{}
	pending.Go(func() error {
		if tw.hook != nil {
			tw.hook()
		}
		_, err := tw.direct.WriteAt(p, pos)
		<-tw.slots
		switch {
		case errors.Is(err, unix.EINVAL):
			tw.noDirect.Store(true)
			return tw.buffered(p, pos)
		case err != nil:
			return fmt.Errorf("write target at %d: %w", pos, err)
		}
		return nil
	})
}

// preallocate gives the blocks of every segment of d that is not all
// zero, beyond the target's old size, before the restore writes: ext4
// (and XFS) serialise direct writes into holes under the file's
// exclusive lock, one at a time, while writes into allocated blocks (even
// not yet written ones) run in parallel. Allocating during the restore
// instead, per write, would stall every write in flight each time (the
// file system waits for them before it allocates). On this host's disk,
// four 4 MiB writers put 2 GB into holes in 1.85-2.26 s, into allocated
// ranges in 1.34-1.48 s. The zero runs inside those segments are punched
// out again once the image is complete, so holes stay holes. Where the
// file system cannot allocate ahead, or has no room for it, the restore
// writes into holes as before (a full disk is then reported by the write
// that does not fit).
func (tw *targetWriter) preallocate(d *Disk) {
	fd := int(tw.direct.Fd())
	var start, end int64 // the run of data segments being gathered
	flush := func() bool {
		if end <= start {
			return true
		}
		// Set before the call: a call that fails may have allocated
		// part of the range all the same.
		tw.preallocated = true
		return unix.Fallocate(fd, unix.FALLOC_FL_KEEP_SIZE, start, end-start) == nil
	}
	for i := range d.segmentCount() {
		from, to := max(d.segmentStart(i), tw.oldSize), d.segmentStart(i)+d.segmentLen(i)
		if _, zero := d.SegmentID(i); zero || from >= to {
			continue
		}
		if from != end {
			if !flush() {
				return
			}
			start = from
		}
		end = to
	}
	flush()
}

func (tw *targetWriter) buffered(p []byte, pos int64) error {
	if len(p) == 0 {
		return nil
	}
	if _, err := tw.f.WriteAt(p, pos); err != nil {
		return fmt.Errorf("write target at %d: %w", pos, err)
	}
	return nil
}

// zero makes [pos, pos+k) of the target zero: a hole in a regular file;
// on a block device the kernel zeroes it (unmapping it where the device
// can, as a thin LV does), without a byte of zeros passing through here;
// written zeros where neither is supported.
func (tw *targetWriter) zero(pos, k int64) error {
	fd := int(tw.f.Fd())
	if tw.regular {
		if unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, pos, k) == nil {
			return nil
		}
		return tw.writeZeros(pos, k)
	}
	// A device zeroes whole pages only: the kernel drops its cached
	// pages of the range, and a partial one would lose the bytes a
	// neighbouring run wrote there. The ends are written.
	head := (directAlign - pos%directAlign) % directAlign
	mid := max(k-head, 0) / directAlign * directAlign
	if mid > 0 {
		// Any failure to punch leaves ZERO_RANGE to try.
		punched, _ := tw.punchDevice(pos+head, mid)
		if !punched && unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, pos+head, mid) != nil {
			return tw.writeZeros(pos, k)
		}
		if err := tw.writeZeros(pos, head); err != nil {
			return err
		}
		return tw.writeZeros(pos+head+mid, k-head-mid)
	}
	return tw.writeZeros(pos, k)
}

// punchDevice asks the block device to zero the whole pages [pos, pos+k)
// itself (fallocate PUNCH_HOLE: the kernel's write-zeroes, which never
// falls back to writing zeros), and reports whether it did; after one
// refusal it no longer asks. write uses it for all-zero segments, which
// are then neither read back nor compared: a device with write-zeroes (a
// loop device, NVMe, a partition or linear LV over one) zeroes a range
// without moving a byte, where reading it back moves every byte (image A
// onto a loop device over /dev/shm read 4,096 MiB back, 2.3 GiB of them
// zeros). On a device without it the segment is read back and only what
// is not zero is zeroed (which keeps a thin LV's blocks that read as
// zeros unallocated).
func (tw *targetWriter) punchDevice(pos, k int64) (bool, error) {
	if pos%directAlign != 0 || k%directAlign != 0 || tw.noPunch.Load() {
		return false, nil
	}
	err := unix.Fallocate(int(tw.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, pos, k)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOTTY):
		tw.noPunch.Store(true)
		return false, nil
	}
	return false, fmt.Errorf("zero target at %d: %w", pos, err)
}

// writeZeros writes k zero bytes at pos.
func (tw *targetWriter) writeZeros(pos, k int64) error {
	for k > 0 {
		n := min(k, int64(len(tw.zeros)))
		if _, err := tw.f.WriteAt(tw.zeros[:n], pos); err != nil {
			return fmt.Errorf("write target at %d: %w", pos, err)
		}
		pos += n
		k -= n
	}
	return nil
}
