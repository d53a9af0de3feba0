package nbd

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
)

// ErrBadAddress reports a listen address Listen cannot parse.
var ErrBadAddress = errors.New("bad listen address")

// ParseListen splits a listen address: "unix:PATH" is a unix socket,
// "HOST:PORT" a TCP address. A missing host means 127.0.0.1, never every
// interface: NBD has no authentication, so exposing it must be asked for.
func ParseListen(spec string) (network, addr string, err error) {
	if path, ok := strings.CutPrefix(spec, "unix:"); ok {
		if path == "" {
			return "", "", fmt.Errorf("listen address %q: empty socket path: %w", spec, ErrBadAddress)
		}
		return "unix", path, nil
	}
	host, port, err := net.SplitHostPort(spec)
	if err != nil {
		return "", "", fmt.Errorf("listen address %q: want unix:PATH or HOST:PORT: %w", spec, ErrBadAddress)
	}
	if port == "" {
		return "", "", fmt.Errorf("listen address %q: no port: %w", spec, ErrBadAddress)
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return "tcp", net.JoinHostPort(host, port), nil
}

// Listen listens on a ParseListen address. A unix socket is made
// accessible to its owner only. A socket path left behind by a server
// that is gone is replaced; one that a server still answers on, or a path
// that is not a socket, is an error.
func Listen(spec string) (net.Listener, error) {
	network, addr, err := ParseListen(spec)
	if err != nil {
		return nil, err
	}
	if network == "unix" {
		if err := removeStaleSocket(addr); err != nil {
			return nil, err
		}
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", spec, err)
	}
	if network == "unix" {
		// Whoever can connect reads the disks: only the owner may,
		// whatever the umask.
		if err := os.Chmod(addr, 0o600); err != nil {
			l.Close()
			return nil, fmt.Errorf("socket %s: %w", addr, err)
		}
	}
	return l, nil
}

// removeStaleSocket removes path if it is a unix socket nobody accepts on.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket %s: %w", path, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("socket %s: exists and is not a socket; remove it or choose another path", path)
	}
	c, err := net.Dial("unix", path)
	if err == nil {
		c.Close()
		return fmt.Errorf("socket %s: another server is listening on it", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("socket %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}
