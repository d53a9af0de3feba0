package repo

import "testing"

// The free list of sealing buffers hands out the smallest idle buffer
// that fits, emptied, and keeps no more than freeBytes idle.
func TestFreeList(t *testing.T) {
	var f freeList
	if b := f.get(1); b != nil {
		t.Fatalf("an empty list gave a buffer of %d bytes", cap(b))
	}
	f.put(make([]byte, 5, 4<<20))
	f.put(make([]byte, 0, 2<<20))
	f.put(make([]byte, 0, 8<<20))
	if b := f.get(3 << 20); cap(b) != 4<<20 || len(b) != 0 {
		t.Fatalf("for 3 MiB: a buffer of len %d cap %d, want the empty 4 MiB one", len(b), cap(b))
	}
	if b := f.get(9 << 20); b != nil {
		t.Fatalf("for 9 MiB: a buffer of %d bytes", cap(b))
	}
	if b := f.get(1); cap(b) != 2<<20 {
		t.Fatalf("for 1 byte: cap %d, want the smallest (2 MiB)", cap(b))
	}
	for range freeBytes / (1 << 20) {
		f.put(make([]byte, 0, 1<<20))
	}
	if f.bytes > freeBytes {
		t.Fatalf("%d bytes idle, bound %d", f.bytes, freeBytes)
	}
	n := 0
	for f.get(1) != nil {
		n++
	}
	if n == 0 || f.bytes != 0 {
		t.Fatalf("drained %d buffers, %d bytes left", n, f.bytes)
	}
}
