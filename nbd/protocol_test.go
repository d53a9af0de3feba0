package nbd

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// rawClient connects and sends the client flags, leaving the option phase
// to the test.
func rawClient(t *testing.T, sock string) *client {
	t.Helper()
	nc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	c := &client{t: t, c: nc}
	c.read(18)
	c.write(appendU32(nil, clientFixedNewstyle|clientNoZeroes))
	return c
}

// TestOptions: the option phase answers each option as the protocol
// says, and a refused option does not end the negotiation.
func TestOptions(t *testing.T) {
	dir := t.TempDir()
	e := openFileExport(t, testImage(t, dir))
	sock := serve(t, dir, "hda", map[string]Export{"hda": e, "hdb": e})
	c := rawClient(t, sock)

	c.option(99, nil)
	if typ, _ := c.optionReply(99); typ != repErrUnsup {
		t.Errorf("unknown option: %#x, want ERR_UNSUP", typ)
	}
	c.option(optSetMetaCtx, encodeMetaContextRequest("", []string{metaAllocation}))
	if typ, _ := c.optionReply(optSetMetaCtx); typ != repErrInvalid {
		t.Errorf("meta context before structured replies: %#x, want ERR_INVALID", typ)
	}
	c.option(optStructuredRepl, []byte{1})
	if typ, _ := c.optionReply(optStructuredRepl); typ != repErrInvalid {
		t.Errorf("structured reply with a payload: %#x, want ERR_INVALID", typ)
	}
	c.option(optList, nil)
	var names []string
	for {
		typ, data := c.optionReply(optList)
		if typ == repAck {
			break
		}
		names = append(names, string(data[4:]))
	}
	if len(names) != 2 || names[0] != "hda" || names[1] != "hdb" {
		t.Errorf("list: %q", names)
	}
	c.option(optInfo, encodeExportRequest("nope", nil))
	if typ, _ := c.optionReply(optInfo); typ != repErrUnknown {
		t.Errorf("info on an unknown export: %#x, want ERR_UNKNOWN", typ)
	}
	c.option(optListMetaCtx, encodeMetaContextRequest("hdb", nil))
	if typ, data := c.optionReply(optListMetaCtx); typ != repMetaContext || string(data[4:]) != metaAllocation {
		t.Errorf("list meta contexts: %#x %q", typ, data)
	}
	if typ, _ := c.optionReply(optListMetaCtx); typ != repAck {
		t.Errorf("list meta contexts not acknowledged: %#x", typ)
	}
	c.option(optAbort, nil)
	if typ, _ := c.optionReply(optAbort); typ != repAck {
		t.Errorf("abort: %#x, want ACK", typ)
	}
	if _, err := c.c.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("connection open after abort: %v", err)
	}
}

// TestExportName: the old NBD_OPT_EXPORT_NAME enters transmission with
// the export's size and flags, and simple replies serve reads.
func TestExportName(t *testing.T) {
	dir := t.TempDir()
	img := testImage(t, dir)
	sock := serve(t, dir, "hda", map[string]Export{"hda": openFileExport(t, img)})
	c := rawClient(t, sock)
	c.option(optExportName, []byte("hda"))
	b := c.read(10)
	if size, flags := binary.BigEndian.Uint64(b), binary.BigEndian.Uint16(b[8:]); size != 16*mib || flags&tflagReadOnly == 0 {
		t.Fatalf("size %d flags %#x", size, flags)
	}
	c.request(cmdRead, 0, 5, 1*mib, 4096, nil)
	if r := c.next(); !r.simple || r.errno != 0 || r.cookie != 5 {
		t.Fatalf("read reply %+v", r)
	}
	want := make([]byte, 4096)
	openFileExport(t, img).ReadAt(want, 1*mib)
	if !bytes.Equal(c.read(4096), want) {
		t.Fatal("read returned other bytes")
	}
	c.request(cmdDisc, 0, 6, 0, 0, nil)
	if _, err := c.c.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("connection open after disconnect: %v", err)
	}
}

// TestBlockStatusAndReads: block status reports holes and data exactly,
// REQ_ONE gives one extent, and reads split into hole and data chunks,
// or one data chunk with DF; out-of-range requests get EINVAL.
func TestBlockStatusAndReads(t *testing.T) {
	dir := t.TempDir()
	img := testImage(t, dir)
	sock := serve(t, dir, "hda", map[string]Export{"hda": openFileExport(t, img)})
	c, _, _ := dial(t, sock, "", true)

	descs := func(p []byte) [][2]uint32 {
		if binary.BigEndian.Uint32(p) != metaAllocationID {
			t.Fatalf("context id %d", binary.BigEndian.Uint32(p))
		}
		var out [][2]uint32
		for p = p[4:]; len(p) >= 8; p = p[8:] {
			out = append(out, [2]uint32{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
		}
		return out
	}
	c.request(cmdBlockStatus, 0, 1, 0, 4*mib, nil)
	ch := c.chunks()
	if len(ch) != 1 || ch[0].typ != chunkBlockStatus {
		t.Fatalf("block status chunks %+v", ch)
	}
	got := descs(ch[0].payload)
	want := [][2]uint32{{mib, stateHole | stateZero}, {2 * mib, 0}, {mib, stateHole | stateZero}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("block status %v, want %v", got, want)
	}
	c.request(cmdBlockStatus, cmdFlagReqOne, 2, 0, 4*mib, nil)
	if got := descs(c.chunks()[0].payload); len(got) != 1 || got[0] != want[0] {
		t.Fatalf("block status with REQ_ONE: %v", got)
	}

	// 512 KiB of hole then 512 KiB of data.
	c.request(cmdRead, 0, 3, mib/2, mib, nil)
	var types []uint16
	for _, r := range c.chunks() {
		types = append(types, r.typ)
	}
	if len(types) != 3 || types[0] != chunkOffsetHole || types[1] != chunkOffsetData || types[2] != chunkNone {
		t.Fatalf("read chunks %v, want hole, data, done", types)
	}
	c.request(cmdRead, cmdFlagDF, 4, mib/2, mib, nil)
	ch = c.chunks()
	if len(ch) != 1 || ch[0].typ != chunkOffsetData || len(ch[0].payload) != 8+mib {
		t.Fatalf("read with DF: %d chunks, first type %d", len(ch), ch[0].typ)
	}
	for _, req := range []struct {
		typ      uint16
		off, len uint64
	}{{cmdRead, 16*mib - 10, 20}, {cmdBlockStatus, 16 * mib, 1}, {cmdRead, 0, maxRequestLen + 1}, {99, 0, 1}} {
		c.request(req.typ, 0, 9, req.off, uint32(req.len), nil)
		if ch := c.chunks(); ch[0].typ != chunkError || ch[0].errno != errInval {
			t.Errorf("request %+v: chunk type %d errno %d, want EINVAL", req, ch[0].typ, ch[0].errno)
		}
	}
}

// countingExport is a large all-data export that counts the bytes its
// Extents were asked about; it reads as zeros without allocating.
type countingExport struct {
	size  int64
	asked atomic.Int64
}

func (c *countingExport) Size() int64 { return c.size }
func (c *countingExport) ReadAt(p []byte, off int64) (int, error) {
	clear(p)
	return len(p), nil
}
func (c *countingExport) Extents(off, length int64) ([]Extent, error) {
	c.asked.Add(length)
	return []Extent{{Offset: off, Length: length}}, nil
}

// TestBlockStatusBounded: a block status request for 4 GiB is answered
// for at most maxStatusLen, and the export is asked no more; qemu-img map
// still walks the whole export.
func TestBlockStatusBounded(t *testing.T) {
	dir := t.TempDir()
	e := &countingExport{size: 8 << 30}
	sock := serve(t, dir, "big", map[string]Export{"big": e})
	c, _, _ := dial(t, sock, "", true)
	c.request(cmdBlockStatus, 0, 1, 0, 1<<32-1, nil)
	p := c.chunks()[0].payload
	if n := binary.BigEndian.Uint32(p[4:]); n != maxStatusLen || len(p) != 12 {
		t.Fatalf("block status covers %d bytes in %d descriptors", n, (len(p)-4)/8)
	}
	if got := e.asked.Load(); got != maxStatusLen {
		t.Fatalf("export asked about %d bytes", got)
	}
	needQemu(t)
	out := run(t, "qemu-img", "map", "--output=json", "-f", "raw", nbdURL(sock, ""))
	if !strings.Contains(out, `"length": 8589934592`) || !strings.Contains(out, `"data": true`) {
		t.Fatalf("qemu-img map over short block status replies: %s", out)
	}
}
