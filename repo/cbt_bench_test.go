package repo

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"
)

// BenchmarkBackupChanges measures an incremental backup of a 1 GiB image
// file whose change tracker reports 1 % of it changed, against a full
// re-read of the same image, interleaved in one run, at the default
// segment size and at 2 MiB. Both run against a repository that already
// holds day 2, so both measure reading and hashing, not uploads. It
// reports the share of the image each read (read-fraction,
// full-read-fraction: holes are never read) and the time of the tracked
// backup over the full read's (time-ratio, from the medians). Run:
// go test -run X -bench BackupChanges -benchtime 3x ./repo
func BenchmarkBackupChanges(b *testing.B) {
	const size = 1 << 30
	img := testImage(42, size)
	patterns := []struct {
		name   string
		ranges func(rng *rand.Rand) []Range
	}{
		// A few files rewritten: 1 % in runs of 1 MiB.
		{"runs-1MiB", func(rng *rand.Rand) []Range { return changeRanges(rng, size, 1<<20) }},
		// Scattered writes as a thin pool reports them: 1 % in 64 KiB
		// blocks at random.
		{"blocks-64KiB", func(rng *rand.Rand) []Range { return changeRanges(rng, size, 64<<10) }},
	}
	for _, seg := range []int64{DefaultSegmentSize, 2 << 20} {
		for _, p := range patterns {
			b.Run(fmt.Sprintf("%s/seg=%dMiB", p.name, seg>>20), func(b *testing.B) {
				benchChanges(b, img, seg, p.ranges, false)
			})
		}
	}
	// A source without hole information, as a thin LV is: the full read
	// reads every byte.
	for _, p := range patterns {
		b.Run(fmt.Sprintf("%s/seg=%dMiB/device", p.name, DefaultSegmentSize>>20), func(b *testing.B) {
			benchChanges(b, img, DefaultSegmentSize, p.ranges, true)
		})
	}
}

// benchChanges is one case of BenchmarkBackupChanges: a repository of
// segment size seg, day 1 img, day 2 changed at the ranges chosen, read
// from a sparse file or (device) as from a block device.
func benchChanges(b *testing.B, img []byte, seg int64, choose func(*rand.Rand) []Range, device bool) {
	size := int64(len(img))
	dir := b.TempDir()
	r := benchRepo(b, seg)
	day1 := writeSparse(b, filepath.Join(dir, "day1"), img)
	m1, err := r.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Reader: day1, Size: size}}})
	if err != nil {
		b.Fatal(err)
	}
	img2 := bytes.Clone(img)
	rng := rand.New(rand.NewPCG(1, 2))
	ranges := choose(rng)
	for _, rg := range ranges {
		randomWrite(rng, img2, int(rg.Off), int(rg.Len))
	}
	var day2 io.Reader = writeSparse(b, filepath.Join(dir, "day2"), img2)
	if device {
		day2 = readerAtOnly{bytes.NewReader(img2)}
	}
	// backup returns the wall and the CPU time (user + system, of the
	// whole process: the machine may be shared) it took.
	backup := func(ch *Changes) (m *Manifest, wall, cpu time.Duration) {
		start, cpu0 := time.Now(), cpuTime(b)
		m, err := r.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Reader: day2, Size: size, Changes: ch}}})
		if err != nil {
			b.Fatal(err)
		}
		return m, time.Since(start), cpuTime(b) - cpu0
	}
	backup(nil) // store day 2's new data once
	var full, tracked, fullCPU, trackedCPU []time.Duration
	var mFull, mTracked *Manifest
	for b.Loop() {
		var d, c time.Duration
		mFull, d, c = backup(nil)
		full, fullCPU = append(full, d), append(fullCPU, c)
		mTracked, d, c = backup(&Changes{Base: m1.ID, Ranges: ranges, Kind: "bench"})
		tracked, trackedCPU = append(tracked, d), append(trackedCPU, c)
	}
	if mFull.Disks[0].Digest != mTracked.Disks[0].Digest {
		b.Fatal("the tracked backup differs from the full read")
	}
	b.ReportMetric(float64(mTracked.Disks[0].BytesRead)/float64(size), "read-fraction")
	b.ReportMetric(float64(mFull.Disks[0].BytesRead)/float64(size), "full-read-fraction")
	b.ReportMetric(median(tracked).Seconds(), "tracked-s")
	b.ReportMetric(median(full).Seconds(), "full-s")
	b.ReportMetric(median(tracked).Seconds()/median(full).Seconds(), "time-ratio")
	b.ReportMetric(median(trackedCPU).Seconds()/median(fullCPU).Seconds(), "cpu-ratio")
}

// cpuTime is the process's user and system time so far.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// changeRanges returns ranges of n bytes each (n-aligned, distinct, in
// order) covering 1 % of size.
func changeRanges(rng *rand.Rand, size int64, n int64) []Range {
	picked := map[int64]bool{}
	for int64(len(picked))*n < size/100 {
		picked[rng.Int64N(size/n)*n] = true
	}
	var rs []Range
	for off := range picked {
		rs = append(rs, Range{off, n})
	}
	slices.SortFunc(rs, func(a, b Range) int { return int(a.Off - b.Off) })
	return rs
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}
