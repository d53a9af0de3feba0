package repo

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"vmvault/chunk"
	"vmvault/crypto"
)

var updateVectors = flag.Bool("update-vectors", false, "rewrite testdata/vectors.json")

// vector is one test vector of docs/format.md: an object sealed under a
// fixed key, and what it must open to.
type vector struct {
	Comment   string `json:"comment"`
	EncKey    string `json:"encryption_key"`
	IDKey     string `json:"id_key"`
	Name      string `json:"name"`
	Type      int    `json:"type"`
	Sealed    string `json:"sealed"`
	Plaintext string `json:"plaintext"`
	ChunkID   string `json:"chunk_id,omitempty"` // keyed BLAKE3 "chunk" ID of plaintext
	// SegmentID is the keyed BLAKE3 "segment-list" ID of a segment
	// list's plaintext: its name (manifest version 3).
	SegmentID string `json:"segment_id,omitempty"`
}

func vectorKeys() *crypto.MasterKey {
	var mk crypto.MasterKey
	for i := range mk.Encrypt {
		mk.Encrypt[i] = byte(i)
		mk.ID[i] = byte(0x80 + i)
	}
	return &mk
}

func TestVectors(t *testing.T) {
	path := filepath.Join("testdata", "vectors.json")
	mk := vectorKeys()
	c, err := newCodec(mk.Encrypt[:])
	if err != nil {
		t.Fatal(err)
	}
	chunkH := crypto.NewHasher(mk.ID, "chunk")
	segListH := crypto.NewHasher(mk.ID, "segment-list")
	if *updateVectors {
		chunkData := bytes.Repeat([]byte("vmvault test vector chunk. "), 100)
		cid := chunkH.Sum(chunkData)
		seg := encodeSegmentList([]SegmentEntry{{Length: uint32(len(chunkData)), ID: cid}, {Zero: true, Length: 65536}})
		idx := encodeIndex([]IndexEntry{{ID: cid, Type: TypeChunk, Size: 123}})
		var vs []vector
		add := func(comment string, t ObjectType, name string, plain []byte) {
			v := vector{Comment: comment, EncKey: hex.EncodeToString(mk.Encrypt[:]), IDKey: hex.EncodeToString(mk.ID[:]),
				Name: name, Type: int(t), Sealed: hex.EncodeToString(c.seal(t, name, plain)), Plaintext: hex.EncodeToString(plain)}
			switch t {
			case TypeChunk:
				v.ChunkID = hex.EncodeToString(cid[:])
			case TypeSegment:
				sid := segListH.Sum(plain)
				v.SegmentID = hex.EncodeToString(sid[:])
			}
			vs = append(vs, v)
		}
		add("compressible chunk (zstd)", TypeChunk, dataName(cid), chunkData)
		add("segment list: one chunk, one 64 KiB zero run; named by its segment ID", TypeSegment, dataName(segListH.Sum(seg)), seg)
		add("index with one entry", TypeIndex, indexName(crypto.ID{2}), idx)
		add("short object, stored uncompressed", TypeLock, lockName(crypto.ID{3}), []byte("{}"))
		add("segment table: a chunked segment, then an all-zero one", TypeTable, dataName(crypto.ID{4}), encodeTable(append(bytes.Repeat([]byte{1}, 32), make([]byte, 32)...), []int64{6 << 20, 12 << 20}))
		out, _ := json.MarshalIndent(vs, "", "  ")
		os.MkdirAll("testdata", 0o755)
		if err := os.WriteFile(path, append(out, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var vs []vector
	if err := json.Unmarshal(raw, &vs); err != nil {
		t.Fatal(err)
	}
	if len(vs) < 4 {
		t.Fatalf("only %d vectors", len(vs))
	}
	for _, v := range vs {
		sealed, _ := hex.DecodeString(v.Sealed)
		want, _ := hex.DecodeString(v.Plaintext)
		got, err := c.open(ObjectType(v.Type), v.Name, sealed)
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: open = %v", v.Comment, err)
		}
		if v.ChunkID != "" {
			if id := chunkH.Sum(want); hex.EncodeToString(id[:]) != v.ChunkID {
				t.Errorf("%s: chunk ID differs", v.Comment)
			}
		}
		if v.SegmentID != "" {
			if id := segListH.Sum(want); hex.EncodeToString(id[:]) != v.SegmentID || v.Name != dataName(id) {
				t.Errorf("%s: segment ID differs, or does not name the object", v.Comment)
			}
		}
		// Renamed: must fail.
		if _, err := c.open(ObjectType(v.Type), v.Name+"x", sealed); err == nil {
			t.Errorf("%s: opened under another name", v.Comment)
		}
	}
}

func TestSegmentListRoundTrip(t *testing.T) {
	in := []SegmentEntry{{Length: 5, ID: crypto.ID{9}}, {Zero: true, Length: 1 << 20}, {Length: 1, ID: crypto.ID{1, 2}}}
	out, err := decodeSegmentList(encodeSegmentList(in))
	if err != nil || len(out) != 3 || out[0] != in[0] || out[1] != in[1] || out[2] != in[2] {
		t.Fatalf("round trip: %v %+v", err, out)
	}
	for _, bad := range [][]byte{nil, {1}, {2, 0}, {1, 1, 0, 5}, {1, 1, 7, 5}, {1, 1, 1, 0}, append(encodeSegmentList(in), 0)} {
		if _, err := decodeSegmentList(bad); err == nil {
			t.Errorf("accepted %x", bad)
		}
	}
}

// Fuzz seeds. Each fuzzer starts from objects its decoder accepts, and
// TestFuzzSeedsAccepted keeps them so: a seed the decoder rejects (a
// stale one, after a format change) tests nothing but the first check.

func segmentListSeeds() [][]byte {
	return [][]byte{
		encodeSegmentList([]SegmentEntry{{Length: 5, ID: crypto.ID{9}}, {Zero: true, Length: 7}}),
		encodeSegmentList([]SegmentEntry{{Zero: true, Length: 1 << 20}}),
		encodeSegmentList([]SegmentEntry{{Length: chunk.MinSize, ID: crypto.ID{1}}, {Zero: true, Length: chunk.ZeroBlock}, {Length: 3, ID: crypto.ID{2}}}),
	}
}

func indexSeeds() [][]byte {
	return [][]byte{
		encodeIndex([]IndexEntry{{ID: crypto.ID{1}, Type: TypeChunk, Size: 77}}),
		encodeIndex([]IndexEntry{{ID: crypto.ID{1}, Type: TypeSegment, Size: 300}, {ID: crypto.ID{2}, Type: TypeTable, Size: 1 << 16}}),
	}
}

func tableSeeds() [][]byte {
	full := make([]int64, TableSegments)
	for i := range full {
		full[i] = DefaultSegmentSize + int64(i)*4096
	}
	return [][]byte{encodeTable(make([]byte, 64), []int64{1, 1 << 20}), encodeTable(bytes.Repeat([]byte{7}, 32*TableSegments), full)}
}

// manifestSeeds are manifests as Backup writes them, including the one
// that made Disk.SegmentID panic (a 1-byte disk with one table).
func manifestSeeds() [][]byte {
	mk := func(size int64, segs, tables int) []byte {
		m := Manifest{Version: ManifestVersion, VM: "vm01", Time: time.Date(2026, 11, 30, 1, 0, 0, 0, time.UTC), Host: "h",
			Tags: []string{"nightly"}, Disks: []Disk{{Name: "hda", Source: "vg/vm01", Size: size, SegmentSize: DefaultSegmentSize,
				SegmentCount: segs, Tables: make([]HexID, tables), Digest: HexID{1}}}, Quiesce: json.RawMessage(`{"guest":"frozen"}`)}
		b, err := json.Marshal(&m)
		if err != nil {
			panic(err)
		}
		return b
	}
	return [][]byte{mk(1, 1, 1), mk(0, 0, 0), mk(3*DefaultSegmentSize+5, 4, 1), mk(TableSegments*DefaultSegmentSize+1, TableSegments+1, 2)}
}

func TestFuzzSeedsAccepted(t *testing.T) {
	for _, b := range segmentListSeeds() {
		if _, err := decodeSegmentList(b); err != nil {
			t.Errorf("segment list seed %x: %v", b, err)
		}
	}
	for _, b := range indexSeeds() {
		if _, err := decodeIndex(b); err != nil {
			t.Errorf("index seed %x: %v", b, err)
		}
	}
	for _, b := range tableSeeds() {
		if _, _, err := decodeTable(b); err != nil {
			t.Errorf("table seed: %v", err)
		}
	}
	for _, b := range manifestSeeds() {
		var m Manifest
		if err := json.Unmarshal(b, &m); err != nil || m.validate() != nil {
			t.Errorf("manifest seed %s: %v %v", b, err, m.validate())
		}
		// No field of a seed may be one the format no longer has.
		var back map[string]any
		json.Unmarshal(b, &back)
		again, _ := json.Marshal(&m)
		var want map[string]any
		json.Unmarshal(again, &want)
		if !reflect.DeepEqual(back, want) {
			t.Errorf("manifest seed has fields the format lacks: %s", b)
		}
	}
	c, _ := newCodec(vectorKeys().Encrypt[:])
	for _, s := range openSeeds(c) {
		if _, err := c.open(TypeChunk, s.name, s.sealed); err != nil {
			t.Errorf("object seed %q: %v", s.name, err)
		}
	}
	data, _ := sealMasterKey(vectorKeys(), []byte("pw"), crypto.MinKDFParams)
	if _, err := parseKeyFile(data); err != nil {
		t.Errorf("key file seed: %v", err)
	}
}

func FuzzDecodeSegmentList(f *testing.F) {
	for _, b := range segmentListSeeds() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		es, err := decodeSegmentList(b)
		if err != nil {
			return
		}
		if !bytes.Equal(encodeSegmentList(es), b) {
			t.Fatalf("decode/encode not inverse for %x", b)
		}
	})
}

func FuzzDecodeIndex(f *testing.F) {
	for _, b := range indexSeeds() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		es, err := decodeIndex(b)
		if err != nil {
			return
		}
		if !bytes.Equal(encodeIndex(es), b) {
			t.Fatalf("decode/encode not inverse for %x", b)
		}
	})
}

type openSeed struct {
	name   string
	sealed []byte
}

func openSeeds(c *codec) []openSeed {
	return []openSeed{
		{"data/00/x", c.seal(TypeChunk, "data/00/x", []byte("hello"))},
		{"data/00/y", c.seal(TypeChunk, "data/00/y", bytes.Repeat([]byte("compressible "), 100))},
	}
}

func FuzzOpenObject(f *testing.F) {
	mk := vectorKeys()
	c, _ := newCodec(mk.Encrypt[:])
	seeds := openSeeds(c)
	want := map[string][]byte{}
	for _, s := range seeds {
		f.Add(s.sealed, s.name)
		want[s.name], _ = c.open(TypeChunk, s.name, s.sealed)
	}
	f.Fuzz(func(t *testing.T, b []byte, name string) {
		// Must never panic, and only an authentic seed object under its
		// own name may open. (Fuzz workers seal their own seeds with a
		// fresh nonce, so the check is on what opened, not on the bytes.)
		out, err := c.open(TypeChunk, name, b)
		if w, ok := want[name]; err == nil && (!ok || !bytes.Equal(out, w)) {
			t.Fatalf("forged object opened: %x as %q", b, name)
		}
		// openInto (restore) by the same rule, into a buffer of the size
		// a segment list promises, never writing past it.
		if w, ok := want[name]; ok {
			dst := make([]byte, len(w)+1)
			dst[len(w)] = 0xee
			err := c.openInto(TypeChunk, name, bytes.Clone(b), dst[:len(w)])
			if err == nil && !bytes.Equal(dst[:len(w)], w) || dst[len(w)] != 0xee {
				t.Fatalf("forged object opened into a buffer: %x as %q", b, name)
			}
		}
	})
}

// openInto fills its buffer exactly, from compressed and stored objects
// alike, and refuses an object of another size (ErrCorrupt) without
// writing outside the buffer: restore decodes chunks of one segment
// side by side into one buffer, from several goroutines.
func TestOpenInto(t *testing.T) {
	c, err := newCodec(vectorKeys().Encrypt[:])
	if err != nil {
		t.Fatal(err)
	}
	random := make([]byte, 300<<10)
	rand.Read(random)
	for _, tc := range []struct {
		name    string
		payload []byte
	}{
		{"compressed", bytes.Repeat([]byte("compressible "), 50000)},
		{"stored", random},
	} {
		sealed := c.seal(TypeChunk, "data/00/x", tc.payload)
		n := len(tc.payload)
		for _, size := range []int{n, n - 1, n + 1, 0} {
			buf := bytes.Repeat([]byte{0xee}, n+64)
			dst := buf[32 : 32+size]
			err := c.openInto(TypeChunk, "data/00/x", bytes.Clone(sealed), dst)
			switch {
			case size == n && (err != nil || !bytes.Equal(dst, tc.payload)):
				t.Errorf("%s: open into %d bytes: %v", tc.name, size, err)
			case size != n && !errors.Is(err, ErrCorrupt):
				t.Errorf("%s: open %d bytes into %d: %v, want ErrCorrupt", tc.name, n, size, err)
			}
			if !bytes.Equal(buf[:32], bytes.Repeat([]byte{0xee}, 32)) || !bytes.Equal(buf[32+size:], bytes.Repeat([]byte{0xee}, len(buf)-32-size)) {
				t.Errorf("%s: opening into %d bytes wrote outside them", tc.name, size)
			}
		}
		if err := c.openInto(TypeSegment, "data/00/x", bytes.Clone(sealed), make([]byte, n)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: opened as the wrong type: %v", tc.name, err)
		}
		if err := c.openInto(TypeChunk, "data/00/y", bytes.Clone(sealed), make([]byte, n)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: opened under another name: %v", tc.name, err)
		}
	}
}

func FuzzManifest(f *testing.F) {
	for _, b := range manifestSeeds() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var m Manifest
		if json.Unmarshal(b, &m) != nil || m.validate() != nil {
			return
		}
		for i := range m.Disks {
			d := &m.Disks[i]
			n := d.segmentCount()
			if n > MaxDiskSegments || len(d.Tables) > MaxDiskTables {
				t.Fatalf("validated manifest beyond the format limits: %d segments, %d tables", n, len(d.Tables))
			}
			if n > 4096 {
				continue
			}
			for j := range n {
				// Unresolved (no tables read): must not panic, and must
				// not pass the segment off as all zeros.
				if id, zero := d.SegmentID(j); zero || id != unresolvedSegment {
					t.Fatal("unresolved segment taken for a real one")
				}
			}
			// A validated count can always be filled with segments of
			// allowed lengths: split the size evenly.
			lens := make([]int64, n)
			for j := range lens {
				lens[j] = d.Size / int64(n)
				if int64(j) < d.Size%int64(n) {
					lens[j]++
				}
			}
			if err := d.setSegments(make([]byte, 32*n), lens); err != nil {
				t.Fatalf("validated manifest: %v", err)
			}
			for j := range n {
				if _, zero := d.SegmentID(j); !zero || d.segmentLen(j) <= 0 {
					t.Fatalf("segment %d misplaced", j)
				}
				if i, start := d.segmentAt(d.segmentStart(j)); i != j || start != d.segmentStart(j) {
					t.Fatalf("segmentAt(start of %d) = %d", j, i)
				}
			}
		}
	})
}

func FuzzKeyFile(f *testing.F) {
	data, _ := sealMasterKey(vectorKeys(), []byte("pw"), crypto.MinKDFParams)
	f.Add(data)
	want := vectorKeys()
	f.Fuzz(func(t *testing.T, b []byte) {
		kf, err := parseKeyFile(b)
		if err != nil || kf.Params != crypto.MinKDFParams {
			return // other parameters may be costly to try; parsing is what is fuzzed
		}
		// With "pw", a key file opens to the master key it was made
		// with, or not at all.
		mk, err := openKeyFile(context.Background(), kf, []byte("pw"))
		if err == nil && *mk != *want {
			t.Fatal("a mutated key file opened to another master key")
		}
	})
}

func TestCompressionProbe(t *testing.T) {
	c, _ := newCodec(vectorKeys().Encrypt[:])
	text := bytes.Repeat([]byte("log line 42: all good\n"), 1<<16)
	if sealed := c.seal(TypeChunk, "n", text); sealed[3] != compressZstd {
		t.Fatal("text stored uncompressed")
	}
	rnd := make([]byte, 1<<20)
	rand.Read(rnd)
	if c.compressible(rnd) {
		t.Fatal("random data judged compressible")
	}
	if sealed := c.seal(TypeChunk, "n", rnd); sealed[3] != compressNone || len(sealed) != len(rnd)+headerSize+crypto.Overhead {
		t.Fatal("random data stored compressed or with overhead")
	}
	// Random data with text in one quarter is still compressed.
	mixed := bytes.Clone(rnd)
	copy(mixed[len(mixed)/4-probeSize:], text[:2*probeSize])
	if !c.compressible(mixed) {
		t.Fatal("probes missed a compressible quarter")
	}
}

func FuzzDecodeTable(f *testing.F) {
	for _, b := range tableSeeds() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		segs, lens, err := decodeTable(b)
		if err != nil {
			return
		}
		if len(segs) == 0 || len(segs) != 32*len(lens) || !bytes.Equal(encodeTable(segs, lens), b) {
			t.Fatalf("bad table accepted: %x", b)
		}
	})
}

// Sealing reuses recycled buffers: an object sealed into a recycled
// buffer opens to its own payload, and a copy of the object whose buffer
// was recycled still opens to its.
func TestSealRecycledBuffers(t *testing.T) {
	c, err := newCodec(make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	compressible := bytes.Repeat([]byte("vmvault segment "), 64<<10) // 1 MiB
	random := testImage(21, 3<<20)
	var kept [][]byte
	for i, payload := range [][]byte{compressible, random, compressible[:300<<10], random[:1<<20]} {
		name := fmt.Sprintf("data/%02d", i)
		sealed := c.seal(TypeChunk, name, payload)
		kept = append(kept, bytes.Clone(sealed))
		c.recycle(sealed)
	}
	for i, payload := range [][]byte{compressible, random, compressible[:300<<10], random[:1<<20]} {
		got, err := c.open(TypeChunk, fmt.Sprintf("data/%02d", i), kept[i])
		if err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("object %d: %v", i, err)
		}
	}
}
