package sftp

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"vmvault/internal/testsshd"
)

// repoURL is the sftp URL of dir on s.
func repoURL(s *testsshd.Server, dir string) string {
	return fmt.Sprintf("sftp://%s@%s%s", s.User, s.Addr, dir)
}

// serverConfig returns a Config for dir on s with the server's keys.
func serverConfig(s *testsshd.Server, dir string) Config {
	return Config{
		URL:            repoURL(s, dir),
		KeyFile:        s.ClientKeyFile,
		KnownHostsFile: s.KnownHostsFile,
		Connections:    2,
	}
}

// openTestRepo starts an sshd as the current user and creates a
// repository in a fresh directory.
func openTestRepo(t *testing.T) (*Backend, *testsshd.Server, string) {
	t.Helper()
	s := testsshd.Start(t, testsshd.Options{})
	dir := filepath.Join(t.TempDir(), "repo")
	cfg := serverConfig(s, dir)
	cfg.Create = true
	b, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("open: %v\nsshd log:\n%s", err, s.Log())
	}
	t.Cleanup(func() { b.Close() })
	return b, s, dir
}

// srvDir makes a root-owned, world-traversable directory under /srv: a
// chroot must be root-owned on every path component and other accounts
// cannot traverse the test's 0700 temp directories.
func srvDir(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: sshd must switch to the backup account")
	}
	if err := os.MkdirAll("/srv", 0o755); err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("/srv", "vmvault-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// makeLayout creates the repository layout under dir owned by owner, the
// way docs/server.md tells an administrator to.
func makeLayout(t *testing.T, dir, owner string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range layoutDirs() {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("chown", "-R", owner+":", dir).CombinedOutput(); err != nil {
		t.Fatalf("chown: %v: %s", err, out)
	}
}
