package repo

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
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

// BenchmarkBackupMappedFile compares backups of image files read in place
// under a read lease (repo/lease.go) with the private copies made without
// one: a full backup, and an incremental of a day of random block writes
// (runs of 1–64 4 KiB blocks of random data, 1.6 % of the blocks). Run:
// go test -run X -bench BackupMappedFile -count 5 ./repo
func BenchmarkBackupMappedFile(b *testing.B) {
	dir := b.TempDir()
	img := benchImage()
	next := bytes.Clone(img)
	rng := rand.New(rand.NewPCG(3, 3))
	blocks := len(img) / 4096
	for changed := 0; changed < blocks*16/1000; {
		start, run := rng.IntN(blocks), 1+rng.IntN(64)
		for k := start; k < min(blocks, start+run); k++ {
			for i := k * 4096; i < (k+1)*4096; i += 8 {
				binary.LittleEndian.PutUint64(next[i:], rng.Uint64())
			}
			changed++
		}
	}
	base, blk := filepath.Join(dir, "base.raw"), filepath.Join(dir, "blocks.raw")
	if err := os.WriteFile(base, img, 0o600); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(blk, next, 0o600); err != nil {
		b.Fatal(err)
	}
	backupFile := func(b *testing.B, r *Repository, path string) {
		f, err := os.Open(path)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		if _, err := r.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Source: path, Reader: f, Size: int64(len(img))}}}); err != nil {
			b.Fatal(err)
		}
	}
	for _, lease := range []bool{true, false} {
		for _, day := range []string{"full", "blocks"} {
			b.Run(fmt.Sprintf("%s/lease=%v", day, lease), func(b *testing.B) {
				noLeases = !lease
				defer func() { noLeases = false }()
				b.SetBytes(int64(len(img)))
				for b.Loop() {
					b.StopTimer()
					r := benchRepo(b, DefaultSegmentSize)
					path := base
					if day == "blocks" {
						backupFile(b, r, base)
						path = blk
					}
					b.StartTimer()
					backupFile(b, r, path)
				}
			})
		}
	}
}
