package crypto

import (
	"math/rand/v2"
	"testing"

	zblake3 "github.com/zeebo/blake3"
)

// The keyed BLAKE3 here (Sum, CopySum, Digest) gives exactly what
// zeebo/blake3, the implementation IDs were computed with before, gives:
// at every size around the chunk, batch and piece seams and beyond, and
// for streams written in uneven pieces. A stored ID that changed would
// break deduplication against every earlier backup.
func TestBlake3Equal(t *testing.T) {
	var idKey [KeySize]byte
	idKey[3] = 9
	h := NewHasher(idKey, "chunk")
	ref := zeeboRef(t, idKey, "chunk")
	rng := rand.New(rand.NewPCG(1, 2))
	data := make([]byte, 3*copyPiece+5*batch+777)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	sizes := []int{0, 1, 63, 64, 65, 1023, 1024, 1025, 2048, 2049, 3 * 1024, 7*1024 + 1, 8 * 1024, 9*1024 + 5, 15 * 1024, 15*1024 + 1}
	for _, base := range []int{batch, 2 * batch, 4 * batch, copyPiece, 2 * copyPiece, 3*copyPiece + 5*batch} {
		for _, d := range []int{-1025, -1024, -1, 0, 1, 1024, 1025, 5000} {
			if n := base + d; n >= 0 && n <= len(data) {
				sizes = append(sizes, n)
			}
		}
	}
	for range 40 {
		sizes = append(sizes, rng.IntN(len(data)+1))
	}
	dst := make([]byte, len(data))
	for _, n := range sizes {
		want := sumsEqual(t, h, ref, dst, data[:n])
		d := h.New()
		for p := data[:n]; len(p) > 0; {
			w := min(len(p), rng.IntN(3*batch)+1)
			d.Write(p[:w])
			p = p[w:]
		}
		var got ID
		d.Sum(got[:0])
		if got != want {
			t.Fatalf("%d bytes written in pieces: %x, zeebo/blake3 %x", n, got, want)
		}
		// Sum leaves the state as it was.
		d.Write([]byte{1})
		d.Sum(got[:0])
		if want := ref(append(append([]byte(nil), data[:n]...), 1)); got != want {
			t.Fatalf("%d bytes, then one more after Sum: %x, zeebo/blake3 %x", n, got, want)
		}
	}
}

// TestBlake3EqualLarge: segment-sized inputs, whose trees are many
// levels deep, equal zeebo/blake3's too (TestBlake3Equal stays below a
// few hundred KiB).
func TestBlake3EqualLarge(t *testing.T) {
	var idKey [KeySize]byte
	idKey[0] = 1
	h := NewHasher(idKey, "segment")
	ref := zeeboRef(t, idKey, "segment")
	rng := rand.New(rand.NewPCG(3, 4))
	data := make([]byte, 13<<20)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	sizes := []int{1 << 20, 1<<20 + 1, 8<<20 - 1, 8 << 20, 8<<20 + 1, 8<<20 + batch, 12<<20 + 3*1024 + 7, len(data)}
	for range 6 {
		sizes = append(sizes, rng.IntN(len(data)+1))
	}
	dst := make([]byte, len(data))
	for _, n := range sizes {
		sumsEqual(t, h, ref, dst, data[:n])
	}
}

// sumsEqual checks that h's Sum and CopySum (into dst) of b equal ref's
// and returns that hash.
func sumsEqual(t *testing.T, h *Hasher, ref func([]byte) ID, dst, b []byte) ID {
	t.Helper()
	want := ref(b)
	if got := h.Sum(b); got != want {
		t.Fatalf("%d bytes: Sum %x, zeebo/blake3 %x", len(b), got, want)
	}
	if got := h.CopySum(dst, b); got != want {
		t.Fatalf("%d bytes: CopySum %x, zeebo/blake3 %x", len(b), got, want)
	}
	return want
}

// zeeboRef returns the keyed hash a Hasher for domain must give, computed
// by zeebo/blake3 (the implementation IDs were first computed with).
func zeeboRef(t *testing.T, idKey [KeySize]byte, domain string) func([]byte) ID {
	var k [KeySize]byte
	zblake3.DeriveKey("vmvault 2026 content id "+domain, idKey[:], k[:])
	return func(data []byte) ID {
		z, err := zblake3.NewKeyed(k[:])
		if err != nil {
			t.Fatal(err)
		}
		z.Write(data)
		var id ID
		z.Sum(id[:0])
		return id
	}
}
