package repo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"vmvault/chunk"

	"vmvault/backend"
	"vmvault/crypto"
)

// ageRepository sets every file under dirs of the repository to at, as
// if written then (the store's clock judges age by file time).
func ageRepository(t *testing.T, root string, at time.Time, dirs ...string) {
	t.Helper()
	eachFile(root, dirs, func(p string) { os.Chtimes(p, at, at) })
}

// eachFile calls fn with the path of every file under root/dirs.
func eachFile(root string, dirs []string, fn func(path string)) {
	for _, d := range dirs {
		filepath.Walk(filepath.Join(root, d), func(p string, fi os.FileInfo, err error) error {
			if err == nil && !fi.IsDir() {
				fn(p)
			}
			return nil
		})
	}
}

// The walker yields every table, segment list and chunk with the
// generation and object that referenced it; counts agree with check.
func TestWalkOrigins(t *testing.T) {
	tr := newTestRepo(t)
	ctx := context.Background()
	img := testImage(3, 9<<20)
	m1 := backupBytes(t, tr.Repository, "vm01", img)
	img[5<<20] ^= 1
	m2 := backupBytes(t, tr.Repository, "vm02", img)
	var gens []string
	tables, lists, chunks := map[crypto.ID]bool{}, map[crypto.ID]bool{}, map[crypto.ID]bool{}
	refs := 0
	w := Walk{
		Generation: func(m *Manifest) error { gens = append(gens, m.VM+"/"+m.ShortID()); return nil },
		Table: func(id crypto.ID, from Origin) error {
			if !strings.HasPrefix(from.Object, "manifests/") || from.Disk != "disk" {
				t.Errorf("table %x from %v", id[:4], from)
			}
			tables[id] = true
			return nil
		},
		SegmentRef: func(id crypto.ID, zero bool, length int64, from Origin) (bool, error) {
			refs++
			if length <= 0 || !strings.HasPrefix(from.Object, "data/") {
				t.Errorf("segment ref length %d from %v", length, from)
			}
			return true, nil
		},
		SegmentList: func(id crypto.ID, _ []SegmentEntry, from Origin) error {
			lists[id] = true
			return nil
		},
		Chunk: func(e SegmentEntry, from Origin) error {
			if e.Zero || !lists[mustParse(t, shortName(from.Object))] {
				t.Errorf("chunk %x from %v: not from a yielded segment list", e.ID[:4], from)
			}
			chunks[e.ID] = true
			return nil
		},
	}
	if err := w.Run(ctx, tr.Repository); err != nil {
		t.Fatal(err)
	}
	want := []string{m1.VM + "/" + m1.ShortID(), m2.VM + "/" + m2.ShortID()}
	if len(gens) != 2 || !(gens[0] == want[0] && gens[1] == want[1] || gens[0] == want[1] && gens[1] == want[0]) {
		t.Fatalf("generations %v, want %v", gens, want)
	}
	if refs != 2*int(m1.Disks[0].segmentCount()) {
		t.Fatalf("%d segment refs, want %d", refs, 2*m1.Disks[0].segmentCount())
	}
	rep, err := tr.Check(ctx, CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Tables != len(tables) || rep.Segments != len(lists) || rep.Chunks != len(chunks) || !rep.OK() {
		t.Fatalf("walk saw %d tables, %d lists, %d chunks; check %+v", len(tables), len(lists), len(chunks), rep)
	}

	// A missing segment list stops a walk without OnError, naming the
	// generation and the object; with OnError it is reported and skipped.
	var victim crypto.ID
	for id := range lists {
		victim = id
		break
	}
	os.Remove(filepath.Join(tr.dir, filepath.FromSlash(dataName(victim))))
	err = (&Walk{SegmentList: func(crypto.ID, []SegmentEntry, Origin) error { return nil }}).Run(ctx, tr.Repository)
	if !errors.Is(err, backend.ErrNotExist) || !strings.Contains(err.Error(), "generation vm0") {
		t.Fatalf("walk over a missing segment list: %v", err)
	}
	var reported []string
	err = (&Walk{
		SegmentList: func(crypto.ID, []SegmentEntry, Origin) error { return nil },
		OnError:     func(object string, err error, from Origin) error { reported = append(reported, object); return nil },
	}).Run(ctx, tr.Repository)
	if err != nil || len(reported) == 0 || reported[0] != dataName(victim) {
		t.Fatalf("OnError walk: %v, reported %v", err, reported)
	}
}

func mustParse(t *testing.T, s string) crypto.ID {
	id, err := parseID(s)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// Stats had no tests. Per VM and in total: generations, logical bytes,
// zero bytes, unique bytes counted once across generations, stored
// bytes; JSON names say what they are.
func TestStats(t *testing.T) {
	tr := newTestRepo(t)
	ctx := context.Background()
	img := make([]byte, 12<<20) // 3 segments: data, zeros, data
	copy(img, testImage(7, 4<<20))
	copy(img[8<<20:], testImage(8, 4<<20))
	backupBytes(t, tr.Repository, "vm01", img)
	backupBytes(t, tr.Repository, "vm01", img) // identical: no new unique bytes
	backupBytes(t, tr.Repository, "vm02", img[:4<<20])
	st, err := tr.Stats(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 3 || st[0].VM != "vm01" || st[1].VM != "vm02" || st[2].VM != "total" {
		t.Fatalf("stats rows %+v", st)
	}
	vm1, vm2, total := st[0], st[1], st[2]
	if vm1.Generations != 2 || vm1.LogicalBytes != 24<<20 || vm1.ZeroBytes < 8<<20 {
		t.Fatalf("vm01 %+v", vm1)
	}
	// Unique bytes are the non-zero image bytes, once (minus zero runs
	// inside segments the chunker found).
	nonZero := int64(12<<20) - vm1.ZeroBytes/2
	if vm1.UniqueBytes != nonZero {
		t.Fatalf("vm01 unique %d, want %d (%+v)", vm1.UniqueBytes, nonZero, vm1)
	}
	if vm2.Generations != 1 || vm2.LogicalBytes != 4<<20 || vm2.UniqueBytes > 4<<20 || vm2.UniqueBytes == 0 {
		t.Fatalf("vm02 %+v", vm2)
	}
	// vm02's data is vm01's first 4 MiB: the total counts it once, but for
	// vm02's last chunk, which its end cuts short (chunk and segment
	// boundaries are keyed per repository, so where it falls varies).
	if extra := total.UniqueBytes - vm1.UniqueBytes; total.Generations != 3 || total.LogicalBytes != 28<<20 ||
		extra < 0 || extra > chunk.MaxSize || extra >= vm2.UniqueBytes {
		t.Fatalf("total %+v (vm01 %+v)", total, vm1)
	}
	if vm1.DedupRatio < 1.99 || vm1.DedupRatio > 2.01 || total.StoredBytes < vm1.StoredBytes || vm1.StoredBytes == 0 || vm1.CompressionRate <= 0 {
		t.Fatalf("ratios/stored: vm01 %+v total %+v", vm1, total)
	}
	one, err := tr.Stats(ctx, "vm02")
	if err != nil || len(one) != 2 || one[0] != vm2 || one[1].Generations != 1 {
		t.Fatalf("Stats(vm02) = %+v, %v", one, err)
	}
	raw, _ := json.Marshal(vm1)
	if !bytes.Contains(raw, []byte(`"vm":"vm01"`)) {
		t.Fatalf("JSON %s", raw)
	}
}

// Junk names under manifests/ are warned about and skipped: listing,
// latest, check and a prune plan all work. A junk manifest under a valid
// name is damage for check, skipped by listings, and stops a prune.
func TestJunkManifests(t *testing.T) {
	tr := newTestRepo(t)
	ctx := context.Background()
	m := backupBytes(t, tr.Repository, "vm01", testImage(4, 5<<20))
	os.WriteFile(filepath.Join(tr.dir, "manifests", "x"), []byte("junk"), 0o600)
	ms, err := tr.Manifests(ctx, "")
	if err != nil || len(ms) != 1 {
		t.Fatalf("Manifests with manifests/x: %v %v", len(ms), err)
	}
	if got, err := tr.FindManifest(ctx, "vm01", "latest"); err != nil || got.ID != m.ID {
		t.Fatalf("latest with manifests/x: %v", err)
	}
	rep, err := tr.Check(ctx, CheckOptions{})
	if err != nil || !rep.OK() || rep.Manifests != 1 {
		t.Fatalf("check with manifests/x: %+v %v", rep, err)
	}
	plan, err := tr.PlanPrune(ctx, PruneOptions{})
	if err != nil {
		t.Fatalf("prune plan with manifests/x: %v", err)
	}
	plan.Close()

	bad := strings.Repeat("ab", 32)
	os.WriteFile(filepath.Join(tr.dir, "manifests", bad), []byte("junk under a valid name"), 0o600)
	if ms, err := tr.Manifests(ctx, ""); err != nil || len(ms) != 1 {
		t.Fatalf("Manifests with a junk manifest: %d %v", len(ms), err)
	}
	rep, err = tr.Check(ctx, CheckOptions{})
	if err != nil || rep.OK() || rep.Damage[0].Object != "manifests/"+bad {
		t.Fatalf("check with a junk manifest: %+v %v", rep, err)
	}
	if _, err := tr.PlanPrune(ctx, PruneOptions{}); err == nil || !strings.Contains(err.Error(), "nothing deleted") {
		t.Fatalf("prune over an unreadable manifest must stop: %v", err)
	}
}
