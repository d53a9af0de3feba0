package local

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"vmvault/internal/testio"
)

// alignedBuffer returns n bytes of random data starting on a page.
func alignedBuffer(t *testing.T, seed uint64, n int) []byte {
	t.Helper()
	raw := make([]byte, n+directAlign)
	off := (directAlign - int(uintptr(unsafe.Pointer(&raw[0]))%directAlign)) % directAlign
	b := raw[off : off+n]
	r := rand.New(rand.NewPCG(seed, 2))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// residentPages counts the pages of file name that are in the page cache.
func residentPages(t *testing.T, name string) (resident, total int) {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	in := testio.Resident(t, m)
	for _, r := range in {
		if r {
			resident++
		}
	}
	return resident, len(in)
}

// An object whose memory starts on a page has its whole pages written
// with O_DIRECT: they reach the file without a copy into the page cache
// (so without the kernel's writeback later), and only the partial page at
// its end goes through the cache. Every object reads back as written,
// aligned or not, large or small. Before, every page went through the
// page cache.
func TestPutWritesPagesDirect(t *testing.T) {
	dir := t.TempDir()
	if f, err := os.OpenFile(filepath.Join(dir, "probe"), os.O_CREATE|os.O_WRONLY|unix.O_DIRECT, 0o600); err != nil {
		t.Skipf("the file system under %s refuses O_DIRECT: %v", dir, err)
	} else {
		f.Close()
	}
	b, err := Create(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	big := alignedBuffer(t, 1, 3<<20+100)
	cases := []struct {
		name   string
		data   []byte
		direct bool
	}{
		{"data/aa/aligned", big, true},
		{"data/ab/pages", big[:1<<20], true},
		{"data/ac/unaligned", big[1 : 1<<20+1], false},
		{"data/ad/small", big[:4096], false},
		{"data/ae/tiny", big[:17], false},
	}
	for _, c := range cases {
		if err := b.PutDeferred(ctx, c.name, c.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		fn := filepath.Join(b.root, c.name)
		if c.direct {
			resident, total := residentPages(t, fn)
			if resident > 1 {
				t.Errorf("%s: %d of %d pages in the page cache after the put, want at most the last", c.name, resident, total)
			}
		}
		got, err := b.GetAll(ctx, c.name, 16<<20)
		if err != nil || !bytes.Equal(got, c.data) {
			t.Errorf("%s: read back %d bytes, %v; want the %d written", c.name, len(got), err, len(c.data))
		}
	}
}
