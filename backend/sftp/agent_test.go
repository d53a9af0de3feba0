package sftp

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"

	"vmvault/internal/testsshd"
)

// startAgent runs a real ssh-agent holding keyFile's key and returns its
// socket path.
func startAgent(t *testing.T, keyFile string) string {
	t.Helper()
	bin, err := exec.LookPath("ssh-agent")
	if err != nil {
		t.Fatalf("ssh-agent not found: install openssh-client (apt-get install openssh-client)")
	}
	sock := filepath.Join(t.TempDir(), "agent.sock")
	cmd := exec.Command(bin, "-D", "-a", sock)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	var c net.Conn
	for i := 0; i < 200; i++ {
		if c, err = net.Dial("unix", sock); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("ssh-agent socket: %v", err)
	}
	defer c.Close()
	pem, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ssh.ParseRawPrivateKey(pem)
	if err != nil {
		t.Fatal(err)
	}
	if err := agent.NewClient(c).Add(agent.AddedKey{PrivateKey: key}); err != nil {
		t.Fatalf("ssh-add: %v", err)
	}
	return sock
}

func TestAgentAuthentication(t *testing.T) {
	s := testsshd.Start(t, testsshd.Options{})
	t.Setenv("HOME", t.TempDir()) // no default key files
	cfg := serverConfig(s, t.TempDir())
	cfg.KeyFile = ""

	t.Setenv("SSH_AUTH_SOCK", "")
	if _, err := Open(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "no SSH key") {
		t.Fatalf("open without any key: %v", err)
	}

	t.Setenv("SSH_AUTH_SOCK", startAgent(t, s.ClientKeyFile))
	b, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("open with ssh-agent: %v", err)
	}
	defer b.Close()
	if err := b.Put(context.Background(), "keys/k", []byte("k")); err != nil {
		t.Fatalf("put over agent-authenticated connection: %v", err)
	}
}
