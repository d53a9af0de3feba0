package repo

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// streamOnly hides every interface but io.Reader, so the backup reads
// the image as a stream.
type streamOnly struct{ io.Reader }

// A sparse image file: its holes are never read (bytes_read counts only
// the data), it backs up to the same segments and digest as the same bytes
// read as a stream, and it restores byte-identical.
func TestBackupSparseFileSkipsHoles(t *testing.T) {
	tr := newTestRepo(t)
	const size = 256 << 20
	path := filepath.Join(t.TempDir(), "sparse.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	data := testImage(7, 3<<20)
	// Data at an unaligned offset inside a segment, across a segment
	// boundary, and at the very end.
	var dataBytes int64
	for _, off := range []int64{5<<20 + 4096, 64<<20 - 1<<20, size - 2<<20} {
		n, err := f.WriteAt(data[:2<<20], off)
		if err != nil {
			t.Fatal(err)
		}
		dataBytes += int64(n)
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 >= size/2 {
		t.Skip("the file system of the test's temp dir does not keep files sparse")
	}
	m, err := tr.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Source: path, Reader: f, Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	// Filesystems report data at block granularity: allow a little slack.
	if m.Stats.BytesRead < dataBytes || m.Stats.BytesRead > dataBytes+3<<20 {
		t.Fatalf("bytes_read %d for %d bytes of data in a %d-byte sparse file", m.Stats.BytesRead, dataBytes, int64(size))
	}
	if m.Stats.BytesZero < size-dataBytes-3<<20 {
		t.Fatalf("bytes_zero %d", m.Stats.BytesZero)
	}
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ms, err := tr.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Reader: streamOnly{bytes.NewReader(img)}, Size: -1}}})
	if err != nil {
		t.Fatal(err)
	}
	if ms.Stats.BytesRead != size {
		t.Fatalf("stream: bytes_read %d of %d", ms.Stats.BytesRead, int64(size))
	}
	if ms.Disks[0].Digest != m.Disks[0].Digest {
		t.Fatal("the sparse file and the same bytes as a stream give different segments")
	}
	if ms.Stats.SegmentsNew != 0 {
		t.Fatalf("stream of the same image stored %d new segments", ms.Stats.SegmentsNew)
	}
	r := tr.reopen(t)
	if got := restoreBytes(t, r, mustFind(t, r, "vm", m.ID[:8])); !bytes.Equal(got, img) {
		t.Fatal("restore of the sparse image differs")
	}
}
