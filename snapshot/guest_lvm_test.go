//go:build lvmguest

// These tests need real LVM and device-mapper, which only the test guest has.
// They are compiled only into the binary TestLVMInGuest builds (tag
// lvmguest) and run inside the guest; TestLVMInGuest asserts that each of
// them ran and passed.

package snapshot

import (
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const guestVG = "vgtest"

// guestRunner returns the runner for the in-guest tests and makes sure the
// test volume group exists.
func guestRunner(t *testing.T) Runner {
	t.Helper()
	if os.Getenv("VMVAULT_LVM_GUEST") != "1" {
		t.Fatal("in-guest LVM test run outside the guest: run TestLVMInGuest on the host instead")
	}
	r := Exec{}
	if _, err := r.Run(t.Context(), "vgs", guestVG); err == nil {
		return r
	}
	disk := os.Getenv("VMVAULT_LVM_GUEST_DISK")
	for _, args := range [][]string{{"pvcreate", "-y", disk}, {"vgcreate", guestVG, disk}} {
		if out, err := r.Run(t.Context(), args[0], args[1:]...); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
	}
	return r
}

func run(t *testing.T, r Runner, name string, args ...string) string {
	t.Helper()
	out, err := r.Run(t.Context(), name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// newLV creates a test origin volume, removed at the end of the test.
func newLV(t *testing.T, r Runner, name, size string) LV {
	t.Helper()
	run(t, r, "lvcreate", "-y", "-L", size, "-n", name, guestVG)
	lv := LV{VG: guestVG, Name: name}
	t.Cleanup(func() { _ = Remove(context.Background(), r, lv) })
	return lv
}

// writePattern writes n pseudo-random bytes (seeded) at off and syncs, so
// the write reaches device-mapper and triggers copy-on-write.
func writePattern(t *testing.T, path string, off, n int64, seed uint64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	src := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	buf := make([]byte, 1<<20)
	for done := int64(0); done < n; done += int64(len(buf)) {
		src.Read(buf)
		if _, err := f.WriteAt(buf[:min(int64(len(buf)), n-done)], off+done); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func hashFile(t *testing.T, path string) [32]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return [32]byte(h.Sum(nil))
}

// hashReader reads everything and returns the digest and byte count.
func hashReader(r io.Reader) ([32]byte, int64, error) {
	h := sha256.New()
	n, err := io.Copy(h, r)
	return [32]byte(h.Sum(nil)), n, err
}

func dropCaches(t *testing.T) {
	t.Helper()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
		t.Fatal(err)
	}
}

func assertNoSnapshots(t *testing.T, r Runner) {
	t.Helper()
	if out := run(t, r, "lvs", "--noheadings", "-o", "lv_name", guestVG); strings.Contains(out, snapshotSuffix) {
		t.Errorf("snapshots left behind:\n%s", out)
	}
}

// TestGuestSnapshotConsistency: a set of two snapshots keeps the content
// the origins had when it was created while the origins keep changing.
func TestGuestSnapshotConsistency(t *testing.T) {
	r := guestRunner(t)
	ctx := t.Context()
	root := newLV(t, r, "vm1root", "16m")
	data := newLV(t, r, "vm1data", "8m")
	writePattern(t, root.DevicePath(), 0, 16<<20, 1)
	writePattern(t, data.DevicePath(), 0, 8<<20, 2)
	wantRoot, wantData := hashFile(t, root.DevicePath()), hashFile(t, data.DevicePath())

	start := time.Now()
	set, err := CreateSet(ctx, r, "vm1", []Disk{{Name: "root", Origin: root, Size: 12 << 20}, {Name: "data", Origin: data, Size: 8 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("two snapshots created in %v", time.Since(start).Round(time.Millisecond))
	defer set.Close()
	if got := set.Snapshots(); len(got) != 2 || got[0].LV.Name != "vm1-root-vmvault" || got[1].LV.Name != "vm1-data-vmvault" {
		t.Fatalf("Snapshots() = %+v", got)
	}
	st, err := GetStatus(ctx, r, LV{guestVG, "vm1-root-vmvault"})
	if err != nil || st.Invalid() || !st.IsSnapshot() || st.Attr[4] != 'a' || st.Size != 12<<20 || st.Path != "/dev/vgtest/vm1-root-vmvault" {
		t.Fatalf("fresh snapshot status %+v, %v", st, err)
	}

	// The running VM keeps writing.
	writePattern(t, root.DevicePath(), 4<<20, 4<<20, 3)
	writePattern(t, data.DevicePath(), 0, 1<<20, 4)

	for disk, want := range map[string][32]byte{"root": wantRoot, "data": wantData} {
		rd, size, err := set.Open(ctx, disk, "")
		if err != nil {
			t.Fatal(err)
		}
		got, n, err := hashReader(rd)
		if err != nil || n != size {
			t.Fatalf("read %s: %d of %d bytes, %v", disk, n, size, err)
		}
		if got != want {
			t.Errorf("snapshot of %s differs from the origin at snapshot time", disk)
		}
		if err := rd.Close(); err != nil {
			t.Error(err)
		}
	}
	rep, err := set.Check(ctx)
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	if len(rep.Snapshots) != 2 || rep.Peak <= 0 || rep.Peak >= 100 || rep.Snapshots[0].Size != 12<<20 {
		t.Errorf("Check report %+v", rep)
	}
	t.Logf("peak fill %.2f%% (warn %v)", rep.Peak, rep.Warn())

	if err := set.RemoveAll(ctx); err != nil {
		t.Fatal(err)
	}
	assertNoSnapshots(t, r)
	if err := set.RemoveAll(ctx); err != nil {
		t.Errorf("second RemoveAll: %v", err)
	}
	if err := set.Close(); err != nil {
		t.Errorf("Close after RemoveAll: %v", err)
	}
	if _, _, err := set.Open(ctx, "root", ""); err == nil {
		t.Error("Open after RemoveAll succeeded")
	}
}

// TestGuestOverflow: writing more to the origin than the snapshot can hold
// invalidates it; Status, Check and reads all say so.
func TestGuestOverflow(t *testing.T) {
	r := guestRunner(t)
	ctx := t.Context()
	origin := newLV(t, r, "vm2root", "16m")
	writePattern(t, origin.DevicePath(), 0, 2<<20, 5)
	set, err := CreateSet(ctx, r, "vm2", []Disk{{Name: "root", Origin: origin, Size: 4 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	rd, size, err := set.Open(ctx, "root", "")
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	// Part of the image is read before the overflow, as in a real backup.
	if _, err := io.CopyN(io.Discard, rd, 1<<20); err != nil {
		t.Fatal(err)
	}

	writePattern(t, origin.DevicePath(), 0, 12<<20, 6)
	snap := set.Snapshots()[0].LV
	st, err := GetStatus(ctx, r, snap)
	if err != nil {
		t.Fatal(err)
	}
	if !st.Invalid() || st.Attr[4] != 'I' {
		t.Fatalf("status after overflow %+v, want invalid (attr swi-I-s---)", st)
	}
	rep, err := set.Check(ctx)
	var oe *OverflowError
	if !errors.As(err, &oe) || oe.LV != snap {
		t.Fatalf("Check after overflow = %v, want *OverflowError for %s", err, snap)
	}
	for _, want := range []string{"snapshot vgtest/vm2-root-vmvault overflowed", "100% of 4.0 MiB", "raise snapshot_size"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Check error %q lacks %q", err, want)
		}
	}
	if rep.Peak != 100 || !rep.Warn() {
		t.Errorf("report %+v, want peak 100 and a warning", rep)
	}

	dropCaches(t)
	n, err := io.Copy(io.Discard, rd)
	if err == nil {
		t.Fatalf("reading the overflowed snapshot succeeded (%d more bytes of %d)", n, size)
	}
	t.Logf("read of overflowed snapshot fails as it must: %v", err)
	rd2, _, err := set.Open(ctx, "root", "")
	if err == nil {
		_, n, err = hashReader(rd2)
		rd2.Close()
		if err == nil {
			t.Fatalf("fresh read of the overflowed snapshot succeeded (%d bytes)", n)
		}
	}
	if err := set.RemoveAll(ctx); err != nil {
		t.Fatal(err)
	}
	assertNoSnapshots(t, r)
}

// TestGuestLeftovers: snapshots from a crashed run are found (only those of
// the VM asked for), and CreateSet rolls back when a later disk fails.
func TestGuestLeftovers(t *testing.T) {
	r := guestRunner(t)
	ctx := t.Context()
	root := newLV(t, r, "vm3root", "8m")
	data := newLV(t, r, "vm3data", "8m")
	// A crashed run of VM vm3, and a live run of VM vm3-b, whose snapshot
	// name also starts with "vm3-".
	if _, err := Create(ctx, r, root, SnapshotName("vm3", "root"), 4<<20, "vmvault", vmTagPrefix+"vm3"); err != nil {
		t.Fatal(err)
	}
	if _, err := Create(ctx, r, root, SnapshotName("vm3-b", "root"), 4<<20, "vmvault", vmTagPrefix+"vm3-b"); err != nil {
		t.Fatal(err)
	}
	got, err := FindLeftovers(ctx, r, guestVG, "vm3")
	if err != nil || len(got) != 1 || got[0] != (LV{guestVG, "vm3-root-vmvault"}) {
		t.Fatalf("FindLeftovers(vm3) = %v, %v", got, err)
	}

	// The leftover blocks a new set; the disk snapshotted first is rolled back.
	_, err = CreateSet(ctx, r, "vm3", []Disk{{Name: "data", Origin: data, Size: 4 << 20}, {Name: "root", Origin: root, Size: 4 << 20}})
	if err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("CreateSet over a leftover = %v, want 'already exists'", err)
	}
	if out := run(t, r, "lvs", "--noheadings", "-o", "lv_name", guestVG); strings.Contains(out, "vm3-data-vmvault") {
		t.Errorf("failed CreateSet left vm3-data-vmvault behind:\n%s", out)
	}

	for _, lv := range got {
		if err := Remove(ctx, r, lv); err != nil {
			t.Fatal(err)
		}
	}
	if err := Remove(ctx, r, got[0]); err != nil {
		t.Errorf("removing a removed snapshot: %v", err)
	}
	if got, err := FindLeftovers(ctx, r, guestVG, "vm3"); err != nil || len(got) != 0 {
		t.Errorf("FindLeftovers after removal = %v, %v", got, err)
	}
	other, err := FindLeftovers(ctx, r, guestVG, "vm3-b")
	if err != nil || len(other) != 1 {
		t.Fatalf("FindLeftovers(vm3-b) = %v, %v", other, err)
	}
	if _, err := GetStatus(ctx, r, LV{guestVG, "nonexistent"}); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetStatus of a missing LV = %v, want ErrNotFound", err)
	}
	if err := Remove(ctx, r, other[0]); err != nil {
		t.Fatal(err)
	}
	assertNoSnapshots(t, r)
}

// TestGuestFileLayoutExt4 and TestGuestFileLayoutXFS: the VM's image is a
// file on a mounted file system on the LV; the snapshot is mounted read-only
// and the file read as it was at snapshot time.
func TestGuestFileLayoutExt4(t *testing.T) { testFileLayout(t, "ext4", "vm4", "32m") }

func TestGuestFileLayoutXFS(t *testing.T) { testFileLayout(t, "xfs", "vm5", "300m") }

func testFileLayout(t *testing.T, fstype, vm, lvSize string) {
	r := guestRunner(t)
	ctx := t.Context()
	origin := newLV(t, r, vm+"store", lvSize)
	noDiscard := map[string][]string{"ext4": {"-E", "nodiscard"}, "xfs": {"-K"}}[fstype]
	run(t, r, "mkfs."+fstype, append(append([]string{"-q"}, noDiscard...), origin.DevicePath())...)
	mnt := filepath.Join(t.TempDir(), "store")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, r, "mount", "-t", fstype, origin.DevicePath(), mnt)
	defer func() { _, _ = r.Run(context.Background(), "umount", mnt) }()
	img := filepath.Join(mnt, "images", "vm.img")
	if err := os.MkdirAll(filepath.Dir(img), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	writePattern(t, img, 0, 4<<20, 7)
	want := hashFile(t, img)
	if err := os.Symlink("/vmvault/env", filepath.Join(mnt, "images", "escape")); err != nil {
		t.Fatal(err)
	}

	// The file system stays mounted and busy, as on a host with running VMs.
	set, err := CreateSet(ctx, r, vm, []Disk{{Name: "img", Origin: origin, Size: 16 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	writePattern(t, img, 1<<20, 2<<20, 8)

	if typ, err := FSType(ctx, r, set.Snapshots()[0].LV.DevicePath()); err != nil || typ != fstype {
		t.Fatalf("FSType = %q, %v; want %s", typ, err, fstype)
	}
	rd, size, err := set.Open(ctx, "img", "/images/vm.img")
	if err != nil {
		t.Fatal(err)
	}
	mounts := readMounts(t)
	if !strings.Contains(mounts, "vmvault-snap-") || !strings.Contains(mounts, " ro,") {
		t.Errorf("snapshot not mounted read-only:\n%s", mounts)
	}
	got, n, err := hashReader(rd)
	if err != nil || n != size || size != 4<<20 {
		t.Fatalf("read image: %d of %d bytes, %v", n, size, err)
	}
	if got != want {
		t.Error("image read from the snapshot differs from the image at snapshot time")
	}
	if err := rd.Close(); err != nil {
		t.Fatal(err)
	}
	if rep, err := set.Check(ctx); err != nil || rep.Peak <= 0 {
		t.Errorf("Check = %+v, %v; want a valid snapshot that took copy-on-write data", rep, err)
	}
	if m := readMounts(t); strings.Contains(m, "vmvault-snap-") {
		t.Errorf("snapshot still mounted after Close:\n%s", m)
	}
	if left, _ := filepath.Glob(filepath.Join(os.TempDir(), "vmvault-snap-*")); len(left) != 0 {
		t.Errorf("mount points left behind: %v", left)
	}

	for _, bad := range []string{"../etc/passwd", "images/escape", "images/missing.img", "images"} {
		if rd, _, err := set.Open(ctx, "img", bad); err == nil {
			rd.Close()
			t.Errorf("Open(%q) succeeded", bad)
		}
	}
	if m := readMounts(t); strings.Contains(m, "vmvault-snap-") {
		t.Errorf("failed Open left the snapshot mounted:\n%s", m)
	}

	// RemoveAll with a reader still open (the backup was interrupted)
	// unmounts before removing.
	rd, _, err = set.Open(ctx, "img", "images/vm.img")
	if err != nil {
		t.Fatal(err)
	}
	if err := set.RemoveAll(ctx); err != nil {
		t.Fatal(err)
	}
	if err := rd.Close(); err != nil {
		t.Errorf("Close after RemoveAll: %v", err)
	}
	if m := readMounts(t); strings.Contains(m, "vmvault-snap-") {
		t.Errorf("snapshot still mounted after RemoveAll:\n%s", m)
	}
	assertNoSnapshots(t, r)
}

func readMounts(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestGuestThin: on a real thin pool, a thin snapshot set reads the
// origin's content, Keep turns it into an inactive base, thin_delta
// reports exactly the blocks written and discarded since, the metadata
// snapshot is released after success and after failure, a base replaced
// by another volume of the same name is not trusted, and volumes without
// vmvault's tags are neither listed nor removed.
func TestGuestThin(t *testing.T) {
	r := guestRunner(t)
	ctx := t.Context()
	const kib = 1024
	run(t, r, "lvcreate", "-y", "--type", "thin-pool", "-L", "32m", "-n", "tpool", guestVG)
	pool := LV{VG: guestVG, Name: "tpool"}
	run(t, r, "lvcreate", "-y", "-V", "16m", "-T", pool.String(), "-n", "thin1")
	origin := LV{VG: guestVG, Name: "thin1"}
	t.Cleanup(func() {
		out, _ := r.Run(context.Background(), "lvs", "--noheadings", "-o", "lv_name", "-S", "pool_lv=tpool", guestVG)
		for _, name := range strings.Fields(string(out)) {
			_ = Remove(context.Background(), r, LV{VG: guestVG, Name: name})
		}
		_ = Remove(context.Background(), r, pool)
	})
	writePattern(t, origin.DevicePath(), 0, 4*mib, 1)

	v, err := Inspect(ctx, r, origin)
	if err != nil || !v.Thin() || v.PoolLV() != pool {
		t.Fatalf("Inspect(%s) = %+v, %v; want a thin LV of %s", origin, v, err, pool)
	}
	// take snapshots the origin and checks the snapshot reads what the
	// origin holds.
	take := func() (*Set, Volume) {
		t.Helper()
		want := hashFile(t, origin.DevicePath())
		set, err := CreateSet(ctx, r, "tv", []Disk{{Name: "hda", Origin: origin, Thin: true}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { set.Close() })
		rd, _, err := set.Open(ctx, "hda", "")
		if err != nil {
			t.Fatal(err)
		}
		got, _, err := hashReader(rd)
		rd.Close()
		if err != nil || got != want {
			t.Fatalf("thin snapshot reads %x (%v), origin %x", got, err, want)
		}
		if _, err := set.Check(ctx); err != nil {
			t.Fatalf("Check of a thin snapshot: %v", err)
		}
		sv, err := set.Volume(ctx, "hda")
		if err != nil || !sv.Thin() {
			t.Fatalf("the snapshot is %+v (%v), not thin", sv, err)
		}
		return set, sv
	}
	// keep keeps the snapshot as base and returns its ThinBase.
	keep := func(set *Set, sv Volume) ThinBase {
		t.Helper()
		kept, err := set.Keep(ctx, "hda")
		if err != nil {
			t.Fatal(err)
		}
		if err := set.RemoveAll(ctx); err != nil {
			t.Fatal(err)
		}
		kv, err := Inspect(ctx, r, kept)
		if err != nil || kept.Name != "tv-hda-vmvault-base" || kv.ThinID != sv.ThinID || kv.UUID != sv.UUID || !kv.OwnedBy("tv") || kv.Attr[4] == 'a' {
			t.Fatalf("kept %s as %+v (%v); the snapshot was %+v", kept, kv, err, sv)
		}
		return ThinBase{LV: kept, Pool: pool, ThinID: kv.ThinID, UUID: kv.UUID}
	}
	// released: the metadata snapshot can be reserved again.
	released := func() {
		t.Helper()
		run(t, r, "dmsetup", "message", dmName(pool)+"-tpool", "0", "reserve_metadata_snap")
		run(t, r, "dmsetup", "message", dmName(pool)+"-tpool", "0", "release_metadata_snap")
	}

	b1 := keep(take())
	if err := CheckBase(ctx, r, "tv", b1); err != nil {
		t.Fatalf("CheckBase of the base just kept: %v", err)
	}
	writePattern(t, origin.DevicePath(), 1*mib, 1*mib, 2)                         // rewrites mapped blocks: different
	writePattern(t, origin.DevicePath(), 10*mib, 4*kib, 3)                        // an unmapped block: right_only
	run(t, r, "blkdiscard", "-o", "3145728", "-l", "524288", origin.DevicePath()) // left_only
	set2, sv2 := take()
	rs, err := ThinDelta(ctx, r, pool, b1.ThinID, sv2.ThinID, 16*mib)
	if err != nil {
		t.Fatal(err)
	}
	want := []Range{{Off: 1 * mib, Len: 1 * mib}, {Off: 3 * mib, Len: 512 * kib}, {Off: 10 * mib, Len: 64 * kib}}
	if !slices.Equal(rs, want) {
		t.Fatalf("thin_delta ranges %v, want %v", rs, want)
	}
	released()
	if _, err := ThinDelta(ctx, r, pool, b1.ThinID, 999, 16*mib); err == nil {
		t.Fatal("thin_delta of a device that does not exist succeeded")
	}
	released()
	b2 := keep(set2, sv2)

	// b1's volume was replaced by b2 under the same name.
	if err := CheckBase(ctx, r, "tv", b1); err == nil || !strings.Contains(err.Error(), "not the snapshot recorded") {
		t.Fatalf("CheckBase of a replaced base: %v", err)
	}
	if err := CheckBase(ctx, r, "other", b2); err == nil || !strings.Contains(err.Error(), "tags") {
		t.Fatalf("CheckBase for another VM: %v", err)
	}
	// A volume with a base's name but not made by vmvault.
	run(t, r, "lvcreate", "-y", "--type", "thin", "-n", "tv-hdb-vmvault-base", origin.String())
	foreign := LV{VG: guestVG, Name: "tv-hdb-vmvault-base"}
	fv, err := Inspect(ctx, r, foreign)
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckBase(ctx, r, "tv", ThinBase{LV: foreign, Pool: pool, ThinID: fv.ThinID, UUID: fv.UUID}); err == nil {
		t.Fatal("a base without vmvault's tags was trusted")
	}
	bases, err := FindBases(ctx, r, guestVG, "tv")
	if err != nil || len(bases) != 1 || bases["hda"] != b2.LV {
		t.Fatalf("FindBases = %v, %v; want only hda's", bases, err)
	}
	if err := RemoveBase(ctx, r, "tv", foreign); err == nil {
		t.Fatal("RemoveBase removed a volume without vmvault's tags")
	}
	if _, err := Inspect(ctx, r, foreign); err != nil {
		t.Fatalf("the foreign volume is gone: %v", err)
	}
	if err := RemoveBase(ctx, r, "tv", b2.LV); err != nil {
		t.Fatal(err)
	}
	if _, err := Inspect(ctx, r, b2.LV); !errors.Is(err, ErrNotFound) {
		t.Fatalf("base still there after RemoveBase: %v", err)
	}
}
