package repo

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"runtime"
	"sync"

	"github.com/klauspost/compress/zstd"

	"vmvault/backend"
	"vmvault/chunk"
	"vmvault/crypto"
)

// ObjectType is the kind of a stored object; it is authenticated with the
// object so that an object of one kind cannot be passed off as another.
type ObjectType byte

// Object types.
const (
	TypeChunk    ObjectType = 1 // a piece of disk data
	TypeSegment  ObjectType = 2 // a segment's list of chunks and zero runs
	TypeIndex    ObjectType = 3 // a list of data objects a backup added
	TypeManifest ObjectType = 4 // one generation
	TypeConfig   ObjectType = 5 // repository parameters
	TypeLock     ObjectType = 6 // a shared or exclusive lock
	TypeTable    ObjectType = 7 // a run of a disk's segment IDs
)

func (t ObjectType) String() string {
	switch t {
	case TypeChunk:
		return "chunk"
	case TypeSegment:
		return "segment"
	case TypeIndex:
		return "index"
	case TypeManifest:
		return "manifest"
	case TypeConfig:
		return "config"
	case TypeLock:
		return "lock"
	case TypeTable:
		return "segment table"
	}
	return fmt.Sprintf("type(%d)", byte(t))
}

// Header layout of every sealed object: magic, format version, type,
// compression. The header is authenticated as associated data together
// with the object's name.
const (
	objectMagic   = 'V'
	objectVersion = 1
	headerSize    = 4

	compressNone = 0
	compressZstd = 1
)

// ErrCorrupt marks an object that is damaged: it fails authentication,
// decompression or parsing.
var ErrCorrupt = errors.New("object damaged")

// codec seals and opens objects. It is safe for concurrent use.
type codec struct {
	sealer *crypto.Sealer
	enc    *zstd.Encoder
	dec    *zstd.Decoder
	// bufs recycles the buffers of sealing: a backup seals each chunk
	// into a new buffer of its size, and allocating (and so zeroing) one
	// per chunk cost more CPU than encrypting it (docs/performance.md).
	bufs freeList
}

// maxDecoded bounds decompression: no object (chunks ≤ 8 MiB, segment
// lists, indexes, manifests) legitimately expands beyond this.
const maxDecoded = 256 << 20

func newCodec(encKey []byte) (*codec, error) {
	s, err := crypto.NewSealer(encKey)
	if err != nil {
		return nil, err
	}
	// No frame checksum: the AEAD tag authenticates the body already,
	// and the checksum cost a hash of every compressed byte.
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)), zstd.WithZeroFrames(true), zstd.WithEncoderCRC(false))
	if err != nil {
		return nil, err
	}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(runtime.GOMAXPROCS(0)),
		zstd.WithDecoderMaxMemory(maxDecoded), zstd.WithDecoderMaxWindow(64<<20))
	if err != nil {
		return nil, err
	}
	return &codec{sealer: s, enc: enc, dec: dec}, nil
}

func associatedData(hdr []byte, name string) []byte {
	ad := make([]byte, 0, len(hdr)+len(name))
	ad = append(ad, hdr...)
	return append(ad, name...)
}

// seal compresses (when it pays) and encrypts payload as object name.
// The result may go back to recycle once nothing refers to it.
func (c *codec) seal(t ObjectType, name string, payload []byte) []byte {
	comp := byte(compressNone)
	body := payload
	var z []byte
	if len(payload) > 64 && c.compressible(payload) {
		// Room for the worst case, so incompressible data is not copied
		// again while the output grows.
		z = c.enc.EncodeAll(payload, c.buffer(len(payload)+len(payload)/128+64))
		// Keep the compressed form only if it saves at least 1/32: the
		// decode cost of barely-compressible data is not worth it.
		if len(z) < len(payload)-len(payload)/32 {
			comp, body = compressZstd, z
		}
	}
	hdr := []byte{objectMagic, objectVersion, byte(t), comp}
	out := c.buffer(headerSize + len(body) + crypto.Overhead)
	out = append(out, hdr...)
	out = c.sealer.Seal(out, body, associatedData(hdr, name))
	if z != nil {
		c.recycle(z)
	}
	return out
}

// buffer returns an empty buffer of capacity at least n, recycled where
// possible. Large capacities are rounded up to whole MiB so that a
// recycled buffer fits most chunks.
func (c *codec) buffer(n int) []byte {
	const unit = 1 << 20
	if n < unit/4 {
		return make([]byte, 0, n) // small objects: not worth a MiB
	}
	if b := c.bufs.get(n); b != nil {
		return b
	}
	return make([]byte, 0, (n+unit-1)/unit*unit)
}

// recycle hands b, from seal, back for reuse. The caller must not use b
// afterwards, nor let anything else still read it (a store's upload).
func (c *codec) recycle(b []byte) {
	if cap(b) >= 1<<20 {
		c.bufs.put(b)
	}
}

// freeBytes bounds the idle buffers a codec keeps for reuse.
const freeBytes = 32 << 20

// freeList keeps idle sealing buffers, up to freeBytes of them. Unlike a
// sync.Pool it is not emptied by each garbage collection: a backup runs
// one every few hundred milliseconds, and every MiB-sized buffer made
// again is cleared again (runtime.memclrNoHeapPointers in the profiles).
type freeList struct {
	mu    sync.Mutex
	free  [][]byte
	bytes int
}

// get returns the smallest idle buffer of capacity at least n, emptied,
// or nil.
func (f *freeList) get(n int) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	best := -1
	for i, b := range f.free {
		if cap(b) >= n && (best < 0 || cap(b) < cap(f.free[best])) {
			best = i
		}
	}
	if best < 0 {
		return nil
	}
	b := f.free[best]
	last := len(f.free) - 1
	f.free[best] = f.free[last]
	f.free[last] = nil
	f.free = f.free[:last]
	f.bytes -= cap(b)
	return b[:0]
}

// put keeps b for reuse if there is room under freeBytes.
func (f *freeList) put(b []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.bytes+cap(b) <= freeBytes {
		f.free = append(f.free, b)
		f.bytes += cap(b)
	}
}

// probeSize is how much of a large payload is test-compressed before the
// whole is: disk images hold much incompressible data (compressed files,
// encrypted volumes, media), and zstd spends nearly as long failing on
// such data as succeeding on text.
const probeSize = 64 << 10

// compressible reports whether any of three probes (at a quarter, half
// and three quarters of payload) compresses by at least 1/32; small
// payloads are always tried. Chunks of disk images are often mixed (a
// file boundary inside), so one incompressible probe is not enough to
// give up.
func (c *codec) compressible(payload []byte) bool {
	if len(payload) < 8*probeSize {
		return true
	}
	// A recycled buffer: one of the probe's size escapes to the heap.
	buf := c.buffer(1 << 20)
	defer c.recycle(buf)
	for _, at := range []int{len(payload) / 4, len(payload) / 2, len(payload) * 3 / 4} {
		probe := payload[at-probeSize/2 : at+probeSize/2]
		if z := c.enc.EncodeAll(probe, buf[:0]); len(z) < len(probe)-len(probe)/32 {
			return true
		}
	}
	return false
}

// open authenticates, decrypts and decompresses object name, which must
// be of type want.
func (c *codec) open(want ObjectType, name string, data []byte) ([]byte, error) {
	hdr, err := parseHeader(data)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", want, name, err)
	}
	if hdr.Type != want {
		return nil, fmt.Errorf("%s %s: is a %s object: %w", want, name, hdr.Type, ErrCorrupt)
	}
	body, err := c.sealer.Open(nil, data[headerSize:], associatedData(data[:headerSize], name))
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w: %w", want, name, ErrCorrupt, err)
	}
	if hdr.Compression == compressZstd {
		body, err = c.dec.DecodeAll(body, nil)
		if err != nil {
			return nil, fmt.Errorf("%s %s: decompress: %w: %w", want, name, ErrCorrupt, err)
		}
	}
	return body, nil
}

// openInto opens object name, of type want, into dst, which it must fill
// exactly: the plaintext is decrypted in place in data (which is
// clobbered) and decompressed straight into dst, or decrypted straight
// into dst when stored uncompressed, so a restored chunk is never copied
// or allocated again. An object of another size is ErrCorrupt.
func (c *codec) openInto(want ObjectType, name string, data, dst []byte) error {
	hdr, err := parseHeader(data)
	if err != nil {
		return fmt.Errorf("%s %s: %w", want, name, err)
	}
	if hdr.Type != want {
		return fmt.Errorf("%s %s: is a %s object: %w", want, name, hdr.Type, ErrCorrupt)
	}
	ad := associatedData(data[:headerSize], name)
	sealed := data[headerSize:]
	// In place: the AEAD allows the plaintext over its own ciphertext.
	out := sealed[crypto.NonceSize:crypto.NonceSize]
	if hdr.Compression != compressZstd {
		if len(sealed)-crypto.Overhead != len(dst) {
			return fmt.Errorf("%s %s: holds %d bytes, expected %d: %w", want, name, max(0, len(sealed)-crypto.Overhead), len(dst), ErrCorrupt)
		}
		out = dst[:0]
	}
	body, err := c.sealer.Open(out, sealed, ad)
	if err != nil {
		return fmt.Errorf("%s %s: %w: %w", want, name, ErrCorrupt, err)
	}
	if hdr.Compression != compressZstd {
		return nil
	}
	// The capacity stops the decoder at dst's end: anything longer goes
	// to a buffer of its own and fails the length check.
	got, err := c.dec.DecodeAll(body, dst[:0:len(dst)])
	if err != nil {
		return fmt.Errorf("%s %s: decompress: %w: %w", want, name, ErrCorrupt, err)
	}
	if len(got) != len(dst) {
		return fmt.Errorf("%s %s: holds %d bytes, expected %d: %w", want, name, len(got), len(dst), ErrCorrupt)
	}
	if len(got) > 0 && &got[0] != &dst[0] {
		// A frame announcing a larger size made the decoder allocate.
		copy(dst, got)
	}
	return nil
}

// objectHeader is the cleartext part of a sealed object.
type objectHeader struct {
	Type        ObjectType
	Compression byte
}

// parseHeader checks the cleartext header of a sealed object. check uses it
// to find damaged objects without the key's help.
func parseHeader(data []byte) (objectHeader, error) {
	if len(data) < headerSize+crypto.Overhead {
		return objectHeader{}, fmt.Errorf("too short (%d bytes): %w", len(data), ErrCorrupt)
	}
	return parseHeaderBytes(data[:headerSize])
}

// parseHeaderBytes checks the first headerSize bytes of a sealed object.
func parseHeaderBytes(h []byte) (objectHeader, error) {
	if len(h) != headerSize {
		return objectHeader{}, fmt.Errorf("short header: %w", ErrCorrupt)
	}
	if h[0] != objectMagic {
		return objectHeader{}, fmt.Errorf("bad magic %#x: %w", h[0], ErrCorrupt)
	}
	if h[1] != objectVersion {
		return objectHeader{}, fmt.Errorf("unsupported object version %d: %w", h[1], ErrCorrupt)
	}
	t := ObjectType(h[2])
	if t < TypeChunk || t > TypeTable {
		return objectHeader{}, fmt.Errorf("unknown object type %d: %w", h[2], ErrCorrupt)
	}
	if h[3] != compressNone && h[3] != compressZstd {
		return objectHeader{}, fmt.Errorf("unknown compression %d: %w", h[3], ErrCorrupt)
	}
	return objectHeader{Type: t, Compression: h[3]}, nil
}

// Object names.

func dataName(id crypto.ID) string {
	h := hex.EncodeToString(id[:])
	return "data/" + h[:2] + "/" + h
}

func manifestName(id crypto.ID) string { return "manifests/" + hex.EncodeToString(id[:]) }
func indexName(id crypto.ID) string    { return "index/" + hex.EncodeToString(id[:]) }
func lockName(id crypto.ID) string     { return "locks/" + hex.EncodeToString(id[:]) }

const configName = "config"

// parseID parses a full hexadecimal ID.
func parseID(s string) (crypto.ID, error) {
	var id crypto.ID
	if len(s) != 64 {
		return id, fmt.Errorf("invalid ID %q", s)
	}
	_, err := hex.Decode(id[:], []byte(s))
	return id, err
}

func randomID() crypto.ID {
	var id crypto.ID
	k, err := crypto.NewSalt()
	if err != nil {
		panic(err)
	}
	copy(id[:], k)
	return id
}

// Format limits on stored objects (docs/format.md, "Limits"). Sizes and
// counts read from the repository are untrusted: a reader refuses an
// object larger than its kind can be before reading it, so a damaged or
// hostile store cannot make vmvault allocate what the server claims.
const (
	// maxDataObject bounds a data object: a chunk of at most chunk.MaxSize
	// bytes stored uncompressed is the largest; segment lists (a few
	// thousand entries) and segment tables (64 KiB) are far smaller.
	maxDataObject = chunk.MaxSize + headerSize + crypto.Overhead
	// maxIndexObject bounds an index object (prune writes up to
	// indexObjectEntries entries of at most 38 bytes each).
	maxIndexObject = 8 << 20
	// maxManifestObject bounds a manifest.
	maxManifestObject = 4 << 20
	// maxSmallObject bounds a key file, the config and a lock.
	maxSmallObject = 64 << 10
)

// ErrTooLarge marks an object larger than the format allows for its kind.
// It is the backend's sentinel: GetAll refuses such an object unread.
var ErrTooLarge = backend.ErrTooLarge

// getBounded reads the whole object name in one request, refusing it
// without reading when the store reports more than limit bytes.
func getBounded(ctx context.Context, be backend.Backend, name string, limit int64) ([]byte, error) {
	data, err := be.GetAll(ctx, name, limit)
	if errors.Is(err, backend.ErrTooLarge) {
		return nil, fmt.Errorf("%w: %w", err, ErrCorrupt)
	}
	return data, err
}
