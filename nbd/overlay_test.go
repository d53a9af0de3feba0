package nbd

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
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
