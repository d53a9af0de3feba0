package nbd

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// OverlayBlock is the copy-on-write granularity: the first write into a
// block copies the whole block from the base into the overlay file. 64 KiB
// keeps the map small (2 MiB of bits for 1 TiB) at the cost of reading up
// to 64 KiB of base for a small first write.
const OverlayBlock = 64 << 10

// blockState says where a block's current content lives.
type blockState uint8

const (
	inBase    blockState = iota // unchanged: read the base
	inOverlay                   // written: read the overlay file
	zeroed                      // written as zeros: read nothing
)

// Overlay is a copy-on-write layer over a read-only Export: writes go to a
// local sparse file, reads merge that file with the base. The base is
// never written. An overlay from CreateOverlay lives for one session: it
// is created new and removed by Close; one from OpenOverlay is kept and
// can be resumed.
type Overlay struct {
	base Export
	f    *os.File
	path string
	size int64
	// kept overlays save their map (see overlay_keep.go) for identity.
	kept     bool
	identity string
	flushMu  sync.Mutex

	mu sync.RWMutex
	// data and zero hold one bit per block: set in data means inOverlay,
	// set in zero means zeroed, neither means inBase.
	data, zero []uint64
}

// newOverlay returns an overlay over base with an empty map, in f.
func newOverlay(base Export, f *os.File, path string) *Overlay {
	size := base.Size()
	words := (size/OverlayBlock + 64) / 64
	return &Overlay{base: base, f: f, path: path, size: size,
		data: make([]uint64, words), zero: make([]uint64, words)}
}

// CreateOverlay creates the overlay file at path, which must not exist,
// for writes over base.
func CreateOverlay(base Export, path string) (*Overlay, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("overlay %s already exists: remove it or choose another path: %w", path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("create overlay: %w", err)
	}
	if err := f.Truncate(base.Size()); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("size overlay %s: %w", path, err)
	}
	return newOverlay(base, f, path), nil
}

// Close ends the overlay. A kept overlay saves its map and stays; any
// other is removed, and its writes with it.
func (o *Overlay) Close() error {
	if o.kept {
		err := o.saveMap()
		if cerr := o.f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("close overlay %s: %w", o.path, cerr)
		}
		return err
	}
	err := o.f.Close()
	if rerr := os.Remove(o.path); err == nil {
		err = rerr
	}
	if err != nil {
		return fmt.Errorf("remove overlay %s: %w", o.path, err)
	}
	return nil
}

// Size returns the base's size.
func (o *Overlay) Size() int64 { return o.size }

func (o *Overlay) state(b int64) blockState {
	w, bit := b/64, uint64(1)<<(b%64)
	switch {
	case o.data[w]&bit != 0:
		return inOverlay
	case o.zero[w]&bit != 0:
		return zeroed
	}
	return inBase
}

func (o *Overlay) setState(b int64, s blockState) {
	w, bit := b/64, uint64(1)<<(b%64)
	o.data[w] &^= bit
	o.zero[w] &^= bit
	switch s {
	case inOverlay:
		o.data[w] |= bit
	case zeroed:
		o.zero[w] |= bit
	}
}

// runs calls fn for each maximal run of blocks in one state that overlaps
// [off, off+length), clipped to that range.
func (o *Overlay) runs(off, length int64, fn func(s blockState, off, length int64) error) error {
	end := off + length
	for off < end {
		s := o.state(off / OverlayBlock)
		next := (off/OverlayBlock + 1) * OverlayBlock
		for next < end && o.state(next/OverlayBlock) == s {
			next += OverlayBlock
		}
		next = min(next, end)
		if err := fn(s, off, next-off); err != nil {
			return err
		}
		off = next
	}
	return nil
}

// ReadAt reads from the overlay where a block was written, else the base.
func (o *Overlay) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > o.size {
		return 0, fmt.Errorf("read %d bytes at %d: outside the %d-byte disk", len(p), off, o.size)
	}
	o.mu.RLock()
	defer o.mu.RUnlock()
	err := o.runs(off, int64(len(p)), func(s blockState, roff, n int64) error {
		part := p[roff-off : roff-off+n]
		switch s {
		case inOverlay:
			if _, err := o.f.ReadAt(part, roff); err != nil {
				return fmt.Errorf("read overlay %s: %w", o.path, err)
			}
		case zeroed:
			clear(part)
		default:
			return readFull(o.base, part, roff)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Extents reports written blocks as data, zeroed blocks as holes and the
// rest as the base reports it.
func (o *Overlay) Extents(off, length int64) ([]Extent, error) {
	length = min(length, o.size-off)
	o.mu.RLock()
	defer o.mu.RUnlock()
	var out []Extent
	err := o.runs(off, length, func(s blockState, roff, n int64) error {
		if s != inBase {
			out = append(out, Extent{Offset: roff, Length: n, Hole: s == zeroed})
			return nil
		}
		ext, err := o.base.Extents(roff, n)
		if err == nil {
			ext, err = clipExtents(ext, roff, n)
		}
		out = append(out, ext...)
		return err
	})
	return out, err
}

// blockSpan returns the start and length of block b.
func (o *Overlay) blockSpan(b int64) (int64, int64) {
	start := b * OverlayBlock
	return start, min(OverlayBlock, o.size-start)
}

// WriteAt writes p at off into the overlay. A block written for the first
// time, but not whole, is first copied from the base (or zeros), so the
// overlay file always holds whole blocks.
func (o *Overlay) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > o.size {
		return 0, fmt.Errorf("write %d bytes at %d: outside the %d-byte disk", len(p), off, o.size)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if err := o.write(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// eachBlock calls fn for every block overlapping [off, end): the block's
// number, start and length, and the part of [off, end) inside it.
func (o *Overlay) eachBlock(off, end int64, fn func(b, bstart, blen, pos, n int64) error) error {
	for pos := off; pos < end; {
		b := pos / OverlayBlock
		bstart, blen := o.blockSpan(b)
		n := min(bstart+blen, end) - pos
		if err := fn(b, bstart, blen, pos, n); err != nil {
			return err
		}
		pos += n
	}
	return nil
}

// write does WriteAt's work under o.mu.
func (o *Overlay) write(p []byte, off int64) error {
	var block []byte
	return o.eachBlock(off, off+int64(len(p)), func(b, bstart, blen, pos, n int64) error {
		part, at := p[pos-off:pos-off+n], pos
		if s := o.state(b); s != inOverlay && n < blen {
			if block == nil {
				block = make([]byte, OverlayBlock)
			}
			full := block[:blen]
			if s == zeroed {
				clear(full)
			} else if err := readFull(o.base, full, bstart); err != nil {
				return fmt.Errorf("copy block at %d from the base: %w", bstart, err)
			}
			copy(full[pos-bstart:], part)
			part, at = full, bstart
		}
		if _, err := o.f.WriteAt(part, at); err != nil {
			return fmt.Errorf("write overlay %s: %w", o.path, err)
		}
		o.setState(b, inOverlay)
		return nil
	})
}

// WriteZeroes makes [off, off+length) read as zeros: whole blocks are
// marked zeroed and their space in the overlay file released, partial
// blocks are written.
func (o *Overlay) WriteZeroes(off, length int64) error {
	if off < 0 || length < 0 || off+length > o.size {
		return fmt.Errorf("zero %d bytes at %d: outside the %d-byte disk", length, off, o.size)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	var zeros []byte
	return o.eachBlock(off, off+length, func(b, bstart, blen, pos, n int64) error {
		if n < blen {
			if zeros == nil {
				zeros = make([]byte, OverlayBlock)
			}
			return o.write(zeros[:n], pos)
		}
		if o.state(b) == inOverlay {
			// Releasing space is an optimisation; a filesystem without
			// hole punching keeps the stale bytes, which are never read.
			_ = unix.Fallocate(int(o.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, bstart, blen)
		}
		o.setState(b, zeroed)
		return nil
	})
}

// Flush makes the completed writes durable; a kept overlay also saves its
// map, so they survive a crash.
func (o *Overlay) Flush() error {
	if o.kept {
		return o.saveMap()
	}
	if err := o.f.Sync(); err != nil {
		return fmt.Errorf("sync overlay %s: %w", o.path, err)
	}
	return nil
}
