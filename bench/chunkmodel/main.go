// Command chunkmodel estimates, without a repository, how much a day's
// change adds to a repository under different chunk sizes: it cuts two
// images (a day and the next) into chunks and sums the lengths of the
// next day's chunks the first day does not have (before compression).
// docs/performance.md ("Session 15") used it to weigh smaller chunks.
//
// Usage:
//
//	chunkmodel [-seeds 3] BASE NEXT
//
// Each model runs with -seeds random polynomials (and segment keys), as
// each repository has its own; it prints one line per seed and the mean.
// Models: restic 0.14's chunker over the whole image as one stream
// (`restic backup --stdin`); vmvault's own cutting (chunk.Splitter and
// chunk.Segmenter: 8 MiB segments, zero runs, 256 KiB + 512 KiB chunks),
// also without segments; and restic's chunker over the image's data
// extents (vmvault's zero-run rule) with smaller minimum and average
// sizes. Both images are read into memory whole.
package main

import (
	"bytes"
	"crypto/sha256"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/restic/chunker"

	"vmvault/chunk"
)

// chunkSet maps a chunk's SHA-256 to its length.
type chunkSet map[[32]byte]int

// model cuts an image into its chunks with polynomial pol and segment key
// seed.
type model struct {
	name string
	cut  func(img []byte, pol uint64, seed byte) (chunkSet, error)
}

// resticStream cuts img as one stream with restic's chunker and sizes.
func resticStream(img []byte, pol uint64, _ byte) (chunkSet, error) {
	return resticCut(chunkSet{}, img, pol, chunker.MinSize, 20)
}

// resticCut adds the chunks of data cut by restic's chunker, minimum min
// bytes, a cut past it with probability 2^-bits per byte, into set.
func resticCut(set chunkSet, data []byte, pol uint64, min uint, bits int) (chunkSet, error) {
	c := chunker.NewWithBoundaries(bytes.NewReader(data), chunker.Pol(pol), min, chunk.MaxSize)
	c.SetAverageBits(bits)
	buf := make([]byte, chunk.MaxSize)
	for {
		ch, err := c.Next(buf)
		if err == io.EOF {
			return set, nil
		}
		if err != nil {
			return nil, err
		}
		set[sha256.Sum256(ch.Data)] = int(ch.Length)
	}
}

// extents returns img's data extents: the runs between aligned all-zero
// blocks of chunk.ZeroBlock bytes.
func extents(img []byte) [][]byte {
	var out [][]byte
	start := -1
	zero := make([]byte, chunk.ZeroBlock)
	for off := 0; off < len(img); off += chunk.ZeroBlock {
		end := min(off+chunk.ZeroBlock, len(img))
		switch z := bytes.Equal(img[off:end], zero[:end-off]); {
		case z && start >= 0:
			out = append(out, img[start:off])
			start = -1
		case !z && start < 0:
			start = off
		}
	}
	if start >= 0 {
		out = append(out, img[start:])
	}
	return out
}

// resticExtents returns a model cutting each data extent with restic's
// chunker at the given sizes.
func resticExtents(min uint, bits int) func([]byte, uint64, byte) (chunkSet, error) {
	return func(img []byte, pol uint64, _ byte) (chunkSet, error) {
		set := chunkSet{}
		for _, e := range extents(img) {
			if _, err := resticCut(set, e, pol, min, bits); err != nil {
				return nil, err
			}
		}
		return set, nil
	}
}

// vmvaultCut cuts img as a backup does: segments of segAvg bytes on
// average (0: the whole image as one segment), each split into zero runs
// and chunks.
func vmvaultCut(segAvg int) func([]byte, uint64, byte) (chunkSet, error) {
	return func(img []byte, pol uint64, seed byte) (chunkSet, error) {
		sp, err := chunk.NewSplitter(pol)
		if err != nil {
			return nil, err
		}
		set := chunkSet{}
		add := func(p chunk.Piece) error {
			if !p.Zero {
				set[sha256.Sum256(p.Data)] = p.Length
			}
			return nil
		}
		if segAvg == 0 {
			return set, sp.Split(img, add)
		}
		sg := chunk.NewSegmenter(segAvg, func(b byte) [32]byte { return sha256.Sum256([]byte{seed, b}) })
		for pos := 0; pos < len(img); {
			end := min(pos+sg.Max(), len(img))
			n := sg.Cut(img[pos:end], end == len(img))
			if err := sp.Split(img[pos:pos+n], add); err != nil {
				return nil, err
			}
			pos += n
		}
		return set, nil
	}
}

// newBytes sums the lengths of next's chunks that base does not have,
// and counts them.
func newBytes(base, next chunkSet) (n int64, chunks int) {
	for id, l := range next {
		if _, ok := base[id]; !ok {
			n += int64(l)
			chunks++
		}
	}
	return n, chunks
}

var models = []model{
	{"restic 0.14 (512K+1M, stream)", resticStream},
	{"vmvault (256K+512K, segments)", vmvaultCut(8 << 20)},
	{"vmvault without segments", vmvaultCut(0)},
	{"extents 128K+512K", resticExtents(128<<10, 19)},
	{"extents 128K+256K", resticExtents(128<<10, 18)},
}

func run(w io.Writer, base, next []byte, seeds int) error {
	for _, m := range models {
		var sum int64
		for s := range seeds {
			pol, err := chunk.NewPolynomial()
			if err != nil {
				return err
			}
			b, err := m.cut(base, pol, byte(s))
			if err != nil {
				return err
			}
			n, err := m.cut(next, pol, byte(s))
			if err != nil {
				return err
			}
			nb, nc := newBytes(b, n)
			sum += nb
			fmt.Fprintf(w, "%-32s seed %d  new %8.1f MiB in %d of %d chunks\n", m.name, s, float64(nb)/(1<<20), nc, len(n))
		}
		fmt.Fprintf(w, "%-32s mean    new %8.1f MiB\n", m.name, float64(sum)/float64(seeds)/(1<<20))
	}
	return nil
}

func main() {
	seeds := flag.Int("seeds", 3, "random polynomials (repositories) per model")
	flag.Parse()
	if flag.NArg() != 2 || *seeds < 1 {
		fmt.Fprintln(os.Stderr, "usage: chunkmodel [-seeds N] BASE NEXT")
		os.Exit(2)
	}
	base, err := os.ReadFile(flag.Arg(0))
	if err == nil {
		var next []byte
		if next, err = os.ReadFile(flag.Arg(1)); err == nil {
			err = run(os.Stdout, base, next, *seeds)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "chunkmodel:", err)
		os.Exit(1)
	}
}
