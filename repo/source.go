package repo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"syscall"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"vmvault/backend/limit"
	"vmvault/chunk"
)

// readPiece is the largest single pread of a parallel read: small enough
// that a window is shared among the readers, large enough that syscalls
// cost nothing next to the copy.
const readPiece = 2 << 20

// imageReader reads a disk image window by window. A source that is an
// io.ReaderAt of known size (a file, a block device) is read with pread
// from several goroutines; if it is also an io.Seeker that supports
// SEEK_DATA/SEEK_HOLE (a file on Linux), holes are never read: they are
// zeros by definition. Any other source is read sequentially as a stream.
//
// A file or block device is mapped instead where possible (mapWindow): the
// window's data pages are made present by MADV_POPULATE_READ from several
// goroutines, which reads what is not cached and reports I/O errors as
// errors, and the workers hash, chunk and compress the page cache's own
// pages. That saves copying every byte into a buffer, which was the larger
// part of an incremental backup's CPU time (docs/performance.md). A
// window's holes go with it as chunk.Hole ranges, which the segment cut
// and the zero-run search skip without reading them.
type imageReader struct {
	src     DiskSource
	ra      io.ReaderAt // nil: a stream
	seeker  io.Seeker   // nil: no hole information
	fd      int         // mappable file or device; -1: read into buffers
	file    *os.File    // a regular file, whose size can change under us
	readers int
	eof     bool          // a stream ended
	read    int64         // bytes really read from the source
	limit   *limit.Bucket // paces reads; nil: unlimited
}

func newImageReader(src DiskSource, readers int) *imageReader {
	ir := &imageReader{src: src, readers: readers, fd: -1}
	if ra, ok := src.Reader.(io.ReaderAt); ok && src.Size >= 0 {
		ir.ra = ra
		if s, ok := src.Reader.(io.Seeker); ok {
			ir.seeker = s
		}
		if f, ok := src.Reader.(*os.File); ok {
			if fi, err := f.Stat(); err == nil && (fi.Mode().IsRegular() || fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0) {
				ir.fd = int(f.Fd())
				if fi.Mode().IsRegular() {
					ir.file = f
				}
			}
		}
	}
	return ir
}

// mappable reports whether windows of the source can be mapped: then the
// caller never carries a window's tail into a buffer, it maps the next
// window from where the segment ended.
func (ir *imageReader) mappable() bool { return ir.fd >= 0 }

// mapWindow maps n bytes of the image at off read-only and makes its data
// present; holes returns the window's holes (relative to off), which are
// zeros and must not be read: a read of a hole's page in the mapping
// would make the kernel allocate and clear a page for it. ok is false,
// with nothing mapped, when the window is all holes, or the source turns
// out not to be mappable (then mappable is false from now on). The caller
// owns mem and releases it with unmapWindow.
func (ir *imageReader) mapWindow(ctx context.Context, off int64, n int) (mem []byte, holes []chunk.Hole, ok bool, err error) {
	page := os.Getpagesize()
	if ir.fd < 0 || n == 0 || off%int64(page) != 0 {
		return nil, nil, false, nil
	}
	spans := ir.dataSpans(off, off+int64(n))
	if len(spans) == 0 {
		return nil, nil, false, nil
	}
	if ir.shorter(off + int64(n)) {
		// Touching a mapping past the end of a file is a fault: a file
		// shorter than announced is read into a buffer, which reports it.
		return nil, nil, false, nil
	}
	mem, err = unix.Mmap(ir.fd, off, n, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		ir.fd = -1
		return nil, nil, false, nil
	}
	at := 0
	for _, s := range spans {
		if a := int(s.off - off); a > at {
			holes = append(holes, chunk.Hole{Off: at, End: a})
		}
		at = int(s.end - off)
	}
	if at < n {
		holes = append(holes, chunk.Hole{Off: at, End: n})
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(ir.readers)
	for _, s := range spans {
		// madvise wants a page-aligned start; a data span starts on a
		// file system block, so this reaches back into a hole only where
		// a file system's blocks are smaller than a page.
		start := int(s.off-off) &^ (page - 1)
		for p := start; p < int(s.end-off); p += readPiece {
			part := mem[p:min(p+readPiece, int(s.end-off))]
			g.Go(func() error {
				if err := ir.limit.Wait(gctx, len(part)); err != nil {
					return err
				}
				if err := unix.Madvise(part, unix.MADV_POPULATE_READ); err != nil {
					if errors.Is(err, syscall.EINVAL) {
						return errNoPopulate
					}
					return fmt.Errorf("read %s at offset %d: %w", ir.src.Source, off+int64(p), err)
				}
				return nil
			})
		}
	}
	if err := g.Wait(); err != nil {
		unix.Munmap(mem)
		if errors.Is(err, errNoPopulate) {
			// A kernel before 5.14: read into buffers.
			ir.fd = -1
			return nil, nil, false, nil
		}
		return nil, nil, false, err
	}
	return mem, holes, true, nil
}

// holeBytes returns how many bytes holes cover.
func holeBytes(holes []chunk.Hole) int64 {
	var k int64
	for _, h := range holes {
		k += int64(h.End - h.Off)
	}
	return k
}

// clipHoles returns the holes that start within the first n bytes, the
// last one cut at n.
func clipHoles(holes []chunk.Hole, n int) []chunk.Hole {
	var out []chunk.Hole
	for _, h := range holes {
		if h.Off >= n {
			break
		}
		out = append(out, chunk.Hole{Off: h.Off, End: min(h.End, n)})
	}
	return out
}

// errNoPopulate means the kernel does not know MADV_POPULATE_READ.
var errNoPopulate = errors.New("madvise populate not supported")

// unmapWindow releases a window from mapWindow.
func unmapWindow(mem []byte) {
	if err := unix.Munmap(mem); err != nil {
		// Only for a slice that is not a mapping: a bug, not bad input.
		panic(fmt.Sprintf("unmap segment window: %v", err))
	}
}

// errSourceFault is a memory fault while reading a mapped window: the
// source shrank, or its device failed after the window was made present
// (pages reclaimed and read again).
var errSourceFault = errors.New("source failed while mapped")

// catchFault makes a memory fault in the calling goroutine a panic instead
// of a crash, and turns that panic into *err. Use it as
//
//	defer catchFault(src, &err)()
//
// in every goroutine that touches a mapped window.
func catchFault(src string, err *error) func() {
	old := debug.SetPanicOnFault(true)
	return func() {
		debug.SetPanicOnFault(old)
		if r := recover(); r != nil {
			if f, ok := r.(interface{ Addr() uintptr }); ok {
				*err = fmt.Errorf("read %s: memory fault at %#x: %w", src, f.Addr(), errSourceFault)
				return
			}
			panic(r)
		}
	}
}

// span is a byte range [off, end) of the image.
type span struct{ off, end int64 }

// dataSpans returns the parts of [off, end) that may hold data; the rest
// are holes. Without hole information, or when the source refuses
// SEEK_DATA, all of it is data.
func (ir *imageReader) dataSpans(off, end int64) []span {
	if ir.seeker == nil {
		return []span{{off, end}}
	}
	var out []span
	for off < end {
		d, err := ir.seeker.Seek(off, unix.SEEK_DATA)
		if errors.Is(err, syscall.ENXIO) {
			break // no data from off to the end of the file
		}
		if err != nil {
			// Not supported here: read everything from now on.
			ir.seeker = nil
			return append(out, span{off, end})
		}
		if d >= end {
			break
		}
		h, err := ir.seeker.Seek(d, unix.SEEK_HOLE)
		if err != nil {
			ir.seeker = nil
			return append(out, span{d, end})
		}
		h = min(h, end)
		if h <= d {
			// A file that changes under us; read rather than guess.
			return append(out, span{d, end})
		}
		out = append(out, span{d, h})
		off = h
	}
	return out
}

// dataBytes returns how many bytes of [off, end) are not holes.
func (ir *imageReader) dataBytes(off, end int64) int64 {
	var n int64
	for _, s := range ir.dataSpans(off, end) {
		n += s.end - s.off
	}
	return n
}

// isHole reports whether [off, off+n) holds no data at all.
func (ir *imageReader) isHole(off, n int64) bool {
	return ir.seeker != nil && !ir.shorter(off+n) && len(ir.dataSpans(off, off+n)) == 0
}

// shorter reports whether a regular file now ends before end: it shrank
// after its size was taken, and SEEK_DATA would call what is missing a
// hole (zeros) instead of an error.
func (ir *imageReader) shorter(end int64) bool {
	if ir.file == nil {
		return false
	}
	fi, err := ir.file.Stat()
	return err == nil && fi.Size() < end
}

// fill reads the image at off into buf and returns how many bytes it
// filled: all of buf, except when a stream ends (ir.eof is then set).
func (ir *imageReader) fill(ctx context.Context, buf []byte, off int64) (int, error) {
	if ir.ra == nil {
		if err := ir.limit.Wait(ctx, len(buf)); err != nil {
			return 0, err
		}
		n, err := io.ReadFull(ir.src.Reader, buf)
		ir.read += int64(n)
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			ir.eof = true
			err = nil
		}
		if err != nil {
			return n, fmt.Errorf("read %s at offset %d: %w", ir.src.Source, off+int64(n), err)
		}
		return n, nil
	}
	end := off + int64(len(buf))
	if ir.shorter(end) {
		return 0, fmt.Errorf("source %s ended early: it has fewer than the %d bytes announced (did it shrink while being read?)", ir.src.Source, ir.src.Size)
	}
	spans := ir.dataSpans(off, end)
	// Holes are zeros; the buffer is reused, so clear them.
	at := off
	for _, s := range spans {
		clear(buf[at-off : s.off-off])
		at = s.end
	}
	clear(buf[at-off:])
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(ir.readers)
	for _, s := range spans {
		for p := s.off; p < s.end; p += readPiece {
			part := buf[p-off : min(p+readPiece, s.end)-off]
			g.Go(func() error {
				if err := ir.limit.Wait(gctx, len(part)); err != nil {
					return err
				}
				n, err := ir.ra.ReadAt(part, p)
				if n == len(part) {
					return nil
				}
				if err == nil || errors.Is(err, io.EOF) {
					return fmt.Errorf("source %s ended early: read %d of %d bytes", ir.src.Source, p+int64(n), ir.src.Size)
				}
				return fmt.Errorf("read %s at offset %d: %w", ir.src.Source, p+int64(n), err)
			})
			ir.read += int64(len(part))
		}
	}
	if err := g.Wait(); err != nil {
		return 0, err
	}
	return len(buf), nil
}

// checkStreamEnd fails if a stream of known size has more bytes than
// announced: the image grew while being read.
func (ir *imageReader) checkStreamEnd() error {
	if ir.ra != nil || ir.src.Size < 0 || ir.eof {
		return nil
	}
	var one [1]byte
	if n, _ := io.ReadFull(ir.src.Reader, one[:]); n > 0 {
		return fmt.Errorf("source %s grew while being read (more than %d bytes)", ir.src.Source, ir.src.Size)
	}
	return nil
}
