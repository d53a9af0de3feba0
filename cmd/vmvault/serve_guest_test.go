package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"vmvault/internal/lvmguest"
)

// TestServeBootGuest boots the qemu test guest with a backup served by
// `vmvault serve --writable` as its virtio disk: the guest reads the
// backup's bytes, writes 1 MiB, drops its caches and reads it back; the
// write is then visible through NBD on the host, and the repository is
// unchanged. One boot (≈15–50 s under TCG).
func TestServeBootGuest(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a qemu guest; skipped with -short")
	}
	e, _, img := backedUp(t)
	before := treeHash(t, e.repo)
	first := sha256.Sum256(img[:1<<20])

	sock := filepath.Join(e.dir, "nbd.sock")
	s := startServe(t, sock, "--repo", e.repo, "--password-file", e.pw, "--cache-dir", e.cache,
		"serve", "vm01", "latest", "--listen", "unix:"+sock, "--writable", "--overlay", e.dir)

	script := `
set -e
D=/dev/disk/by-serial/backup0
echo "size: $(blockdev --getsize64 $D)"
echo "first: $(dd if=$D bs=1M count=1 2>/dev/null | sha256sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/pat bs=64k count=16 2>/dev/null
dd if=/tmp/pat of=$D bs=64k seek=64 conv=fsync 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
dd if=$D of=/tmp/back bs=64k skip=64 count=16 2>/dev/null
cmp /tmp/pat /tmp/back && echo "readback: ok"
echo "written: $(sha256sum /tmp/pat | cut -d' ' -f1)"
`
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := lvmguest.Run(ctx, lvmguest.Spec{
		Script:  script,
		Disks:   []lvmguest.Disk{{Serial: "backup0", Path: s.url("")}},
		WorkDir: t.TempDir(),
		Timeout: 4 * time.Minute,
		Console: lvmguest.LineWriter(func(l string) { t.Log("guest: " + l) }),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("boot to script %v, whole run %v", res.Boot.Round(time.Millisecond), res.Elapsed.Round(time.Millisecond))
	if res.ExitCode != 0 {
		t.Fatalf("guest script exit %d:\n%s", res.ExitCode, res.Output)
	}
	want := []string{"size: 25165824", "first: " + hex.EncodeToString(first[:]), "readback: ok"}
	for _, w := range want {
		if !regexp.MustCompile(regexp.QuoteMeta(w)).MatchString(res.Output) {
			t.Fatalf("guest output lacks %q:\n%s", w, res.Output)
		}
	}
	m := regexp.MustCompile(`written: ([0-9a-f]{64})`).FindStringSubmatch(res.Output)
	if m == nil {
		t.Fatalf("guest did not report what it wrote:\n%s", res.Output)
	}
	// The guest's write is in the overlay: read it back on the host.
	out := filepath.Join(e.dir, "after.raw")
	qemu(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", s.url(""), out)
	after, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if got := sha256.Sum256(after[4<<20 : 5<<20]); hex.EncodeToString(got[:]) != m[1] {
		t.Fatal("the guest's write is not what the export returns")
	}
	if sum(after[:4<<20]) != sum(img[:4<<20]) || sum(after[5<<20:]) != sum(img[5<<20:]) {
		t.Fatal("bytes the guest did not write changed")
	}
	s.stop()
	if treeHash(t, e.repo) != before {
		t.Fatal("the guest's writes reached the repository")
	}
}
