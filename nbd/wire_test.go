package nbd

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"syscall"
	"testing"
	"time"
)

// encodeExportRequest is the client side of parseExportRequest.
func encodeExportRequest(name string, infos []uint16) []byte {
	b := appendU32(nil, uint32(len(name)))
	b = append(b, name...)
	b = appendU16(b, uint16(len(infos)))
	for _, i := range infos {
		b = appendU16(b, i)
	}
	return b
}

// encodeMetaContextRequest is the client side of parseMetaContextRequest.
func encodeMetaContextRequest(name string, queries []string) []byte {
	b := appendU32(nil, uint32(len(name)))
	b = append(b, name...)
	b = appendU32(b, uint32(len(queries)))
	for _, q := range queries {
		b = appendU32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

func TestParseExportRequest(t *testing.T) {
	for _, tc := range []struct {
		data  []byte
		name  string
		infos int
		ok    bool
	}{
		{encodeExportRequest("hda", []uint16{3, 1}), "hda", 2, true},
		{encodeExportRequest("", nil), "", 0, true},
		{encodeExportRequest("hda", nil)[:5], "", 0, false},                         // name cut short
		{append(encodeExportRequest("hda", nil), 0), "", 0, false},                  // trailing byte
		{encodeExportRequest("hda", []uint16{3})[:9], "", 0, false},                 // info cut short
		{append(appendU32(nil, maxNameLen+1), make([]byte, 4099)...), "", 0, false}, // name too long
	} {
		name, infos, err := parseExportRequest(tc.data)
		if (err == nil) != tc.ok || name != tc.name || len(infos) != tc.infos {
			t.Errorf("parseExportRequest(%x) = %q, %v, %v", tc.data, name, infos, err)
		}
		if err != nil && !errors.Is(err, errMalformed) {
			t.Errorf("error %v does not wrap errMalformed", err)
		}
	}
}

func TestParseMetaContextRequest(t *testing.T) {
	huge := appendU32(encodeMetaContextRequest("", nil)[:4], 1<<30) // a billion queries in 8 bytes
	for _, tc := range []struct {
		data    []byte
		queries []string
		ok      bool
	}{
		{encodeMetaContextRequest("hda", []string{"base:allocation", "qemu:dirty-bitmap:x"}), []string{"base:allocation", "qemu:dirty-bitmap:x"}, true},
		{encodeMetaContextRequest("", nil), nil, true},
		{huge, nil, false},
		{encodeMetaContextRequest("a", []string{"base:"})[:12], nil, false},
	} {
		_, q, err := parseMetaContextRequest(tc.data)
		if (err == nil) != tc.ok || len(q) != len(tc.queries) {
			t.Errorf("parseMetaContextRequest(%x) = %v, %v", tc.data, q, err)
		}
	}
}

func TestClipExtents(t *testing.T) {
	ext := []Extent{{0, 100, true}, {100, 50, true}, {150, 100, false}, {250, 1000, true}}
	got, err := clipExtents(ext, 10, 300)
	want := []Extent{{10, 140, true}, {150, 100, false}, {250, 60, true}}
	if err != nil || len(got) != len(want) {
		t.Fatalf("clipExtents = %v, %v; want %v", got, err, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("clipExtents = %v, want %v", got, want)
		}
	}
	for _, bad := range [][]Extent{
		{{0, 100, false}},                  // stops short
		{{0, 50, false}, {60, 100, false}}, // gap
		{{5, 500, false}},                  // starts late
		{{0, 0, false}, {0, 500, false}},   // empty extent
	} {
		if _, err := clipExtents(bad, 0, 200); !errors.Is(err, errBadExtents) {
			t.Errorf("clipExtents(%v) = %v, want errBadExtents", bad, err)
		}
	}
}

// FuzzParse: the option and request parsers never panic, accept only
// input they consume exactly, and what they accept re-encodes to itself.
func FuzzParse(f *testing.F) {
	f.Add(encodeExportRequest("hda", []uint16{3}))
	f.Add(encodeMetaContextRequest("hda", []string{"base:allocation"}))
	f.Add(appendU64(appendU64(appendU32(nil, magicRequest), 1), 2))
	f.Fuzz(func(t *testing.T, data []byte) {
		if name, infos, err := parseExportRequest(data); err == nil {
			if !bytes.Equal(encodeExportRequest(name, infos), data) {
				t.Fatalf("export request %x does not round-trip", data)
			}
		}
		if name, q, err := parseMetaContextRequest(data); err == nil {
			if !bytes.Equal(encodeMetaContextRequest(name, q), data) {
				t.Fatalf("meta context request %x does not round-trip", data)
			}
		}
		if len(data) >= requestSize {
			r, err := parseRequest(data[:requestSize])
			magic := data[0] == 0x25 && data[1] == 0x60 && data[2] == 0x95 && data[3] == 0x13
			if (err == nil) != magic {
				t.Fatalf("parseRequest(%x) = %v", data[:requestSize], err)
			}
			if err == nil && r.length != uint32(data[24])<<24|uint32(data[25])<<16|uint32(data[26])<<8|uint32(data[27]) {
				t.Fatalf("length %d from %x", r.length, data[24:28])
			}
		}
		if len(data) >= 16 {
			parseOptionHeader(data[:16])
		}
	})
}

// FuzzSession: any byte stream from a client — a valid greeting followed
// by fuzzed options and requests — ends the connection without a panic,
// a hang, or a write to a read-only export.
func FuzzSession(f *testing.F) {
	hs := appendU32(nil, clientFixedNewstyle|clientNoZeroes)
	opt := func(o uint32, data []byte) []byte {
		b := appendU64(nil, magicOption)
		b = appendU32(b, o)
		b = appendU32(b, uint32(len(data)))
		return append(b, data...)
	}
	req := func(typ uint16, off uint64, length uint32) []byte {
		b := appendU32(nil, magicRequest)
		b = appendU16(b, 0)
		b = appendU16(b, typ)
		b = appendU64(b, 1)
		b = appendU64(b, off)
		return appendU32(b, length)
	}
	seed := append(bytes.Clone(hs), opt(optStructuredRepl, nil)...)
	seed = append(seed, opt(optSetMetaCtx, encodeMetaContextRequest("", []string{metaAllocation}))...)
	seed = append(seed, opt(optGo, encodeExportRequest("", nil))...)
	seed = append(seed, req(cmdRead, 0, 4096)...)
	seed = append(seed, req(cmdBlockStatus, 0, 1<<20)...)
	seed = append(seed, req(cmdWrite, 0, 4)...)
	seed = append(seed, "abcd"...)
	f.Add(seed)
	f.Add(append(bytes.Clone(hs), opt(optList, nil)...))
	f.Add(append(bytes.Clone(hs), opt(optExportName, []byte("hda"))...))
	f.Fuzz(func(t *testing.T, in []byte) {
		exp := &memExport{data: make([]byte, 1<<20)}
		srv, err := NewServer(slog.New(slog.DiscardHandler), "hda", map[string]Export{"hda": exp})
		if err != nil {
			t.Fatal(err)
		}
		server, client := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			srv.serveConn(server)
		}()
		go io.Copy(io.Discard, client)
		client.SetWriteDeadline(time.Now().Add(2 * time.Second))
		client.Write(in)
		client.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("server did not end the session")
		}
		if !bytes.Equal(exp.data, make([]byte, 1<<20)) {
			t.Fatal("read-only export was written")
		}
	})
}

// memExport is an all-zero in-memory export for the fuzzer, where real
// files would make each run slow.
type memExport struct{ data []byte }

func (m *memExport) Size() int64 { return int64(len(m.data)) }
func (m *memExport) ReadAt(p []byte, off int64) (int, error) {
	return copy(p, m.data[off:]), nil
}
func (m *memExport) Extents(off, length int64) ([]Extent, error) {
	return []Extent{{Offset: off, Length: length}}, nil
}

// serveMem serves a small in-memory export on a loopback TCP listener,
// wrapped by wrap, and returns the address, Serve's result channel and the
// function that stops it.
func serveMem(t *testing.T, wrap func(net.Listener) net.Listener) (string, <-chan error, context.CancelFunc) {
	t.Helper()
	srv, err := NewServer(slog.New(slog.DiscardHandler), "hda", map[string]Export{"hda": &memExport{data: make([]byte, 4096)}})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, wrap(l)) }()
	return l.Addr().String(), done, cancel
}

// TestServeStopsOnCancel: cancelling the context closes open connections
// and Serve returns nil.
func TestServeStopsOnCancel(t *testing.T) {
	addr, done, cancel := serveMem(t, func(l net.Listener) net.Listener { return l })
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.ReadFull(c, make([]byte, 18)); err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after cancel with a client connected")
	}
	c.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection still open after Serve returned")
	}
}

// flakyListener fails its first Accept as a listener out of file
// descriptors does (a stand-in: exhausting descriptors would disturb the
// other tests of the process).
type flakyListener struct {
	net.Listener
	failed bool
}

func (f *flakyListener) Accept() (net.Conn, error) {
	if !f.failed {
		f.failed = true
		return nil, syscall.EMFILE
	}
	return f.Listener.Accept()
}

// TestServeRetriesAccept: a failed accept does not stop the server.
func TestServeRetriesAccept(t *testing.T) {
	addr, done, cancel := serveMem(t, func(l net.Listener) net.Listener { return &flakyListener{Listener: l} })
	defer func() { cancel(); <-done }()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	hello := make([]byte, 18)
	if _, err := io.ReadFull(c, hello); err != nil || !bytes.HasPrefix(hello, []byte("NBDMAGIC")) {
		t.Fatalf("no greeting after a failed accept: %v %q", err, hello)
	}
}
