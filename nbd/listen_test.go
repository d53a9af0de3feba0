package nbd

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseListen(t *testing.T) {
	for _, tc := range []struct{ spec, network, addr string }{
		{"unix:/run/x.sock", "unix", "/run/x.sock"},
		{":10809", "tcp", "127.0.0.1:10809"},
		{"127.0.0.1:0", "tcp", "127.0.0.1:0"},
		{"0.0.0.0:10809", "tcp", "0.0.0.0:10809"},
		{"[::1]:10809", "tcp", "[::1]:10809"},
	} {
		n, a, err := ParseListen(tc.spec)
		if err != nil || n != tc.network || a != tc.addr {
			t.Errorf("ParseListen(%q) = %q %q %v", tc.spec, n, a, err)
		}
	}
	for _, bad := range []string{"", "unix:", "10809", "localhost", "host:"} {
		if _, _, err := ParseListen(bad); !errors.Is(err, ErrBadAddress) {
			t.Errorf("ParseListen(%q) = %v, want ErrBadAddress", bad, err)
		}
	}
}

// TestListenSocketPath: a stale socket is replaced, a live one or a
// regular file is refused and left alone.
func TestListenSocketPath(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Listen("unix:" + sock); err == nil || !strings.Contains(err.Error(), "another server") {
		t.Fatalf("second listener on a live socket: %v", err)
	}
	// Leave the socket file behind, as a killed server does.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	l2, err := Listen("unix:" + sock)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, %v; want 0600", fi.Mode(), err)
	}
	l2.Close()

	file := filepath.Join(dir, "f")
	os.WriteFile(file, []byte("data"), 0o600)
	if _, err := Listen("unix:" + file); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("listen on a regular file: %v", err)
	}
	if b, _ := os.ReadFile(file); string(b) != "data" {
		t.Fatal("regular file changed")
	}
}
