// Package backend defines the flat object store that a vmvault repository
// lives in, and the errors every implementation reports.
//
// A backend moves opaque bytes: it knows nothing of encryption, chunks or
// manifests. Object names are slash-separated relative paths such as
// "data/3f/3f2a…" or "manifests/9c1b…"; an implementation maps them onto
// its own storage.
package backend

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Sentinel errors. Implementations wrap them (fmt.Errorf("…: %w", ErrNotExist))
// and callers test with errors.Is.
var (
	// ErrNotExist means the named object does not exist.
	ErrNotExist = errors.New("object does not exist")
	// ErrExist means Put found an object of that name already present; the
	// existing object is left untouched.
	ErrExist = errors.New("object already exists")
	// ErrReadOnly means the store refuses the operation by policy, for
	// example Delete on an append-only account.
	ErrReadOnly = errors.New("operation not permitted on this repository (append-only or read-only)")
	// ErrRetained means Delete refused an object that the store keeps
	// under retention (S3 object lock) until a date still to come; the
	// object is untouched and can go once its retention has expired.
	ErrRetained = errors.New("object is under retention")
	// ErrTooLarge means GetAll refused an object larger than its limit
	// without reading it.
	ErrTooLarge = errors.New("object larger than allowed")
)

// CheckSize returns an error wrapping ErrTooLarge when an object of size
// bytes exceeds limit. Backends call it in GetAll before they allocate.
func CheckSize(name string, size, limit int64) error {
	if size < 0 || size > limit {
		return fmt.Errorf("get %s: %d bytes, at most %d expected: %w", name, size, limit, ErrTooLarge)
	}
	return nil
}

// IntoGetter is implemented by backends that can read a whole object into
// a buffer the caller owns, so a reader that fetches many objects (a
// restore) reuses its buffers instead of allocating one per object, and
// the store need not report the size first.
type IntoGetter interface {
	// GetInto reads the whole object into buf and returns its size. An
	// object that does not fit, or fills buf exactly, fails with an
	// error wrapping ErrTooLarge: callers give buf at least one byte
	// more than the largest object they accept, so that a filled buffer
	// proves the object too large without asking for its size. buf's
	// content is undefined after an error.
	GetInto(ctx context.Context, name string, buf []byte) (int, error)
}

// GetInto reads object name into buf by the IntoGetter rule: with be's
// own GetInto where it has one, else with GetAll and a copy.
func GetInto(ctx context.Context, be Backend, name string, buf []byte) (int, error) {
	if g, ok := be.(IntoGetter); ok {
		return g.GetInto(ctx, name, buf)
	}
	data, err := be.GetAll(ctx, name, int64(len(buf))-1)
	if err != nil {
		return 0, err
	}
	return copy(buf, data), nil
}

// ObjectInfo describes one stored object.
type ObjectInfo struct {
	Name string // full object name, e.g. "data/3f/3f2a…"
	Size int64
	// ModTime is when the store last wrote the object, by the store's own
	// clock (file mtime on local and SFTP, LastModified on object stores).
	// A client cannot choose it after the fact: retention and lock leases
	// judge arrival and age by it rather than by times a client wrote into
	// the object. Zero means the store cannot tell.
	ModTime time.Time
}

// Backend is a flat object store.
//
// Put is atomic and exclusive: after it returns nil the whole object is
// visible under name; a crash leaves either nothing or the whole object
// visible; an existing object is never replaced (ErrExist).
type Backend interface {
	// Put stores data under name. It returns an error wrapping ErrExist if
	// name is already present.
	Put(ctx context.Context, name string, data []byte) error
	// Get returns length bytes of the object starting at off; length < 0
	// means up to the end. A missing object is ErrNotExist.
	Get(ctx context.Context, name string, off, length int64) ([]byte, error)
	// GetAll returns the whole object in one request. When the store
	// reports more than limit bytes it fails with an error wrapping
	// ErrTooLarge before allocating anything, so a hostile or damaged
	// store cannot drive the reader's memory (a 1 TiB sparse file), and
	// the reader pays no separate Stat for the bound.
	GetAll(ctx context.Context, name string, limit int64) ([]byte, error)
	// Stat returns the object's size, or ErrNotExist.
	Stat(ctx context.Context, name string) (ObjectInfo, error)
	// List calls fn for every object whose name starts with prefix, in no
	// particular order. An error from fn stops the listing and is returned.
	List(ctx context.Context, prefix string, fn func(ObjectInfo) error) error
	// Delete removes the object; a missing object is ErrNotExist.
	Delete(ctx context.Context, name string) error
	// Location names the store for messages (a path or URL, no secrets).
	Location() string
	// Close releases connections and other resources.
	Close() error
}
