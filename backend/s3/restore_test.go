package s3

import (
	"context"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"runtime"
	"runtime/debug"
	"testing"

	"vmvault/crypto"
	"vmvault/internal/testminio"
	"vmvault/repo"
)

// A restore from S3 under cmd/vmvault's soft memory limit (144 MiB)
// collects garbage now and then, not continuously: with the restore's
// buffers at the limit, every response body's garbage started a
// collection (866 collections and twice the CPU for image A from MinIO;
// this test: 29 collections before the fix, 2 after). repo's
// TestRestoreCollectsRarely does the same locally and over SFTP.
func TestRestoreCollectsRarely(t *testing.T) {
	if testing.Short() {
		t.Skip("backs up and restores 160 MiB")
	}
	const size = 160 << 20
	ctx := context.Background()
	s := testminio.Start(t, testminio.Options{})
	be := open(t, rootConfig(t, s, ""))
	opts := repo.Options{KDF: crypto.MinKDFParams, CacheDir: t.TempDir()}
	r, err := repo.Init(ctx, be, []byte("secret"), opts)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	image := func() io.Reader { return io.LimitReader(rand.NewChaCha8([32]byte{7}), size) }
	m, err := r.Backup(ctx, repo.BackupRequest{VM: "vm01", Disks: []repo.DiskSource{{Name: "disk", Source: "test", Reader: image(), Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	want := sha256.New()
	io.Copy(want, image())

	defer debug.SetMemoryLimit(debug.SetMemoryLimit(144 << 20))
	got := sha256.New()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	if _, err := r.Restore(ctx, m, "", got); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	if string(got.Sum(nil)) != string(want.Sum(nil)) {
		t.Fatal("restored image differs")
	}
	if n := after.NumGC - before.NumGC; n > size/(8<<20) {
		t.Fatalf("%d garbage collections restoring %d MiB (at most %d expected): the restore's buffers crowd the soft memory limit", n, size>>20, size/(8<<20))
	} else {
		t.Logf("%d garbage collections", n)
	}
}
