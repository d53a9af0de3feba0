package repo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"vmvault/backend/limit"
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
type imageReader struct {
	src     DiskSource
	ra      io.ReaderAt // nil: a stream
	seeker  io.Seeker   // nil: no hole information
	readers int
	eof     bool          // a stream ended
	read    int64         // bytes really read from the source
	limit   *limit.Bucket // paces reads; nil: unlimited
}

func newImageReader(src DiskSource, readers int) *imageReader {
	ir := &imageReader{src: src, readers: readers}
	if ra, ok := src.Reader.(io.ReaderAt); ok && src.Size >= 0 {
		ir.ra = ra
		if s, ok := src.Reader.(io.Seeker); ok {
			ir.seeker = s
		}
	}
	return ir
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

// isHole reports whether [off, off+n) holds no data at all.
func (ir *imageReader) isHole(off, n int64) bool {
	return ir.seeker != nil && len(ir.dataSpans(off, off+n)) == 0
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
