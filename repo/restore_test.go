package repo

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

// An existing larger target with other content becomes exactly the image
// (cut only at the end); an unaligned image size takes the buffered path
// for its tail while the aligned runs go through O_DIRECT; a block of
// zeros over old data becomes zero.
func TestRestoreToOverLargerTarget(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(12, 13<<20+1234)
	clear(img[2<<20 : 3<<20])
	m := backupBytes(t, tr.Repository, "vm01", img)
	target := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(target, bytes.Repeat([]byte{0x5a}, 20<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := tr.RestoreTo(context.Background(), m, "", target)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(target)
	if !bytes.Equal(got, img) {
		t.Fatalf("target (%d bytes) differs from the image (%d bytes)", len(got), len(img))
	}
	if st.Bytes != int64(len(img)) || st.Written != int64(len(img)) {
		t.Fatalf("stats %+v: every byte differed and had to be written", st)
	}
	// Again: nothing differs, nothing is written.
	st, err = tr.RestoreTo(context.Background(), m, "", target)
	if err != nil || st.Written != 0 || st.Skipped != int64(len(img)) {
		t.Fatalf("second restore over an equal target: %+v, %v", st, err)
	}
}
