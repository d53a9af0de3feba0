package repo

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"vmvault/crypto"
)

// allocatedBy returns the bytes the Go heap handed out while fn ran.
func allocatedBy(fn func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	fn()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// A segment list whose header claims millions of entries (8 MiB of
// zeros behind it: a 1.6 KB sealed object once compressed) allocated 40
// bytes per claimed entry, 320 MiB, before parsing failed.
func TestDecodeSegmentListAllocationBounded(t *testing.T) {
	b := []byte{segmentListVersion}
	b = binary.AppendUvarint(b, 8<<20)
	b = append(b, make([]byte, 8<<20)...)
	var err error
	n := allocatedBy(func() { _, err = decodeSegmentList(b) })
	if err == nil || !errors.Is(err, ErrCorrupt) {
		t.Fatalf("hostile list accepted: %v", err)
	}
	t.Logf("hostile segment list: %d bytes allocated", n)
	if n > 1<<20 {
		t.Fatalf("decoding a hostile segment list allocated %d bytes", n)
	}
	// A list within the limit still decodes.
	entries := make([]SegmentEntry, maxSegmentEntries)
	for i := range entries {
		entries[i] = SegmentEntry{Zero: i%2 == 1, Length: 1, ID: crypto.ID{byte(i%2 ^ 1)}}
	}
	if _, err := decodeSegmentList(encodeSegmentList(entries)); err != nil {
		t.Fatalf("list of %d entries refused: %v", len(entries), err)
	}
	if _, err := decodeSegmentList(encodeSegmentList(append(entries, SegmentEntry{Zero: true, Length: 1}))); err == nil {
		t.Fatal("list beyond the format limit accepted")
	}
}

// A 412-byte manifest listing one segment table 4,096 times (for a disk
// it claims to be 64 TiB) made a prune dry run allocate 1.69 GiB. The
// format bounds a disk's segments and tables; such a manifest is refused
// as damaged, by name, before anything is sized by it.
func TestManifestRepeatedTableRefused(t *testing.T) {
	tr := newTestRepo(t)
	ctx := context.Background()
	tid := strings.Repeat("ab", 32)
	tables := make([]string, 4096)
	for i := range tables {
		tables[i] = tid
	}
	seg := int64(DefaultSegmentSize)
	m := map[string]any{"version": ManifestVersion, "vm": "vm01", "time": "2026-11-30T00:00:00Z",
		"disks": []map[string]any{{"name": "d", "size": 4096 * TableSegments * seg, "segment_size": seg, "segment_count": 4096 * TableSegments,
			"segment_tables": tables, "digest": strings.Repeat("00", 32)}}}
	raw, _ := json.Marshal(m)
	id := randomID()
	name := manifestName(id)
	if err := tr.be.Put(ctx, name, tr.codec.seal(TypeManifest, name, raw)); err != nil {
		t.Fatal(err)
	}
	var err error
	n := allocatedBy(func() { _, err = tr.LoadManifest(ctx, hex.EncodeToString(id[:])) })
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), hex.EncodeToString(id[:])[:8]) {
		t.Fatalf("oversized manifest: %v", err)
	}
	t.Logf("manifest naming one table 4096 times: %d bytes allocated", n)
	if n > 4<<20 {
		t.Fatalf("loading the manifest allocated %d bytes", n)
	}
	// The prune dry run of the report (a plan) is not sized by it.
	n = allocatedBy(func() {
		plan, err := tr.PlanPrune(ctx, PruneOptions{})
		if err == nil {
			plan.Close()
		}
	})
	t.Logf("prune plan over it: %d bytes allocated", n)
	if n > 16<<20 {
		t.Fatalf("prune plan allocated %d MiB", n>>20)
	}
	// The same table repeated within the limits is legitimate (an empty
	// disk's tables are all alike) and is fetched once.
	if err := (&Disk{Name: "d", Size: MaxDiskSegments * seg, SegmentSize: seg, SegmentCount: MaxDiskSegments, Tables: make([]HexID, MaxDiskTables)}).validateLimits(); err != nil {
		t.Fatalf("disk at the limit refused: %v", err)
	}
	if err := (&Disk{Name: "d", Size: MaxDiskSegments*seg + 1, SegmentSize: seg, SegmentCount: MaxDiskSegments + 1, Tables: make([]HexID, MaxDiskTables+1)}).validateLimits(); err == nil {
		t.Fatal("disk beyond the limit accepted")
	}
}

// The store decides what size it reports. A 1 TiB sparse file in place
// of a chunk made Get allocate 1 TiB ("fatal error: out of memory"); now
// the object is refused by its size, by name, with nothing allocated.
func TestSparseTebibyteObjectRefused(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(3, 6<<20)
	m := backupBytes(t, tr.Repository, "vm01", img)
	// Replace a chunk of the generation with a 1 TiB sparse file.
	r := tr.reopen(t)
	if err := r.resolveManifest(context.Background(), m); err != nil {
		t.Fatal(err)
	}
	sid, _ := m.Disks[0].SegmentID(0)
	var victim crypto.ID
	for _, e := range segmentEntries(t, r, sid) {
		if !e.Zero {
			victim = e.ID
			break
		}
	}
	path := filepath.Join(tr.dir, dataName(victim))
	os.Chmod(path, 0o600)
	if err := os.Truncate(path, 1<<40); err != nil {
		t.Fatal(err)
	}
	var err error
	n := allocatedBy(func() { _, err = r.getData(context.Background(), TypeChunk, victim) })
	if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), dataName(victim)) {
		t.Fatalf("1 TiB object: %v", err)
	}
	t.Logf("1 TiB sparse object: %d bytes allocated", n)
	if n > 1<<20 {
		t.Fatalf("refusing the object allocated %d bytes", n)
	}
	var out strings.Builder
	if _, err := r.Restore(context.Background(), m, "", &out); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("restore over a 1 TiB object: %v", err)
	}
}
