// Package local stores repository objects as files under a directory.
//
// Writes go to a temporary file in the target directory, are fsynced, then
// hard-linked to the final name (link fails if the name exists, so an
// object is never replaced), and the directory is fsynced. A crash leaves
// at most a temporary file, which is invisible to List and Get.
//
// PutDeferred and Sync batch that durability for many objects: the
// temporary files are written without fsync and linked to their names
// only by Sync, after one syncfs made them durable, followed by a second
// syncfs for the links. So a name still never shows a partial object.
//
// An object's whole pages go to its file with O_DIRECT where its buffer
// is page-aligned (see writeData): no copy into the page cache, no
// writeback of it later, and the host's page cache is left to the VMs.
package local

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"vmvault/backend"
)

// tmpPrefix marks in-progress uploads; List skips such names.
const tmpPrefix = ".tmp-"

// Backend is a repository on a local filesystem path.
type Backend struct {
	root string

	mu       sync.Mutex
	deferred []deferredPut // written by PutDeferred, published by Sync

	noDirect atomic.Bool // set once the file system refused O_DIRECT
}

// deferredPut is an object written to a temporary file, not yet linked.
type deferredPut struct{ name, tmp, fn string }

// Open returns a backend rooted at dir. It does not create dir.
func Open(dir string) (*Backend, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("repository path %q: %w", dir, err)
	}
	return &Backend{root: abs}, nil
}

// Create makes dir (and parents) for a new repository, with its fixed
// layout of directories (so that an append-only SFTP account, which cannot
// usefully create directories, can later write into it), and returns a
// backend.
func Create(dir string) (*Backend, error) {
	dirs := []string{"keys", "index", "manifests", "locks", "data"}
	for i := range 256 {
		dirs = append(dirs, fmt.Sprintf("data/%02x", i))
	}
	for _, d := range append([]string{""}, dirs...) {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return nil, fmt.Errorf("create repository directory: %w", err)
		}
	}
	return Open(dir)
}

// Location returns the repository's absolute path.
func (b *Backend) Location() string { return b.root }

// Close does nothing; a local backend holds no resources.
func (b *Backend) Close() error { return nil }

func (b *Backend) filename(name string) (string, error) {
	clean := path.Clean(name)
	if name == "" || clean != name || strings.HasPrefix(clean, "/") || strings.HasPrefix(clean, "..") {
		return "", fmt.Errorf("invalid object name %q", name)
	}
	return filepath.Join(b.root, filepath.FromSlash(clean)), nil
}

// Put writes data atomically under name, never replacing an existing object.
func (b *Backend) Put(ctx context.Context, name string, data []byte) error {
	tmp, fn, err := b.writeTemp(ctx, name, data, true)
	if err != nil {
		return err
	}
	if err := link(name, tmp, fn); err != nil {
		return err
	}
	return syncDir(filepath.Dir(fn))
}

// PutDeferred writes data for name like Put, but the object appears under
// its name, durable, only when Sync returns nil. It returns ErrExist if
// the name is already present.
func (b *Backend) PutDeferred(ctx context.Context, name string, data []byte) error {
	tmp, fn, err := b.writeTemp(ctx, name, data, false)
	if err != nil {
		return err
	}
	b.mu.Lock()
	b.deferred = append(b.deferred, deferredPut{name: name, tmp: tmp, fn: fn})
	b.mu.Unlock()
	return nil
}

// Sync makes every object written by PutDeferred before the call durable
// and visible under its name. A name that appeared meanwhile (another
// writer of the same content) is not an error.
func (b *Backend) Sync(ctx context.Context) error {
	b.mu.Lock()
	batch := b.deferred
	b.deferred = nil
	b.mu.Unlock()
	if len(batch) == 0 {
		return nil
	}
	if err := syncFS(b.root); err != nil {
		return err
	}
	var first error
	for _, p := range batch {
		if err := link(p.name, p.tmp, p.fn); err != nil && !errors.Is(err, backend.ErrExist) && first == nil {
			first = err
		}
	}
	if first != nil {
		return first
	}
	return syncFS(b.root)
}

// syncFS flushes the file system holding dir: one call for a whole batch.
func syncFS(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// writeTemp writes data to a read-only temporary file beside name's final
// path, fsynced if sync is set.
func (b *Backend) writeTemp(ctx context.Context, name string, data []byte, sync bool) (tmp, fn string, err error) {
	if err := ctx.Err(); err != nil {
		return "", "", err
	}
	fn, err = b.filename(name)
	if err != nil {
		return "", "", err
	}
	dir := filepath.Dir(fn)
	if _, err := os.Lstat(fn); err == nil {
		return "", "", fmt.Errorf("put %s: %w", name, backend.ErrExist)
	}
	f, err := os.CreateTemp(dir, tmpPrefix)
	if errors.Is(err, fs.ErrNotExist) {
		if err = os.MkdirAll(dir, 0o700); err == nil {
			f, err = os.CreateTemp(dir, tmpPrefix)
		}
	}
	if err != nil {
		return "", "", fmt.Errorf("put %s: %w", name, err)
	}
	tmp = f.Name()
	fail := func(err error) (string, string, error) {
		f.Close()
		os.Remove(tmp)
		return "", "", fmt.Errorf("put %s: %w", name, err)
	}
	if err := b.writeData(f, data); err != nil {
		return fail(err)
	}
	if sync {
		if err := f.Sync(); err != nil {
			return fail(err)
		}
	}
	if err := f.Chmod(0o400); err != nil {
		return fail(err)
	}
	if err := inheritOwner(f, dir); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return "", "", fmt.Errorf("put %s: %w", name, err)
	}
	return tmp, fn, nil
}

// link publishes a written temporary file under its final path. link(2)
// refuses an existing target: two writers of the same name cannot replace
// each other's object.
func link(name, tmp, fn string) error {
	err := os.Link(tmp, fn)
	os.Remove(tmp)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("put %s: %w", name, backend.ErrExist)
		}
		return fmt.Errorf("put %s: %w", name, err)
	}
	return nil
}

// inheritOwner gives a new object the owner and group of its directory
// when root writes it: server-side tools (init, prune, key add) run as
// root against a repository that belongs to an append-only SFTP account,
// which must be able to read what they write. The object stays 0400, so
// its owner can read but not change it (and the account may not chmod).
func inheritOwner(f *os.File, dir string) error {
	if os.Geteuid() != 0 {
		return nil
	}
	st, err := os.Stat(dir)
	if err != nil {
		return err
	}
	ds, ok := st.Sys().(*syscall.Stat_t)
	if !ok || ds.Uid == 0 && ds.Gid == 0 {
		return nil
	}
	return f.Chown(int(ds.Uid), int(ds.Gid))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, syscall.EINVAL) {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// Get reads part or all of an object.
func (b *Backend) Get(ctx context.Context, name string, off, length int64) ([]byte, error) {
	return b.read(ctx, name, off, length, -1)
}

// GetAll reads the whole object, refusing it by its size (fstat on the
// open handle: no extra round trip) before allocating when it exceeds
// limit.
func (b *Backend) GetAll(ctx context.Context, name string, limit int64) ([]byte, error) {
	return b.read(ctx, name, 0, -1, limit)
}

// read reads length bytes at off (length < 0: to the end); with limit >=
// 0 it first refuses an object larger than limit.
func (b *Backend) read(ctx context.Context, name string, off, length, limit int64) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fn, err := b.filename(name)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(fn)
	if err != nil {
		return nil, mapErr("get", name, err)
	}
	defer f.Close()
	if length < 0 || limit >= 0 {
		st, err := f.Stat()
		if err != nil {
			return nil, mapErr("get", name, err)
		}
		if limit >= 0 {
			if err := backend.CheckSize(name, st.Size(), limit); err != nil {
				return nil, err
			}
		}
		if length < 0 {
			length = st.Size() - off
		}
		if length < 0 {
			return nil, fmt.Errorf("get %s: offset %d beyond size %d", name, off, st.Size())
		}
	}
	buf := make([]byte, length)
	n, err := f.ReadAt(buf, off)
	if err != nil && !(errors.Is(err, io.EOF) && int64(n) == length) {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("get %s: short object (%d of %d bytes at offset %d): %w", name, n, length, off, io.ErrUnexpectedEOF)
		}
		return nil, mapErr("get", name, err)
	}
	return buf, nil
}

// GetInto reads the whole object into buf (backend.IntoGetter); fstat on
// the open file refuses one that does not fit before reading.
func (b *Backend) GetInto(ctx context.Context, name string, buf []byte) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	fn, err := b.filename(name)
	if err != nil {
		return 0, err
	}
	f, err := os.Open(fn)
	if err != nil {
		return 0, mapErr("get", name, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, mapErr("get", name, err)
	}
	if err := backend.CheckSize(name, st.Size(), int64(len(buf))-1); err != nil {
		return 0, err
	}
	n, err := f.ReadAt(buf[:st.Size()], 0)
	if err != nil && !(errors.Is(err, io.EOF) && int64(n) == st.Size()) {
		if errors.Is(err, io.EOF) {
			return 0, fmt.Errorf("get %s: short object (%d of %d bytes): %w", name, n, st.Size(), io.ErrUnexpectedEOF)
		}
		return 0, mapErr("get", name, err)
	}
	return n, nil
}

// Stat returns an object's size.
func (b *Backend) Stat(ctx context.Context, name string) (backend.ObjectInfo, error) {
	fn, err := b.filename(name)
	if err != nil {
		return backend.ObjectInfo{}, err
	}
	st, err := os.Stat(fn)
	if err != nil {
		return backend.ObjectInfo{}, mapErr("stat", name, err)
	}
	return backend.ObjectInfo{Name: name, Size: st.Size(), ModTime: st.ModTime()}, nil
}

// List walks every object under prefix. prefix is either a directory
// ("data/") or a directory plus a name prefix ("locks/ab").
func (b *Backend) List(ctx context.Context, prefix string, fn func(backend.ObjectInfo) error) error {
	dir, _ := path.Split(prefix)
	start := filepath.Join(b.root, filepath.FromSlash(dir))
	err := filepath.WalkDir(start, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) && p == start {
				return filepath.SkipDir
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if d.IsDir() || strings.HasPrefix(d.Name(), tmpPrefix) {
			return nil
		}
		rel, err := filepath.Rel(b.root, p)
		if err != nil {
			return err
		}
		name := filepath.ToSlash(rel)
		if !strings.HasPrefix(name, prefix) {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed while listing
			}
			return err
		}
		return fn(backend.ObjectInfo{Name: name, Size: info.Size(), ModTime: info.ModTime()})
	})
	if err != nil {
		return fmt.Errorf("list %s: %w", prefix, err)
	}
	return nil
}

// Delete removes an object.
func (b *Backend) Delete(ctx context.Context, name string) error {
	fn, err := b.filename(name)
	if err != nil {
		return err
	}
	if err := os.Remove(fn); err != nil {
		return mapErr("delete", name, err)
	}
	return nil
}

// RemoveTemporary deletes leftovers of interrupted uploads (temporary files)
// last written before before, and returns how many it removed. Prune calls
// it under an exclusive lock, with its safety margin: a younger temporary
// file may be an upload in progress.
func (b *Backend) RemoveTemporary(ctx context.Context, before time.Time) (int, error) {
	n := 0
	err := filepath.WalkDir(b.root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || !strings.HasPrefix(d.Name(), tmpPrefix) {
			return nil
		}
		if fi, err := d.Info(); err != nil || !fi.ModTime().Before(before) {
			return nil
		}
		if err := os.Remove(p); err != nil {
			return err
		}
		n++
		return nil
	})
	return n, err
}

func mapErr(op, name string, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s %s: %w", op, name, backend.ErrNotExist)
	}
	return fmt.Errorf("%s %s: %w", op, name, err)
}

// directAlign is what O_DIRECT needs of a write's offset, length and
// memory address: a page covers 512- and 4096-byte sectors.
const directAlign = 4096

// minDirect is the smallest object whose pages are written directly:
// small objects (segment lists, index objects) save little copying for
// the two fcntl calls (a choice, not measured).
const minDirect = 64 << 10

// writeData writes data at the start of f, which is new and empty: the
// whole pages at its start with O_DIRECT where data's memory is
// page-aligned (buffers the size of a sealed chunk are), so they go from
// data to the device without a copy into the page cache and without the
// kernel's writeback of it later; the rest through the page cache.
// Sync's syncfs flushes the rest and the device's cache, as before.
func (b *Backend) writeData(f *os.File, data []byte) error {
	n := len(data) &^ (directAlign - 1)
	if n >= minDirect && !b.noDirect.Load() && uintptr(unsafe.Pointer(&data[0]))%directAlign == 0 {
		done, err := b.writeDirect(f, data[:n])
		if err != nil {
			return err
		}
		if done {
			_, err := f.WriteAt(data[n:], int64(n))
			return err
		}
	}
	_, err := f.WriteAt(data, 0)
	return err
}

// writeDirect writes p at offset 0 of f with O_DIRECT turned on for the
// call. It reports false where the file system refuses O_DIRECT; then the
// caller's buffered write covers whatever part of p it may have written.
func (b *Backend) writeDirect(f *os.File, p []byte) (bool, error) {
	fd := f.Fd()
	flags, err := unix.FcntlInt(fd, unix.F_GETFL, 0)
	if err != nil {
		return false, nil
	}
	if _, err := unix.FcntlInt(fd, unix.F_SETFL, flags|unix.O_DIRECT); err != nil {
		b.noDirect.Store(true)
		return false, nil
	}
	_, werr := f.WriteAt(p, 0)
	if _, err := unix.FcntlInt(fd, unix.F_SETFL, flags); err != nil && werr == nil {
		werr = err
	}
	if errors.Is(werr, unix.EINVAL) {
		b.noDirect.Store(true)
		return false, nil
	}
	return werr == nil, werr
}
