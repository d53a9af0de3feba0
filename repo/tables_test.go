package repo

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vmvault/crypto"
)

// Segment tables: a disk's segment IDs live in deduplicated table objects,
// so an incremental generation stores only the tables that changed and
// damage to a table is found and named.
func TestSegmentTables(t *testing.T) {
	tr := newTestRepo(t)
	tr.tableSegments = 2 // 4 MiB segments on average: a table covers about 8 MiB
	img := testImage(31, 40<<20)
	m1 := backupBytes(t, tr.Repository, "vm01", img)
	// Segments are cut by content under the repository's key: their
	// number varies around 10.
	if n, segs := len(m1.Disks[0].Tables), m1.Disks[0].SegmentCount; n != (segs+1)/2 || segs < 6 {
		t.Fatalf("%d tables for %d segments of 2", n, segs)
	}
	img2 := bytes.Clone(img)
	copy(img2[13<<20:], []byte("one changed segment"))
	m2 := backupBytes(t, tr.Repository, "vm01", img2)
	changed := 0
	for i := range m1.Disks[0].Tables {
		if m1.Disks[0].Tables[i] != m2.Disks[0].Tables[i] {
			changed++
		}
	}
	if changed != 1 {
		t.Fatalf("%d tables differ after changing one segment", changed)
	}
	r := tr.reopen(t)
	for _, c := range []struct {
		m   *Manifest
		img []byte
	}{{m1, img}, {m2, img2}} {
		m, err := r.LoadManifest(context.Background(), c.m.ID)
		if err != nil {
			t.Fatal(err)
		}
		if m.Disks[0].Segments != nil {
			t.Fatal("segment IDs stored in the manifest")
		}
		if got := restoreBytes(t, r, m); !bytes.Equal(got, c.img) {
			t.Fatal("restore through segment tables differs")
		}
	}
	// Damage the table only the second generation has.
	var victim crypto.ID
	for i := range m2.Disks[0].Tables {
		if m1.Disks[0].Tables[i] != m2.Disks[0].Tables[i] {
			victim = crypto.ID(m2.Disks[0].Tables[i])
		}
	}
	path := filepath.Join(tr.dir, dataName(victim))
	data, _ := os.ReadFile(path)
	data[len(data)-3] ^= 1
	os.Chmod(path, 0o600)
	os.WriteFile(path, data, 0o600)
	rep, err := r.Check(context.Background(), CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() || rep.Damage[0].Object != dataName(victim) || len(rep.Damage[0].Generations) != 1 || !strings.Contains(rep.Damage[0].Generations[0], m2.ShortID()) {
		t.Fatalf("check of a damaged table: %+v", rep.Damage)
	}
	m, _ := r.LoadManifest(context.Background(), m2.ID)
	var out bytes.Buffer
	if _, err := r.Restore(context.Background(), m, "", &out); err == nil || out.Len() != 0 {
		t.Fatalf("restore through a damaged table: err %v, %d bytes written", err, out.Len())
	}
	// The first generation is unaffected.
	m, _ = r.LoadManifest(context.Background(), m1.ID)
	if got := restoreBytes(t, r, m); !bytes.Equal(got, img) {
		t.Fatal("undamaged generation restores wrong")
	}
}
