// Package crypto seals and opens repository objects and derives keys.
//
// Every object is encrypted with XChaCha20-Poly1305 under the repository's
// master encryption key with a fresh random 24-byte nonce; the caller passes
// associated data (the object's type and name) so that a swapped or renamed
// object fails to open. Content IDs are keyed BLAKE3 hashes, so the storage
// server cannot confirm a guess about the content behind an ID.
package crypto

import (
	"crypto/rand"
	"errors"
	"fmt"

	"golang.org/x/crypto/chacha20poly1305"
	"lukechampine.com/blake3"
)

// KeySize is the size of every symmetric key, in bytes.
const KeySize = 32

// NonceSize is the size of the random nonce stored in front of every sealed object.
const NonceSize = chacha20poly1305.NonceSizeX

// Overhead is the number of bytes Seal adds to a plaintext.
const Overhead = NonceSize + chacha20poly1305.Overhead

// ErrAuth means a sealed object failed authentication: it was damaged,
// truncated, swapped for another object, or sealed under another key.
var ErrAuth = errors.New("authentication failed (object damaged, swapped or under another key)")

// ID is a 32-byte content identifier.
type ID [32]byte

// MasterKey holds the secret keys of one repository. Key files wrap it
// under passwords; it never leaves the host unencrypted.
type MasterKey struct {
	// Encrypt is the XChaCha20-Poly1305 key for all objects.
	Encrypt [KeySize]byte
	// ID is the BLAKE3 key that content IDs are computed under.
	ID [KeySize]byte
}

// NewMasterKey returns fresh random keys.
func NewMasterKey() (*MasterKey, error) {
	var k MasterKey
	if _, err := rand.Read(k.Encrypt[:]); err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	if _, err := rand.Read(k.ID[:]); err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	return &k, nil
}

// Sealer encrypts and authenticates objects under one key. It is safe for
// concurrent use.
type Sealer struct {
	aead interface {
		Seal(dst, nonce, plaintext, additionalData []byte) []byte
		Open(dst, nonce, ciphertext, additionalData []byte) ([]byte, error)
	}
}

// NewSealer returns a Sealer for a 32-byte key.
func NewSealer(key []byte) (*Sealer, error) {
	a, err := chacha20poly1305.NewX(key)
	if err != nil {
		return nil, err
	}
	return &Sealer{aead: a}, nil
}

// Seal appends nonce || ciphertext || tag of plaintext to dst and returns it.
func (s *Sealer) Seal(dst, plaintext, ad []byte) []byte {
	n := len(dst)
	dst = grow(dst, NonceSize+len(plaintext)+chacha20poly1305.Overhead)
	nonce := dst[n : n+NonceSize]
	if _, err := rand.Read(nonce); err != nil {
		// crypto/rand never fails on Linux ≥ 3.17; a failure here would
		// mean nonce reuse, which is worse than stopping.
		panic("crypto/rand failed: " + err.Error())
	}
	return s.aead.Seal(dst[:n+NonceSize], nonce, plaintext, ad)
}

// Open authenticates and decrypts sealed (as made by Seal), appending the
// plaintext to dst. Any damage yields ErrAuth.
func (s *Sealer) Open(dst, sealed, ad []byte) ([]byte, error) {
	if len(sealed) < Overhead {
		return nil, ErrAuth
	}
	out, err := s.aead.Open(dst, sealed[:NonceSize], sealed[NonceSize:], ad)
	if err != nil {
		return nil, ErrAuth
	}
	return out, nil
}

func grow(b []byte, n int) []byte {
	if cap(b)-len(b) < n {
		nb := make([]byte, len(b), len(b)+n)
		copy(nb, b)
		b = nb
	}
	return b[:len(b)+n]
}

// Hasher computes keyed content IDs. Different domains (chunks, segments,
// image digests) use independent keys derived from the master ID key, so an
// ID of one kind can never be mistaken for another. It is safe for
// concurrent use.
type Hasher struct {
	key [8]uint32
}

// NewHasher returns a Hasher for one domain (e.g. "chunk", "segment").
func NewHasher(idKey [KeySize]byte, domain string) *Hasher {
	var k [KeySize]byte
	blake3.DeriveKey(k[:], "vmvault 2026 content id "+domain, idKey[:])
	return &Hasher{key: keyWords(k)}
}

// Sum returns the keyed hash of data.
func (h *Hasher) Sum(data []byte) ID {
	t := tree{key: &h.key}
	for len(data) > batch {
		t.pushBatch((*[batch]byte)(data))
		data = data[batch:]
	}
	return t.sum(data)
}

// New returns a streaming keyed hash for this domain.
func (h *Hasher) New() *Digest { return &Digest{t: tree{key: &h.key}} }

// copyPiece is how much CopySum copies before hashing it: small enough
// that the copy is still in the core's cache when the hash reads it, and
// a whole number of batches.
const copyPiece = 8 * batch

// CopySum copies src into dst (which must be at least as long) and
// returns the keyed hash of the copy, reading src once: each piece is
// hashed from the copy while it is in cache. The ID describes dst even if
// src changes meanwhile (a mapped file someone writes).
func (h *Hasher) CopySum(dst, src []byte) ID {
	dst = dst[:len(src)]
	t := tree{key: &h.key}
	off := 0 // dst[:off] is hashed
	for c := 0; c < len(src); {
		end := min(c+copyPiece, len(src))
		copy(dst[c:end], src[c:end])
		c = end
		for off+batch <= c && off+batch < len(src) {
			t.pushBatch((*[batch]byte)(dst[off:]))
			off += batch
		}
	}
	return t.sum(dst[off:])
}
