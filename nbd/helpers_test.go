package nbd

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// fileExport serves a plain (sparse) file; its holes, found with
// SEEK_DATA/SEEK_HOLE, are the extents reported as holes.
type fileExport struct {
	f    *os.File
	size int64
}

func openFileExport(t testing.TB, path string) *fileExport {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return &fileExport{f: f, size: st.Size()}
}

func (e *fileExport) Size() int64                             { return e.size }
func (e *fileExport) ReadAt(p []byte, off int64) (int, error) { return e.f.ReadAt(p, off) }

func (e *fileExport) Extents(off, length int64) ([]Extent, error) {
	end := min(off+length, e.size)
	var out []Extent
	fd := int(e.f.Fd())
	for pos := off; pos < end; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			data = e.size
		} else if err != nil {
			return nil, err
		}
		if data > pos {
			out = append(out, Extent{Offset: pos, Length: data - pos, Hole: true})
			pos = data
			continue
		}
		hole, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if err != nil {
			return nil, err
		}
		out = append(out, Extent{Offset: pos, Length: hole - pos})
		pos = hole
	}
	return out, nil
}

// failingExport fails every read that touches [badOff, badOff+badLen),
// as a repository reader does for a chunk that fails authentication.
type failingExport struct {
	Export
	badOff, badLen int64
}

func (e *failingExport) ReadAt(p []byte, off int64) (int, error) {
	if off < e.badOff+e.badLen && off+int64(len(p)) > e.badOff {
		return 0, fmt.Errorf("chunk data/ab/cdef: authentication failed")
	}
	return e.Export.ReadAt(p, off)
}

// makeImage writes a sparse test image of size bytes: random data in
// the given [offset, length) ranges, holes elsewhere. It returns the path.
func makeImage(t testing.TB, dir string, size int64, data [][2]int64) string {
	t.Helper()
	path := filepath.Join(dir, "disk.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for _, r := range data {
		buf := make([]byte, r[1])
		for i := range buf {
			buf[i] = byte(rng.Uint32())
		}
		if _, err := f.WriteAt(buf, r[0]); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

// serve starts a server on a unix socket in dir and returns the socket's
// path; the server stops when the test ends.
func serve(t testing.TB, dir, def string, exports map[string]Export) string {
	t.Helper()
	srv, err := NewServer(slog.New(slog.DiscardHandler), def, exports)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := srv.Serve(ctx, l); err != nil {
			t.Errorf("serve: %v", err)
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return sock
}

func nbdURL(sock, name string) string {
	return "nbd+unix:///" + name + "?socket=" + sock
}

func needQemu(t testing.TB) {
	t.Helper()
	for _, p := range []string{"qemu-img", "qemu-io", "qemu-nbd"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s not installed (package qemu-utils; scripts/deps.sh installs it)", p)
		}
	}
}

// run runs a command and returns its combined output, failing the test
// on a non-zero exit.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// allocated returns the bytes a file has allocated on disk.
func allocated(t testing.TB, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func fileSHA256(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// client is a minimal NBD client for protocol-level tests: what qemu's
// client does not let a test observe (error numbers, chunk types).
type client struct {
	t testing.TB
	c net.Conn
}

// reply is one reply message: a simple reply or one structured chunk.
type reply struct {
	simple  bool
	errno   uint32
	flags   uint16
	typ     uint16
	cookie  uint64
	payload []byte
}

func (c *client) write(parts ...[]byte) {
	c.t.Helper()
	for _, p := range parts {
		if len(p) == 0 {
			continue // the server may have closed after a disconnect request
		}
		if _, err := c.c.Write(p); err != nil {
			c.t.Fatal(err)
		}
	}
}

func (c *client) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.c, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

func (c *client) option(opt uint32, data []byte) {
	b := appendU64(nil, magicOption)
	b = appendU32(b, opt)
	b = appendU32(b, uint32(len(data)))
	c.write(b, data)
}

// optionReply reads one option reply: its type and data.
func (c *client) optionReply(opt uint32) (uint32, []byte) {
	c.t.Helper()
	h := c.read(20)
	if binary.BigEndian.Uint64(h) != magicReply || binary.BigEndian.Uint32(h[8:]) != opt {
		c.t.Fatalf("bad option reply header %x", h)
	}
	return binary.BigEndian.Uint32(h[12:]), c.read(int(binary.BigEndian.Uint32(h[16:])))
}

// dial connects, negotiates structured replies and base:allocation if
// asked, and enters transmission on export name with NBD_OPT_GO. It
// returns the export's size and transmission flags.
func dial(t testing.TB, sock, name string, structured bool) (*client, uint64, uint16) {
	t.Helper()
	nc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	c := &client{t: t, c: nc}
	hello := c.read(18)
	if binary.BigEndian.Uint64(hello) != magicInit || binary.BigEndian.Uint64(hello[8:]) != magicOption {
		t.Fatalf("bad greeting %x", hello)
	}
	c.write(appendU32(nil, clientFixedNewstyle|clientNoZeroes))
	if structured {
		c.option(optStructuredRepl, nil)
		if typ, _ := c.optionReply(optStructuredRepl); typ != repAck {
			t.Fatalf("structured reply: %#x", typ)
		}
		q := appendU32(nil, uint32(len(name)))
		q = append(q, name...)
		q = appendU32(q, 1)
		q = appendU32(q, uint32(len(metaAllocation)))
		q = append(q, metaAllocation...)
		c.option(optSetMetaCtx, q)
		if typ, _ := c.optionReply(optSetMetaCtx); typ != repMetaContext {
			t.Fatalf("set meta context: %#x", typ)
		}
		if typ, _ := c.optionReply(optSetMetaCtx); typ != repAck {
			t.Fatalf("set meta context: %#x", typ)
		}
	}
	g := appendU32(nil, uint32(len(name)))
	g = append(g, name...)
	g = appendU16(g, 0)
	c.option(optGo, g)
	var size uint64
	var flags uint16
	for {
		typ, data := c.optionReply(optGo)
		if typ == repAck {
			break
		}
		if typ != repInfo {
			t.Fatalf("go: reply %#x %q", typ, data)
		}
		if binary.BigEndian.Uint16(data) == infoExport {
			size, flags = binary.BigEndian.Uint64(data[2:]), binary.BigEndian.Uint16(data[10:])
		}
	}
	return c, size, flags
}

func (c *client) request(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	b := appendU32(nil, magicRequest)
	b = appendU16(b, flags)
	b = appendU16(b, typ)
	b = appendU64(b, cookie)
	b = appendU64(b, off)
	b = appendU32(b, length)
	c.write(b, payload)
}

// next reads one reply message. A simple reply to a read carries data
// the caller must read itself.
func (c *client) next() reply {
	c.t.Helper()
	m := binary.BigEndian.Uint32(c.read(4))
	switch m {
	case magicSimple:
		h := c.read(12)
		return reply{simple: true, errno: binary.BigEndian.Uint32(h), cookie: binary.BigEndian.Uint64(h[4:])}
	case magicStructed:
		h := c.read(16)
		r := reply{flags: binary.BigEndian.Uint16(h), typ: binary.BigEndian.Uint16(h[2:]), cookie: binary.BigEndian.Uint64(h[4:])}
		r.payload = c.read(int(binary.BigEndian.Uint32(h[12:])))
		if r.typ&(1<<15) != 0 {
			r.errno = binary.BigEndian.Uint32(r.payload)
		}
		return r
	}
	c.t.Fatalf("bad reply magic %#x", m)
	return reply{}
}

// chunks reads structured chunks up to and including the one flagged done.
func (c *client) chunks() []reply {
	c.t.Helper()
	var out []reply
	for {
		r := c.next()
		if r.simple {
			c.t.Fatalf("simple reply where chunks were expected: errno %d", r.errno)
		}
		out = append(out, r)
		if r.flags&replyFlagDone != 0 {
			return out
		}
	}
}
