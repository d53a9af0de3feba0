package repo

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vmvault/crypto"
)

// checkSegmentIDs fails t unless every non-zero segment of m (a version-3
// generation) is named by the keyed hash of its stored segment list.
func checkSegmentIDs(t *testing.T, r *Repository, m *Manifest) {
	t.Helper()
	if m.Version != ManifestVersion {
		t.Fatalf("generation %s has manifest version %d, want %d", m.ShortID(), m.Version, ManifestVersion)
	}
	ctx := context.Background()
	for di := range m.Disks {
		d := &m.Disks[di]
		if err := r.resolveSegments(ctx, d); err != nil {
			t.Fatal(err)
		}
		for i := range d.segmentCount() {
			id, zero := d.SegmentID(i)
			if zero {
				continue
			}
			list, err := r.getData(ctx, TypeSegment, id)
			if err != nil {
				t.Fatalf("segment %d: %v", i, err)
			}
			if r.segListH.Sum(list) != id {
				t.Fatalf("disk %s segment %d at offset %d: its ID is not the hash of its list", d.Name, i, d.segmentStart(i))
			}
		}
	}
}

// oldImage is the image the version-2 repository in testdata/v2repo holds
// (VM "old", disk "disk"), written by vmvault before segment IDs were
// hashes of segment lists: 2 MiB of compressible words with a 512 KiB
// zero hole, 1 MiB segments.
func oldImage() []byte {
	rng := rand.New(rand.NewPCG(42, 2))
	words := []string{"alpha ", "beta ", "gamma\n", "vault "}
	var b bytes.Buffer
	for b.Len() < 2<<20 {
		b.WriteString(words[rng.IntN(len(words))])
	}
	img := b.Bytes()[:2<<20]
	clear(img[768<<10 : 1280<<10])
	return img
}

// openOldRepo opens a copy of testdata/v2repo.
func openOldRepo(t *testing.T) *testRepo {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "repo")
	if err := os.CopyFS(dir, os.DirFS(filepath.Join("testdata", "v2repo"))); err != nil {
		t.Fatal(err)
	}
	tr := &testRepo{dir: dir, cache: t.TempDir()}
	tr.Repository = tr.reopen(t)
	return tr
}

// A version-2 generation (segment IDs over segment bytes) still
// restores byte-identical and checks sound by its own rule; check
// --read-data still finds a list that restores other bytes than its ID
// names. A version-3 backup into the same repository deduplicates its
// chunks against the old ones, writes each segment list once more under
// its new ID, and both generations restore and check.
func TestOldGeneration(t *testing.T) {
	ctx := context.Background()
	img := oldImage()
	tr := openOldRepo(t)
	old := mustFind(t, tr.Repository, "old", "latest")
	if old.Version != manifestVersionContentIDs {
		t.Fatalf("the old generation has version %d", old.Version)
	}
	if got := restoreBytes(t, tr.Repository, old); !bytes.Equal(got, img) {
		t.Fatal("the old generation restores other bytes")
	}
	rep, err := tr.Check(ctx, CheckOptions{ReadData: true})
	if err != nil || !rep.OK() || rep.SegmentsRead == 0 {
		t.Fatalf("check --read-data of the old repository: %v %+v", err, rep)
	}

	// Changed bytes, in the first segment only.
	next := bytes.Clone(img)
	copy(next[300<<10:], "a change in the first segment")
	m, err := tr.Backup(ctx, BackupRequest{VM: "old", Disks: []DiskSource{{Name: "disk", Source: "test", Reader: bytes.NewReader(next), Size: int64(len(next))}}})
	if err != nil {
		t.Fatal(err)
	}
	if m.Stats.ChunksNew != 1 || m.Stats.SegmentsNew != int64(old.Disks[0].SegmentCount) {
		t.Fatalf("backup into the old repository: %d new chunks (want the changed one), %d new segment lists (want all %d)",
			m.Stats.ChunksNew, m.Stats.SegmentsNew, old.Disks[0].SegmentCount)
	}
	r := tr.reopen(t)
	checkSegmentIDs(t, r, mustFind(t, r, "old", m.ID[:8]))
	if got := restoreBytes(t, r, mustFind(t, r, "old", m.ID[:8])); !bytes.Equal(got, next) {
		t.Fatal("the new generation restores other bytes")
	}
	if got := restoreBytes(t, r, mustFind(t, r, "old", old.ID[:8])); !bytes.Equal(got, img) {
		t.Fatal("the old generation restores other bytes after a new backup")
	}
	rep, err = r.Check(ctx, CheckOptions{ReadData: true})
	if err != nil || !rep.OK() {
		t.Fatalf("check --read-data of both generations: %v %+v", err, rep)
	}
}

// In a version-2 generation a segment ID names the segment's bytes, not
// its list: a list with two chunks swapped passes the structural check,
// and check --read-data reports it by hashing the assembled content.
func TestOldGenerationCheckReadData(t *testing.T) {
	tr := openOldRepo(t)
	name := forgeSwappedList(t, tr)
	r := tr.reopen(t)
	rep, err := r.Check(context.Background(), CheckOptions{})
	if err != nil || !rep.OK() {
		t.Fatalf("structural check: %v %+v", err, rep.Damage)
	}
	rep, err = r.Check(context.Background(), CheckOptions{ReadData: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Damage) != 1 || rep.Damage[0].Object != name || !strings.Contains(rep.Damage[0].Problem, "assembled content does not match") {
		t.Fatalf("check --read-data did not report the forged segment list %s: %+v", name, rep.Damage)
	}
}

// Every stored segment ID is the hash of its list, whether the segment
// was split plainly (first backup), guided by the segment at the same
// offset (block writes), or guided by a previous segment of its length
// elsewhere (content moved); each generation restores byte-identical. A
// moved segment is found again without the chunker: its list and ID are
// the old ones.
func TestBackupSegmentIDsAreListHashes(t *testing.T) {
	ctx := context.Background()
	tr := newTestRepo(t)
	img := testImage(21, 48<<20)
	written := bytes.Clone(img)
	rng := rand.New(rand.NewPCG(5, 5))
	for range 20 { // block writes
		off := rng.IntN(len(written)/4096) * 4096
		for i := range 4096 {
			written[off+i] = byte(rng.Uint32())
		}
	}
	// Moved: 20 KiB inserted near the start, the rest shifted.
	moved := append(append(bytes.Clone(written[:1<<20]), testImage(22, 20<<10)...), written[1<<20:len(img)-20<<10]...)
	var prevIDs map[crypto.ID]bool // the generation before's segments
	for _, step := range []struct {
		name string
		img  []byte
	}{{"plain", img}, {"block writes", written}, {"moved", moved}} {
		m, err := tr.Backup(ctx, BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "disk", Source: "test", Reader: bytes.NewReader(step.img), Size: int64(len(step.img))}}})
		if err != nil {
			t.Fatal(err)
		}
		r := tr.reopen(t)
		m = mustFind(t, r, "vm", m.ID[:8])
		checkSegmentIDs(t, r, m)
		if got := restoreBytes(t, r, m); !bytes.Equal(got, step.img) {
			t.Fatalf("%s: restore differs", step.name)
		}
		t.Logf("%s: %d of %d segments new, %d bytes chunked, %d new chunks", step.name, m.Stats.SegmentsNew, m.Stats.SegmentsSeen, m.Stats.BytesChunked, m.Stats.ChunksNew)
		if step.name == "moved" {
			// Only the segments around the insertion and the last one
			// (its end moved) are new; the chunker ran on nothing else.
			var newBytes int64
			for i := range m.Disks[0].segmentCount() {
				if id, zero := m.Disks[0].SegmentID(i); !zero && !prevIDs[id] {
					newBytes += m.Disks[0].segmentLen(i)
				}
			}
			if m.Stats.SegmentsNew == m.Stats.SegmentsSeen || m.Stats.BytesChunked > newBytes {
				t.Fatalf("moved content: %d new segments (%d bytes), %d bytes chunked: moved segments were not found again", m.Stats.SegmentsNew, newBytes, m.Stats.BytesChunked)
			}
		}
		prevIDs = map[crypto.ID]bool{}
		for i := range m.Disks[0].segmentCount() {
			id, _ := m.Disks[0].SegmentID(i)
			prevIDs[id] = true
		}
	}
}

// Manifest versions 2 and 3 are read. A newer one is not damage (repair
// quarantines manifests that are ErrCorrupt): the error says to upgrade.
func TestManifestVersions(t *testing.T) {
	for v, want := range map[int]string{1: "corrupt", 2: "", 3: "", 4: "upgrade"} {
		err := (&Manifest{Version: v, VM: "vm"}).validate()
		switch {
		case want == "" && err != nil:
			t.Errorf("version %d: %v", v, err)
		case want == "corrupt" && !errors.Is(err, ErrCorrupt):
			t.Errorf("version %d: %v, want ErrCorrupt", v, err)
		case want == "upgrade" && (err == nil || errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "upgrade")):
			t.Errorf("version %d: %v, want an error saying to upgrade, not ErrCorrupt", v, err)
		}
	}
}

// A version-2 base cannot lend its segments to a version-3 generation
// (their IDs follow another rule): change tracking refuses it before
// anything is read, and the caller reads the disk whole.
func TestChangesRefuseOldBase(t *testing.T) {
	tr := openOldRepo(t)
	old := mustFind(t, tr.Repository, "old", "latest")
	img := oldImage()
	_, err := tr.Backup(context.Background(), BackupRequest{VM: "old", Disks: []DiskSource{{Name: "disk", Source: "test",
		Reader: bytes.NewReader(img), Size: int64(len(img)), Changes: &Changes{Base: old.ID, Kind: "thin"}}}})
	if !errors.Is(err, ErrNoBase) || !strings.Contains(err.Error(), "version-2 segment IDs") {
		t.Fatalf("change tracking on a version-2 base: %v", err)
	}
}
