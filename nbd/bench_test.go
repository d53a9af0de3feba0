package nbd

import (
	"testing"
)

// BenchmarkRead measures the server's own cost for sequential 2 MiB
// structured reads, 8 in flight, over a unix socket from an in-memory
// export (no disk, no repository): protocol, copies and syscalls.
func BenchmarkRead(b *testing.B) {
	const size, req, depth = 64 << 20, 2 << 20, 8
	dir := b.TempDir()
	exp := &memExport{data: make([]byte, size)}
	for i := range exp.data {
		exp.data[i] = byte(i)
	}
	sock := serve(b, dir, "m", map[string]Export{"m": exp})
	c, _, _ := dial(b, sock, "", true)
	b.SetBytes(req)
	b.ReportAllocs()
	b.ResetTimer()
	var off uint64
	inFlight := 0
	for i := 0; i < b.N; i++ {
		c.request(cmdRead, 0, uint64(i), off, req, nil)
		off = (off + req) % size
		if inFlight++; inFlight == depth {
			c.chunks()
			inFlight--
		}
	}
	for ; inFlight > 0; inFlight-- {
		c.chunks()
	}
}
