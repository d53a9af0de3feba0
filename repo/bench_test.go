package repo

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"vmvault/backend/local"
)

// benchImage is 256 MiB shaped like a VM disk: ~45 % zeros (free space),
// compressible text, incompressible data.
func benchImage() []byte { return testImage(42, 256<<20) }

// nextDay changes ~1.6 % of 4 KiB blocks, clustered in runs as file
// system writes are (a few files and logs), not uniformly scattered.
func nextDay(img []byte) []byte {
	out := bytes.Clone(img)
	rng := rand.New(rand.NewPCG(7, 7))
	blocks := len(img) / 4096
	changed := 0
	for changed < blocks*16/1000 {
		start := rng.IntN(blocks)
		run := 1 + rng.IntN(64)
		for b := start; b < min(blocks, start+run); b++ {
			for i := b * 4096; i < (b+1)*4096; i += 64 {
				out[i] ^= 0x5a
			}
			changed++
		}
	}
	return out
}

func benchRepo(b *testing.B, segSize int64) *Repository {
	dir := filepath.Join(b.TempDir(), "repo")
	be, _ := local.Create(dir)
	r, err := Init(context.Background(), be, []byte("pw"), Options{KDF: fastKDF, CacheDir: b.TempDir(), SegmentSize: segSize})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { r.Close() })
	return r
}

func benchBackup(b *testing.B, r *Repository, img []byte) *Manifest {
	m, err := r.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Reader: bytes.NewReader(img), Size: int64(len(img))}}})
	if err != nil {
		b.Fatal(err)
	}
	return m
}

// BenchmarkBackup measures full and incremental backups per segment size,
// reporting MB/s of image, allocations, and the bytes each incremental
// stored. Run: go test -run X -bench Backup -benchtime 3x ./repo
func BenchmarkBackup(b *testing.B) {
	img := benchImage()
	img2 := nextDay(img)
	for _, seg := range []int64{4 << 20, 8 << 20, 16 << 20, 32 << 20, 64 << 20} {
		b.Run(fmt.Sprintf("full/seg=%dMiB", seg>>20), func(b *testing.B) {
			b.SetBytes(int64(len(img)))
			b.ReportAllocs()
			for b.Loop() {
				b.StopTimer()
				r := benchRepo(b, seg)
				b.StartTimer()
				benchBackup(b, r, img)
			}
		})
		b.Run(fmt.Sprintf("incremental/seg=%dMiB", seg>>20), func(b *testing.B) {
			b.SetBytes(int64(len(img2)))
			b.ReportAllocs()
			var stored, rechunked int64
			for b.Loop() {
				b.StopTimer()
				r := benchRepo(b, seg)
				benchBackup(b, r, img)
				b.StartTimer()
				m := benchBackup(b, r, img2)
				stored, rechunked = m.Stats.BytesStored, m.Stats.SegmentsNew*seg
			}
			b.ReportMetric(float64(stored)/(1<<20), "MiB-stored")
			b.ReportMetric(float64(rechunked)/(1<<20), "MiB-rechunked")
		})
	}
}

// BenchmarkRestore measures a verified restore to io.Discard.
func BenchmarkRestore(b *testing.B) {
	img := benchImage()
	r := benchRepo(b, DefaultSegmentSize)
	m := benchBackup(b, r, img)
	b.SetBytes(int64(len(img)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.Restore(context.Background(), m, "", io.Discard); err != nil {
			b.Fatal(err)
		}
	}
}
