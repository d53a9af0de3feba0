package repo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"vmvault/chunk"
)

// chunkFetchers bounds concurrent chunk downloads per segment being
// restored (each holds at most one decoded chunk, ≤ 8 MiB).
const chunkFetchers = 4

// restoredSegment is one segment, authenticated, ready to write. data is
// nil for an all-zero segment.
type restoredSegment struct {
	index int
	off   int64
	size  int64
	data  []byte
}

// fetchSegment assembles segment i of d and verifies it against its keyed
// segment ID before returning it: nothing unauthenticated leaves here.
func (r *Repository) fetchSegment(ctx context.Context, d *Disk, i int, buf []byte) (restoredSegment, error) {
	seg := restoredSegment{index: i, off: d.segmentStart(i), size: d.segmentLen(i)}
	id, zero := d.SegmentID(i)
	if zero {
		return seg, nil
	}
	raw, err := r.getData(ctx, TypeSegment, id)
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
	// Chunks of one segment are fetched concurrently: over SFTP each is a
	// round trip.
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(chunkFetchers)
	var off int64
	for _, e := range entries {
		part := buf[off : off+int64(e.Length)]
		off += int64(e.Length)
		if e.Zero {
			clear(part)
			continue
		}
		g.Go(func() error {
			data, err := r.getData(gctx, TypeChunk, e.ID)
			if err != nil {
				return err
			}
			if len(data) != len(part) {
				return fmt.Errorf("chunk %s: %d bytes, segment list says %d: %w", dataName(e.ID), len(data), len(part), ErrCorrupt)
			}
			copy(part, data)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return seg, err
	}
	if got := r.segH.Sum(buf); got != id {
		return seg, fmt.Errorf("segment %s: content does not match its ID: %w", dataName(id), ErrCorrupt)
	}
	seg.data = buf
	return seg, nil
}

// restoreSegments fetches d's segments with several workers and hands them
// to emit strictly in order. emit must not keep seg.data.
func (r *Repository) restoreSegments(ctx context.Context, d *Disk, emit func(restoredSegment) error) error {
	if err := r.resolveSegments(ctx, d); err != nil {
		return err
	}
	id := imageDigest(r.imageH, d.Size, d.SegmentSize, d.Segments, d.segmentLens())
	if HexID(id) != d.Digest {
		return fmt.Errorf("disk %s: segment list does not match the image digest: %w", d.Name, ErrCorrupt)
	}
	n := d.segmentCount()
	nw := workers() + 1
	g, ctx := errgroup.WithContext(ctx)
	// Free segment buffers, allocated on first use: at most nw+1 exist.
	free := make(chan []byte, nw+1)
	for range nw + 1 {
		free <- nil
	}
	// One result slot per segment in flight; the window bounds memory to
	// nw+1 segment buffers.
	results := make([]chan restoredSegment, n)
	for i := range results {
		results[i] = make(chan restoredSegment, 1)
	}
	window := make(chan struct{}, nw)
	next := make(chan int)
	g.Go(func() error {
		defer close(next)
		for i := range n {
			select {
			case window <- struct{}{}:
			case <-ctx.Done():
				return nil
			}
			select {
			case next <- i:
			case <-ctx.Done():
				return nil
			}
		}
		return nil
	})
	for range nw {
		g.Go(func() error {
			for i := range next {
				buf := <-free
				if buf == nil {
					buf = make([]byte, d.maxSegmentLen())
				}
				seg, err := r.fetchSegment(ctx, d, i, buf)
				if err != nil {
					return fmt.Errorf("restore %s at offset %d: %w", d.Name, seg.off, err)
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
		for i := range n {
			var seg restoredSegment
			select {
			case seg = <-results[i]:
			case <-ctx.Done():
				return nil
			}
			err := emit(seg)
			if seg.data != nil {
				free <- seg.data[:cap(seg.data)]
			}
			<-window
			if err != nil {
				return err
			}
		}
		return nil
	})
	return g.Wait()
}

// RestoreStats counts what a restore wrote.
type RestoreStats struct {
	Bytes   int64 `json:"bytes"`   // image size
	Written int64 `json:"written"` // bytes actually written to the target
	Skipped int64 `json:"skipped"` // bytes already equal (or holes)
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
	err = r.restoreSegments(ctx, d, func(seg restoredSegment) error {
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
// rewritten.
const compareBlock = chunk.ZeroBlock

// RestoreTo writes disk d of manifest m into target (a file, created if
// missing, or a block device) in place: ranges that already hold the right
// bytes are not written, and zero ranges of a regular file become holes.
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
	fi, err := f.Stat()
	if err != nil {
		return RestoreStats{}, err
	}
	regular := fi.Mode().IsRegular()
	if regular {
		// Growing leaves a hole; shrinking drops what is beyond the image.
		if err := f.Truncate(d.Size); err != nil {
			return RestoreStats{}, fmt.Errorf("size target: %w", err)
		}
	} else {
		size, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			return RestoreStats{}, fmt.Errorf("target size: %w", err)
		}
		if size < d.Size {
			return RestoreStats{}, fmt.Errorf("target %s holds %d bytes, the image needs %d", target, size, d.Size)
		}
	}
	var st RestoreStats
	cur := make([]byte, compareBlock)
	err = r.restoreSegments(ctx, d, func(seg restoredSegment) error {
		st.Bytes += seg.size
		for off := int64(0); off < seg.size; off += compareBlock {
			k := min(compareBlock, seg.size-off)
			pos := seg.off + off
			if _, err := f.ReadAt(cur[:k], pos); err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("read target at %d: %w", pos, err)
			}
			var want []byte
			if seg.data != nil {
				want = seg.data[off : off+k]
			}
			if want == nil || chunk.IsZero(want) {
				if chunk.IsZero(cur[:k]) {
					st.Skipped += k
					continue
				}
				if regular {
					if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, pos, k); err == nil {
						st.Written += k
						continue
					}
				}
				want = make([]byte, k)
			} else if bytes.Equal(cur[:k], want) {
				st.Skipped += k
				continue
			}
			if _, err := f.WriteAt(want, pos); err != nil {
				return fmt.Errorf("write target at %d: %w", pos, err)
			}
			st.Written += k
		}
		return nil
	})
	if err != nil {
		return st, err
	}
	if err := f.Sync(); err != nil {
		return st, fmt.Errorf("sync target: %w", err)
	}
	return st, f.Close()
}
