package nbd

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestOverlayMatchesReference: random writes and zeroings (aligned and
// not, across block edges and the odd-sized last block) read back the
// same as on a plain byte slice; holes reported by Extents read as zeros;
// the base is never written.
func TestOverlayMatchesReference(t *testing.T) {
	const size = 10*OverlayBlock + 12345
	rng := rand.New(rand.NewPCG(3, 4))
	base := &memExport{data: make([]byte, size)}
	for i := range base.data {
		base.data[i] = byte(rng.Uint32())
	}
	orig := bytes.Clone(base.data)
	want := bytes.Clone(base.data)
	ov, err := CreateOverlay(base, filepath.Join(t.TempDir(), "ov"))
	if err != nil {
		t.Fatal(err)
	}
	defer ov.Close()
	for i := range 300 {
		off := rng.Int64N(size)
		n := rng.Int64N(min(size-off, 3*OverlayBlock)) + 1
		if rng.IntN(2) == 0 {
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(i)
			}
			if _, err := ov.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			copy(want[off:], p)
		} else {
			if err := ov.WriteZeroes(off, n); err != nil {
				t.Fatal(err)
			}
			clear(want[off : off+n])
		}
	}
	// Later writes may cover every random zeroing: zero two whole blocks.
	if err := ov.WriteZeroes(4*OverlayBlock, 2*OverlayBlock); err != nil {
		t.Fatal(err)
	}
	clear(want[4*OverlayBlock : 6*OverlayBlock])
	got := make([]byte, size)
	if _, err := ov.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("overlay content differs from the reference")
	}
	ext, err := ov.Extents(0, size)
	if err != nil {
		t.Fatal(err)
	}
	if ext, err = clipExtents(ext, 0, size); err != nil {
		t.Fatal(err)
	}
	holes := 0
	for _, x := range ext {
		if x.Hole {
			holes++
			if !bytes.Equal(want[x.Offset:x.Offset+x.Length], make([]byte, x.Length)) {
				t.Fatalf("hole %+v holds data", x)
			}
		}
	}
	if holes == 0 {
		t.Fatal("no zeroed block reported as a hole")
	}
	if !bytes.Equal(base.data, orig) {
		t.Fatal("base written")
	}
}

// TestCreateOverlayRefusesExisting: an existing file is never reused or
// truncated.
func TestCreateOverlayRefusesExisting(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ov")
	if err := os.WriteFile(path, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := CreateOverlay(&memExport{data: make([]byte, 4096)}, path); err == nil {
		t.Fatal("existing overlay file accepted")
	}
	if b, _ := os.ReadFile(path); string(b) != "keep" {
		t.Fatalf("existing file changed to %q", b)
	}
}

// TestKeptOverlay: a kept overlay resumes with what was flushed; a write
// after the last flush is gone after a crash (the file closed without
// Close), as on a disk that lost power, and the neighbouring base data is
// intact; another identity, or a second opener, is refused.
func TestKeptOverlay(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	base := &memExport{data: make([]byte, 4*OverlayBlock+100)}
	for i := range base.data {
		base.data[i] = byte(rng.Uint32())
	}
	path := filepath.Join(t.TempDir(), "ov")
	ov, err := OpenOverlay(base, path, "vm01/abc/hda")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := OpenOverlay(base, path, "vm01/abc/hda"); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second opener: %v", err)
	}
	flushed := bytes.Repeat([]byte{0xab}, 1000)
	ov.WriteAt(flushed, 10)
	ov.WriteZeroes(OverlayBlock, OverlayBlock)
	if err := ov.Flush(); err != nil {
		t.Fatal(err)
	}
	ov.WriteAt(bytes.Repeat([]byte{0xcd}, 1000), 2*OverlayBlock+10) // never flushed
	ov.f.Close()                                                    // the crash

	want := bytes.Clone(base.data)
	copy(want[10:], flushed)
	clear(want[OverlayBlock : 2*OverlayBlock])
	ov, err = OpenOverlay(base, path, "vm01/abc/hda")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if _, err := ov.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("resumed overlay differs from what was flushed: %v", err)
	}
	if err := ov.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("kept overlay removed: %v", err)
	}
	if _, err := OpenOverlay(base, path, "vm01/def/hda"); !errors.Is(err, errBadMap) {
		t.Fatalf("overlay of another generation: %v", err)
	}
	other := &memExport{data: make([]byte, 8*OverlayBlock)}
	if _, err := OpenOverlay(other, path, "vm01/abc/hda"); !errors.Is(err, errBadMap) {
		t.Fatalf("overlay of another size: %v", err)
	}
	// A data file that no longer matches its map is refused.
	os.Truncate(path, 100)
	if _, err := OpenOverlay(base, path, "vm01/abc/hda"); !errors.Is(err, errBadMap) {
		t.Fatalf("truncated overlay: %v", err)
	}
	os.Truncate(path, int64(len(base.data)))
	// A damaged map is refused, never read as a different map.
	raw, _ := os.ReadFile(path + ".map")
	raw[len(overlayMagic)+20] ^= 1
	os.WriteFile(path+".map", raw, 0o600)
	if _, err := OpenOverlay(base, path, "vm01/abc/hda"); !errors.Is(err, errBadMap) {
		t.Fatalf("damaged map: %v", err)
	}
}

// FuzzOverlayMap: decodeMap never panics, and a map it accepts re-encodes
// to the same bytes.
func FuzzOverlayMap(f *testing.F) {
	o := newOverlay(&memExport{data: make([]byte, 3*OverlayBlock)}, nil, "")
	o.identity = "vm01/abc/hda"
	o.data[0], o.zero[0] = 0b001, 0b100
	f.Add(o.encodeMap(o.data, o.zero))
	f.Add([]byte(overlayMagic))
	f.Fuzz(func(t *testing.T, raw []byte) {
		p := newOverlay(&memExport{data: make([]byte, 3*OverlayBlock)}, nil, "")
		p.identity = "vm01/abc/hda"
		if p.decodeMap(raw) == nil && !bytes.Equal(p.encodeMap(p.data, p.zero), raw) {
			t.Fatalf("accepted map %x does not round-trip", raw)
		}
	})
}
