package repo

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"vmvault/backend/local"
	"vmvault/crypto"
)

// BenchmarkIndexScale measures loading a large index into a fresh local
// cache (a new host, or a lost cache): a synthetic repository whose
// index objects list n random data objects (no data objects behind them;
// only the index is read). docs/scale.md extrapolates from it. Reported
// per entry: load time, index bytes in the store, cache bytes on disk,
// and the peak RSS of the load.
//
//	go test -run XXX -bench IndexScale -benchtime 1x ./repo/
func BenchmarkIndexScale(b *testing.B) {
	for _, n := range scaleSizes() {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			ctx := context.Background()
			dir := filepath.Join(b.TempDir(), "repo")
			be, err := local.Create(dir)
			if err != nil {
				b.Fatal(err)
			}
			r, err := Init(ctx, be, []byte("scale"), Options{KDF: crypto.MinKDFParams, CacheDir: b.TempDir()})
			if err != nil {
				b.Fatal(err)
			}
			var stored int64
			entries := make([]IndexEntry, 0, indexObjectEntries)
			for i := 0; i < n; i += indexObjectEntries {
				entries = entries[:0]
				for range min(indexObjectEntries, n-i) {
					entries = append(entries, IndexEntry{ID: randomID(), Type: TypeChunk, Size: 1 << 20})
				}
				name := indexName(randomID())
				sealed := r.codec.seal(TypeIndex, name, encodeIndex(entries))
				if err := be.Put(ctx, name, sealed); err != nil {
					b.Fatal(err)
				}
				stored += int64(len(sealed))
			}
			r.Close()
			var load time.Duration
			for range b.N {
				cache := b.TempDir()
				r, err := Open(ctx, be, []byte("scale"), Options{CacheDir: cache})
				if err != nil {
					b.Fatal(err)
				}
				os.WriteFile("/proc/self/clear_refs", []byte("5"), 0)
				start := time.Now()
				if _, err := r.LoadIndex(ctx); err != nil {
					b.Fatal(err)
				}
				load += time.Since(start)
				b.ReportMetric(peakRSSMiB(), "peak-RSS-MiB")
				r.Close()
				var cacheBytes int64
				filepath.Walk(cache, func(_ string, fi os.FileInfo, err error) error {
					if err == nil && !fi.IsDir() {
						cacheBytes += fi.Size()
					}
					return nil
				})
				b.ReportMetric(float64(cacheBytes)/float64(n), "cache-B/entry")
			}
			b.ReportMetric(float64(load.Nanoseconds())/float64(b.N)/float64(n), "load-ns/entry")
			b.ReportMetric(float64(stored)/float64(n), "index-B/entry")
		})
	}
}

// peakRSSMiB is the process's VmHWM in MiB (Linux).
func peakRSSMiB() float64 {
	s, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(s), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

// scaleSizes are the index sizes BenchmarkIndexScale loads:
// VMVAULT_SCALE_ENTRIES (comma-separated) or 100,000 and 1,000,000.
func scaleSizes() []int {
	var out []int
	for _, f := range strings.Split(os.Getenv("VMVAULT_SCALE_ENTRIES"), ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(f)); err == nil && n > 0 {
			out = append(out, n)
		}
	}
	if len(out) == 0 {
		out = []int{100_000, 1_000_000}
	}
	return out
}

// BenchmarkMarkSet marks n random object IDs in prune's on-disk mark
// set, in batches as prune's mark phase does.
func BenchmarkMarkSet(b *testing.B) {
	const n = 200_000
	ids := make([]crypto.ID, n)
	for i := range ids {
		ids[i] = randomID()
	}
	for b.Loop() {
		m, err := newMarkSet(b.TempDir())
		if err != nil {
			b.Fatal(err)
		}
		for _, id := range ids {
			if err := m.add(id, TypeChunk); err != nil {
				b.Fatal(err)
			}
		}
		if err := m.flush(); err != nil {
			b.Fatal(err)
		}
		m.close()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/mark")
}
