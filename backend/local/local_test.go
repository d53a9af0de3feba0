package local

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"vmvault/backend"
	"vmvault/backend/backendtest"
)

func newBackend(t *testing.T) (*Backend, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "repo")
	b, err := Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	return b, dir
}

// The backend contract, as every backend runs it.
func TestConformance(t *testing.T) {
	backendtest.Run(t, func(t *testing.T) backend.Backend {
		b, _ := newBackend(t)
		return b
	}, backendtest.Options{})
}

// Create lays out data/00..ff, and a racing Put leaves no temporary file
// behind (the contract itself is in the conformance suite).
func TestLayoutAndNoTemporaryFiles(t *testing.T) {
	ctx := context.Background()
	b, dir := newBackend(t)
	if _, err := os.Stat(filepath.Join(dir, "data", "ff")); err != nil {
		t.Fatal("Create did not lay out data/ff:", err)
	}
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b.Put(ctx, "data/00/race", bytes.Repeat([]byte{byte(i)}, 1<<16))
		}()
	}
	wg.Wait()
	if _, err := b.Stat(ctx, "data/00/race"); err != nil {
		t.Fatal(err)
	}
	if tmp, _ := filepath.Glob(filepath.Join(dir, "data", "00", tmpPrefix+"*")); len(tmp) != 0 {
		t.Fatalf("temporary files left: %v", tmp)
	}
}

// A full disk is a clear error and leaves no object visible.
func TestFullDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts a small tmpfs and needs root")
	}
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	ctx := context.Background()
	b, err := Create(filepath.Join(mnt, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	err = b.Put(ctx, "data/00/big", make([]byte, 2<<20))
	if err == nil || !strings.Contains(err.Error(), "no space left") {
		t.Fatalf("Put on a full disk: %v", err)
	}
	if _, err := b.Stat(ctx, "data/00/big"); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("half-written object visible: %v", err)
	}
	if tmp, _ := filepath.Glob(filepath.Join(mnt, "repo", "data", "00", tmpPrefix+"*")); len(tmp) != 0 {
		t.Fatalf("temporary files left: %v", tmp)
	}
	// Space is back: the same name can be written.
	if err := b.Put(ctx, "data/00/big", make([]byte, 100)); err != nil {
		t.Fatal(err)
	}
}

// A read-only directory is a clear error (as a non-root user) — as root,
// a read-only bind of the directory is the same refusal.
func TestReadOnlyDirectory(t *testing.T) {
	ctx := context.Background()
	b, dir := newBackend(t)
	if os.Geteuid() == 0 {
		if out, err := exec.Command("mount", "--bind", "-o", "ro", dir, dir).CombinedOutput(); err != nil {
			t.Fatalf("read-only bind mount: %v %s", err, out)
		}
		t.Cleanup(func() { exec.Command("umount", dir).Run() })
		// Some kernels need a remount for ro to take effect on a bind.
		exec.Command("mount", "-o", "remount,bind,ro", dir).Run()
	} else {
		os.Chmod(filepath.Join(dir, "data", "00"), 0o500)
	}
	err := b.Put(ctx, "data/00/x", []byte("x"))
	if err == nil || !(strings.Contains(err.Error(), "read-only") || strings.Contains(err.Error(), "permission denied")) {
		t.Fatalf("Put into a read-only directory: %v", err)
	}
	if _, err := b.Stat(ctx, "data/00/x"); !errors.Is(err, backend.ErrNotExist) {
		t.Fatal("object visible after a failed Put")
	}
}

func TestRemoveTemporary(t *testing.T) {
	b, dir := newBackend(t)
	old := filepath.Join(dir, "data", "00", tmpPrefix+"123")
	os.WriteFile(old, []byte("partial"), 0o600)
	os.Chtimes(old, time.Now().Add(-time.Hour), time.Now().Add(-time.Hour))
	young := filepath.Join(dir, "data", "00", tmpPrefix+"456")
	os.WriteFile(young, []byte("an upload in progress"), 0o600)
	b.Put(context.Background(), "data/00/keep", []byte("k"))
	n, err := b.RemoveTemporary(context.Background(), time.Now().Add(-time.Minute))
	if err != nil || n != 1 {
		t.Fatalf("RemoveTemporary = %d, %v", n, err)
	}
	if _, err := os.Stat(young); err != nil {
		t.Fatal("RemoveTemporary removed a temporary file younger than its limit")
	}
	if _, err := b.Stat(context.Background(), "data/00/keep"); err != nil {
		t.Fatal("RemoveTemporary removed an object")
	}
}
