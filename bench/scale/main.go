// Command scale builds a synthetic repository with the real repo code and
// measures what docs/scale.md extrapolates to a fleet: objects per GiB,
// index bytes per entry and the time to load the index into a fresh cache,
// manifests per generation and the time to read them all, peak RSS of
// backup and prune, and the store requests of a night's incremental backup
// (counted by a wrapper around the backend, with S3's LIST pages of 1000).
//
// It writes only under -dir (removed at the end unless -keep) and measures
// on a local-path repository, so the figures are the repository's own,
// not a network's.
//
//	go run ./bench/scale -vms 4 -image-mib 512 -nights 10 -gens 1000
//
// Phases: full backups of -vms images of -image-mib random MiB each; then
// -nights nights in which each image changes by -change-pct percent (in
// runs of -change-run KiB at random places) and is backed up again; the
// index and manifests are then loaded with a fresh cache and a prune is
// planned and executed; finally -gens small generations of one extra VM
// (8 MiB, 2 % change each) give the cost per generation.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"vmvault/backend"
	"vmvault/backend/local"
	"vmvault/crypto"
	"vmvault/repo"
)

// counting counts the requests a repository makes of its store.
type counting struct {
	backend.Backend
	puts, gets, stats, deletes, lists, listPages atomic.Int64
	putBytes                                     atomic.Int64
}

func (c *counting) Put(ctx context.Context, name string, data []byte) error {
	c.puts.Add(1)
	c.putBytes.Add(int64(len(data)))
	return c.Backend.Put(ctx, name, data)
}

func (c *counting) Get(ctx context.Context, name string, off, length int64) ([]byte, error) {
	c.gets.Add(1)
	return c.Backend.Get(ctx, name, off, length)
}

func (c *counting) GetAll(ctx context.Context, name string, limit int64) ([]byte, error) {
	c.gets.Add(1)
	return c.Backend.GetAll(ctx, name, limit)
}

func (c *counting) Stat(ctx context.Context, name string) (backend.ObjectInfo, error) {
	c.stats.Add(1)
	return c.Backend.Stat(ctx, name)
}

func (c *counting) Delete(ctx context.Context, name string) error {
	c.deletes.Add(1)
	return c.Backend.Delete(ctx, name)
}

// List counts one call and the pages an S3 store would answer it with.
func (c *counting) List(ctx context.Context, prefix string, fn func(backend.ObjectInfo) error) error {
	c.lists.Add(1)
	n := int64(0)
	err := c.Backend.List(ctx, prefix, func(oi backend.ObjectInfo) error { n++; return fn(oi) })
	c.listPages.Add(max(1, (n+999)/1000))
	return err
}

// requests is a snapshot of the counters.
type requests struct{ put, get, stat, del, list, pages, putBytes int64 }

func (c *counting) snap() requests {
	return requests{c.puts.Load(), c.gets.Load(), c.stats.Load(), c.deletes.Load(), c.lists.Load(), c.listPages.Load(), c.putBytes.Load()}
}

func (a requests) minus(b requests) requests {
	return requests{a.put - b.put, a.get - b.get, a.stat - b.stat, a.del - b.del, a.list - b.list, a.pages - b.pages, a.putBytes - b.putBytes}
}

// resetPeakRSS starts a new peak-RSS measurement (Linux: clear_refs 5).
func resetPeakRSS() { os.WriteFile("/proc/self/clear_refs", []byte("5"), 0) }

// peakRSS is VmHWM in MiB.
func peakRSS() float64 {
	b, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

// fill writes n random bytes from rng to f at off.
func fill(f *os.File, rng *rand.Rand, off, n int64) error {
	buf := make([]byte, 1<<20)
	for n > 0 {
		m := min(n, int64(len(buf)))
		for i := int64(0); i+8 <= m; i += 8 {
			v := rng.Uint64()
			for j := range int64(8) {
				buf[i+j] = byte(v >> (8 * j))
			}
		}
		if _, err := f.WriteAt(buf[:m], off); err != nil {
			return err
		}
		off += m
		n -= m
	}
	return nil
}

// change overwrites pct percent of the image in runs of run bytes.
func change(f *os.File, rng *rand.Rand, size int64, pct float64, run int64) error {
	for left := int64(float64(size) * pct / 100); left > 0; left -= run {
		off := rng.Int64N(size/run) * run
		if err := fill(f, rng, off, min(run, left)); err != nil {
			return err
		}
	}
	return nil
}

type bench struct {
	ctx   context.Context
	dir   string
	pw    []byte
	opts  repo.Options
	count *counting
	r     *repo.Repository
}

func (b *bench) backup(vm, path string, size int64) (*repo.Manifest, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	l, err := b.r.Lock(b.ctx, repo.SharedLock, "backup", 0)
	if err != nil {
		return nil, err
	}
	defer l.Unlock()
	return b.r.Backup(b.ctx, repo.BackupRequest{VM: vm, Host: "scale", Disks: []repo.DiskSource{{Name: "disk", Source: path, Reader: io.Reader(f), Size: size}}})
}

// reopen opens the repository again with a fresh, empty cache.
func (b *bench) reopen(cache string) (*repo.Repository, error) {
	o := b.opts
	o.CacheDir = filepath.Join(b.dir, cache)
	return repo.Open(b.ctx, b.count, b.pw, o)
}

func main() {
	dir := flag.String("dir", "", "work directory (default: a new one under $TMPDIR)")
	keep := flag.Bool("keep", false, "keep the work directory")
	vms := flag.Int("vms", 4, "VMs with a full image each")
	imageMiB := flag.Int64("image-mib", 512, "image size of each VM, MiB")
	nights := flag.Int("nights", 10, "incremental nights per VM")
	changePct := flag.Float64("change-pct", 2, "share of each image changed per night, percent")
	changeRun := flag.Int64("change-run", 256, "size of one changed run, KiB")
	gens := flag.Int("gens", 1000, "small generations for the per-generation costs")
	flag.Parse()
	if err := run(*dir, *keep, *vms, *imageMiB<<20, *nights, *changePct, *changeRun<<10, *gens); err != nil {
		fmt.Fprintln(os.Stderr, "scale:", err)
		os.Exit(1)
	}
}

func run(dir string, keep bool, vms int, size int64, nights int, pct float64, run int64, gens int) error {
	if dir == "" {
		d, err := os.MkdirTemp("", "vmvault-scale-")
		if err != nil {
			return err
		}
		dir = d
	}
	if !keep {
		defer os.RemoveAll(dir)
	}
	ctx := context.Background()
	be, err := local.Create(filepath.Join(dir, "repo"))
	if err != nil {
		return err
	}
	b := &bench{ctx: ctx, dir: dir, pw: []byte("scale"), count: &counting{Backend: be},
		opts: repo.Options{CacheDir: filepath.Join(dir, "cache"), Logger: slog.New(slog.DiscardHandler),
			KDF: crypto.KDFParams{Time: 1, Memory: 8192, Threads: 1}}}
	if b.r, err = repo.Init(ctx, b.count, b.pw, b.opts); err != nil {
		return err
	}
	fmt.Printf("machine: %d CPUs, %s\n", runtime.NumCPU(), runtime.Version())
	fmt.Printf("params: vms=%d image=%d MiB nights=%d change=%.1f%% runs of %d KiB gens=%d\n", vms, size>>20, nights, pct, run>>10, gens)

	// Full backups.
	rng := rand.New(rand.NewChaCha8([32]byte{1}))
	images := make([]string, vms)
	for i := range images {
		images[i] = filepath.Join(dir, fmt.Sprintf("vm%02d.raw", i))
		f, err := os.Create(images[i])
		if err != nil {
			return err
		}
		err = fill(f, rng, 0, size)
		f.Close()
		if err != nil {
			return err
		}
	}
	resetPeakRSS()
	before := b.count.snap()
	start := time.Now()
	for i, img := range images {
		if _, err := b.backup(fmt.Sprintf("vm%02d", i), img, size); err != nil {
			return err
		}
	}
	full := b.count.snap().minus(before)
	fmt.Printf("full: %d backups of %d MiB in %.1f s, peak RSS %.0f MiB; requests per backup: %s\n",
		vms, size>>20, time.Since(start).Seconds(), peakRSS(), perBackup(full, vms))

	// Nights.
	var nightly requests
	var nightTime time.Duration
	resetPeakRSS()
	for n := range nights {
		for i, img := range images {
			f, err := os.OpenFile(img, os.O_RDWR, 0)
			if err != nil {
				return err
			}
			err = change(f, rng, size, pct, run)
			f.Close()
			if err != nil {
				return err
			}
			before := b.count.snap()
			start := time.Now()
			if _, err := b.backup(fmt.Sprintf("vm%02d", i), img, size); err != nil {
				return fmt.Errorf("night %d: %w", n, err)
			}
			nightTime += time.Since(start)
			d := b.count.snap().minus(before)
			nightly = requests{nightly.put + d.put, nightly.get + d.get, nightly.stat + d.stat, nightly.del + d.del,
				nightly.list + d.list, nightly.pages + d.pages, nightly.putBytes + d.putBytes}
		}
	}
	incs := vms * nights
	fmt.Printf("incremental: %d backups, %.2f s each, peak RSS %.0f MiB; per backup: %s; stored %.2f MiB = %.2f × the %.2f MiB changed\n",
		incs, nightTime.Seconds()/float64(incs), peakRSS(), perBackup(nightly, incs),
		float64(nightly.putBytes)/float64(incs)/(1<<20), float64(nightly.putBytes)/float64(incs)/(float64(size)*pct/100),
		float64(size)*pct/100/(1<<20))

	// What the store holds.
	counts := map[string]int64{}
	bytes := map[string]int64{}
	err = be.List(ctx, "", func(oi backend.ObjectInfo) error {
		kind, _, _ := strings.Cut(oi.Name, "/")
		counts[kind]++
		bytes[kind] += oi.Size
		return nil
	})
	if err != nil {
		return err
	}
	for _, k := range []string{"data", "index", "manifests", "locks", "keys", "config"} {
		fmt.Printf("store: %-9s %8d objects %10.2f MiB\n", k, counts[k], float64(bytes[k])/(1<<20))
	}
	logical := float64(size) * float64(vms*(1+nights)) / (1 << 30)
	fmt.Printf("store: %.3f data objects per stored MiB; index %.1f bytes per data object\n",
		float64(counts["data"])/(float64(bytes["data"])/(1<<20)), float64(bytes["index"])/float64(counts["data"]))
	_ = logical

	// Index and manifests with a fresh cache (a new host, or a lost cache).
	if err := b.loadFresh("cache-fresh-1", counts["data"]); err != nil {
		return err
	}

	// Prune (nothing to forget: the plan walks everything all the same).
	resetPeakRSS()
	start = time.Now()
	l, err := b.r.Lock(ctx, repo.ExclusiveLock, "prune", 0)
	if err != nil {
		return err
	}
	plan, err := b.r.PlanPrune(ctx, repo.PruneOptions{Margin: 0})
	if err != nil {
		l.Unlock()
		return err
	}
	planTime := time.Since(start)
	st, err := plan.Execute(ctx)
	plan.Close()
	l.Unlock()
	if err != nil {
		return err
	}
	fmt.Printf("prune: plan %.2f s, plan+execute %.2f s, peak RSS %.0f MiB, %d generations, %d objects kept, %d index objects written\n",
		planTime.Seconds(), time.Since(start).Seconds(), peakRSS(), st.Generations, st.ObjectsKept, st.IndexWritten)

	// Many small generations.
	if gens > 0 {
		small := filepath.Join(dir, "small.raw")
		f, err := os.Create(small)
		if err != nil {
			return err
		}
		const smallSize = 8 << 20
		fill(f, rng, 0, smallSize)
		f.Close()
		start := time.Now()
		for g := range gens {
			f, _ := os.OpenFile(small, os.O_RDWR, 0)
			change(f, rng, smallSize, 2, 64<<10)
			f.Close()
			if _, err := b.backup("small", small, smallSize); err != nil {
				return fmt.Errorf("generation %d: %w", g, err)
			}
		}
		fmt.Printf("generations: %d small backups in %.1f s\n", gens, time.Since(start).Seconds())
		r2, err := b.reopen("cache-fresh-2")
		if err != nil {
			return err
		}
		resetPeakRSS()
		start = time.Now()
		ms, err := r2.Manifests(ctx, "")
		if err != nil {
			return err
		}
		var mbytes int64
		be.List(ctx, "manifests/", func(oi backend.ObjectInfo) error { mbytes += oi.Size; return nil })
		fmt.Printf("manifests: %d read in %.2f s (%.0f µs each), %.0f bytes each on average, peak RSS %.0f MiB\n",
			len(ms), time.Since(start).Seconds(), time.Since(start).Seconds()*1e6/float64(len(ms)), float64(mbytes)/float64(len(ms)), peakRSS())
		r2.Close()
		resetPeakRSS()
		start = time.Now()
		l, err := b.r.Lock(ctx, repo.ExclusiveLock, "prune", 0)
		if err != nil {
			return err
		}
		plan, err := b.r.PlanPrune(ctx, repo.PruneOptions{Margin: 0})
		if err == nil {
			fmt.Printf("prune plan with %d generations: %.2f s, peak RSS %.0f MiB\n", plan.Stats.Generations, time.Since(start).Seconds(), peakRSS())
			plan.Close()
		}
		l.Unlock()
		if err != nil {
			return err
		}
	}
	return b.r.Close()
}

// loadFresh times LoadIndex into an empty cache.
func (b *bench) loadFresh(cache string, entries int64) error {
	r2, err := b.reopen(cache)
	if err != nil {
		return err
	}
	defer r2.Close()
	resetPeakRSS()
	before := b.count.snap()
	start := time.Now()
	if _, err := r2.LoadIndex(b.ctx); err != nil {
		return err
	}
	d := time.Since(start)
	req := b.count.snap().minus(before)
	var cacheBytes int64
	filepath.Walk(filepath.Join(b.dir, cache), func(_ string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			cacheBytes += fi.Size()
		}
		return nil
	})
	fmt.Printf("index: %d entries loaded into a fresh cache in %.2f s (%.1f µs per entry), %d GETs, peak RSS %.0f MiB, cache %.1f MiB (%.0f bytes per entry)\n",
		entries, d.Seconds(), d.Seconds()*1e6/float64(entries), req.get, peakRSS(), float64(cacheBytes)/(1<<20), float64(cacheBytes)/float64(entries))
	return nil
}

func perBackup(r requests, n int) string {
	f := func(v int64) float64 { return float64(v) / float64(n) }
	return fmt.Sprintf("PUT %.1f (%.2f MiB), GET %.1f, HEAD %.1f, DELETE %.1f, LIST calls %.1f (pages %.1f)",
		f(r.put), f(r.putBytes)/(1<<20), f(r.get), f(r.stat), f(r.del), f(r.list), f(r.pages))
}
