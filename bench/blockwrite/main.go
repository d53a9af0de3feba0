// Command blockwrite overwrites random 4 KiB blocks of a disk image in place,
// the way a day of a database or a file system's own writes changes a disk
// below any file: the benchmark's "block writes" next day. Writes come in
// runs of 1 to 64 blocks at random block-aligned offsets, with random
// (incompressible) content, until the given share of the image's blocks has
// been written. The same seed gives the same writes.
//
// Usage:
//
//	blockwrite [-pct 1.6] [-seed 1] IMAGE
//
// It prints the number of blocks written.
package main

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
)

const block = 4096

func main() {
	pct := flag.Float64("pct", 1.6, "share of the image's 4 KiB blocks to overwrite, in percent")
	seed := flag.Uint64("seed", 1, "random seed")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: blockwrite [-pct P] [-seed N] IMAGE")
		os.Exit(2)
	}
	n, err := write(flag.Arg(0), *pct, *seed)
	if err != nil {
		fmt.Fprintf(os.Stderr, "blockwrite: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(n)
}

// write overwrites pct percent of path's blocks and returns how many
// distinct blocks it wrote.
func write(path string, pct float64, seed uint64) (int, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	blocks := int(st.Size() / block)
	if blocks == 0 {
		return 0, fmt.Errorf("%s: smaller than one block", path)
	}
	rng := rand.New(rand.NewPCG(seed, 0x626c6f636b))
	want := int(float64(blocks) * pct / 100)
	written := map[int]bool{}
	buf := make([]byte, 64*block)
	for len(written) < want {
		start := rng.IntN(blocks)
		run := min(1+rng.IntN(64), blocks-start, want-len(written))
		for i := range buf[:run*block] {
			buf[i] = byte(rng.Uint32())
		}
		if _, err := f.WriteAt(buf[:run*block], int64(start)*block); err != nil {
			return 0, err
		}
		for b := start; b < start+run; b++ {
			written[b] = true
		}
	}
	return len(written), f.Sync()
}
