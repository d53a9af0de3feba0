package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

const mib = 1 << 20

// testImage is 16 MiB: data at 1 MiB (2 MiB long), 8 MiB (64 KiB) and the
// last 1 MiB; holes elsewhere.
func testImage(t testing.TB, dir string) string {
	return makeImage(t, dir, 16*mib, [][2]int64{{1 * mib, 2 * mib}, {8 * mib, 64 << 10}, {15 * mib, mib}})
}

// TestQemuImgCompare: qemu's client reads the export byte-identical to
// the image (default export and by name), and sees a one-byte difference.
func TestQemuImgCompare(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	img := testImage(t, dir)
	sock := serve(t, dir, "hda", map[string]Export{"hda": openFileExport(t, img)})
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", img, nbdURL(sock, ""))
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", img, nbdURL(sock, "hda"))

	other := filepath.Join(dir, "other.raw")
	run(t, "cp", "--sparse=always", img, other)
	f, err := os.OpenFile(other, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0x5a}, 8*mib+100); err != nil {
		t.Fatal(err)
	}
	f.Close()
	out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", other, nbdURL(sock, "")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "Content mismatch at offset 8388608") {
		t.Fatalf("compare against a changed image: err %v, output %s", err, out)
	}
}

// mapEntry is one line of `qemu-img map --output=json`.
type mapEntry struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	Data   bool  `json:"data"`
	Zero   bool  `json:"zero"`
}

// TestQemuImgMapAndConvertSeeHoles: block status tells qemu exactly where
// the data is, and a converted copy is sparse and identical.
func TestQemuImgMapAndConvertSeeHoles(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	img := testImage(t, dir)
	sock := serve(t, dir, "hda", map[string]Export{"hda": openFileExport(t, img)})
	var m []mapEntry
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "map", "--output=json", "-f", "raw", nbdURL(sock, ""))), &m); err != nil {
		t.Fatal(err)
	}
	var data [][2]int64
	for _, e := range m {
		if e.Data {
			if e.Zero {
				t.Errorf("extent %+v is data and zero", e)
			}
			data = append(data, [2]int64{e.Start, e.Length})
		} else if !e.Zero {
			t.Errorf("hole %+v does not read as zero", e)
		}
	}
	want := [][2]int64{{1 * mib, 2 * mib}, {8 * mib, 64 << 10}, {15 * mib, mib}}
	if len(data) != len(want) {
		t.Fatalf("data extents %v, want %v (map %+v)", data, want, m)
	}
	for i := range want {
		if data[i] != want[i] {
			t.Fatalf("data extents %v, want %v", data, want)
		}
	}

	out := filepath.Join(dir, "out.raw")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", nbdURL(sock, ""), out)
	if fileSHA256(t, out) != fileSHA256(t, img) {
		t.Fatal("converted image differs")
	}
	if got, want := allocated(t, out), allocated(t, img); got > want+mib {
		t.Fatalf("converted copy allocates %d bytes, the image %d: holes were written", got, want)
	}
}

// TestWritableOverlay: qemu-io writes through the overlay and reads its
// data back; unwritten ranges still read from the base; the base file is
// unchanged and the overlay file removed on Close.
func TestWritableOverlay(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	img := testImage(t, dir)
	before := fileSHA256(t, img)
	ovPath := filepath.Join(dir, "overlay")
	ov, err := CreateOverlay(openFileExport(t, img), ovPath)
	if err != nil {
		t.Fatal(err)
	}
	sock := serve(t, dir, "hda", map[string]Export{"hda": ov})
	url := nbdURL(sock, "")
	// 1M+1M covers data and hole; the unaligned 5000-byte write exercises
	// copy-on-write of a partial block.
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 1M", "-c", "write -P 0xcd 9000000 5000", "-c", "flush", url)
	run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0xab 1M 1M", "-c", "read -P 0xcd 9000000 5000", url)
	out, _ := exec.Command("qemu-io", "-f", "raw", "-r", "-c", "read -P 0xab 2M 4k", url).CombinedOutput()
	if !strings.Contains(string(out), "Pattern verification failed") {
		t.Fatalf("data past the written range should be the base's: %v %s", err, out)
	}
	// Everything outside the writes equals the image: compare a copy of
	// the image with the same writes applied.
	want := filepath.Join(dir, "want.raw")
	run(t, "cp", img, want)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 1M", "-c", "write -P 0xcd 9000000 5000", want)
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", want, url)
	// Write zeroes over a whole block and a partial one.
	run(t, "qemu-io", "-f", "raw", "-c", "write -z 15M 192k", "-c", "write -z 8M 1000", url)
	run(t, "qemu-io", "-f", "raw", "-c", "write -z 15M 192k", "-c", "write -z 8M 1000", want)
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", want, url)

	if fileSHA256(t, img) != before {
		t.Fatal("base image changed")
	}
	if err := ov.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(ovPath); !os.IsNotExist(err) {
		t.Fatalf("overlay file left behind: %v", err)
	}
}

// TestReadOnlyRefusesWrites: write, zero, trim and flush on a read-only
// export answer EPERM, and the export is flagged read-only.
func TestReadOnlyRefusesWrites(t *testing.T) {
	dir := t.TempDir()
	img := testImage(t, dir)
	before := fileSHA256(t, img)
	sock := serve(t, dir, "hda", map[string]Export{"hda": openFileExport(t, img)})
	c, size, flags := dial(t, sock, "", true)
	if size != 16*mib || flags&tflagReadOnly == 0 || flags&tflagSendFlush != 0 {
		t.Fatalf("size %d flags %#x", size, flags)
	}
	c.request(cmdWrite, 0, 1, 0, 4, []byte("evil"))
	c.request(cmdWriteZeroes, 0, 2, 0, 4096, nil)
	c.request(cmdTrim, 0, 3, 0, 4096, nil)
	c.request(cmdFlush, 0, 4, 0, 0, nil)
	for range 4 {
		if r := c.next(); !r.simple || r.errno != errPerm {
			t.Fatalf("reply to cookie %d: %+v, want EPERM", r.cookie, r)
		}
	}
	if fileSHA256(t, img) != before {
		t.Fatal("read-only export was written")
	}
}

// TestReadErrorIsEIO: a range whose read fails is answered with an EIO
// error chunk and not one byte of data for it; qemu-io reports an I/O
// error; reads elsewhere and later requests on the connection still work.
func TestReadErrorIsEIO(t *testing.T) {
	dir := t.TempDir()
	img := testImage(t, dir)
	exp := &failingExport{Export: openFileExport(t, img), badOff: 2 * mib, badLen: 4096}
	sock := serve(t, dir, "hda", map[string]Export{"hda": exp})

	c, _, _ := dial(t, sock, "", true)
	c.request(cmdRead, 0, 7, 2*mib-8192, 65536, nil)
	chunks := c.chunks()
	last := chunks[len(chunks)-1]
	if last.typ != chunkErrorOffset || last.errno != errIO {
		t.Fatalf("last chunk type %d errno %d, want ERROR_OFFSET EIO", last.typ, last.errno)
	}
	for _, ch := range chunks {
		if ch.typ == chunkOffsetData {
			t.Fatalf("data chunk at %d sent for a failed read", binary.BigEndian.Uint64(ch.payload))
		}
	}
	// Without structured replies: a simple EIO reply without data.
	c2, _, _ := dial(t, sock, "", false)
	c2.request(cmdRead, 0, 8, 2*mib, 512, nil)
	c2.request(cmdRead, 0, 9, 0, 512, nil)
	// Requests are served concurrently: replies may come in any order.
	for range 2 {
		switch r := c2.next(); {
		case r.cookie == 8 && r.errno == errIO:
		case r.cookie == 9 && r.errno == 0:
			if got := c2.read(512); !bytes.Equal(got, make([]byte, 512)) {
				t.Fatal("hole at 0 did not read as zeros")
			}
		default:
			t.Fatalf("reply %+v, want EIO for cookie 8, success for 9", r)
		}
	}

	needQemu(t)
	out, _ := exec.Command("qemu-io", "-f", "raw", "-r", "-c", "read 2M 64k", nbdURL(sock, "")).CombinedOutput()
	if !strings.Contains(string(out), "Input/output error") || strings.Contains(string(out), "read 65536/65536") {
		t.Fatalf("qemu-io did not report an I/O error: %s", out)
	}
	run(t, "qemu-io", "-f", "raw", "-r", "-c", "read 1M 64k", nbdURL(sock, ""))
}

// TestConcurrentClients: several clients read the export at once, each
// byte-identical.
func TestConcurrentClients(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	img := testImage(t, dir)
	sock := serve(t, dir, "hda", map[string]Export{"hda": openFileExport(t, img)})
	var wg sync.WaitGroup
	errs := make(chan string, 4)
	for range 4 {
		wg.Go(func() {
			out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", img, nbdURL(sock, "")).CombinedOutput()
			if err != nil {
				errs <- string(out)
			}
		})
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

// TestListAndUnknownExport: NBD_OPT_LIST names every export, and GO on
// an unknown name is refused without ending the negotiation.
func TestListAndUnknownExport(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	img := testImage(t, dir)
	e := openFileExport(t, img)
	sock := serve(t, dir, "hda", map[string]Export{"hda": e, "hdb": e})
	out := run(t, "qemu-nbd", "--list", "-k", sock)
	for _, n := range []string{"export: 'hda'", "export: 'hdb'", "base:allocation"} {
		if !strings.Contains(out, n) {
			t.Errorf("qemu-nbd --list lacks %q:\n%s", n, out)
		}
	}
	if out, err := exec.Command("qemu-img", "info", nbdURL(sock, "nope")).CombinedOutput(); err == nil {
		t.Fatalf("unknown export opened: %s", out)
	}
}

// TestTCPLoopback: a TCP address without a host listens on 127.0.0.1
// only, and qemu reads the export by name over it.
func TestTCPLoopback(t *testing.T) {
	needQemu(t)
	dir := t.TempDir()
	img := testImage(t, dir)
	srv, err := NewServer(slog.New(slog.DiscardHandler), "hda", map[string]Export{"hda": openFileExport(t, img)})
	if err != nil {
		t.Fatal(err)
	}
	l, err := Listen(":0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().(*net.TCPAddr)
	if !addr.IP.Equal(net.IPv4(127, 0, 0, 1)) {
		t.Fatalf("listening on %s, want 127.0.0.1", addr)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	defer func() { cancel(); <-done }()
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", img, fmt.Sprintf("nbd://127.0.0.1:%d/hda", addr.Port))
}

// TestOverlayFull: when the overlay's filesystem is full, a write fails
// with ENOSPC, and what was written before still reads back.
func TestOverlayFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounts a small tmpfs: needs root")
	}
	dir := t.TempDir()
	img := testImage(t, dir)
	small := filepath.Join(dir, "small")
	os.Mkdir(small, 0o700)
	run(t, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small)
	defer exec.Command("umount", small).Run()
	ov, err := CreateOverlay(openFileExport(t, img), filepath.Join(small, "ov"))
	if err != nil {
		t.Fatal(err)
	}
	defer ov.Close()
	sock := serve(t, dir, "hda", map[string]Export{"hda": ov})
	c, _, _ := dial(t, sock, "", true)
	first := bytes.Repeat([]byte{0xab}, 512<<10)
	c.request(cmdWrite, 0, 1, 0, uint32(len(first)), first)
	if r := c.next(); r.errno != 0 {
		t.Fatalf("first write: errno %d", r.errno)
	}
	big := make([]byte, 2*mib)
	c.request(cmdWrite, 0, 2, 4*mib, uint32(len(big)), big)
	if r := c.next(); r.errno != errNoSpc {
		t.Fatalf("write to a full overlay: errno %d, want ENOSPC", r.errno)
	}
	got := make([]byte, len(first))
	if _, err := ov.ReadAt(got, 0); err != nil || !bytes.Equal(got, first) {
		t.Fatalf("earlier write lost: %v", err)
	}
}

// Each connection asks for a send buffer of socketBuffer bytes (the
// kernel reports twice what was set), beyond net.core.wmem_max where the
// process may; elsewhere at least up to that limit.
func TestSendBuffer(t *testing.T) {
	dir := t.TempDir()
	l, err := net.Listen("unix", filepath.Join(dir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := net.Dial("unix", l.Addr().String())
		if err == nil {
			defer c.Close()
			io.Copy(io.Discard, c)
		}
	}()
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	setSendBuffer(c, socketBuffer)
	raw, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var got int
	raw.Control(func(fd uintptr) { got, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF) })
	if err != nil {
		t.Fatal(err)
	}
	want := socketBuffer
	if os.Geteuid() != 0 {
		b, err := os.ReadFile("/proc/sys/net/core/wmem_max")
		if err != nil {
			t.Skip("not root and no wmem_max to compare with")
		}
		limit, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		want = min(want, limit)
	}
	if got < want {
		t.Fatalf("send buffer %d bytes, want at least %d", got, want)
	}
}
