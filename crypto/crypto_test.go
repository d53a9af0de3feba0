package crypto

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"testing"

	zblake3 "github.com/zeebo/blake3"
	lblake3 "lukechampine.com/blake3"
)

func testSealer(t testing.TB) *Sealer {
	k, err := NewMasterKey()
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewSealer(k.Encrypt[:])
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSealOpen(t *testing.T) {
	s := testSealer(t)
	plain := []byte("the quick brown fox")
	ad := []byte("data/ab/abcd")
	sealed := s.Seal(nil, plain, ad)
	if len(sealed) != len(plain)+Overhead {
		t.Fatalf("sealed length %d, want %d", len(sealed), len(plain)+Overhead)
	}
	got, err := s.Open(nil, sealed, ad)
	if err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("Open = %q, %v", got, err)
	}
	// Two seals of one plaintext differ (random nonce).
	if bytes.Equal(sealed, s.Seal(nil, plain, ad)) {
		t.Fatal("two seals are identical: nonce not random")
	}
	cases := map[string]func() ([]byte, []byte){
		"flipped byte": func() ([]byte, []byte) {
			c := bytes.Clone(sealed)
			c[len(c)/2] ^= 1
			return c, ad
		},
		"truncated":  func() ([]byte, []byte) { return sealed[:len(sealed)-1], ad },
		"too short":  func() ([]byte, []byte) { return sealed[:10], ad },
		"other name": func() ([]byte, []byte) { return sealed, []byte("data/ab/abce") },
		"other key": func() ([]byte, []byte) {
			return testSealer(t).Seal(nil, plain, ad), ad
		},
	}
	for name, mk := range cases {
		c, a := mk()
		if _, err := s.Open(nil, c, a); !errors.Is(err, ErrAuth) {
			t.Errorf("%s: Open err = %v, want ErrAuth", name, err)
		}
	}
}

func TestHasherDomainsAndKeys(t *testing.T) {
	k1, _ := NewMasterKey()
	k2, _ := NewMasterKey()
	data := []byte("segment content")
	a := NewHasher(k1.ID, "chunk").Sum(data)
	if a != NewHasher(k1.ID, "chunk").Sum(data) {
		t.Fatal("hash not deterministic")
	}
	if a == NewHasher(k1.ID, "segment").Sum(data) {
		t.Fatal("domains share IDs")
	}
	if a == NewHasher(k2.ID, "chunk").Sum(data) {
		t.Fatal("keys share IDs")
	}
	h := NewHasher(k1.ID, "chunk")
	st := h.New()
	st.Write(data[:4])
	st.Write(data[4:])
	var id ID
	st.Sum(id[:0])
	if id != a {
		t.Fatal("streaming hash differs from Sum")
	}
}

func TestDeriveKey(t *testing.T) {
	salt, _ := NewSalt()
	p := MinKDFParams
	k1, err := DeriveKey([]byte("pw"), salt, p)
	if err != nil {
		t.Fatal(err)
	}
	k2, _ := DeriveKey([]byte("pw"), salt, p)
	k3, _ := DeriveKey([]byte("pW"), salt, p)
	if k1 != k2 || k1 == k3 {
		t.Fatal("derivation not deterministic or ignores the password")
	}
	for _, bad := range []KDFParams{{Time: 0, Memory: 65536, Threads: 1}, {Time: 1, Memory: 1024, Threads: 1}, {Time: 1, Memory: 1 << 30, Threads: 1}} {
		if _, err := DeriveKey([]byte("pw"), salt, bad); err == nil {
			t.Errorf("params %+v accepted", bad)
		}
	}
}

// The chunk-ID hash: keyed BLAKE3 (ours and two packages') against
// HMAC-SHA256, on chunk-sized input. Run with -bench Hash.
func BenchmarkHash(b *testing.B) {
	data := make([]byte, 1<<20)
	rand.Read(data)
	var key [32]byte
	b.Run("blake3", func(b *testing.B) {
		h := NewHasher(key, "chunk")
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			h.Sum(data)
		}
	})
	b.Run("blake3-zeebo", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			h, _ := zblake3.NewKeyed(key[:])
			h.Write(data)
			h.Sum(nil)
		}
	})
	b.Run("blake3-lukechampine", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			h := lblake3.New(32, key[:])
			h.Write(data)
			h.Sum(nil)
		}
	})
	b.Run("hmac-sha256", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			m := hmac.New(sha256.New, key[:])
			m.Write(data)
			m.Sum(nil)
		}
	})
}

func BenchmarkSeal(b *testing.B) {
	s := testSealer(b)
	data := make([]byte, 1<<20)
	buf := make([]byte, 0, len(data)+Overhead)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		buf = s.Seal(buf[:0], data, []byte("ad"))
	}
}

// CopySum copies exactly and hashes to what Sum gives for the same bytes,
// at every size around its piece boundaries.
func TestCopySum(t *testing.T) {
	var key [32]byte
	key[0] = 7
	h := NewHasher(key, "segment")
	src := make([]byte, 3*copyPiece+17)
	rand.Read(src)
	for _, n := range []int{0, 1, 1023, 1024, 1025, copyPiece - 1, copyPiece, copyPiece + 1, 2 * copyPiece, len(src)} {
		dst := make([]byte, n+5)
		if got, want := h.CopySum(dst, src[:n]), h.Sum(src[:n]); got != want {
			t.Errorf("%d bytes: CopySum %x, Sum %x", n, got, want)
		}
		if !bytes.Equal(dst[:n], src[:n]) || !bytes.Equal(dst[n:], make([]byte, 5)) {
			t.Errorf("%d bytes: the copy differs or ran past the input", n)
		}
	}
}

// A new segment of a mapped file: hashed in place, copied and hashed
// again (hash-copy-hash), against CopySum, on memory not in cache (the
// segments of a 256 MiB image, copied into one of four buffers as a
// backup does). Run with -bench CopySum.
func BenchmarkCopySum(b *testing.B) {
	const seg = 8 << 20
	src := make([]byte, 256<<20)
	rand.Read(src)
	var dsts [4][]byte
	for i := range dsts {
		dsts[i] = make([]byte, seg)
	}
	var key [32]byte
	h := NewHasher(key, "segment")
	run := func(b *testing.B, f func(dst, src []byte)) {
		b.SetBytes(seg)
		i := 0
		for b.Loop() {
			f(dsts[i%len(dsts)], src[i*seg%len(src):][:seg])
			i++
		}
	}
	b.Run("hash-copy-hash", func(b *testing.B) {
		run(b, func(dst, src []byte) { h.Sum(src); copy(dst, src); h.Sum(dst) })
	})
	b.Run("copysum", func(b *testing.B) {
		run(b, func(dst, src []byte) { h.CopySum(dst, src) })
	})
	b.Run("hash", func(b *testing.B) {
		run(b, func(dst, src []byte) { h.Sum(src) })
	})
	b.Run("copy", func(b *testing.B) {
		run(b, func(dst, src []byte) { copy(dst, src) })
	})
}
