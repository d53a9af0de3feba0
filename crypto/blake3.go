package crypto

import (
	"encoding/binary"
	"math/bits"

	"lukechampine.com/blake3/guts"
)

// A serial keyed BLAKE3 over lukechampine.com/blake3/guts, which hashes 16
// chunks at once with AVX-512 where the CPU has it (8 with AVX2). The
// package's own Hasher starts a goroutine per 16 KiB of input, and
// github.com/zeebo/blake3 hashes 8 chunks at once: inside the backup, where
// every core already hashes, chunks and compresses, both cost more CPU
// per byte (docs/performance.md). The output is BLAKE3's: TestBlake3Equal
// compares it with zeebo/blake3 at every size around the tree's seams.

// batch is the input hashed in one SIMD call: a subtree of 16 chunks.
const batch = guts.MaxSIMD * guts.ChunkSize

// batchHeight is log2 of the chunks in a batch.
var batchHeight = bits.TrailingZeros(guts.MaxSIMD)

// tree is the state of a BLAKE3 hash between batches: the roots of the
// complete subtrees hashed so far, at most one per height.
type tree struct {
	key     *[8]uint32
	stack   [54][8]uint32 // 2^54 chunks of 1 KiB: more than any input
	counter uint64        // chunks hashed; bit i set: stack[i] holds a subtree
}

// push adds the subtree of 2^height chunks whose chaining value is cv,
// merging with the subtrees before it. The caller guarantees that more
// input follows (a merged node is never the root).
func (t *tree) push(cv [8]uint32, height int) {
	i := height
	for t.counter&(1<<i) != 0 {
		cv = guts.ChainingValue(guts.ParentNode(t.stack[i], cv, t.key, guts.FlagKeyedHash))
		i++
	}
	t.stack[i] = cv
	t.counter += 1 << height
}

// pushBatch hashes one batch, which more input follows.
func (t *tree) pushBatch(b *[batch]byte) {
	t.push(guts.ChainingValue(guts.CompressBuffer(b, batch, t.key, t.counter, guts.FlagKeyedHash)), batchHeight)
}

// sum returns the hash of everything pushed followed by rest, the input's
// last 0 to batch bytes. It changes t.
func (t *tree) sum(rest []byte) ID {
	// Every chunk of rest but the last joins the tree; the last is the
	// root's rightmost leaf. They are hashed in falling powers of two at
	// once, from a copy: the counter is a multiple of the batch here, so
	// each such subtree is aligned.
	full := 0
	if len(rest) > guts.ChunkSize {
		full = (len(rest) - 1) / guts.ChunkSize
	}
	var b [batch]byte
	for full >= 2 {
		n := 1 << (bits.Len(uint(full)) - 1)
		copy(b[:], rest[:n*guts.ChunkSize])
		t.push(guts.ChainingValue(guts.CompressBuffer(&b, n*guts.ChunkSize, t.key, t.counter, guts.FlagKeyedHash)), bits.TrailingZeros(uint(n)))
		rest, full = rest[n*guts.ChunkSize:], full-n
	}
	for ; full > 0; full-- {
		t.push(guts.ChainingValue(guts.CompressChunk(rest[:guts.ChunkSize], t.key, t.counter, guts.FlagKeyedHash)), 0)
		rest = rest[guts.ChunkSize:]
	}
	n := guts.CompressChunk(rest, t.key, t.counter, guts.FlagKeyedHash)
	for i := bits.TrailingZeros64(t.counter); i < bits.Len64(t.counter); i++ {
		if t.counter&(1<<i) != 0 {
			n = guts.ParentNode(t.stack[i], guts.ChainingValue(n), t.key, guts.FlagKeyedHash)
		}
	}
	n.Flags |= guts.FlagRoot
	out := guts.WordsToBytes(guts.CompressNode(n))
	return ID(out[:32])
}

// keyWords returns a BLAKE3 key as the words the compression takes.
func keyWords(k [KeySize]byte) (w [8]uint32) {
	for i := range w {
		w[i] = binary.LittleEndian.Uint32(k[4*i:])
	}
	return w
}

// Digest is a streaming keyed hash of one domain (Hasher.New).
type Digest struct {
	t   tree
	buf [batch]byte
	n   int // bytes in buf
}

// Write adds p to the hash. It never fails.
func (d *Digest) Write(p []byte) (int, error) {
	size := len(p)
	if d.n > 0 {
		k := copy(d.buf[d.n:], p)
		d.n += k
		p = p[k:]
		if d.n == batch && len(p) > 0 {
			d.t.pushBatch(&d.buf)
			d.n = 0
		}
	}
	// The last batch waits in buf: it is the root's if nothing follows.
	for len(p) > batch {
		d.t.pushBatch((*[batch]byte)(p))
		p = p[batch:]
	}
	d.n += copy(d.buf[d.n:], p)
	return size, nil
}

// Sum appends the hash of what was written to b.
func (d *Digest) Sum(b []byte) []byte {
	t := d.t
	id := t.sum(d.buf[:d.n])
	return append(b, id[:]...)
}
