package main

import (
	"path/filepath"
	"testing"
	"time"
)

// --limit-read paces reading the source (a lower bound on time, which
// load cannot break), bad limits are refused as usage errors, and a
// limited backup still restores byte-identical.
func TestLimitsCLI(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	img := writeImage(t, src, 5, 6<<20)
	e.fails(exitUsage, "unknown I/O priority", "backup", "vm01", "--source", src, "--io-priority", "bogus")
	e.fails(exitUsage, "positive number of MiB/s", "backup", "vm01", "--source", src, "--limit-upload", "-1")
	start := time.Now()
	e.ok("backup", "vm01", "--source", src, "--limit-read", "2", "--limit-upload", "64", "--io-priority", "idle")
	// 6 MiB at 2 MiB/s with one second's worth allowed at once: ≥ 2 s.
	if d := time.Since(start); d < 1500*time.Millisecond {
		t.Fatalf("6 MiB read at --limit-read 2 in %v", d)
	}
	r := e.ok("--limit-download", "64", "restore", "vm01", "latest")
	if sum([]byte(r.stdout)) != sum(img) {
		t.Fatal("restore after a limited backup differs")
	}
}
