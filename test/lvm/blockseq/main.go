// Command blockseq writes and checks the data of the end-to-end LVM test
// (test/lvm) inside the qemu guest, where only busybox is available.
//
// Its central job is proving that a backup is a point-in-time image. The
// writer numbers its writes k = 0, 1, 2, … and sends write k, a 4 KiB block
// that carries k and content derived from k, to block slot(k mod n) of a
// region of n blocks, where slot is a fixed permutation that spreads
// consecutive writes over the whole region. Each write is O_DIRECT|O_DSYNC and
// completes before the next starts, so the device always holds exactly the
// result of writes 0…K-1 for some K. verify reconstructs that K from an image
// and checks every block against it: a torn block, a block from a later write
// next to one that misses an earlier write, or any stray data fails.
//
//	blockseq fill  PATH OFFSET LENGTH SEED   pseudo-random data, fsync; prints its sha256
//	blockseq zero  PATH OFFSET LENGTH        zeros, fsync
//	blockseq sum   PATH OFFSET LENGTH        prints the sha256 of a range
//	blockseq cmp   PATH PATH2 LENGTH         compares the first LENGTH bytes; prints "equal"
//	blockseq write DEV OFFSET BLOCKS STATUS  numbered writes until SIGTERM; the count of
//	                                         completed writes is kept in the file STATUS
//	blockseq verify IMAGE OFFSET BLOCKS      checks the region; prints "writes K"
//
// Numbers are decimal bytes (or blocks); BLOCKS must be a power of two.
package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"math/rand/v2"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
)

// blockSize is the unit of the numbered writes: one page, the natural
// O_DIRECT unit, and a single bio that a snapshot sees whole or not at all.
const blockSize = 4096

// magic starts every numbered block.
var magic = [8]byte{'V', 'M', 'V', 'S', 'E', 'Q', 0, 1}

// stride is odd, so k*stride mod n (n a power of two) is a permutation.
const stride = 2731

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "blockseq:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: blockseq fill|zero|sum|write|verify ARGS…")
	}
	nums := func(want int, from []string) ([]int64, error) {
		if len(from) != want {
			return nil, fmt.Errorf("%s: want %d numeric arguments after the path, got %d", args[0], want, len(from))
		}
		out := make([]int64, len(from))
		for i, s := range from {
			v, err := strconv.ParseInt(s, 10, 64)
			if err != nil || v < 0 {
				return nil, fmt.Errorf("%s: bad number %q", args[0], s)
			}
			out[i] = v
		}
		return out, nil
	}
	if len(args) < 2 {
		return fmt.Errorf("%s: missing path", args[0])
	}
	path := args[1]
	switch args[0] {
	case "fill":
		n, err := nums(3, args[2:])
		if err != nil {
			return err
		}
		sum, err := fill(path, n[0], n[1], uint64(n[2]))
		if err != nil {
			return err
		}
		fmt.Println(sum)
	case "zero":
		n, err := nums(2, args[2:])
		if err != nil {
			return err
		}
		return zero(path, n[0], n[1])
	case "sum":
		n, err := nums(2, args[2:])
		if err != nil {
			return err
		}
		sum, err := sumRange(path, n[0], n[1])
		if err != nil {
			return err
		}
		fmt.Println(sum)
	case "cmp":
		if len(args) != 4 {
			return errors.New("usage: blockseq cmp PATH PATH2 LENGTH")
		}
		n, err := nums(1, args[3:])
		if err != nil {
			return err
		}
		if err := compare(path, args[2], n[0]); err != nil {
			return err
		}
		fmt.Println("equal")
	case "write":
		if len(args) != 5 {
			return errors.New("usage: blockseq write DEV OFFSET BLOCKS STATUS")
		}
		n, err := nums(2, args[2:4])
		if err != nil {
			return err
		}
		return write(path, n[0], n[1], args[4])
	case "verify":
		n, err := nums(2, args[2:])
		if err != nil {
			return err
		}
		k, err := verify(path, n[0], n[1])
		if err != nil {
			return err
		}
		fmt.Printf("writes %d\n", k)
	default:
		return fmt.Errorf("unknown subcommand %q", args[0])
	}
	return nil
}

// fill writes length pseudo-random bytes (a ChaCha8 stream keyed by seed)
// at off and returns their sha256.
func fill(path string, off, length int64, seed uint64) (string, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	src := rand.NewChaCha8(key)
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for done := int64(0); done < length; {
		b := buf[:min(int64(len(buf)), length-done)]
		src.Read(b)
		h.Write(b)
		if _, err := f.WriteAt(b, off+done); err != nil {
			return "", fmt.Errorf("fill %s: %w", path, err)
		}
		done += int64(len(b))
	}
	if err := f.Sync(); err != nil {
		return "", fmt.Errorf("fill %s: fsync: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), f.Close()
}

func zero(path string, off, length int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for done := int64(0); done < length; {
		n := min(int64(len(buf)), length-done)
		if _, err := f.WriteAt(buf[:n], off+done); err != nil {
			return fmt.Errorf("zero %s: %w", path, err)
		}
		done += n
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("zero %s: fsync: %w", path, err)
	}
	return f.Close()
}

func sumRange(path string, off, length int64) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, io.NewSectionReader(f, off, length))
	if err != nil {
		return "", fmt.Errorf("sum %s: %w", path, err)
	}
	if n != length {
		return "", fmt.Errorf("sum %s: only %d of %d bytes", path, n, length)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// compare checks that two files or devices hold the same first length
// bytes. It reads in large blocks and compares bytes rather than hashing
// them: under TCG a comparison costs a fraction of a SHA-256.
func compare(a, b string, length int64) error {
	fa, err := os.Open(a)
	if err != nil {
		return err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return err
	}
	defer fb.Close()
	const step = 4 << 20
	ba, bb := make([]byte, step), make([]byte, step)
	for off := int64(0); off < length; off += step {
		n := int(min(step, length-off))
		if _, err := fa.ReadAt(ba[:n], off); err != nil {
			return fmt.Errorf("cmp: read %s at %d: %w", a, off, err)
		}
		if _, err := fb.ReadAt(bb[:n], off); err != nil {
			return fmt.Errorf("cmp: read %s at %d: %w", b, off, err)
		}
		if !bytes.Equal(ba[:n], bb[:n]) {
			for i := range n {
				if ba[i] != bb[i] {
					return fmt.Errorf("cmp: %s and %s differ at offset %d", a, b, off+int64(i))
				}
			}
		}
	}
	return nil
}

// slot is the block that write k goes to in a region of n blocks.
func slot(k, n int64) int64 { return (k % n) * stride & (n - 1) }

// block fills b with the content of write k to slot s.
func block(b []byte, k, s int64) {
	copy(b, magic[:])
	binary.LittleEndian.PutUint64(b[8:], uint64(k))
	binary.LittleEndian.PutUint64(b[16:], uint64(s))
	// xorshift64 keyed by k: every write has its own content, cheaply.
	x := uint64(k)*0x9E3779B97F4A7C15 | 1
	for i := 24; i+8 <= len(b); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
}

func checkBlocks(n int64) error {
	if n <= 0 || bits.OnesCount64(uint64(n)) != 1 {
		return fmt.Errorf("BLOCKS %d is not a power of two", n)
	}
	return nil
}

// write performs numbered writes until SIGTERM or SIGINT, then prints the
// count. After each completed write it publishes the count in status
// (written to a temporary file and renamed, so readers never see a torn
// number).
func write(dev string, off, n int64, status string) error {
	if err := checkBlocks(n); err != nil {
		return err
	}
	if off%blockSize != 0 {
		return fmt.Errorf("OFFSET %d is not a multiple of %d", off, blockSize)
	}
	f, err := os.OpenFile(dev, os.O_WRONLY|syscall.O_DIRECT|syscall.O_DSYNC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// O_DIRECT needs an aligned buffer; an anonymous mapping is page-aligned.
	buf, err := syscall.Mmap(-1, 0, blockSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		return fmt.Errorf("aligned buffer: %w", err)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	tmp := filepath.Join(filepath.Dir(status), "."+filepath.Base(status)+".tmp")
	for k := int64(0); ; k++ {
		select {
		case <-stop:
			fmt.Printf("writes %d\n", k)
			return nil
		default:
		}
		s := slot(k, n)
		block(buf, k, s)
		if _, err := f.WriteAt(buf, off+s*blockSize); err != nil {
			return fmt.Errorf("write %d to block %d: %w", k, s, err)
		}
		if err := os.WriteFile(tmp, []byte(strconv.FormatInt(k+1, 10)+"\n"), 0o644); err != nil {
			return err
		}
		if err := os.Rename(tmp, status); err != nil {
			return err
		}
	}
}

// verify checks that the region of image holds exactly the result of
// writes 0…K-1 for some K and returns K.
func verify(image string, off, n int64) (int64, error) {
	if err := checkBlocks(n); err != nil {
		return 0, err
	}
	f, err := os.Open(image)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	data := make([]byte, n*blockSize)
	if _, err := io.ReadFull(io.NewSectionReader(f, off, int64(len(data))), data); err != nil {
		return 0, fmt.Errorf("read region of %s: %w", image, err)
	}
	// first[s] is the first write that goes to slot s.
	first := make([]int64, n)
	for k := int64(0); k < n; k++ {
		first[slot(k, n)] = k
	}
	// Each block is zero or an intact write meant for its slot; the newest
	// such write gives K.
	seq := make([]int64, n) // -1: zero block
	want := make([]byte, blockSize)
	zeros := make([]byte, blockSize)
	last := int64(-1)
	for s := int64(0); s < n; s++ {
		b := data[s*blockSize : (s+1)*blockSize]
		if bytes.Equal(b, zeros) {
			seq[s] = -1
			continue
		}
		if !bytes.Equal(b[:8], magic[:]) {
			return 0, fmt.Errorf("block %d holds foreign data (no write header)", s)
		}
		k := int64(binary.LittleEndian.Uint64(b[8:]))
		if k < 0 || slot(k, n) != s {
			return 0, fmt.Errorf("block %d holds write %d, which belongs to block %d", s, k, slot(k, n))
		}
		block(want, k, s)
		if !bytes.Equal(b, want) {
			return 0, fmt.Errorf("block %d: write %d is torn or corrupt", s, k)
		}
		seq[s] = k
		last = max(last, k)
	}
	// With K = last+1, slot s must hold the newest write k < K with
	// k ≡ first[s] (mod n), or zeros if write first[s] had not happened.
	for s := int64(0); s < n; s++ {
		exp := int64(-1)
		if first[s] <= last {
			exp = last - (last-first[s])%n
		}
		if seq[s] != exp {
			return 0, fmt.Errorf("not a point-in-time image: block %d holds write %d, but the newest write in the image is %d, so it must hold write %d (-1: none)", s, seq[s], last, exp)
		}
	}
	return last + 1, nil
}
