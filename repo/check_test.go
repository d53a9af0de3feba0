package repo

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"vmvault/crypto"
)

// TestCheckReadDataVerifiesSegments: a segment list whose chunks are all
// sound but which is not what its ID names (here two of its chunks
// swapped, so lengths and chunk IDs still add up) restores wrong data.
// check --read-data must report it, naming the generation. Since version
// 3 a segment ID is the hash of its list, so the structural check, which
// loads every list, reports it too (it passed such a list before that
// check). Version-2 generations are TestOldGenerationCheck's.
func TestCheckReadDataVerifiesSegments(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(11, 24<<20)
	m := backupBytes(t, tr.Repository, "vm01", img)
	name := forgeSwappedList(t, tr)
	r := tr.reopen(t)
	for _, opts := range []CheckOptions{{}, {ReadData: true}} {
		rep, err := r.Check(context.Background(), opts)
		if err != nil {
			t.Fatal(err)
		}
		if len(rep.Damage) != 1 || rep.Damage[0].Object != name ||
			!strings.Contains(rep.Damage[0].Problem, "does not match") ||
			len(rep.Damage[0].Generations) != 1 || !strings.Contains(rep.Damage[0].Generations[0], m.ShortID()) {
			t.Fatalf("check (read data %v) did not report the forged segment list %s: %+v", opts.ReadData, name, rep.Damage)
		}
		if opts.ReadData && (rep.SegmentsRead == 0 || rep.ChunksRead != rep.Chunks) {
			t.Fatalf("segments read %d, chunks read %d of %d", rep.SegmentsRead, rep.ChunksRead, rep.Chunks)
		}
	}
}

// forgeSwappedList rewrites a segment list of tr, under its own name,
// with two different chunks swapped, and returns the list's object name.
func forgeSwappedList(t *testing.T, tr *testRepo) string {
	t.Helper()
	// A segment list with two different non-zero chunks.
	var victim crypto.ID
	var entries []SegmentEntry
	w := Walk{SegmentList: func(id crypto.ID, es []SegmentEntry, _ Origin) error {
		if entries != nil {
			return nil
		}
		var nz []int
		for i, e := range es {
			if !e.Zero {
				nz = append(nz, i)
			}
		}
		if len(nz) >= 2 && es[nz[0]].ID != es[nz[1]].ID {
			victim, entries = id, slices.Clone(es)
			entries[nz[0]], entries[nz[1]] = entries[nz[1]], entries[nz[0]]
		}
		return nil
	}}
	if err := w.Run(context.Background(), tr.Repository); err != nil {
		t.Fatal(err)
	}
	if entries == nil {
		t.Fatal("test image has no segment with two different chunks")
	}
	name := dataName(victim)
	path := filepath.Join(tr.dir, name)
	os.Chmod(path, 0o600)
	if err := os.WriteFile(path, tr.codec.seal(TypeSegment, name, encodeSegmentList(entries)), 0o600); err != nil {
		t.Fatal(err)
	}

	return name
}
