package nbd

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// A kept overlay survives its server: OpenOverlay resumes it. Its block
// map is written to PATH.map on every Flush and on Close, so after a crash
// the overlay holds exactly what the client had flushed:
//   - Flush copies the map under the write lock, then syncs the data file,
//     then replaces the map file atomically (temp file, sync, rename, sync
//     of the directory). Every block the saved map names was completely
//     written before that sync.
//   - A block written after the last saved map is not named by it and
//     reads from the base again: an unflushed write lost, as on a disk that
//     lost power. Flushes are serialised, so an older map never replaces a
//     newer one.
//   - The map names the base it belongs to; an overlay is never resumed
//     over another generation or disk, nor by two servers at once (the
//     data file is locked with flock).

const overlayMagic = "vmvault overlay 1\n"

// OpenOverlay opens the kept overlay at path for writes over base,
// creating it if it does not exist, resuming it if it does. identity names
// the base (e.g. VM, generation ID and disk); an existing overlay made for
// another identity or size is refused. Close keeps the overlay.
func OpenOverlay(base Export, path, identity string) (*Overlay, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open overlay: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("overlay %s is in use by another server: %w", path, err)
	}
	o := newOverlay(base, f, path)
	o.identity = identity
	o.kept = true
	raw, err := os.ReadFile(path + ".map")
	switch {
	case errors.Is(err, os.ErrNotExist):
		if st, serr := f.Stat(); serr != nil || st.Size() != 0 {
			f.Close()
			return nil, fmt.Errorf("overlay %s has data but no map %s.map: remove both to start afresh", path, path)
		}
		if err := f.Truncate(o.size); err != nil {
			f.Close()
			return nil, fmt.Errorf("size overlay %s: %w", path, err)
		}
		// Save the empty map now, so the overlay is never without one.
		if err := o.Flush(); err != nil {
			f.Close()
			return nil, err
		}
	case err != nil:
		f.Close()
		return nil, fmt.Errorf("read overlay map: %w", err)
	default:
		if err := o.decodeMap(raw); err != nil {
			f.Close()
			return nil, fmt.Errorf("overlay map %s.map: %w", path, err)
		}
		if st, err := f.Stat(); err != nil || st.Size() != o.size {
			f.Close()
			return nil, fmt.Errorf("overlay %s does not match its map (replaced or truncated): remove it and %s.map to start afresh: %w", path, path, errBadMap)
		}
	}
	return o, nil
}

// encodeMap serialises the block map: magic, identity, size, block size,
// the two bitmaps, and a SHA-256 of all that.
func (o *Overlay) encodeMap(data, zero []uint64) []byte {
	b := []byte(overlayMagic)
	b = appendU32(b, uint32(len(o.identity)))
	b = append(b, o.identity...)
	b = appendU64(b, uint64(o.size))
	b = appendU32(b, OverlayBlock)
	b = appendU64(b, uint64(len(data)))
	for _, w := range data {
		b = appendU64(b, w)
	}
	for _, w := range zero {
		b = appendU64(b, w)
	}
	sum := sha256.Sum256(b)
	return append(b, sum[:]...)
}

// errBadMap reports a map file that is damaged or belongs elsewhere.
var errBadMap = errors.New("not a map of this overlay")

// decodeMap loads a map made by encodeMap for this overlay's identity
// and size.
func (o *Overlay) decodeMap(raw []byte) error {
	if len(raw) < len(overlayMagic)+sha256.Size || !bytes.HasPrefix(raw, []byte(overlayMagic)) {
		return fmt.Errorf("no overlay map header: %w", errBadMap)
	}
	body := raw[:len(raw)-sha256.Size]
	if sum := sha256.Sum256(body); !bytes.Equal(sum[:], raw[len(body):]) {
		return fmt.Errorf("checksum mismatch: %w", errBadMap)
	}
	c := cursor{b: body[len(overlayMagic):]}
	id := c.name()
	size := c.take(8)
	block := c.u32()
	words := c.take(8)
	if c.bad {
		return fmt.Errorf("truncated: %w", errBadMap)
	}
	if id != o.identity {
		return fmt.Errorf("made for %q, not %q: %w", id, o.identity, errBadMap)
	}
	if int64(binary.BigEndian.Uint64(size)) != o.size || block != OverlayBlock || binary.BigEndian.Uint64(words) != uint64(len(o.data)) {
		return fmt.Errorf("made for another disk size or block size: %w", errBadMap)
	}
	if len(c.b) != 16*len(o.data) {
		return fmt.Errorf("bitmaps of %d bytes: %w", len(c.b), errBadMap)
	}
	for i := range o.data {
		o.data[i] = binary.BigEndian.Uint64(c.b[8*i:])
		o.zero[i] = binary.BigEndian.Uint64(c.b[8*(len(o.data)+i):])
	}
	return nil
}

// saveMap makes the data file durable and then records the map as it was
// before the sync (see the crash argument above).
func (o *Overlay) saveMap() error {
	o.flushMu.Lock()
	defer o.flushMu.Unlock()
	o.mu.Lock()
	data, zero := append([]uint64(nil), o.data...), append([]uint64(nil), o.zero...)
	o.mu.Unlock()
	if err := o.f.Sync(); err != nil {
		return fmt.Errorf("sync overlay %s: %w", o.path, err)
	}
	tmp := o.path + ".map.tmp"
	if err := writeFileSync(tmp, o.encodeMap(data, zero)); err != nil {
		return fmt.Errorf("save overlay map: %w", err)
	}
	if err := os.Rename(tmp, o.path+".map"); err != nil {
		return fmt.Errorf("save overlay map: %w", err)
	}
	d, err := os.Open(filepath.Dir(o.path))
	if err != nil {
		return fmt.Errorf("save overlay map: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("save overlay map: sync %s: %w", filepath.Dir(o.path), err)
	}
	return nil
}

// writeFileSync writes b to a new file at path and syncs it.
func writeFileSync(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
