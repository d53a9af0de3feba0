package sftp

import (
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os/user"
	"path"
	"strconv"
	"strings"
)

// Config says where a repository is and how to reach it.
type Config struct {
	// URL is sftp://user@host[:port]/absolute/path. The port defaults to
	// 22 and the user to the local account name. A password in the URL
	// is rejected: only key authentication is supported.
	URL string
	// KeyFile is an OpenSSH private key. It must not be readable by group
	// or others. When empty, keys come from ssh-agent (SSH_AUTH_SOCK) and
	// from ~/.ssh/id_ed25519, id_ecdsa and id_rsa if present; when set,
	// ssh-agent keys are tried after it.
	KeyFile string
	// KnownHostsFile lists trusted host keys; default ~/.ssh/known_hosts.
	KnownHostsFile string
	// AcceptNewHostKey trusts an unknown host's key on first contact and
	// appends it to KnownHostsFile (like ssh's StrictHostKeyChecking=
	// accept-new). A changed key is refused regardless.
	AcceptNewHostKey bool
	// Connections is the number of SSH connections used in parallel;
	// default 4. Each one is a separate sshd process and cipher stream,
	// which is what lets uploads use more than one core at both ends.
	Connections int
	// Create makes the repository directory and its fixed layout
	// (keys/, data/00…ff/, index/, manifests/, locks/) if missing.
	// Without it, a missing repository directory is ErrNotExist.
	Create bool
	// Logger receives connection events (reconnects, accepted host
	// keys); nil means slog.Default().
	Logger *slog.Logger
}

// DefaultConnections is the number of SSH connections when
// Config.Connections is zero.
const DefaultConnections = 4

// target is a parsed repository URL.
type target struct {
	user string
	addr string // host:port, as dialled and as checked in known_hosts
	root string // absolute, cleaned, no trailing slash except "/"
}

func parseURL(raw string) (target, error) {
	u, err := url.Parse(raw)
	if err != nil {
		// url.Parse echoes the input, which could hold a password.
		return target{}, fmt.Errorf("invalid repository URL")
	}
	if u.Scheme != "sftp" {
		return target{}, fmt.Errorf("repository URL %s: scheme must be sftp", redact(u))
	}
	if _, has := u.User.Password(); has {
		return target{}, fmt.Errorf("repository URL %s: passwords are not supported, use a key file or ssh-agent", redact(u))
	}
	host := u.Hostname()
	if host == "" {
		return target{}, fmt.Errorf("repository URL %s: no host", redact(u))
	}
	port := 22
	if p := u.Port(); p != "" {
		port, err = strconv.Atoi(p)
		if err != nil || port < 1 || port > 65535 {
			return target{}, fmt.Errorf("repository URL %s: invalid port %q", redact(u), p)
		}
	}
	login := u.User.Username()
	if login == "" {
		cur, err := user.Current()
		if err != nil {
			return target{}, fmt.Errorf("repository URL %s has no user and the local user is unknown: %w", redact(u), err)
		}
		login = cur.Username
	}
	p := u.Path
	if !strings.HasPrefix(p, "/") {
		return target{}, fmt.Errorf("repository URL %s: path must be absolute (sftp://user@host/srv/repo)", redact(u))
	}
	return target{
		user: login,
		addr: net.JoinHostPort(host, strconv.Itoa(port)),
		root: path.Clean(p),
	}, nil
}

// location is the URL without secrets, for messages.
func (t target) location() string {
	host, port, _ := net.SplitHostPort(t.addr)
	hp := net.JoinHostPort(host, port)
	if port == "22" {
		hp = host
		if strings.Contains(host, ":") {
			hp = "[" + host + "]"
		}
	}
	return "sftp://" + t.user + "@" + hp + t.root
}

func redact(u *url.URL) string {
	c := *u
	if c.User != nil {
		c.User = url.User(c.User.Username())
	}
	return c.String()
}
