package fusefs

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"vmvault/repo"
)

// The targets of issue 11, as benchmarks (go test -bench . ./fusefs/):
// sequential read through the mount against restore to stdout, chunk
// bytes fetched to copy one 100 MiB file out of a loop mount, and time to
// the first byte after mounting a repository of 100 generations.

// benchImage is an ext4 image holding a 100 MiB random file among other
// data (random, text, free space).
func benchImage(b *testing.B, dir string) string {
	b.Helper()
	tree := filepath.Join(dir, "tree")
	rng := rand.New(rand.NewPCG(9, 9))
	write := func(name string, n int, text bool) {
		p := make([]byte, n)
		for i := range p {
			if text {
				p[i] = "abcdefgh \n"[rng.IntN(10)]
			} else {
				p[i] = byte(rng.Uint32())
			}
		}
		os.MkdirAll(filepath.Dir(filepath.Join(tree, name)), 0o755)
		if err := os.WriteFile(filepath.Join(tree, name), p, 0o644); err != nil {
			b.Fatal(err)
		}
	}
	write("var/lib/big.bin", 100<<20, false)
	write("var/log/syslog", 60<<20, true)
	for i := range 8 {
		write(fmt.Sprintf("usr/share/f%d.bin", i), 16<<20, false)
	}
	img := filepath.Join(dir, "disk.raw")
	os.WriteFile(img, nil, 0o600)
	os.Truncate(img, 512<<20)
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", tree, img).CombinedOutput(); err != nil {
		b.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	return img
}

func benchMount(b *testing.B, src Source) (string, *Mounted, func()) {
	b.Helper()
	dir := b.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	m, err := Mount(ctx, dir, src, Options{})
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- m.Serve(ctx) }()
	return dir, m, func() { cancel(); <-done }
}

// BenchmarkSequentialRead reads the whole disk through the mount and, for
// comparison, restores it to io.Discard; reports both rates and their
// ratio (target ≥ 0.8).
func BenchmarkSequentialRead(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	r, _ := newRepo(b)
	img := benchImage(b, b.TempDir())
	m := backupFile(b, r, "vm01", img, time.Time{})
	size := m.Disks[0].Size
	var fuseDur, restoreDur time.Duration
	for b.Loop() {
		t0 := time.Now()
		if _, err := r.Restore(context.Background(), m, "", io.Discard); err != nil {
			b.Fatal(err)
		}
		restoreDur += time.Since(t0)
		dir, _, stop := benchMount(b, r)
		t0 = time.Now()
		f, err := os.Open(filepath.Join(dir, "vm01/latest/hda"))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := io.CopyBuffer(io.Discard, f, make([]byte, 1<<20)); err != nil {
			b.Fatal(err)
		}
		f.Close()
		fuseDur += time.Since(t0)
		stop()
	}
	fuse := float64(size*int64(b.N)) / fuseDur.Seconds() / 1e6
	rest := float64(size*int64(b.N)) / restoreDur.Seconds() / 1e6
	b.ReportMetric(fuse, "fuse-MB/s")
	b.ReportMetric(rest, "restore-MB/s")
	b.ReportMetric(fuse/rest, "fuse/restore")
}

// BenchmarkCopyOneFile loop-mounts the disk from the mount and copies the
// 100 MiB file out; reports the chunk bytes fetched per byte copied
// (target ≤ 2).
func BenchmarkCopyOneFile(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	r, _ := newRepo(b)
	img := benchImage(b, b.TempDir())
	backupFile(b, r, "vm01", img, time.Time{})
	var ratio float64
	for b.Loop() {
		dir, mnt, stop := benchMount(b, r)
		loop := b.TempDir()
		if out, err := exec.Command("mount", "-o", "ro,loop,noload", filepath.Join(dir, "vm01/latest/hda"), loop).CombinedOutput(); err != nil {
			b.Fatalf("loop mount: %v: %s", err, out)
		}
		before := mnt.Stats().FetchedBytes
		out := filepath.Join(b.TempDir(), "big.bin")
		if o, err := exec.Command("cp", filepath.Join(loop, "var/lib/big.bin"), out).CombinedOutput(); err != nil {
			b.Fatalf("cp: %v: %s", err, o)
		}
		fetched := mnt.Stats().FetchedBytes
		exec.Command("umount", loop).Run()
		stop()
		ratio = float64(fetched) / float64(100<<20)
		b.ReportMetric(float64(fetched-before)/float64(100<<20), "fetched/copied-after-mount")
		os.Remove(out)
	}
	b.ReportMetric(ratio, "fetched/copied")
}

// BenchmarkFirstByte100Generations: a repository of 100 generations;
// time from Mount to the first byte of vm/latest/disk (target ≤ 1 s).
func BenchmarkFirstByte100Generations(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	r, _ := newRepo(b)
	base := make([]byte, 16<<20)
	rng := rand.New(rand.NewPCG(1, 1))
	for i := range base {
		base[i] = byte(rng.Uint32())
	}
	at := time.Date(2026, 1, 1, 2, 0, 0, 0, time.UTC)
	for g := range 100 {
		copy(base[g*4096:], bytes.Repeat([]byte{byte(g)}, 4096))
		_, err := r.Backup(context.Background(), repo.BackupRequest{VM: fmt.Sprintf("vm%02d", g%10), Time: at.Add(time.Duration(g) * time.Hour),
			Disks: []repo.DiskSource{{Name: "hda", Reader: bytes.NewReader(base), Size: int64(len(base))}}})
		if err != nil {
			b.Fatal(err)
		}
	}
	var total time.Duration
	for b.Loop() {
		dir := b.TempDir()
		ctx, cancel := context.WithCancel(context.Background())
		t0 := time.Now()
		m, err := Mount(ctx, dir, r, Options{})
		if err != nil {
			b.Fatal(err)
		}
		f, err := os.Open(filepath.Join(dir, "vm09/latest/hda"))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := f.ReadAt(make([]byte, 1), 0); err != nil {
			b.Fatal(err)
		}
		total += time.Since(t0)
		f.Close()
		done := make(chan error, 1)
		go func() { done <- m.Serve(ctx) }()
		cancel()
		<-done
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "s-to-first-byte")
}
