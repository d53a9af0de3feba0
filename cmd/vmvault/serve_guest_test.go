package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"vmvault/internal/lvmguest"
)

// TestServeBootGuest boots the qemu test guest with a backed-up ext4
// filesystem served by `vmvault serve --writable` as its virtio disk: the
// guest mounts it, reads a file from the backup, writes a new one,
// unmounts, drops its caches, mounts again and reads it back. On the
// host, the export then holds a clean filesystem with the guest's file,
// and the repository is unchanged. One boot (≈10–50 s under TCG).
func TestServeBootGuest(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a qemu guest; skipped with -short")
	}
	needQemuUtils(t)
	for _, p := range []string{"mkfs.ext4", "debugfs", "e2fsck"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s not installed (package e2fsprogs)", p)
		}
	}
	e := newEnv(t)
	root := filepath.Join(e.dir, "root")
	os.Mkdir(root, 0o755)
	os.WriteFile(filepath.Join(root, "hello.txt"), []byte("from the backup"), 0o644)
	src := filepath.Join(e.dir, "vm01.raw")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(32 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	qemu(t, "mkfs.ext4", "-F", "-q", "-d", root, src)
	e.ok("backup", "vm01", "--source", src)
	before := treeHash(t, e.repo)

	sock := filepath.Join(e.dir, "nbd.sock")
	s := startServe(t, sock, "--repo", e.repo, "--password-file", e.pw, "--cache-dir", e.cache,
		"serve", "vm01", "latest", "--listen", "unix:"+sock, "--writable", "--overlay", e.dir)

	script := `
set -e
D=/dev/disk/by-serial/backup0
mkdir -p /mnt/d
mount -t ext4 $D /mnt/d
echo "hello: $(cat /mnt/d/hello.txt)"
dd if=/dev/urandom of=/mnt/d/new.bin bs=64k count=16 2>/dev/null
echo "written: $(sha256sum /mnt/d/new.bin | cut -d' ' -f1)"
umount /mnt/d
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro $D /mnt/d
echo "reread: $(sha256sum /mnt/d/new.bin | cut -d' ' -f1)"
umount /mnt/d
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
	if !strings.Contains(res.Output, "hello: from the backup") {
		t.Fatalf("guest did not read the backed-up file:\n%s", res.Output)
	}
	w := regexp.MustCompile(`written: ([0-9a-f]{64})`).FindStringSubmatch(res.Output)
	r := regexp.MustCompile(`reread: ([0-9a-f]{64})`).FindStringSubmatch(res.Output)
	if w == nil || r == nil || w[1] != r[1] {
		t.Fatalf("guest wrote and reread different data:\n%s", res.Output)
	}

	// On the host: the export is a clean filesystem holding the guest's file.
	after := filepath.Join(e.dir, "after.raw")
	qemu(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", s.url(""), after)
	qemu(t, "e2fsck", "-fn", after)
	got := filepath.Join(e.dir, "new.bin")
	qemu(t, "debugfs", "-R", "dump /new.bin "+got, after)
	data, err := os.ReadFile(got)
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != w[1] {
		t.Fatal("the file on the export differs from what the guest wrote")
	}
	s.stop()
	if treeHash(t, e.repo) != before {
		t.Fatal("the guest's writes reached the repository")
	}
}
