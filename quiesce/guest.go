package quiesce

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"vmvault/internal/sshkey"
)

// GuestConfig says how to reach a VM's guest over SSH and what to run there
// around the snapshot.
type GuestConfig struct {
	// Addr is "host" or "host:port" (port 22 if omitted).
	Addr string
	// User is the login account. fsfreeze needs root, or a FreezeCommand
	// like "sudo -n fsfreeze".
	User string
	// KeyFile is an unencrypted private key. It must not be readable by
	// group or others.
	KeyFile string
	// KnownHostsFile verifies the guest's host key; default
	// ~/.ssh/known_hosts. Unknown or changed keys are refused.
	KnownHostsFile string
	// BeforeSnapshot commands run in order (through the guest's shell)
	// before sync, for example to trim logs or zero free space.
	BeforeSnapshot []string
	// AfterSnapshot commands run in order once everything is released,
	// and also when Hold fails after BeforeSnapshot started.
	AfterSnapshot []string
	// FreezeMounts are mount points frozen with "FreezeCommand -f" after
	// the databases are locked and thawed with "FreezeCommand -u".
	FreezeMounts []string
	// FreezeCommand defaults to "fsfreeze".
	FreezeCommand string
	// FreezeTimeout bounds each freeze command; default 30s. Thaw
	// commands get at least the default.
	FreezeTimeout time.Duration
	// CommandTimeout bounds each BeforeSnapshot/AfterSnapshot command and
	// sync; default 10 minutes.
	CommandTimeout time.Duration
	// ConnectTimeout bounds the SSH connection and handshake; default 15s.
	ConnectTimeout time.Duration
}

// Defaults for GuestConfig's zero values.
const (
	defaultFreezeCommand  = "fsfreeze"
	defaultFreezeTimeout  = 30 * time.Second
	defaultCommandTimeout = 10 * time.Minute
	defaultConnectTimeout = 15 * time.Second
	maxCapturedOutput     = 4096
)

// HostKeyError is returned when a guest's host key is not in the known
// hosts file (Known false) or differs from the one recorded there.
type HostKeyError struct {
	VM          string
	Host        string
	KeyType     string
	Fingerprint string // "SHA256:…" of the key the guest presented
	KnownHosts  string
	Known       bool // the host is listed, with a different key
}

// Error implements error.
func (e *HostKeyError) Error() string {
	if e.Known {
		return fmt.Sprintf("VM %s: guest %s presented host key %s %s, which does not match %s: possible man-in-the-middle attack, refusing to connect",
			e.VM, e.Host, e.KeyType, e.Fingerprint, e.KnownHosts)
	}
	return fmt.Sprintf("VM %s: guest %s presented unknown host key %s %s: not in %s; verify it and add it to that file",
		e.VM, e.Host, e.KeyType, e.Fingerprint, e.KnownHosts)
}

// CommandError is a guest command that failed or exited non-zero.
type CommandError struct {
	VM      string
	Command string
	// ExitStatus is the command's exit status, or -1 if it has none (the
	// command was killed, timed out or the connection broke).
	ExitStatus int
	Stderr     string
	Err        error
}

// Error implements error.
func (e *CommandError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "VM %s: guest command %q", e.VM, e.Command)
	if e.ExitStatus >= 0 {
		fmt.Fprintf(&b, " exited with status %d", e.ExitStatus)
	} else {
		fmt.Fprintf(&b, " failed: %v", e.Err)
	}
	if s := strings.TrimSpace(e.Stderr); s != "" {
		fmt.Fprintf(&b, "; stderr: %s", s)
	}
	return b.String()
}

// Unwrap returns the underlying error.
func (e *CommandError) Unwrap() error { return e.Err }

// guest is an SSH connection to one VM's guest.
type guest struct {
	vm     string
	cfg    GuestConfig
	addr   string
	client *ssh.Client
	ssh    *ssh.ClientConfig
	log    *slog.Logger

	mu sync.Mutex // guards client across redial
}

func (c GuestConfig) withDefaults() (GuestConfig, error) {
	if c.FreezeCommand == "" {
		c.FreezeCommand = defaultFreezeCommand
	}
	if c.FreezeTimeout <= 0 {
		c.FreezeTimeout = defaultFreezeTimeout
	}
	if c.CommandTimeout <= 0 {
		c.CommandTimeout = defaultCommandTimeout
	}
	if c.ConnectTimeout <= 0 {
		c.ConnectTimeout = defaultConnectTimeout
	}
	if c.KnownHostsFile == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return c, fmt.Errorf("default known_hosts: %w", err)
		}
		c.KnownHostsFile = filepath.Join(home, ".ssh", "known_hosts")
	}
	return c, nil
}

// dialGuest connects to the guest with key authentication and a verified
// host key.
func dialGuest(ctx context.Context, vm string, cfg GuestConfig, log *slog.Logger) (*guest, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("VM %s: %w", vm, err)
	}
	addr := cfg.Addr
	if _, _, err := net.SplitHostPort(addr); err != nil {
		addr = net.JoinHostPort(addr, "22")
	}
	signer, err := sshkey.ReadPrivateKey(cfg.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("VM %s: %w", vm, err)
	}
	known, err := knownhosts.New(cfg.KnownHostsFile)
	if err != nil {
		return nil, fmt.Errorf("VM %s: read known hosts: %w", vm, err)
	}
	g := &guest{vm: vm, cfg: cfg, addr: addr, log: log}
	g.ssh = &ssh.ClientConfig{
		User:              cfg.User,
		Auth:              []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback:   g.verifyHostKey(known),
		HostKeyAlgorithms: sshkey.KnownAlgorithms(known, addr),
		Timeout:           cfg.ConnectTimeout,
	}
	if err := g.dial(ctx); err != nil {
		return nil, err
	}
	return g, nil
}

func (g *guest) dial(ctx context.Context) error {
	dctx, cancel := context.WithTimeout(ctx, g.cfg.ConnectTimeout)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(dctx, "tcp", g.addr)
	if err != nil {
		return fmt.Errorf("VM %s: connect to guest %s: %w", g.vm, g.addr, err)
	}
	// The handshake has no context parameter; a deadline on the socket
	// bounds it instead.
	if dl, ok := dctx.Deadline(); ok {
		_ = nc.SetDeadline(dl)
	}
	conn, chans, reqs, err := ssh.NewClientConn(nc, g.addr, g.ssh)
	if err != nil {
		nc.Close()
		var hk *HostKeyError
		if errors.As(err, &hk) {
			return hk
		}
		return fmt.Errorf("VM %s: ssh to guest %s as %s: %w", g.vm, g.addr, g.cfg.User, err)
	}
	_ = nc.SetDeadline(time.Time{})
	g.mu.Lock()
	g.client = ssh.NewClient(conn, chans, reqs)
	g.mu.Unlock()
	return nil
}

// verifyHostKey wraps the known_hosts check so a refusal names the VM,
// the guest and the key's fingerprint.
func (g *guest) verifyHostKey(known ssh.HostKeyCallback) ssh.HostKeyCallback {
	return func(hostname string, remote net.Addr, key ssh.PublicKey) error {
		err := known(hostname, remote, key)
		if err == nil {
			return nil
		}
		var ke *knownhosts.KeyError
		if errors.As(err, &ke) {
			return &HostKeyError{
				VM: g.vm, Host: hostname, KeyType: key.Type(),
				Fingerprint: ssh.FingerprintSHA256(key),
				KnownHosts:  g.cfg.KnownHostsFile, Known: len(ke.Want) > 0,
			}
		}
		return fmt.Errorf("VM %s: guest %s host key %s: %w", g.vm, hostname, ssh.FingerprintSHA256(key), err)
	}
}

// run executes one command through the guest's shell, bounded by timeout.
func (g *guest) run(ctx context.Context, cmd string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	g.mu.Lock()
	client := g.client
	g.mu.Unlock()
	cerr := func(status int, stderr string, err error) error {
		return &CommandError{VM: g.vm, Command: cmd, ExitStatus: status, Stderr: stderr, Err: err}
	}
	if client == nil {
		return cerr(-1, "", errors.New("not connected"))
	}
	sess, err := client.NewSession()
	if err != nil {
		return cerr(-1, "", fmt.Errorf("open session: %w", err))
	}
	defer sess.Close()
	var stdout, stderr capped
	sess.Stdout, sess.Stderr = &stdout, &stderr
	start := time.Now()
	if err := sess.Start(cmd); err != nil {
		return cerr(-1, "", fmt.Errorf("start: %w", err))
	}
	done := make(chan error, 1)
	go func() { done <- sess.Wait() }()
	select {
	case err = <-done:
	case <-ctx.Done():
		// SIGTERM, not SIGKILL: the guest's shell may be in the middle of
		// its rc files and must get to run its exit traps (a killed
		// shell can leave lock files behind that stall later logins).
		// Closing the channel ends our wait either way.
		_ = sess.Signal(ssh.SIGTERM)
		sess.Close()
		return cerr(-1, stderr.String(), fmt.Errorf("after %v: %w", time.Since(start).Round(time.Millisecond), context.Cause(ctx)))
	}
	if err != nil {
		var ee *ssh.ExitError
		if errors.As(err, &ee) {
			return cerr(ee.ExitStatus(), stderr.String(), err)
		}
		return cerr(-1, stderr.String(), err)
	}
	if s := strings.TrimSpace(stdout.String()); s != "" {
		g.log.Debug("guest command output", "command", cmd, "stdout", s)
	}
	attrs := []any{"command", cmd, "took", time.Since(start).Round(time.Millisecond)}
	if s := strings.TrimSpace(stderr.String()); s != "" {
		g.log.Warn("guest command succeeded with messages on stderr", append(attrs, "stderr", s)...)
	} else {
		g.log.Info("guest command done", attrs...)
	}
	return nil
}

// prepare runs the BeforeSnapshot commands in order, then sync. started
// reports whether any BeforeSnapshot command was started, so the caller
// knows whether AfterSnapshot must run.
func (g *guest) prepare(ctx context.Context) (started bool, err error) {
	for _, cmd := range g.cfg.BeforeSnapshot {
		started = true
		if err := g.run(ctx, cmd, g.cfg.CommandTimeout); err != nil {
			return started, err
		}
	}
	return started, g.run(ctx, "sync", g.cfg.CommandTimeout)
}

// freeze freezes every configured mount point in order. It returns the
// mount points that need a thaw, including one whose freeze failed or
// timed out (it may have taken effect in the guest anyway).
func (g *guest) freeze(ctx context.Context) (toThaw []string, err error) {
	for _, m := range g.cfg.FreezeMounts {
		toThaw = append(toThaw, m)
		if err := g.run(ctx, g.cfg.FreezeCommand+" -f "+shellQuote(m), g.cfg.FreezeTimeout); err != nil {
			return toThaw, err
		}
	}
	return toThaw, nil
}

// thaw unfreezes mounts in reverse order with fresh contexts, so a
// cancelled backup still thaws. If the connection broke, it reconnects
// once. If lastMayBeThawed, the last mount's freeze failed and may never
// have taken effect, so its thaw error (not frozen) is not reported.
func (g *guest) thaw(ctx context.Context, mounts []string, lastMayBeThawed bool) error {
	ctx = context.WithoutCancel(ctx)
	// A thaw gets at least the default timeout even when freezing is
	// allowed less: giving up on a thaw leaves the guest frozen.
	timeout := max(g.cfg.FreezeTimeout, defaultFreezeTimeout)
	var errs []error
	for i := len(mounts) - 1; i >= 0; i-- {
		cmd := g.cfg.FreezeCommand + " -u " + shellQuote(mounts[i])
		err := g.run(ctx, cmd, timeout)
		var ce *CommandError
		if errors.As(err, &ce) && ce.ExitStatus < 0 {
			g.log.Warn("thaw failed without exit status; reconnecting to retry", "mount", mounts[i], "err", err)
			g.closeClient()
			if derr := g.dial(ctx); derr != nil {
				errs = append(errs, err, derr)
				continue
			}
			err = g.run(ctx, cmd, timeout)
		}
		if err != nil && !(lastMayBeThawed && i == len(mounts)-1) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// finish runs the AfterSnapshot commands, all of them even if one fails.
func (g *guest) finish(ctx context.Context) error {
	ctx = context.WithoutCancel(ctx)
	var errs []error
	for _, cmd := range g.cfg.AfterSnapshot {
		if err := g.run(ctx, cmd, g.cfg.CommandTimeout); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (g *guest) closeClient() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.client != nil {
		g.client.Close()
		g.client = nil
	}
}

// shellQuote quotes s for a POSIX shell.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// capped keeps the first maxCapturedOutput bytes written to it, enough to
// explain a failure without letting a chatty command fill memory. It is
// safe for concurrent use: after a timeout the session may still write
// while the error is being built.
type capped struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *capped) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if room := maxCapturedOutput - c.buf.Len(); room > 0 {
		c.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (c *capped) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}
