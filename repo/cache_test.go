package repo

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The local index cache is a cache: deleted, damaged or stale, it is
// rebuilt on its own and deduplication keeps working.
func TestIndexCacheRebuilt(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(7, 9<<20)
	backupBytes(t, tr.Repository, "vm01", img)
	tr.Close()
	cacheFile := filepath.Join(tr.cache, tr.Config().ID, "index.db")
	if _, err := os.Stat(cacheFile); err != nil {
		t.Fatal("no cache file after a backup:", err)
	}
	for name, damage := range map[string]func(){
		"deleted": func() { os.Remove(cacheFile) },
		"garbage": func() { os.WriteFile(cacheFile, bytes.Repeat([]byte("x"), 8192), 0o600) },
		"empty":   func() { os.WriteFile(cacheFile, nil, 0o600) },
	} {
		damage()
		r := tr.reopen(t)
		m := backupBytes(t, r, "vm01", img)
		if m.Stats.ChunksNew != 0 || m.Stats.SegmentsNew != 0 {
			t.Fatalf("%s cache: unchanged image stored new data: %+v", name, m.Stats)
		}
		r.Close()
	}
}

// Restoring into a full file system fails with a clear error.
func TestRestoreToFullDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts a small tmpfs and needs root")
	}
	tr := newTestRepo(t)
	img := testImage(8, 6<<20)
	for i := range img {
		if img[i] == 0 {
			img[i] = 1 // no holes: every byte needs space
		}
	}
	m := backupBytes(t, tr.Repository, "vm01", img)
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	_, err := tr.RestoreTo(context.Background(), m, "", filepath.Join(mnt, "disk.raw"))
	if err == nil || !strings.Contains(err.Error(), "no space left") {
		t.Fatalf("restore to a full disk: %v", err)
	}
}
