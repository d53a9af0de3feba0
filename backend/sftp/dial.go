package sftp

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	sftplib "github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"
	"golang.org/x/crypto/ssh/knownhosts"

	"vmvault/internal/sshkey"
)

const (
	// dialTimeout bounds TCP connect plus SSH handshake plus SFTP init.
	dialTimeout = 30 * time.Second
	// keepaliveInterval is how often an idle-looking connection is
	// probed; a probe unanswered for as long closes the connection, so
	// requests on a silently dead link fail instead of hanging forever.
	keepaliveInterval = 20 * time.Second
	// maxPacketOpenSSH is the payload size used with OpenSSH servers:
	// sftp-server accepts messages up to 256 KiB and reads up to 256 KiB
	// minus 1 KiB. Large packets cut per-request overhead, which is what
	// limits throughput on a fast link. Other servers get the 32 KiB every
	// server must accept.
	maxPacketOpenSSH = 256*1024 - 1024
	maxPacketSafe    = 32 * 1024
	// requestsPerFile is how many SFTP requests one transfer keeps in
	// flight.
	requestsPerFile = 64
)

// UnknownHostKeyError reports a server whose host key is not in the known
// hosts file. Its message shows the key's fingerprint and the line to add.
type UnknownHostKeyError struct {
	Host           string        // host:port as dialled
	Key            ssh.PublicKey // the key the server presented
	Fingerprint    string        // SHA256:…
	Line           string        // known_hosts line trusting Key for Host
	KnownHostsFile string
}

func (e *UnknownHostKeyError) Error() string {
	return fmt.Sprintf("sftp: the host key of %s is not known (no entry in %s).\n"+
		"The server presents a %s key with fingerprint %s.\n"+
		"Compare it with the server's own key (on the server: ssh-keygen -lf /etc/ssh/ssh_host_%s_key.pub), then add this line to %s:\n%s\n"+
		"or connect once with AcceptNewHostKey (--accept-new-host-key) to store it.",
		e.Host, e.KnownHostsFile, e.Key.Type(), e.Fingerprint, keyFileStem(e.Key.Type()), e.KnownHostsFile, e.Line)
}

func keyFileStem(keyType string) string {
	switch {
	case strings.Contains(keyType, "ed25519"):
		return "ed25519"
	case strings.Contains(keyType, "ecdsa"):
		return "ecdsa"
	default:
		return "rsa"
	}
}

// hostKeys verifies server keys against a known_hosts file, reloading it
// on each connection so a key appended by one connection is known to the
// next.
type hostKeys struct {
	file      string
	acceptNew bool
	logf      func(msg string, args ...any)
	mu        sync.Mutex // serialises appends
}

func (h *hostKeys) load() (ssh.HostKeyCallback, error) {
	cb, err := knownhosts.New(h.file)
	if errors.Is(err, fs.ErrNotExist) {
		// No file yet: every host is unknown.
		return func(string, net.Addr, ssh.PublicKey) error {
			return &knownhosts.KeyError{}
		}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read known hosts %s: %w", h.file, err)
	}
	return cb, nil
}

// config returns a host key callback and the key algorithms to ask the
// server for. Asking only for algorithms already known for the host
// avoids a false mismatch when the server has several host keys (say RSA
// and ed25519) and known_hosts lists only one.
func (h *hostKeys) config(addr string) (ssh.HostKeyCallback, []string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	known, err := h.load()
	if err != nil {
		return nil, nil, err
	}
	algos := sshkey.KnownAlgorithms(known, addr)
	cb := func(hostname string, remote net.Addr, key ssh.PublicKey) error {
		err := known(hostname, remote, key)
		var ke *knownhosts.KeyError
		if !errors.As(err, &ke) {
			return err
		}
		if len(ke.Want) > 0 {
			var want []string
			for _, k := range ke.Want {
				want = append(want, fmt.Sprintf("%s %s (%s:%d)", k.Key.Type(), ssh.FingerprintSHA256(k.Key), k.Filename, k.Line))
			}
			return fmt.Errorf("sftp: HOST KEY MISMATCH for %s: the server presents %s %s but the known hosts file expects %s.\n"+
				"Someone may be intercepting the connection (man-in-the-middle), or the server's host key was replaced. Refusing to connect.\n"+
				"If the change is legitimate, remove the old entry (ssh-keygen -R '%s' -f %s) and add the new key: %w",
				hostname, key.Type(), ssh.FingerprintSHA256(key), strings.Join(want, ", "),
				knownhosts.Normalize(hostname), h.file, ke)
		}
		line := knownhosts.Line([]string{knownhosts.Normalize(hostname)}, key)
		if !h.acceptNew {
			return &UnknownHostKeyError{Host: hostname, Key: key, Fingerprint: ssh.FingerprintSHA256(key), Line: line, KnownHostsFile: h.file}
		}
		if err := h.appendLine(line); err != nil {
			return err
		}
		h.logf("stored new SSH host key", "host", hostname, "fingerprint", ssh.FingerprintSHA256(key), "known_hosts", h.file)
		return nil
	}
	return cb, algos, nil
}

func (h *hostKeys) appendLine(line string) error {
	if err := os.MkdirAll(filepath.Dir(h.file), 0o700); err != nil {
		return fmt.Errorf("store host key: %w", err)
	}
	f, err := os.OpenFile(h.file, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("store host key: %w", err)
	}
	_, err = f.WriteString(line + "\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("store host key in %s: %w", h.file, err)
	}
	return nil
}

// signers loads the client's keys: the key file if given, otherwise the
// usual default files that exist, then ssh-agent's keys. The returned
// closer releases the agent connection.
func signers(keyFile string) (func() ([]ssh.Signer, error), func(), error) {
	var fileSigners []ssh.Signer
	if keyFile != "" {
		s, err := sshkey.ReadPrivateKey(keyFile)
		if err != nil {
			return nil, nil, err
		}
		fileSigners = append(fileSigners, s)
	} else if home, err := os.UserHomeDir(); err == nil {
		for _, name := range []string{"id_ed25519", "id_ecdsa", "id_rsa"} {
			f := filepath.Join(home, ".ssh", name)
			if _, err := os.Stat(f); err != nil {
				continue
			}
			s, err := sshkey.ReadPrivateKey(f)
			if err != nil {
				return nil, nil, err
			}
			fileSigners = append(fileSigners, s)
		}
	}
	var ag agent.ExtendedAgent
	closer := func() {}
	if sock := os.Getenv("SSH_AUTH_SOCK"); sock != "" {
		c, err := net.Dial("unix", sock)
		if err != nil {
			return nil, nil, fmt.Errorf("connect to ssh-agent at SSH_AUTH_SOCK: %w", err)
		}
		ag = agent.NewClient(c)
		closer = func() { c.Close() }
	}
	if len(fileSigners) == 0 && ag == nil {
		return nil, nil, errors.New("no SSH key: set a key file, or run ssh-agent with a key loaded (SSH_AUTH_SOCK), or create ~/.ssh/id_ed25519")
	}
	return func() ([]ssh.Signer, error) {
		out := append([]ssh.Signer(nil), fileSigners...)
		if ag != nil {
			s, err := ag.Signers()
			if err != nil {
				return nil, fmt.Errorf("ssh-agent: %w", err)
			}
			out = append(out, s...)
		}
		return out, nil
	}, closer, nil
}

// conn is one SSH connection with an SFTP session on it.
type conn struct {
	ssh  *ssh.Client
	sftp *sftplib.Client
	// reads is the session objects are read through; nil when the
	// server refused a second session.
	reads *readSession
	dead  chan struct{} // closed when the SSH connection has ended
	// Extensions the server offered.
	hardlink bool
	fsync    bool
}

func (c *conn) alive() bool {
	select {
	case <-c.dead:
		return false
	default:
		return true
	}
}

// close drops the SSH connection first: sftp.Client.Close waits for its
// reader, which on a hung link only returns once the transport is gone.
func (c *conn) close() {
	c.ssh.Close()
	c.sftp.Close()
}

// dial opens one connection. The whole handshake is bounded by ctx and
// dialTimeout.
func (b *Backend) dial(parent context.Context) (*conn, error) {
	c, err := b.dialTimeout(parent)
	if err != nil && parent.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		// Our own timeout, not the caller's: a slow or overloaded
		// server is worth another try, so report a network timeout
		// rather than a context error.
		return nil, fmt.Errorf("ssh %s: no answer within %v: %w", b.target.addr, dialTimeout, os.ErrDeadlineExceeded)
	}
	return c, err
}

func (b *Backend) dialTimeout(parent context.Context) (*conn, error) {
	ctx, cancel := context.WithTimeout(parent, dialTimeout)
	defer cancel()
	cb, algos, err := b.hostKeys.config(b.target.addr)
	if err != nil {
		return nil, err
	}
	cfg := &ssh.ClientConfig{
		User:              b.target.user,
		Auth:              []ssh.AuthMethod{ssh.PublicKeysCallback(b.signers)},
		HostKeyCallback:   cb,
		HostKeyAlgorithms: algos,
		Timeout:           dialTimeout,
	}
	var d net.Dialer
	tcp, err := d.DialContext(ctx, "tcp", b.target.addr)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("connect to %s: %w", b.target.addr, ctx.Err())
		}
		return nil, fmt.Errorf("connect to %s: %w", b.target.addr, err)
	}
	// Unblock the handshake when ctx ends; the deadline covers a server
	// that accepts TCP but never speaks.
	stop := context.AfterFunc(ctx, func() { tcp.Close() })
	dl, _ := ctx.Deadline()
	tcp.SetDeadline(dl)
	sc, chans, reqs, err := ssh.NewClientConn(newReadBufferedConn(tcp), b.target.addr, cfg)
	if err != nil {
		stop()
		tcp.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("ssh %s: %w", b.target.addr, ctx.Err())
		}
		return nil, fmt.Errorf("ssh %s as %s: %w", b.target.addr, b.target.user, err)
	}
	client := ssh.NewClient(sc, chans, reqs)
	// The extension list only arrives with the version packet, so the
	// packet size is decided on a first client and applied to a second
	// session if needed.
	sc1, err := sftplib.NewClient(client, sftplib.UseConcurrentWrites(true), sftplib.MaxConcurrentRequestsPerFile(requestsPerFile), sftplib.MaxPacketUnchecked(maxPacketSafe))
	if err == nil {
		if _, ok := sc1.HasExtension("limits@openssh.com"); ok {
			// OpenSSH ≥ 8.7: its limits are known (see maxPacketOpenSSH).
			sc1.Close()
			sc1, err = sftplib.NewClient(client, sftplib.UseConcurrentWrites(true), sftplib.MaxConcurrentRequestsPerFile(requestsPerFile), sftplib.MaxPacketUnchecked(maxPacketOpenSSH))
		}
	}
	if err != nil {
		stop()
		client.Close()
		return nil, fmt.Errorf("start SFTP session on %s (is the sftp subsystem enabled?): %w", b.target.addr, err)
	}
	// Reads get a session of their own (see readSession); a failure of
	// it closes the connection, which Reconnect then replaces. A server
	// that refuses a second session is read through the library.
	rs, rerr := startReadSession(ctx, client, maxPacketSafe, func() { client.Close() })
	stop()
	if rerr != nil {
		if ctx.Err() != nil {
			sc1.Close()
			client.Close()
			return nil, fmt.Errorf("ssh %s: %w", b.target.addr, ctx.Err())
		}
		b.log.Info("no second SFTP session for reads; reading through the main session", "error", rerr)
	}
	tcp.SetDeadline(time.Time{})
	c := &conn{ssh: client, sftp: sc1, reads: rs, dead: make(chan struct{})}
	_, c.hardlink = sc1.HasExtension("hardlink@openssh.com")
	_, c.fsync = sc1.HasExtension("fsync@openssh.com")
	go func() { client.Wait(); close(c.dead) }()
	go keepalive(c)
	return c, nil
}

// keepalive probes the connection periodically and closes it when the
// server stops answering, so that requests fail (and get retried) rather
// than hang on a link that died without a TCP reset.
func keepalive(c *conn) {
	t := time.NewTicker(keepaliveInterval)
	defer t.Stop()
	for {
		select {
		case <-c.dead:
			return
		case <-t.C:
		}
		answered := make(chan struct{})
		go func() {
			c.ssh.SendRequest("keepalive@openssh.com", true, nil)
			close(answered)
		}()
		select {
		case <-answered:
		case <-c.dead:
			return
		case <-time.After(keepaliveInterval):
			c.ssh.Close()
			return
		}
	}
}

// connReadBuffer is how much the SSH transport's connection reads from
// the socket at a time.
const connReadBuffer = 256 << 10

// readBufferedConn gives the SSH transport a large read buffer. The
// transport reads each packet through a 4 KiB bufio.Reader: the packet's
// length prefix fills those 4 KiB from the socket and the rest of a 32 KiB
// data packet takes a second system call, so a restore made two reads per
// packet. Through this buffer one read takes in whatever the socket holds,
// often several packets.
type readBufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func newReadBufferedConn(c net.Conn) *readBufferedConn {
	return &readBufferedConn{Conn: c, r: bufio.NewReaderSize(c, connReadBuffer)}
}

func (c *readBufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }
