package sftp

import (
	"bufio"
	"context"
	"os"
	"strconv"
	"strings"
	"testing"

	"vmvault/backend/backendtest"
)

// readSyscalls returns the read system calls this process has made.
func readSyscalls(t *testing.T) int64 {
	t.Helper()
	f, err := os.Open("/proc/self/io")
	if err != nil {
		t.Skipf("no /proc/self/io: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "syscr: "); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no syscr in /proc/self/io")
	return 0
}

// The SSH transport reads through a 4 KiB buffer: each 32 KiB packet took
// two reads from the socket (the length prefix filled the buffer, the
// rest of the packet was read past it), 2.7 read calls per packet in an
// SFTP restore. Behind a large buffer one read takes in what the socket
// holds.
func TestConnReadsPerPacket(t *testing.T) {
	b, _, _ := openTestRepo(t)
	ctx := context.Background()
	data := backendtest.RandomBytes(t, 8<<20)
	name := backendtest.DataName(data)
	if err := b.Put(ctx, name, data); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(data)+1)
	const gets = 4
	before := readSyscalls(t)
	for range gets {
		if n, err := b.GetInto(ctx, name, buf); err != nil || n != len(data) {
			t.Fatalf("getinto: %d bytes, %v", n, err)
		}
	}
	reads := readSyscalls(t) - before
	packets := int64(gets * len(data) / (32 << 10))
	t.Logf("%d read calls for %d packets of data", reads, packets)
	if reads > packets {
		t.Fatalf("%d read calls for %d SSH packets of data: more than one per packet", reads, packets)
	}
}
