// Package testio holds the checks several packages' tests share: damaging
// a repository's data on purpose, reading a disk file that must fail with
// EIO where it is damaged (the instant-access tests: fusefs, mount,
// serve), and asking which pages of a mapping are in memory.
//
// Rules it keeps: a helper fails the test itself (t.Fatal) on anything
// unexpected, so a caller cannot forget to check; and a read that
// succeeds is always compared with the expected bytes, so damage can
// never pass as data.
package testio

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"unsafe"
)

// LargestObject returns the path of the largest object under
// repoDir/data: a chunk, in any image of a few MiB.
func LargestObject(t testing.TB, repoDir string) string {
	t.Helper()
	var best string
	var size int64
	filepath.WalkDir(filepath.Join(repoDir, "data"), func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil && fi.Size() > size {
				best, size = p, fi.Size()
			}
		}
		return nil
	})
	if best == "" {
		t.Fatalf("no data objects under %s", repoDir)
	}
	return best
}

// FlipLargestObject flips one bit in the middle of LargestObject and
// returns the object's path.
func FlipLargestObject(t testing.TB, repoDir string) string {
	t.Helper()
	victim := LargestObject(t, repoDir)
	b, err := os.ReadFile(victim)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x10
	os.Chmod(victim, 0o600)
	if err := os.WriteFile(victim, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return victim
}

// ReadExpectEIO reads the file at path in blocks of block bytes and
// compares each with want. A block whose read fails must fail with EIO;
// a block that reads must equal want. It returns how many blocks failed.
func ReadExpectEIO(t testing.TB, path string, want []byte, block int) (failed int) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := make([]byte, block)
	for off := int64(0); off < int64(len(want)); off += int64(block) {
		k, err := f.ReadAt(p, off)
		if errors.Is(err, io.EOF) && off+int64(k) == int64(len(want)) {
			err = nil // the last block, short
		}
		if err != nil {
			if !errors.Is(err, syscall.EIO) {
				t.Fatalf("read %s at %d: %v, want EIO", path, off, err)
			}
			failed++
			continue
		}
		if !bytes.Equal(p[:k], want[off:min(off+int64(block), int64(len(want)))]) {
			t.Fatalf("read %s at %d returned wrong bytes", path, off)
		}
	}
	return failed
}

// RestoreFewGCs runs restore, which writes a disk of size bytes into the
// hash it is given, and fails t unless the output's SHA-256 is want and
// the garbage collector ran at most once per 8 MiB restored: a restore
// whose buffers crowd the soft memory limit collects nearly all the time.
func RestoreFewGCs(t testing.TB, size int64, want []byte, restore func(out io.Writer) error) {
	t.Helper()
	got := sha256.New()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	if err := restore(got); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	if !bytes.Equal(got.Sum(nil), want) {
		t.Fatal("restored image differs")
	}
	limit := uint32(size / (8 << 20))
	if n := after.NumGC - before.NumGC; n > limit {
		t.Fatalf("%d garbage collections restoring %d MiB (at most %d expected): the restore's buffers crowd the soft memory limit", n, size>>20, limit)
	} else {
		t.Logf("%d garbage collections", n)
	}
}

// Resident reports, page by page, whether the pages of mem (a mapping) are
// in memory: for a file mapping, whether the page cache holds them
// (mincore).
func Resident(t testing.TB, mem []byte) []bool {
	t.Helper()
	page := os.Getpagesize()
	vec := make([]byte, (len(mem)+page-1)/page)
	if _, _, e := syscall.Syscall(syscall.SYS_MINCORE, uintptr(unsafe.Pointer(&mem[0])), uintptr(len(mem)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatalf("mincore: %v", e)
	}
	in := make([]bool, len(vec))
	for i, v := range vec {
		in[i] = v&1 == 1
	}
	return in
}
