package main

import (
	"bytes"
	"math/rand/v2"
	"strings"
	"testing"
)

// testImages returns a base image of random data islands between zero
// runs and a next day with one 4 KiB block rewritten inside an island.
func testImages() (base, next []byte) {
	rng := rand.New(rand.NewPCG(1, 2))
	base = make([]byte, 24<<20)
	for _, island := range [][2]int{{0, 9 << 20}, {12 << 20, 20 << 20}} {
		for i := island[0]; i < island[1]; i += 8 {
			v := rng.Uint64()
			for k := range 8 {
				base[i+k] = byte(v >> (8 * k))
			}
		}
	}
	next = bytes.Clone(base)
	for i := 16 << 20; i < 16<<20+4096; i++ {
		next[i] ^= 0x5a
	}
	return base, next
}

func TestModelsCountTheChange(t *testing.T) {
	base, next := testImages()
	for _, m := range models {
		b, err := m.cut(base, 0x3DA3358B4DC173, 1)
		if err != nil {
			t.Fatal(m.name, err)
		}
		n, err := m.cut(next, 0x3DA3358B4DC173, 1)
		if err != nil {
			t.Fatal(m.name, err)
		}
		if got, _ := newBytes(b, b); got != 0 {
			t.Errorf("%s: an image against itself adds %d bytes", m.name, got)
		}
		// One changed block costs at least its own bytes and at most
		// the chunks around it (two of the largest).
		if got, _ := newBytes(b, n); got < 4096 || got > 16<<20 {
			t.Errorf("%s: one changed 4 KiB block adds %d bytes", m.name, got)
		}
		var total int
		for _, l := range b {
			total += l
		}
		// Every model stores the data once; restic's stream also cuts
		// the zero runs into chunks (one of them, deduplicated).
		if total < 17<<20 || total > 24<<20 {
			t.Errorf("%s: the base's distinct chunks hold %d bytes, want its 17 MiB of data", m.name, total)
		}
	}
}

func TestExtentsSkipZeroRuns(t *testing.T) {
	base, _ := testImages()
	ext := extents(base)
	if len(ext) != 2 || len(ext[0]) != 9<<20 || len(ext[1]) != 8<<20 {
		lens := []int{}
		for _, e := range ext {
			lens = append(lens, len(e))
		}
		t.Fatalf("extents of two islands: %v", lens)
	}
}

func TestRunPrintsEveryModel(t *testing.T) {
	base, next := testImages()
	var out strings.Builder
	if err := run(&out, base, next, 1); err != nil {
		t.Fatal(err)
	}
	for _, m := range models {
		if !strings.Contains(out.String(), m.name+" ") || strings.Count(out.String(), m.name) != 2 {
			t.Errorf("output lacks %q twice:\n%s", m.name, out.String())
		}
	}
}
