package sftp

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"testing"
)

// countingConn is a connection whose reads come from r, counted.
type countingConn struct {
	net.Conn // nil: only Read is used
	r        io.Reader
	reads    int
}

func (c *countingConn) Read(p []byte) (int, error) {
	c.reads++
	return c.r.Read(p)
}

// readPackets reads SSH-style packets (a 4-byte length, then the body)
// from conn the way golang.org/x/crypto/ssh's transport does: through a
// bufio.Reader of the default 4 KiB.
func readPackets(t *testing.T, conn net.Conn, packets int) {
	t.Helper()
	r := bufio.NewReader(conn)
	var prefix [4]byte
	body := make([]byte, 64<<10)
	for range packets {
		if _, err := io.ReadFull(r, prefix[:]); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(r, body[:binary.BigEndian.Uint32(prefix[:])]); err != nil {
			t.Fatal(err)
		}
	}
}

// The SSH transport reads through a 4 KiB bufio.Reader: each 32 KiB
// packet took two reads from the socket (the length prefix filled the
// buffer, the rest of the packet was read past it); an SFTP restore of
// image A made 73,630 read calls. Behind readBufferedConn one read takes
// in what the socket holds (20,654 calls for the same restore). Here the
// whole stream is there to read, as when the server is ahead.
func TestConnReadsPerPacket(t *testing.T) {
	const packets, size = 64, 32<<10 + 20
	var stream []byte
	for range packets {
		stream = binary.BigEndian.AppendUint32(stream, size)
		stream = append(stream, make([]byte, size)...)
	}
	raw := &countingConn{r: bytes.NewReader(stream)}
	readPackets(t, raw, packets)
	t.Logf("through the transport's buffer alone: %d reads for %d packets", raw.reads, packets)
	if raw.reads < 2*packets {
		t.Fatalf("%d reads for %d packets: the transport's own buffer no longer makes two per packet; is readBufferedConn still needed?", raw.reads, packets)
	}
	counted := &countingConn{r: bytes.NewReader(stream)}
	readPackets(t, newReadBufferedConn(counted), packets)
	t.Logf("behind readBufferedConn: %d reads", counted.reads)
	if want := len(stream)/connReadBuffer + 1; counted.reads > want {
		t.Fatalf("%d reads for %d bytes behind a %d-byte buffer, want at most %d", counted.reads, len(stream), connReadBuffer, want)
	}
}
