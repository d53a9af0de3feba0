package s3

import (
	"context"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"runtime/debug"
	"testing"

	"vmvault/crypto"
	"vmvault/internal/testio"
	"vmvault/internal/testminio"
	"vmvault/repo"
)

// A restore from S3 under cmd/vmvault's soft memory limit (176 MiB)
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

	defer debug.SetMemoryLimit(debug.SetMemoryLimit(176 << 20))
	testio.RestoreFewGCs(t, size, want.Sum(nil), func(out io.Writer) error {
		_, err := r.Restore(ctx, m, "", out)
		return err
	})
}
