package sftp

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh/knownhosts"

	"vmvault/backend"
	"vmvault/backend/backendtest"
	"vmvault/internal/testsshd"
)

// The backend contract, as every backend runs it, against one real sshd.
func TestConformance(t *testing.T) {
	s := testsshd.Start(t, testsshd.Options{})
	backendtest.Run(t, func(t *testing.T) backend.Backend {
		cfg := serverConfig(s, filepath.Join(t.TempDir(), "repo"))
		cfg.Create = true
		b, err := Open(context.Background(), cfg)
		if err != nil {
			t.Fatalf("open: %v\nsshd log:\n%s", err, s.Log())
		}
		t.Cleanup(func() { b.Close() })
		return b
	}, backendtest.Options{ManyObjects: 300})
}

// What the suite cannot see: the layout Create makes, the bytes on the
// server's disk, temporary files hidden from List and none left behind.
func TestServerSide(t *testing.T) {
	b, s, dir := openTestRepo(t)
	ctx := context.Background()

	for _, d := range []string{"keys", "index", "manifests", "locks", "data/00", "data/7f", "data/ff"} {
		if st, err := os.Stat(filepath.Join(dir, d)); err != nil || !st.IsDir() {
			t.Fatalf("layout directory %s missing after Create: %v", d, err)
		}
	}
	if loc := b.Location(); loc != "sftp://"+s.User+"@"+s.Addr+dir {
		t.Fatalf("Location = %q", loc)
	}

	data := backendtest.RandomBytes(t, 3<<20+17)
	name := backendtest.DataName(data)
	if err := b.Put(ctx, name, data); err != nil {
		t.Fatalf("put: %v", err)
	}
	onDisk, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil || !bytes.Equal(onDisk, data) {
		t.Fatalf("server file differs from upload (err %v)", err)
	}
	if err := b.Put(ctx, name, []byte("other")); !errors.Is(err, backend.ErrExist) {
		t.Fatalf("second put: %v, want ErrExist", err)
	}
	if onDisk, _ := os.ReadFile(filepath.Join(dir, name)); !bytes.Equal(onDisk, data) {
		t.Fatalf("second put changed the object")
	}
	if err := os.WriteFile(filepath.Join(dir, "data", name[5:7], ".tmp-leftover"), []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	var names []string
	if err := b.List(ctx, "data/", func(oi backend.ObjectInfo) error { names = append(names, oi.Name); return nil }); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(names, []string{name}) {
		t.Fatalf("list data/ = %v, want only %s (no temporary file)", names, name)
	}

	// No temporary files remain after normal uploads (rename allowed).
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && strings.HasPrefix(d.Name(), tmpPrefix) && d.Name() != ".tmp-leftover" {
			t.Errorf("temporary file left: %s", p)
		}
		return nil
	})
}

func TestOpenMissingRepository(t *testing.T) {
	s := testsshd.Start(t, testsshd.Options{})
	_, err := Open(context.Background(), serverConfig(s, filepath.Join(t.TempDir(), "nope")))
	if !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("open of a missing repository: %v, want ErrNotExist", err)
	}
}

func TestURL(t *testing.T) {
	for _, tc := range []struct{ in, addr, root, loc string }{
		{"sftp://bob@example.org/srv/r", "example.org:22", "/srv/r", "sftp://bob@example.org/srv/r"},
		{"sftp://bob@example.org:2222/srv/r/", "example.org:2222", "/srv/r", "sftp://bob@example.org:2222/srv/r"},
		{"sftp://bob@[::1]:2222/r", "[::1]:2222", "/r", "sftp://bob@[::1]:2222/r"},
		{"sftp://bob@[::1]/r", "[::1]:22", "/r", "sftp://bob@[::1]/r"},
	} {
		tg, err := parseURL(tc.in)
		if err != nil || tg.addr != tc.addr || tg.root != tc.root || tg.location() != tc.loc {
			t.Errorf("parseURL(%q) = %+v, %q, %v", tc.in, tg, tg.location(), err)
		}
	}
	for _, bad := range []string{"http://h/x", "sftp://bob:secret@h/x", "sftp://bob@/x", "sftp://bob@h:99999/x", "sftp://bob@h"} {
		_, err := parseURL(bad)
		if err == nil {
			t.Errorf("parseURL(%q) accepted", bad)
		} else if strings.Contains(err.Error(), "secret") {
			t.Errorf("error leaks the password: %v", err)
		}
	}
}

func TestUnknownHostKey(t *testing.T) {
	s := testsshd.Start(t, testsshd.Options{})
	dir := t.TempDir()
	cfg := serverConfig(s, dir)
	cfg.KnownHostsFile = filepath.Join(dir, "known_hosts") // does not exist
	_, err := Open(context.Background(), cfg)
	var uh *UnknownHostKeyError
	if !errors.As(err, &uh) {
		t.Fatalf("open with unknown host key: %v", err)
	}
	wantLine := knownhosts.Line([]string{knownhosts.Normalize(s.Addr)}, s.HostKey)
	if !strings.Contains(err.Error(), s.HostKeyFingerprint) || !strings.Contains(err.Error(), wantLine) {
		t.Fatalf("error does not show fingerprint %s and line %q:\n%v", s.HostKeyFingerprint, wantLine, err)
	}
	if _, serr := os.Stat(cfg.KnownHostsFile); serr == nil {
		t.Fatalf("known_hosts written without AcceptNewHostKey")
	}
}

func TestAcceptNewHostKey(t *testing.T) {
	s := testsshd.Start(t, testsshd.Options{})
	dir := t.TempDir()
	cfg := serverConfig(s, dir)
	cfg.KnownHostsFile = filepath.Join(dir, "ssh", "known_hosts")
	cfg.AcceptNewHostKey = true
	cfg.Connections = 3
	b, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("open with AcceptNewHostKey: %v", err)
	}
	b.Close()
	stored, err := os.ReadFile(cfg.KnownHostsFile)
	if err != nil {
		t.Fatal(err)
	}
	// Exactly one line, although three connections were made.
	want := knownhosts.Line([]string{knownhosts.Normalize(s.Addr)}, s.HostKey) + "\n"
	if string(stored) != want {
		t.Fatalf("known_hosts = %q, want %q", stored, want)
	}
	cfg.AcceptNewHostKey = false
	b, err = Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("reopen with the stored key: %v", err)
	}
	b.Close()

	// Another server (another host key) on a known address is refused,
	// AcceptNewHostKey or not.
	other := testsshd.Start(t, testsshd.Options{})
	line := knownhosts.Line([]string{knownhosts.Normalize(other.Addr)}, s.HostKey)
	if err := os.WriteFile(cfg.KnownHostsFile, []byte(line+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ocfg := serverConfig(other, dir)
	ocfg.KnownHostsFile = cfg.KnownHostsFile
	ocfg.AcceptNewHostKey = true
	_, err = Open(context.Background(), ocfg)
	var ke *knownhosts.KeyError
	if !errors.As(err, &ke) || len(ke.Want) == 0 {
		t.Fatalf("open with a changed host key: %v, want *knownhosts.KeyError with Want", err)
	}
	if !strings.Contains(err.Error(), "HOST KEY MISMATCH") || !strings.Contains(err.Error(), other.HostKeyFingerprint) {
		t.Fatalf("mismatch error is not loud enough: %v", err)
	}
	if after, _ := os.ReadFile(cfg.KnownHostsFile); string(after) != line+"\n" {
		t.Fatalf("known_hosts changed on mismatch: %q", after)
	}
}

func TestWrongClientKey(t *testing.T) {
	s := testsshd.Start(t, testsshd.Options{})
	other := testsshd.Start(t, testsshd.Options{}) // its client key is not authorised on s
	cfg := serverConfig(s, t.TempDir())
	cfg.KeyFile = other.ClientKeyFile
	t.Setenv("SSH_AUTH_SOCK", "")
	_, err := Open(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "unable to authenticate") {
		t.Fatalf("open with an unauthorised key: %v", err)
	}
}

func TestKeyFilePermissions(t *testing.T) {
	s := testsshd.Start(t, testsshd.Options{})
	key, err := os.ReadFile(s.ClientKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, mode := range []os.FileMode{0o644, 0o640, 0o604} {
		f := filepath.Join(dir, "key")
		os.Remove(f)
		if err := os.WriteFile(f, key, mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(f, mode)
		cfg := serverConfig(s, dir)
		cfg.KeyFile = f
		_, err := Open(context.Background(), cfg)
		if err == nil || !strings.Contains(err.Error(), "chmod 600") {
			t.Fatalf("key file mode %04o: %v", mode, err)
		}
	}
}

// GetInto reads an object without asking its size: on a server that
// denies fstat it still works, where GetAll (which bounds the object by
// fstat first) fails. One round trip less for each chunk of a restore.
func TestGetIntoWithoutFstat(t *testing.T) {
	s := testsshd.Start(t, testsshd.Options{Config: []string{"ForceCommand internal-sftp -P fstat"}})
	dir := filepath.Join(t.TempDir(), "repo")
	cfg := serverConfig(s, dir)
	cfg.Create = true
	b, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	data := backendtest.RandomBytes(t, 600<<10)
	name := backendtest.DataName(data)
	if err := os.WriteFile(filepath.Join(dir, filepath.FromSlash(name)), data, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := b.GetAll(ctx, name, 1<<20); err == nil {
		t.Fatal("getall worked although the server denies fstat: the test proves nothing")
	}
	buf := make([]byte, 1<<20)
	if n, err := b.GetInto(ctx, name, buf); err != nil || !bytes.Equal(buf[:n], data) {
		t.Fatalf("getinto on a server that denies fstat: %d bytes, %v", n, err)
	}
}
