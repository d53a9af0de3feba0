package testsshd

import (
	"bytes"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"
)

func run(t *testing.T, c *ssh.Client, cmd string) string {
	t.Helper()
	sess, err := c.NewSession()
	if err != nil {
		t.Fatalf("session: %v", err)
	}
	defer sess.Close()
	out, err := sess.CombinedOutput(cmd)
	if err != nil {
		t.Fatalf("%s: %v: %s", cmd, err, out)
	}
	return string(out)
}

func TestShellCommand(t *testing.T) {
	s := Start(t, Options{})
	c := s.Dial()
	if got := run(t, c, "echo hello; id -un"); !strings.HasPrefix(got, "hello\n"+s.User) {
		t.Fatalf("output %q, want hello and %s", got, s.User)
	}
	if !strings.HasPrefix(s.HostKeyFingerprint, "SHA256:") {
		t.Fatalf("fingerprint %q", s.HostKeyFingerprint)
	}
}

func TestOtherUser(t *testing.T) {
	s := Start(t, Options{User: "backup", Config: []string{"Match User backup", "  ForceCommand internal-sftp"}})
	c := s.Dial()
	sess, err := c.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	if err := sess.RequestSubsystem("sftp"); err != nil {
		t.Fatalf("sftp subsystem as backup: %v", err)
	}
}

func TestStopRestart(t *testing.T) {
	s := Start(t, Options{})
	c := s.Dial()
	oldPID := s.PID
	s.Restart()
	if s.PID == oldPID {
		t.Fatalf("PID unchanged after restart")
	}
	// The old connection died with the old server.
	if _, err := c.NewSession(); err == nil {
		t.Fatalf("session on a connection to a stopped sshd succeeded")
	}
	c2 := s.Dial()
	if got := run(t, c2, "echo again"); got != "again\n" {
		t.Fatalf("after restart: %q", got)
	}
	s.Stop()
	if _, err := ssh.Dial("tcp", s.Addr, s.ClientConfig()); err == nil {
		t.Fatalf("dial after Stop succeeded")
	}
}

func TestWrongHostKeyRejected(t *testing.T) {
	s := Start(t, Options{})
	other := Start(t, Options{})
	cfg := s.ClientConfig()
	cfg.HostKeyCallback = ssh.FixedHostKey(other.HostKey)
	if _, err := ssh.Dial("tcp", s.Addr, cfg); err == nil || !bytes.Contains([]byte(err.Error()), []byte("host key")) {
		t.Fatalf("dial with wrong host key: %v", err)
	}
}
