package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"vmvault/internal/testio"
	"vmvault/internal/testsshd"
)

func needRootFUSE(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the mount tests mount directly: run the suite as root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Fatal("the mount tests need /dev/fuse")
	}
}

// mkfsImage makes a 32 MiB ext4 image holding a random file and a text
// file, and returns the image and the random file's content.
func mkfsImage(t *testing.T, dir string) (string, []byte) {
	t.Helper()
	tree := filepath.Join(dir, "tree")
	os.MkdirAll(filepath.Join(tree, "etc"), 0o755)
	data := writeImage(t, filepath.Join(tree, "data.bin"), 31, 6<<20)
	os.WriteFile(filepath.Join(tree, "etc", "hostname"), []byte("vm01\n"), 0o644)
	img := filepath.Join(dir, "disk.raw")
	os.WriteFile(img, nil, 0o600)
	os.Truncate(img, 32<<20)
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", tree, img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	return img, data
}

// startMount runs `vmvault mount DIR` as a child (real signals) with
// the given global arguments and waits until the disk file appears.
func startMount(t *testing.T, global []string, dir string) (*exec.Cmd, *lockedWriter) {
	t.Helper()
	cmd := exec.Command(os.Args[0], append(append([]string{"--"}, global...), "mount", dir)...)
	cmd.Env = append(os.Environ(), "VMVAULT_HELPER_MAIN=1")
	stderr := &lockedWriter{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		// Wait for the "mounted" line too: until then go-fuse may hold
		// its poll-probe file open on the mount, and a SIGKILL in that
		// window leaves the process stuck flushing a file on its own
		// (now dead) file system.
		if _, err := os.Stat(filepath.Join(dir, "vm01", "latest", "hda")); err == nil && strings.Contains(stderr.String(), "mounted;") {
			return cmd, stderr
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("mount never showed vm01/latest/hda: %s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// lockedWriter lets the test read a child's stderr while it runs.
type lockedWriter struct {
	mu sync.Mutex
	w  bytes.Buffer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func (l *lockedWriter) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.String()
}

// waitExit waits for a child with a timeout and returns its exit code.
func waitExit(t *testing.T, cmd *exec.Cmd, within time.Duration) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(within):
		cmd.Process.Kill()
		<-done
		t.Fatalf("child did not exit within %s", within)
	}
	return -1
}

func sumFile(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return string(h.Sum(nil))
}

// `vmvault mount`: the disk file equals the image; a file copied out of a
// loop mount equals the original; SIGTERM while a loop mount holds the
// mount point waits (saying it is busy) and unmounts once it is free,
// exit 0; SIGINT unmounts at once; after SIGKILL the stale mount point
// is refused with a clear error.
func TestMountCLISignals(t *testing.T) {
	needRootFUSE(t)
	e := newEnv(t)
	img, data := mkfsImage(t, e.dir)
	e.ok("backup", "vm01", "--source", "hda="+img)
	global := []string{"--repo", e.repo, "--password-file", e.pw, "--cache-dir", e.cache}
	dir := t.TempDir()

	child, stderr := startMount(t, global, dir)
	// A server of reads runs twice as many Go processors as cores, so a
	// read request finds one free while read-ahead decodes (oversubscribe).
	if want := fmt.Sprintf("procs=%d", 2*runtime.GOMAXPROCS(0)); os.Getenv("GOMAXPROCS") == "" && !strings.Contains(stderr.String(), want) {
		t.Errorf("mount's log does not say %s: %s", want, stderr.String())
	}
	if sumFile(t, filepath.Join(dir, "vm01/latest/hda")) != sumFile(t, img) {
		t.Fatal("mounted disk file differs from the image")
	}
	loop := t.TempDir()
	if out, err := exec.Command("mount", "-o", "ro,loop,noload", filepath.Join(dir, "vm01/latest/hda"), loop).CombinedOutput(); err != nil {
		t.Fatalf("loop mount: %v: %s", err, out)
	}
	got, err := os.ReadFile(filepath.Join(loop, "data.bin"))
	if err != nil || !bytes.Equal(got, data) {
		exec.Command("umount", loop).Run()
		t.Fatalf("file copied out of the loop mount differs (%v)", err)
	}
	child.Process.Signal(syscall.SIGTERM)
	time.Sleep(1500 * time.Millisecond)
	if !strings.Contains(stderr.String(), "busy") {
		exec.Command("umount", loop).Run()
		t.Fatalf("SIGTERM with a loop mount on top: no 'busy' message: %s", stderr.String())
	}
	if out, err := exec.Command("umount", loop).CombinedOutput(); err != nil {
		t.Fatalf("umount loop: %v: %s", err, out)
	}
	if code := waitExit(t, child, 20*time.Second); code != 0 {
		t.Fatalf("mount exited %d after SIGTERM: %s", code, stderr.String())
	}
	if isMounted(dir) {
		t.Fatal("still mounted after SIGTERM")
	}

	child, stderr = startMount(t, global, dir)
	child.Process.Signal(syscall.SIGINT)
	if code := waitExit(t, child, 20*time.Second); code != 0 || isMounted(dir) {
		t.Fatalf("SIGINT: exit %d, mounted %v: %s", code, isMounted(dir), stderr.String())
	}

	child, _ = startMount(t, global, dir)
	child.Process.Kill()
	child.Wait()
	defer exec.Command("umount", dir).Run()
	r := e.run(nil, "mount", dir)
	if r.code != exitError || !strings.Contains(r.stderr, "stale") || !strings.Contains(r.stderr, "umount "+dir) {
		t.Fatalf("mount on a stale mount point: exit %d %q", r.code, r.stderr)
	}
	if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
		t.Fatalf("umount stale: %v %s", err, out)
	}
	// A busy (already mounted) point is refused too.
	child, _ = startMount(t, global, dir)
	r = e.run(nil, "mount", dir)
	child.Process.Signal(syscall.SIGTERM)
	waitExit(t, child, 20*time.Second)
	if r.code != exitError || !strings.Contains(r.stderr, "already a mount point") {
		t.Fatalf("mount on a mounted point: exit %d %q", r.code, r.stderr)
	}
}

func isMounted(dir string) bool {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	return strings.Contains(string(b), " "+dir+" ")
}

// The mount over SFTP serves the same bytes, and a damaged chunk in the
// repository is an I/O error for that range, never other bytes.
func TestMountSFTP(t *testing.T) {
	needRootFUSE(t)
	e := newEnv(t)
	srv := testsshd.Start(t, testsshd.Options{})
	repoDir := filepath.Join(e.dir, "sftp-repo")
	base := sftpArgs(srv, repoDir, e)
	if r := runArgs(nil, append(base, "init", "--kdf-params", "t=1,m=8192,p=1", "--segment-size", "4194304")...); r.code != 0 {
		t.Fatalf("init over sftp: %s", r.stderr)
	}
	img, _ := mkfsImage(t, e.dir)
	if r := runArgs(nil, append(base, "backup", "vm01", "--source", "hda="+img)...); r.code != 0 {
		t.Fatalf("backup over sftp: %s", r.stderr)
	}
	dir := t.TempDir()
	child, stderr := startMount(t, base, dir)
	if sumFile(t, filepath.Join(dir, "vm01/latest/hda")) != sumFile(t, img) {
		t.Fatal("disk file mounted over sftp differs from the image")
	}
	child.Process.Signal(syscall.SIGTERM)
	if code := waitExit(t, child, 20*time.Second); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}

	testio.FlipLargestObject(t, repoDir)
	child, stderr = startMount(t, base, dir)
	defer func() {
		child.Process.Signal(syscall.SIGTERM)
		waitExit(t, child, 20*time.Second)
	}()
	want, _ := os.ReadFile(img)
	failed := testio.ReadExpectEIO(t, filepath.Join(dir, "vm01/latest/hda"), want, 128<<10)
	if failed == 0 || !strings.Contains(stderr.String(), "object failed authentication") || !strings.Contains(stderr.String(), "data/") {
		t.Fatalf("damaged chunk: %d reads failed; log %s", failed, stderr.String())
	}
}

// dump writes exactly the range asked for; restore --target-dir restores
// every disk of a generation.
func TestDumpAndTargetDir(t *testing.T) {
	e := newEnv(t)
	a := writeImage(t, filepath.Join(e.dir, "a.raw"), 41, 9<<20+17)
	b := writeImage(t, filepath.Join(e.dir, "b.raw"), 42, 5<<20)
	e.ok("backup", "vm01", "--source", "hda="+filepath.Join(e.dir, "a.raw"), "--source", "hdb="+filepath.Join(e.dir, "b.raw"))

	for _, tc := range []struct {
		args []string
		want []byte
	}{
		{[]string{"--disk", "hda", "--offset", "4194000", "--length", "70000"}, a[4194000 : 4194000+70000]},
		{[]string{"--disk", "hdb", "--offset", "5000000"}, b[5000000:]},
		{[]string{"--disk", "hda"}, a},
		{[]string{"--disk", "hda", "--offset", "100", "--length", "0"}, nil},
	} {
		r := e.ok(append([]string{"dump", "vm01", "latest"}, tc.args...)...)
		if r.stdout != string(tc.want) {
			t.Fatalf("dump %v: %d bytes, want %d (equal prefix: %v)", tc.args, len(r.stdout), len(tc.want), strings.HasPrefix(string(tc.want), r.stdout))
		}
	}
	e.fails(exitError, "beyond the disk's end", "dump", "vm01", "latest", "--disk", "hda", "--offset", "9437202")
	e.fails(exitError, "beyond the disk's end", "dump", "vm01", "latest", "--disk", "hdb", "--offset", "1", "--length", "5242880")
	e.fails(exitUsage, "negative", "dump", "vm01", "latest", "--disk", "hdb", "--offset", "-1")
	e.fails(exitError, "choose one with --disk", "dump", "vm01", "latest")

	dir := filepath.Join(e.dir, "restored")
	e.ok("restore", "vm01", "latest", "--target-dir", dir)
	for name, want := range map[string][]byte{"hda.raw": a, "hdb.raw": b} {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || sum(got) != sum(want) {
			t.Fatalf("--target-dir: %s differs (%v)", name, err)
		}
	}
	e.fails(exitUsage, "not both", "restore", "vm01", "latest", "--target-dir", dir, "--target", "x")
}

// oversubscribe doubles the processors the process started with, once
// however often it is called, and puts the old count back.
func TestOversubscribe(t *testing.T) {
	if os.Getenv("GOMAXPROCS") != "" {
		t.Skip("GOMAXPROCS is set: oversubscribe leaves it alone")
	}
	before := runtime.GOMAXPROCS(0)
	n, restore := oversubscribe()
	n2, restore2 := oversubscribe()
	if n != 2*startProcs || n2 != n || runtime.GOMAXPROCS(0) != n {
		t.Fatalf("oversubscribe: %d then %d, GOMAXPROCS %d; started with %d", n, n2, runtime.GOMAXPROCS(0), startProcs)
	}
	restore2()
	restore()
	if got := runtime.GOMAXPROCS(0); got != before {
		t.Fatalf("GOMAXPROCS %d after restore, was %d", got, before)
	}
	// Overlapping commands (a mount serving while a backup runs) that
	// end in the order they began: the first to end leaves the count
	// raised for the other, the last puts it back; a second call of one
	// restore changes nothing.
	_, endMount := oversubscribe()
	_, endBackup := oversubscribe()
	endMount()
	endMount()
	if got := runtime.GOMAXPROCS(0); got != 2*startProcs {
		t.Fatalf("GOMAXPROCS %d while a command still runs, want %d", got, 2*startProcs)
	}
	endBackup()
	if got := runtime.GOMAXPROCS(0); got != before {
		t.Fatalf("GOMAXPROCS %d after both commands, was %d", got, before)
	}
}

// procsReader is an image on stdin that records GOMAXPROCS when the backup
// first reads it.
type procsReader struct {
	data  []byte
	procs int
}

func (r *procsReader) Read(p []byte) (int, error) {
	if r.procs == 0 {
		r.procs = runtime.GOMAXPROCS(0)
	}
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

// A backup runs with twice the processors the process started with, so
// that goroutines blocked in system calls (O_DIRECT writes, syncfs) leave
// the segment workers' cores busy; the count goes back afterwards.
func TestBackupOversubscribes(t *testing.T) {
	if os.Getenv("GOMAXPROCS") != "" {
		t.Skip("GOMAXPROCS is set: oversubscribe leaves it alone")
	}
	e := newEnv(t)
	img := writeImage(t, filepath.Join(e.dir, "img"), 7, 3<<20)
	before := runtime.GOMAXPROCS(0)
	src := &procsReader{data: img}
	var out, errb bytes.Buffer
	args := []string{"--repo", e.repo, "--password-file", e.pw, "--cache-dir", e.cache, "backup", "vm01", "--source", "-"}
	if code := run(context.Background(), args, src, &out, &errb); code != 0 {
		t.Fatalf("backup: exit %d: %s", code, errb.String())
	}
	if src.procs != 2*startProcs {
		t.Fatalf("backup read its source with GOMAXPROCS %d, want %d (twice the %d it started with)", src.procs, 2*startProcs, startProcs)
	}
	if got := runtime.GOMAXPROCS(0); got != before {
		t.Fatalf("GOMAXPROCS %d after the backup, was %d", got, before)
	}
	r := e.run(nil, "restore", "vm01", "latest")
	if r.code != 0 || sum([]byte(r.stdout)) != sum(img) {
		t.Fatalf("restore: exit %d, image differs", r.code)
	}
}
