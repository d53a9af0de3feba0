// Package sftp stores repository objects on a server reached over SSH,
// using the server's SFTP subsystem (OpenSSH's internal-sftp or
// sftp-server).
//
// Host keys are always verified against a known_hosts file. Uploads go to
// a temporary file that is made visible under its final name by an SFTP
// hard link or rename, both of which fail when the name exists, so an
// object is never replaced and an interrupted upload leaves the name
// free. On an append-only account (rename and remove denied, see
// docs/server.md) the temporary file stays behind and the server-side
// prune removes it.
package sftp

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"

	sftplib "github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
	"golang.org/x/sync/errgroup"

	"vmvault/backend"
)

// tmpPrefix marks in-progress or leftover uploads; List skips such names
// (the same prefix as the local backend, so a server-side prune of the
// same directory removes them).
const tmpPrefix = ".tmp-"

// layoutDirs are the repository's fixed directories, created by Create.
// An append-only account cannot create usable directories itself (its
// umask makes them read-only), so they all must exist up front.
func layoutDirs() []string {
	dirs := []string{"keys", "index", "manifests", "locks", "data"}
	for i := 0; i < 256; i++ {
		dirs = append(dirs, fmt.Sprintf("data/%02x", i))
	}
	return dirs
}

// Backend is a repository on an SFTP server. It is safe for concurrent
// use; requests are spread over several SSH connections.
type Backend struct {
	target   target
	log      *slog.Logger
	hostKeys *hostKeys
	signers  func() ([]ssh.Signer, error)
	closeAg  func()

	mu          sync.Mutex // guards conns (nil once closed)
	conns       []*conn
	next        atomic.Uint32
	reconnectMu sync.Mutex // serialises Reconnect

	// Learned from the server's answers: on an append-only account the
	// first denied rename or remove switches to hard links and stops
	// trying to remove temporary files.
	renameDenied atomic.Bool
	removeDenied atomic.Bool
}

// Open connects to the repository described by cfg. With cfg.Create it
// creates the repository directory and layout; otherwise a missing
// repository directory is an error wrapping backend.ErrNotExist.
func Open(ctx context.Context, cfg Config) (*Backend, error) {
	t, err := parseURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	knownFile := cfg.KnownHostsFile
	if knownFile == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return nil, fmt.Errorf("default known hosts file: %w", err)
		}
		knownFile = filepath.Join(home, ".ssh", "known_hosts")
	}
	n := cfg.Connections
	if n <= 0 {
		n = DefaultConnections
	}
	signers, closeAg, err := signers(cfg.KeyFile)
	if err != nil {
		return nil, err
	}
	b := &Backend{
		target:   t,
		log:      logger.With("repository", t.location()),
		hostKeys: &hostKeys{file: knownFile, acceptNew: cfg.AcceptNewHostKey},
		signers:  signers,
		closeAg:  closeAg,
		conns:    make([]*conn, n),
	}
	b.hostKeys.logf = b.log.Info
	// The first connection alone: it may store a new host key, which the
	// others then find in the file.
	first, err := b.dial(ctx)
	if err != nil {
		closeAg()
		return nil, err
	}
	b.conns[0] = first
	if err := b.Reconnect(ctx); err != nil {
		b.Close()
		return nil, err
	}
	if cfg.Create {
		err = b.create(ctx)
	} else {
		err = b.checkRoot()
	}
	if err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

// Reconnect replaces connections that have died (or were never made),
// keeping live ones. The retry wrapper calls it after a connection error;
// concurrent callers are serialised, so the later ones find nothing left
// to do. Requests on live connections continue meanwhile.
func (b *Backend) Reconnect(ctx context.Context) error {
	b.reconnectMu.Lock()
	defer b.reconnectMu.Unlock()
	b.mu.Lock()
	if b.conns == nil {
		b.mu.Unlock()
		return errors.New("sftp backend is closed")
	}
	var dead []int
	lost := 0
	for i, c := range b.conns {
		if c == nil || !c.alive() {
			dead = append(dead, i)
		}
		if c != nil && !c.alive() {
			lost++
		}
	}
	b.mu.Unlock()
	if len(dead) == 0 {
		return nil
	}
	if lost > 0 {
		b.log.Info("reconnecting", "lost_connections", lost)
	}
	fresh := make([]*conn, len(dead))
	var g errgroup.Group
	for j := range dead {
		g.Go(func() error {
			c, err := b.dial(ctx)
			fresh[j] = c
			return err
		})
	}
	err := g.Wait()
	b.mu.Lock()
	defer b.mu.Unlock()
	for j, i := range dead {
		if fresh[j] == nil {
			continue
		}
		if b.conns == nil { // closed meanwhile
			fresh[j].close()
			continue
		}
		if old := b.conns[i]; old != nil {
			old.close()
		}
		b.conns[i] = fresh[j]
	}
	// Not marked transient: a refused connection is (the retry wrapper
	// recognises it), a changed host key or a rejected key is not.
	if err != nil {
		return fmt.Errorf("connect to %s: %w", b.target.location(), err)
	}
	return nil
}

// client picks a connection round-robin, preferring live ones.
func (b *Backend) client() (*sftplib.Client, *conn, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conns == nil {
		return nil, nil, errors.New("sftp backend is closed")
	}
	start := int(b.next.Add(1))
	var fallback *conn
	for i := range b.conns {
		c := b.conns[(start+i)%len(b.conns)]
		if c == nil {
			continue
		}
		if c.alive() {
			return c.sftp, c, nil
		}
		fallback = c
	}
	if fallback == nil {
		return nil, nil, markTransient(fmt.Errorf("no connection to %s", b.target.location()))
	}
	// Every connection is dead: the request fails with a connection
	// error, which the retry wrapper answers with Reconnect.
	return fallback.sftp, fallback, nil
}

// Location returns the repository URL (no secrets).
func (b *Backend) Location() string { return b.target.location() }

// Close closes every connection.
func (b *Backend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, c := range b.conns {
		if c != nil {
			c.close()
		}
	}
	b.conns = nil
	if b.closeAg != nil {
		b.closeAg()
		b.closeAg = nil
	}
	return nil
}

func (b *Backend) checkRoot() error {
	c, _, err := b.client()
	if err != nil {
		return err
	}
	st, err := c.Stat(b.target.root)
	if err != nil {
		return b.mapErr("open repository", b.target.root, err)
	}
	if !st.IsDir() {
		return fmt.Errorf("repository %s: %s is not a directory", b.Location(), b.target.root)
	}
	return nil
}

func (b *Backend) create(ctx context.Context) error {
	c, _, err := b.client()
	if err != nil {
		return err
	}
	// The root and "data" first: "data/xx" needs its parent.
	if err := c.MkdirAll(path.Join(b.target.root, "data")); err != nil {
		return b.mapErr("create repository directory", b.target.root, err)
	}
	g, ctx := errgroup.WithContext(ctx)
	g.SetLimit(4 * len(b.conns))
	for _, d := range layoutDirs() {
		g.Go(func() error {
			if err := ctx.Err(); err != nil {
				return err
			}
			c, _, err := b.client()
			if err != nil {
				return err
			}
			p := path.Join(b.target.root, d)
			// Mkdir, then Stat on failure: one round trip in the
			// common case, and an existing directory is fine.
			if err := c.Mkdir(p); err != nil {
				if st, serr := c.Stat(p); serr != nil || !st.IsDir() {
					return b.mapErr("create repository directory", d, err)
				}
			}
			return nil
		})
	}
	return g.Wait()
}

// remote maps an object name to its path on the server.
func (b *Backend) remote(name string) (string, error) {
	clean := path.Clean(name)
	if name == "" || clean != name || strings.HasPrefix(clean, "/") || clean == ".." || strings.HasPrefix(clean, "../") {
		return "", fmt.Errorf("invalid object name %q", name)
	}
	return path.Join(b.target.root, clean), nil
}

func randomSuffix() string {
	var r [12]byte
	rand.Read(r[:])
	return hex.EncodeToString(r[:])
}

// Put uploads data under name without ever replacing an existing object.
func (b *Backend) Put(ctx context.Context, name string, data []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p, err := b.remote(name)
	if err != nil {
		return err
	}
	c, cn, err := b.client()
	if err != nil {
		return fmt.Errorf("put %s: %w", name, err)
	}
	// Cheap check first: uploading a large object only to find the name
	// taken wastes bandwidth and, on an append-only account, leaves a
	// temporary file.
	if _, err := c.Lstat(p); err == nil {
		return fmt.Errorf("put %s: %w", name, backend.ErrExist)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return b.mapErr("put", name, err)
	}
	dir := path.Dir(p)
	tmp := path.Join(dir, tmpPrefix+randomSuffix())
	f, err := c.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL)
	if errors.Is(err, fs.ErrNotExist) {
		if err = c.MkdirAll(dir); err == nil {
			f, err = c.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL)
		}
	}
	if err != nil {
		if errors.Is(err, fs.ErrPermission) {
			return fmt.Errorf("put %s: cannot create a file in %s on %s: the SFTP account %q has no write permission there (check the directory's owner and mode on the server): %w",
				name, dir, b.target.addr, b.target.user, err)
		}
		return b.mapErr("put", name, err)
	}
	discard := func(cause error) error {
		f.Close()
		b.removeTemp(c, tmp)
		return b.mapErr("put", name, cause)
	}
	// One large Write: with concurrent writes enabled the client keeps
	// many write requests in flight instead of waiting for each.
	if _, err := f.Write(data); err != nil {
		return discard(err)
	}
	if err := ctx.Err(); err != nil {
		f.Close()
		b.removeTemp(c, tmp)
		return err
	}
	if cn.fsync {
		if err := f.Sync(); err != nil && !errors.Is(err, sftplib.ErrSSHFxOpUnsupported) && !errors.Is(err, fs.ErrPermission) {
			return discard(err)
		}
	}
	if err := f.Close(); err != nil {
		b.removeTemp(c, tmp)
		return b.mapErr("put", name, err)
	}
	return b.publish(c, cn, name, tmp, p)
}

// publish makes the finished temporary file visible under its final
// path. SFTP rename (not posix-rename) and hardlink@openssh.com both fail
// when the target exists. Rename is one round trip; an account that
// denies it (append-only) gets a hard link, and its temporary file stays.
func (b *Backend) publish(c *sftplib.Client, cn *conn, name, tmp, p string) error {
	var err error
	if !b.renameDenied.Load() || !cn.hardlink {
		err = c.Rename(tmp, p)
		if errors.Is(err, fs.ErrPermission) && cn.hardlink {
			b.renameDenied.Store(true)
			b.log.Info("server denies rename (append-only account?); publishing uploads by hard link")
		} else {
			return b.publishResult(c, name, tmp, p, err)
		}
	}
	err = c.Link(tmp, p)
	if err == nil {
		b.removeTemp(c, tmp)
	}
	return b.publishResult(c, name, tmp, p, err)
}

func (b *Backend) publishResult(c *sftplib.Client, name, tmp, p string, err error) error {
	if err == nil {
		return nil
	}
	// OpenSSH reports EEXIST as a generic failure: look.
	exists := false
	if _, serr := c.Lstat(p); serr == nil {
		exists = true
	}
	b.removeTemp(c, tmp)
	if exists {
		return fmt.Errorf("put %s: %w", name, backend.ErrExist)
	}
	return b.mapErr("put", name, err)
}

// removeTemp deletes a temporary file unless the server is known to deny
// removal; failure is harmless because List ignores temporary files and
// prune deletes them.
func (b *Backend) removeTemp(c *sftplib.Client, tmp string) {
	if b.removeDenied.Load() {
		return
	}
	if err := c.Remove(tmp); errors.Is(err, fs.ErrPermission) {
		b.removeDenied.Store(true)
	}
}

// Get reads length bytes at off (length < 0: to the end).
func (b *Backend) Get(ctx context.Context, name string, off, length int64) ([]byte, error) {
	return b.read(ctx, name, off, length, -1)
}

// GetAll reads the whole object, refusing it by its size (fstat on the
// open handle: no extra round trip) before allocating when it exceeds
// limit.
func (b *Backend) GetAll(ctx context.Context, name string, limit int64) ([]byte, error) {
	return b.read(ctx, name, 0, -1, limit)
}

// GetInto reads the whole object into buf (backend.IntoGetter) without
// asking for its size: the read requests for all of buf go out at once,
// and the server's end of file says how long the object is. That saves
// the fstat round trip of GetAll; a buffer the object fills proves it too
// large.
func (b *Backend) GetInto(ctx context.Context, name string, buf []byte) (int, error) {
	f, err := b.openObject(ctx, name)
	if err != nil {
		return 0, err
	}
	defer f.close()
	n, err := f.readAt(0, buf)
	if err != nil {
		return 0, b.mapErr("get", name, err)
	}
	if n >= len(buf) {
		return 0, fmt.Errorf("get %s: more than %d bytes: %w", name, len(buf)-1, backend.ErrTooLarge)
	}
	return n, nil
}

// read reads length bytes at off (length < 0: to the end); with limit >=
// 0 it first refuses an object larger than limit.
func (b *Backend) read(ctx context.Context, name string, off, length, limit int64) ([]byte, error) {
	f, err := b.openObject(ctx, name)
	if err != nil {
		return nil, err
	}
	defer f.close()
	if length < 0 || limit >= 0 {
		size, err := f.size()
		if err != nil {
			return nil, b.mapErr("get", name, err)
		}
		if limit >= 0 {
			if err := backend.CheckSize(name, size, limit); err != nil {
				return nil, err
			}
		}
		if length < 0 {
			length = size - off
		}
		if length < 0 {
			return nil, fmt.Errorf("get %s: offset %d beyond size %d", name, off, size)
		}
	}
	buf := make([]byte, length)
	if length == 0 {
		return buf, nil
	}
	n, err := f.readAt(off, buf)
	if err != nil {
		return nil, b.mapErr("get", name, err)
	}
	if int64(n) < length {
		return nil, fmt.Errorf("get %s: short object (%d of %d bytes at offset %d): %w", name, n, length, off, io.ErrUnexpectedEOF)
	}
	return buf, nil
}

// objectFile is an object open for reading.
type objectFile interface {
	size() (int64, error)
	// readAt reads from off until buf is full or the object ends.
	readAt(off int64, buf []byte) (int, error)
	close()
}

// openObject opens object name for reading: through the connection's
// read session, or the SFTP library where there is none.
func (b *Backend) openObject(ctx context.Context, name string) (objectFile, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p, err := b.remote(name)
	if err != nil {
		return nil, err
	}
	c, cn, err := b.client()
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", name, err)
	}
	if cn.reads != nil {
		h, err := cn.reads.open(ctx, p)
		if err != nil {
			return nil, b.mapErr("get", name, err)
		}
		return &sessionFile{ctx: ctx, s: cn.reads, h: h}, nil
	}
	f, err := c.Open(p)
	if err != nil {
		return nil, b.mapErr("get", name, err)
	}
	return libFile{f}, nil
}

type sessionFile struct {
	ctx context.Context
	s   *readSession
	h   string
}

func (f *sessionFile) size() (int64, error) { return f.s.size(f.ctx, f.h) }
func (f *sessionFile) close()               { f.s.closeHandle(f.h) }
func (f *sessionFile) readAt(off int64, buf []byte) (int, error) {
	return f.s.readAt(f.ctx, f.h, off, buf)
}

type libFile struct{ f *sftplib.File }

// firstReadStep is what libFile.readAt asks for first; each further step
// asks for four times more.
const firstReadStep = 1 << 20

func (f libFile) close() { f.f.Close() }
func (f libFile) size() (int64, error) {
	st, err := f.f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// readAt reads in steps: the library's ReadAt sends read requests for all
// of its buffer at once, and a restore's buffers fit the largest object
// (MiBs) while a typical chunk is far smaller; asking for all of it cost
// hundreds of requests answered with EOF per object and made an SFTP
// restore 2.3 times slower. Most objects end within the first step.
func (f libFile) readAt(off int64, buf []byte) (int, error) {
	n := 0
	for step := firstReadStep; n < len(buf); step *= 4 {
		end := min(len(buf), n+step)
		k, err := f.f.ReadAt(buf[n:end], off+int64(n))
		n += k
		if err != nil && !errors.Is(err, io.EOF) {
			return 0, err
		}
		if n < end {
			break // the server's end of file
		}
	}
	return n, nil
}

// Stat returns an object's size.
func (b *Backend) Stat(ctx context.Context, name string) (backend.ObjectInfo, error) {
	if err := ctx.Err(); err != nil {
		return backend.ObjectInfo{}, err
	}
	p, err := b.remote(name)
	if err != nil {
		return backend.ObjectInfo{}, err
	}
	c, _, err := b.client()
	if err != nil {
		return backend.ObjectInfo{}, fmt.Errorf("stat %s: %w", name, err)
	}
	st, err := c.Stat(p)
	if err != nil {
		return backend.ObjectInfo{}, b.mapErr("stat", name, err)
	}
	if st.IsDir() {
		return backend.ObjectInfo{}, fmt.Errorf("stat %s: is a directory", name)
	}
	return backend.ObjectInfo{Name: name, Size: st.Size(), ModTime: st.ModTime()}, nil
}

// List calls fn for every object under prefix ("data/" or "locks/ab").
// Directories are read in parallel over the connections; fn is called
// from one goroutine at a time.
func (b *Backend) List(ctx context.Context, prefix string, fn func(backend.ObjectInfo) error) error {
	dir, _ := path.Split(prefix)
	dir = strings.TrimSuffix(dir, "/")
	if dir != "" {
		if _, err := b.remote(dir); err != nil {
			return fmt.Errorf("list %s: %w", prefix, err)
		}
	}
	g, ctx := errgroup.WithContext(ctx)
	g.SetLimit(4 * len(b.conns))
	var fnMu sync.Mutex
	var walk func(rel string, top bool) error
	walk = func(rel string, top bool) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		c, _, err := b.client()
		if err != nil {
			return err
		}
		entries, err := c.ReadDirContext(ctx, path.Join(b.target.root, rel))
		if err != nil {
			if top && errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return b.mapErr("read directory", rel, err)
		}
		for _, e := range entries {
			name := e.Name()
			if rel != "" {
				name = rel + "/" + name
			}
			if e.IsDir() {
				if strings.HasPrefix(name+"/", prefix) || strings.HasPrefix(prefix, name+"/") {
					// Inline when all workers are busy: a walker
					// blocked waiting for a slot held by other
					// blocked walkers would deadlock.
					if !g.TryGo(func() error { return walk(name, false) }) {
						if err := walk(name, false); err != nil {
							return err
						}
					}
				}
				continue
			}
			if !e.Mode().IsRegular() || strings.HasPrefix(e.Name(), tmpPrefix) || !strings.HasPrefix(name, prefix) {
				continue
			}
			fnMu.Lock()
			err := fn(backend.ObjectInfo{Name: name, Size: e.Size(), ModTime: e.ModTime()})
			fnMu.Unlock()
			if err != nil {
				return err
			}
		}
		return nil
	}
	g.Go(func() error { return walk(dir, true) })
	if err := g.Wait(); err != nil {
		return fmt.Errorf("list %s: %w", prefix, err)
	}
	return nil
}

// Delete removes an object. An append-only account refuses: the error
// wraps backend.ErrReadOnly.
func (b *Backend) Delete(ctx context.Context, name string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p, err := b.remote(name)
	if err != nil {
		return err
	}
	c, _, err := b.client()
	if err != nil {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	// Remove, not RemoveFile-then-directory fallback: an object is never
	// a directory.
	if err := c.Remove(p); err != nil {
		if errors.Is(err, fs.ErrPermission) {
			return fmt.Errorf("delete %s: the server refused (permission denied); the account %s@%s appears to be append-only, so prune and unlock must run on the server against the repository's local path (vmvault prune --repo /srv/vmvault/…): %w",
				name, b.target.user, b.target.addr, backend.ErrReadOnly)
		}
		return b.mapErr("delete", name, err)
	}
	return nil
}

// mapErr wraps err with the operation and object, translating SFTP
// status codes into backend sentinels and marking connection failures
// as transient for the retry wrapper.
func (b *Backend) mapErr(op, name string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%s %s: %w", op, name, backend.ErrNotExist)
	case isConnErr(err):
		return markTransient(fmt.Errorf("%s %s on %s: %w", op, name, b.target.addr, err))
	}
	return fmt.Errorf("%s %s: %w", op, name, err)
}

// isConnErr reports errors that mean the connection, not the request,
// failed.
func isConnErr(err error) bool {
	if errors.Is(err, sftplib.ErrSSHFxConnectionLost) || errors.Is(err, io.EOF) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.ErrClosedPipe) ||
		errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	var oe *ssh.OpenChannelError
	return errors.As(err, &oe) || strings.Contains(err.Error(), "use of closed network connection")
}

// transientError marks an error worth retrying after a reconnect.
type transientError struct{ err error }

func (e *transientError) Error() string   { return e.err.Error() }
func (e *transientError) Unwrap() error   { return e.err }
func (e *transientError) Transient() bool { return true }

func markTransient(err error) error { return &transientError{err} }

var _ backend.Backend = (*Backend)(nil)
