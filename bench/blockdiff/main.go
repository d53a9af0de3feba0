// Command blockdiff describes how two disk images of the same size differ, in
// 4 KiB blocks: how many blocks are non-zero in each and how many differ. The
// benchmark script uses it to state how large its "next day" change really is.
//
// Usage:
//
//	blockdiff [-block 4096] OLD NEW
//
// It prints one line of key=value pairs, for example
//
//	block=4096 blocks=1048576 nonzero_old=436000 nonzero_new=437100 changed=16800 changed_pct=1.60
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
)

// Counts is what Compare found, in blocks.
type Counts struct {
	Blocks     int64 // blocks in each image (a short last block counts as one)
	NonZeroOld int64 // blocks of OLD that contain a non-zero byte
	NonZeroNew int64 // blocks of NEW that contain a non-zero byte
	Changed    int64 // blocks whose content differs
}

// Compare reads oldImg and newImg in step, blockSize bytes at a time. They must
// have the same length.
func Compare(oldImg, newImg io.Reader, blockSize int) (Counts, error) {
	var c Counts
	// Read many blocks per call: per-block reads would dominate the run time.
	const perRead = 256
	bufOld := make([]byte, blockSize*perRead)
	bufNew := make([]byte, blockSize*perRead)
	zero := make([]byte, blockSize)
	for {
		nOld, errOld := io.ReadFull(oldImg, bufOld)
		nNew, errNew := io.ReadFull(newImg, bufNew)
		if nOld != nNew {
			return c, errors.New("images differ in length")
		}
		for off := 0; off < nOld; off += blockSize {
			end := min(off+blockSize, nOld)
			o, n := bufOld[off:end], bufNew[off:end]
			c.Blocks++
			if !bytes.Equal(o, zero[:end-off]) {
				c.NonZeroOld++
			}
			if !bytes.Equal(n, zero[:end-off]) {
				c.NonZeroNew++
			}
			if !bytes.Equal(o, n) {
				c.Changed++
			}
		}
		if errOld != nil || errNew != nil {
			return c, firstErr(errOld, errNew)
		}
	}
}

// firstErr returns the first error that is not a normal end of input.
func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
			return err
		}
	}
	return nil
}

func main() {
	blockSize := flag.Int("block", 4096, "block size in bytes")
	flag.Parse()
	if flag.NArg() != 2 || *blockSize <= 0 {
		fmt.Fprintln(os.Stderr, "usage: blockdiff [-block 4096] OLD NEW")
		os.Exit(2)
	}
	if err := run(flag.Arg(0), flag.Arg(1), *blockSize); err != nil {
		fmt.Fprintln(os.Stderr, "blockdiff:", err)
		os.Exit(1)
	}
}

func run(oldPath, newPath string, blockSize int) error {
	old, err := os.Open(oldPath)
	if err != nil {
		return err
	}
	defer old.Close()
	cur, err := os.Open(newPath)
	if err != nil {
		return err
	}
	defer cur.Close()
	c, err := Compare(old, cur, blockSize)
	if err != nil {
		return fmt.Errorf("compare %s and %s: %w", oldPath, newPath, err)
	}
	pct := 0.0
	if c.Blocks > 0 {
		pct = 100 * float64(c.Changed) / float64(c.Blocks)
	}
	fmt.Printf("block=%d blocks=%d nonzero_old=%d nonzero_new=%d changed=%d changed_pct=%.2f\n",
		blockSize, c.Blocks, c.NonZeroOld, c.NonZeroNew, c.Changed, pct)
	return nil
}
