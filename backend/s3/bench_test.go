package s3

import (
	"path/filepath"
	"testing"

	"vmvault/backend"
	"vmvault/backend/backendtest"
	"vmvault/backend/local"
	"vmvault/internal/testminio"
)

// BenchmarkPut and BenchmarkGet move 256 objects of 1 MiB with 8
// goroutines to and from a local path and a local MinIO (plain HTTP), so
// the MB/s figures can be compared. On a 2-core machine MinIO competes
// with the benchmark for the CPU.
func BenchmarkPut(b *testing.B) { benchBoth(b, backendtest.BenchPut) }

// BenchmarkGet: see BenchmarkPut.
func BenchmarkGet(b *testing.B) { benchBoth(b, backendtest.BenchGet) }

func benchBoth(b *testing.B, run func(*testing.B, backend.Backend)) {
	b.Run("local", func(b *testing.B) {
		be, err := local.Create(filepath.Join(b.TempDir(), "repo"))
		if err != nil {
			b.Fatal(err)
		}
		run(b, be)
	})
	b.Run("s3", func(b *testing.B) {
		s := testminio.Start(b, testminio.Options{})
		be := open(b, rootConfig(b, s, ""))
		run(b, be)
	})
}
