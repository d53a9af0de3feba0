// Package testio holds the checks the instant-access tests (fusefs,
// mount, serve) share: damaging a repository's data on purpose, and
// reading a disk file that must fail with EIO where it is damaged.
//
// Rules it keeps: a helper fails the test itself (t.Fatal) on anything
// unexpected, so a caller cannot forget to check; and a read that
// succeeds is always compared with the expected bytes, so damage can
// never pass as data.
package testio

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"
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
