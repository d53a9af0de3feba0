package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// image writes a region of n blocks at off holding the result of writes
// 0…k-1, as the writer leaves it, and returns the file's path.
func image(t *testing.T, off, n, k int64) string {
	t.Helper()
	data := make([]byte, off+n*blockSize)
	for i := int64(0); i < k; i++ {
		s := slot(i, n)
		block(data[off+s*blockSize:off+(s+1)*blockSize], i, s)
	}
	p := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func patch(t *testing.T, path string, at int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
}

func TestSlotIsPermutation(t *testing.T) {
	for _, n := range []int64{1, 2, 64, 8192} {
		seen := make([]bool, n)
		for k := int64(0); k < n; k++ {
			s := slot(k, n)
			if s < 0 || s >= n || seen[s] {
				t.Fatalf("n=%d: slot(%d)=%d repeats or is out of range", n, k, s)
			}
			seen[s] = true
			if slot(k+n, n) != s {
				t.Fatalf("n=%d: slot(%d) != slot(%d)", n, k+n, k)
			}
		}
	}
}

// TestVerifyAcceptsEveryPointInTime: any number of writes, within the first
// pass or after several, verifies and reports that number.
func TestVerifyAcceptsEveryPointInTime(t *testing.T) {
	const off, n = 8192, 64
	for _, k := range []int64{0, 1, 2, 37, 63, 64, 65, 100, 3*64 + 5} {
		got, err := verify(image(t, off, n, k), off, n)
		if err != nil || got != k {
			t.Errorf("k=%d: verify = %d, %v", k, got, err)
		}
	}
}

// TestVerifyRejectsMixedTimes: images that no single instant produced are
// rejected, with the reason.
func TestVerifyRejectsMixedTimes(t *testing.T) {
	const off, n = 4096, 64
	blk := func(k int64) []byte {
		b := make([]byte, blockSize)
		block(b, k, slot(k, n))
		return b
	}
	at := func(k int64) int64 { return off + slot(k, n)*blockSize }
	cases := []struct {
		name string
		k    int64
		mod  func(p string)
		want string
	}{
		// A later write is present but an earlier one is missing: what a
		// reader racing the writer on the live origin sees.
		{"gap in first pass", 40, func(p string) { patch(t, p, at(10), make([]byte, blockSize)) }, "not a point-in-time image"},
		{"later write without earlier", 40, func(p string) { patch(t, p, at(50), blk(50)) }, "not a point-in-time image"},
		// Slot of write 5 still holds write 5 although write 69 (same slot)
		// happened before write 80.
		{"stale block in second pass", 81, func(p string) { patch(t, p, at(69), blk(5)) }, "not a point-in-time image"},
		{"torn block", 30, func(p string) { patch(t, p, at(7)+blockSize/2, make([]byte, 16)) }, "torn or corrupt"},
		{"block in the wrong slot", 30, func(p string) { patch(t, p, at(7), blk(8)) }, "belongs to block"},
		{"foreign data", 30, func(p string) { patch(t, p, at(40), []byte("hello")) }, "foreign data"},
	}
	for _, c := range cases {
		p := image(t, off, n, c.k)
		c.mod(p)
		if _, err := verify(p, off, n); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: verify error %v, want one containing %q", c.name, err, c.want)
		}
	}
}

func TestFillSum(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	a, err := fill(p, 4096, 3<<20, 7)
	if err != nil {
		t.Fatal(err)
	}
	b, err := sumRange(p, 4096, 3<<20)
	if err != nil || a != b {
		t.Fatalf("sum %s, %v; fill said %s", b, err, a)
	}
	c, err := fill(p, 4096, 3<<20, 8)
	if err != nil || c == a {
		t.Fatalf("another seed gave %s, %v (first %s)", c, err, a)
	}
}
