// Package testsshd starts a real OpenSSH sshd on 127.0.0.1 for tests.
//
// Each server gets its own temporary directory with an sshd_config, an
// ed25519 host key, a client key pair, authorized_keys and a known_hosts
// file that trusts the host key, so a test can connect with
// golang.org/x/crypto/ssh exactly as production code would. The server is
// stopped with t.Cleanup; only processes it started are signalled.
package testsshd

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// SSHDPath is where Debian's openssh-server installs the daemon. sshd
// refuses to re-exec itself unless started with an absolute path.
const SSHDPath = "/usr/sbin/sshd"

// Options adjusts the server.
type Options struct {
	// User is the account clients log in as; empty means the account the
	// test runs as (root on CI, which has a shell for guest commands). A
	// different account needs the test to run as root; a locked password
	// ("!") is replaced by "*" because sshd refuses locked accounts even
	// for key authentication when PAM is off.
	User string
	// Config lines are appended to the generated sshd_config, for example
	// a "Match User backup" block with ChrootDirectory and ForceCommand.
	// Match blocks must come last, which appending guarantees.
	Config []string
}

// Server is a running sshd.
type Server struct {
	// Addr is "127.0.0.1:port".
	Addr string
	// Port is the TCP port sshd listens on.
	Port int
	// User is the login account.
	User string
	// Dir is the server's private temporary directory.
	Dir string
	// ClientKeyFile is an unencrypted OpenSSH ed25519 private key (mode
	// 0600) that authorized_keys accepts.
	ClientKeyFile string
	// ClientSigner is the same key, parsed.
	ClientSigner ssh.Signer
	// KnownHostsFile holds one line trusting the host key at Addr.
	KnownHostsFile string
	// HostKey is the server's public host key.
	HostKey ssh.PublicKey
	// HostKeyFingerprint is HostKey's "SHA256:…" fingerprint.
	HostKeyFingerprint string
	// PID is the listening sshd's process ID (changes on Restart).
	PID int

	t          testing.TB
	configFile string
	logFile    string
	cmd        *exec.Cmd
	exited     chan struct{}
}

// Start writes a configuration and starts sshd, failing the test if it
// cannot. The server is stopped when the test ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	if _, err := os.Stat(SSHDPath); err != nil {
		t.Fatalf("%s not found: install openssh-server (apt-get install openssh-server)", SSHDPath)
	}
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		t.Fatalf("create sshd privilege separation directory: %v", err)
	}
	login := opts.User
	if login == "" {
		u, err := user.Current()
		if err != nil {
			t.Fatalf("current user: %v", err)
		}
		login = u.Username
	} else if err := unlockAccount(login); err != nil {
		t.Fatalf("prepare account %s: %v", login, err)
	}

	// Not t.TempDir: its parents are 0700, and sshd reads authorized_keys
	// as the target user, who must be able to traverse the directory.
	dir, err := os.MkdirTemp("", "testsshd-")
	if err != nil {
		t.Fatalf("temp dir: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatalf("chmod temp dir: %v", err)
	}

	s := &Server{
		User:           login,
		Dir:            dir,
		ClientKeyFile:  filepath.Join(dir, "client_ed25519"),
		KnownHostsFile: filepath.Join(dir, "known_hosts"),
		t:              t,
		configFile:     filepath.Join(dir, "sshd_config"),
		logFile:        filepath.Join(dir, "sshd.log"),
	}
	hostKeyFile := filepath.Join(dir, "host_ed25519")
	s.HostKey, _, err = writeKey(hostKeyFile)
	if err != nil {
		t.Fatalf("host key: %v", err)
	}
	s.HostKeyFingerprint = ssh.FingerprintSHA256(s.HostKey)
	clientPub, clientSigner, err := writeKey(s.ClientKeyFile)
	if err != nil {
		t.Fatalf("client key: %v", err)
	}
	s.ClientSigner = clientSigner
	authKeys := filepath.Join(dir, "authorized_keys")
	if err := os.WriteFile(authKeys, ssh.MarshalAuthorizedKey(clientPub), 0o644); err != nil {
		t.Fatalf("authorized_keys: %v", err)
	}

	// A port picked by the kernel may be taken again before sshd binds
	// it; retry a few times with a fresh one.
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		port, err := freePort()
		if err != nil {
			t.Fatalf("free port: %v", err)
		}
		s.Port = port
		s.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		cfg := configText(port, hostKeyFile, authKeys, filepath.Join(dir, "sshd.pid"), opts.Config)
		if err := os.WriteFile(s.configFile, []byte(cfg), 0o644); err != nil {
			t.Fatalf("write sshd_config: %v", err)
		}
		line := knownhosts.Line([]string{knownhosts.Normalize(s.Addr)}, s.HostKey)
		if err := os.WriteFile(s.KnownHostsFile, []byte(line+"\n"), 0o600); err != nil {
			t.Fatalf("write known_hosts: %v", err)
		}
		if lastErr = s.start(); lastErr == nil {
			t.Cleanup(s.Stop)
			return s
		}
	}
	t.Fatalf("start sshd: %v", lastErr)
	return nil
}

func configText(port int, hostKey, authKeys, pidFile string, extra []string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "ListenAddress 127.0.0.1\nPort %d\n", port)
	fmt.Fprintf(&b, "HostKey %s\nPidFile %s\nAuthorizedKeysFile %s\n", hostKey, pidFile, authKeys)
	b.WriteString("PasswordAuthentication no\nKbdInteractiveAuthentication no\n")
	b.WriteString("PubkeyAuthentication yes\nPermitRootLogin prohibit-password\n")
	b.WriteString("UsePAM no\nStrictModes no\nUseDNS no\nLogLevel VERBOSE\n")
	b.WriteString("MaxStartups 100\nMaxSessions 100\n")
	b.WriteString("Subsystem sftp internal-sftp\n")
	for _, l := range extra {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	return b.String()
}

// start launches sshd on s.Port and waits until it answers with an SSH
// banner.
func (s *Server) start() error {
	logf, err := os.OpenFile(s.logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(SSHDPath, "-D", "-e", "-f", s.configFile)
	cmd.Stdin = nil
	cmd.Stdout = logf
	cmd.Stderr = logf
	// Own process group, so a terminal's Ctrl-C to the test does not
	// reach sshd before cleanup runs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("run %s: %w", SSHDPath, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	s.cmd, s.exited, s.PID = cmd, exited, cmd.Process.Pid

	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return fmt.Errorf("sshd exited during startup: %s", s.Log())
		default:
		}
		if banner(s.Addr) {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.Stop()
	return fmt.Errorf("sshd not ready after 10s: %s", s.Log())
}

// banner reports whether an SSH server answers at addr.
func banner(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && strings.HasPrefix(line, "SSH-2.0-")
}

// Stop kills sshd and every session process it forked (they run in their
// own sessions, so a process-group kill would miss them), dropping all
// connections at once as a crashed or rebooted server would. Stop is
// idempotent.
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	select {
	case <-s.exited:
	default:
		// Signal the listener first so it forks no new children, then
		// its descendants.
		s.cmd.Process.Signal(syscall.SIGSTOP)
		for _, pid := range descendants(s.PID) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		s.cmd.Process.Kill()
		<-s.exited
	}
	s.cmd = nil
}

// Restart stops sshd and starts it again on the same port with the same
// keys and configuration.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	var err error
	for attempt := 0; attempt < 50; attempt++ {
		if err = s.start(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.t.Fatalf("restart sshd: %v", err)
}

// Log returns sshd's output so far, for failure messages.
func (s *Server) Log() string {
	b, _ := os.ReadFile(s.logFile)
	return string(b)
}

// ClientConfig returns a client configuration that authenticates with the
// client key and checks the host key against KnownHostsFile.
func (s *Server) ClientConfig() *ssh.ClientConfig {
	s.t.Helper()
	cb, err := knownhosts.New(s.KnownHostsFile)
	if err != nil {
		s.t.Fatalf("known_hosts: %v", err)
	}
	return &ssh.ClientConfig{
		User:            s.User,
		Auth:            []ssh.AuthMethod{ssh.PublicKeys(s.ClientSigner)},
		HostKeyCallback: cb,
		Timeout:         10 * time.Second,
	}
}

// Dial connects and authenticates as User.
func (s *Server) Dial() *ssh.Client {
	s.t.Helper()
	c, err := ssh.Dial("tcp", s.Addr, s.ClientConfig())
	if err != nil {
		s.t.Fatalf("ssh dial %s: %v\nsshd log:\n%s", s.Addr, err, s.Log())
	}
	s.t.Cleanup(func() { c.Close() })
	return c
}

// writeKey creates an ed25519 key, stores its private half at file (0600)
// in OpenSSH format, and returns the public key and a signer.
func writeKey(file string) (ssh.PublicKey, ssh.Signer, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	block, err := ssh.MarshalPrivateKey(priv, "testsshd")
	if err != nil {
		return nil, nil, err
	}
	if err := os.WriteFile(file, pem.EncodeToMemory(block), 0o600); err != nil {
		return nil, nil, err
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		return nil, nil, err
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		return nil, nil, err
	}
	return sshPub, signer, nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// descendants returns the PIDs of every process below pid, found through
// /proc.
func descendants(pid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	parent := map[int]int{}
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// The command name in parentheses may contain spaces; fields
		// after the last ')' are "state ppid …".
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(stat[i+1:]))
		if len(f) < 2 {
			continue
		}
		if pp, err := strconv.Atoi(f[1]); err == nil {
			parent[p] = pp
		}
	}
	var out []int
	want := map[int]bool{pid: true}
	for changed := true; changed; {
		changed = false
		for p, pp := range parent {
			if want[pp] && !want[p] {
				want[p] = true
				out = append(out, p)
				changed = true
			}
		}
	}
	return out
}

// unlockAccount makes a locked account ("!" password) usable for key
// authentication by setting its password field to "*" (no password can
// match, but the account is not locked).
func unlockAccount(name string) error {
	if _, err := user.Lookup(name); err != nil {
		return err
	}
	shadow, err := os.ReadFile("/etc/shadow")
	if err != nil {
		return fmt.Errorf("read /etc/shadow (tests with another account run as root): %w", err)
	}
	for _, line := range strings.Split(string(shadow), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) < 2 || f[0] != name {
			continue
		}
		if !strings.HasPrefix(f[1], "!") {
			return nil
		}
		out, err := exec.Command("usermod", "-p", "*", name).CombinedOutput()
		if err != nil {
			return fmt.Errorf("usermod -p '*' %s: %v: %s", name, err, out)
		}
		return nil
	}
	return errors.New("no /etc/shadow entry")
}
