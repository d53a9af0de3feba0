package main

import (
	"bytes"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// largestObject returns the path of the largest file under repo/data: a
// chunk of random data.
func largestObject(t *testing.T, repo string) string {
	t.Helper()
	var best string
	var size int64
	filepath.WalkDir(filepath.Join(repo, "data"), func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil && fi.Size() > size {
				best, size = p, fi.Size()
			}
		}
		return nil
	})
	if best == "" {
		t.Fatal("no data objects")
	}
	return best
}

// stallObject replaces a stored object with a FIFO, so that a restore
// blocks opening it (deterministically, mid-restore) until release is
// called; release then lets the open return an empty object. restore
// puts the real object back.
func stallObject(t *testing.T, path string) (release, restore func()) {
	t.Helper()
	aside := path + ".aside"
	if err := os.Rename(path, aside); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	release = func() {
		f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_NONBLOCK, 0)
		if err == nil {
			f.Close()
		}
	}
	restored := false
	restore = func() {
		if restored {
			return
		}
		restored = true
		os.Remove(path)
		if err := os.Rename(aside, path); err != nil {
			t.Fatal(err)
		}
	}
	return release, restore
}

// waitBlockedOnFIFO waits until a thread of pid sleeps opening a FIFO.
func waitBlockedOnFIFO(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		tasks, _ := filepath.Glob(filepath.Join("/proc", strconv.Itoa(pid), "task", "*", "wchan"))
		for _, w := range tasks {
			if b, _ := os.ReadFile(w); string(b) == "wait_for_partner" {
				return
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("the restore never reached the stalled object")
}

// Issue 9 item 1: SIGTERM or SIGINT during a restore, to a target or to
// stdout, exits 130, logs no success, says the output is incomplete, and
// leaves an existing larger target at its size. Before the fix the
// interrupted restore exited 0 and logged "restored … bytes=…".
func TestRestoreInterrupted(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	img := writeImage(t, src, 9, 24<<20)
	e.ok("backup", "vm01", "--source", src)
	obj := largestObject(t, e.repo)
	old := bytes.Repeat([]byte{0xaa}, len(img)+8<<20)

	for _, tc := range []struct {
		name   string
		sig    syscall.Signal
		stdout bool
	}{
		{"target SIGTERM", syscall.SIGTERM, false},
		{"target SIGINT", syscall.SIGINT, false},
		{"stdout SIGTERM", syscall.SIGTERM, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			target := filepath.Join(t.TempDir(), "target.raw")
			if err := os.WriteFile(target, old, 0o600); err != nil {
				t.Fatal(err)
			}
			args := []string{"restore", "vm01", "latest", "--target", target}
			if tc.stdout {
				args = args[:3]
			}
			child := helper(e, args...)
			out, err := os.Create(filepath.Join(t.TempDir(), "stdout"))
			if err != nil {
				t.Fatal(err)
			}
			defer out.Close()
			var stderr bytes.Buffer
			child.Stdout, child.Stderr = out, &stderr
			release, restore := stallObject(t, obj)
			defer restore()
			if err := child.Start(); err != nil {
				t.Fatal(err)
			}
			waitBlockedOnFIFO(t, child.Process.Pid)
			child.Process.Signal(tc.sig)
			time.Sleep(100 * time.Millisecond)
			release()
			err = child.Wait()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			}
			if code != exitInterrupted {
				t.Fatalf("interrupted restore exited %d (%v), want 130; stderr %s", code, err, stderr.String())
			}
			if strings.Contains(stderr.String(), "msg=restored") || !strings.Contains(stderr.String(), "incomplete") {
				t.Fatalf("interrupted restore: stderr %q; want no success and 'incomplete'", stderr.String())
			}
			if fi, _ := os.Stat(target); !tc.stdout && fi.Size() != int64(len(old)) {
				t.Fatalf("interrupted restore cut the existing target from %d to %d bytes", len(old), fi.Size())
			}
			restore()
			// The same command, uninterrupted, completes the target.
			if !tc.stdout {
				e.ok(args...)
				got, _ := os.ReadFile(target)
				if sum(got) != sum(img) {
					t.Fatal("restore over the interrupted target differs from the image")
				}
			}
		})
	}
}

// A restore that fails (a damaged chunk) exits 1, names the object, says
// the target is incomplete and leaves an existing larger target's size.
func TestRestoreFailedKeepsTarget(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	img := writeImage(t, src, 10, 12<<20)
	e.ok("backup", "vm01", "--source", src)
	obj := largestObject(t, e.repo)
	os.Chmod(obj, 0o600)
	b, _ := os.ReadFile(obj)
	b[len(b)/2] ^= 1
	os.WriteFile(obj, b, 0o600)
	target := filepath.Join(e.dir, "target.raw")
	old := bytes.Repeat([]byte{0x55}, len(img)+4<<20)
	os.WriteFile(target, old, 0o600)
	r := e.run(nil, "restore", "vm01", "latest", "--target", target)
	if r.code != exitError || !strings.Contains(r.stderr, "incomplete") || !strings.Contains(r.stderr, filepath.Base(obj)) || strings.Contains(r.stderr, "msg=restored") {
		t.Fatalf("failed restore: exit %d, stderr %q", r.code, r.stderr)
	}
	if fi, _ := os.Stat(target); fi.Size() != int64(len(old)) {
		t.Fatalf("failed restore cut the target from %d to %d bytes", len(old), fi.Size())
	}
}

// A restore onto a full file system fails with "no space left", says the
// target is incomplete, and exits non-zero (a small tmpfs).
func TestRestoreDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	writeImage(t, src, 11, 16<<20)
	e.ok("backup", "vm01", "--source", src)
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	defer exec.Command("umount", dir).Run()
	r := e.run(nil, "restore", "vm01", "latest", "--target", filepath.Join(dir, "vm01.raw"))
	if r.code != exitError || !strings.Contains(r.stderr, "no space left on device") || !strings.Contains(r.stderr, "incomplete") || strings.Contains(r.stderr, "msg=restored") {
		t.Fatalf("restore onto a full disk: exit %d, stderr %q", r.code, r.stderr)
	}
}
