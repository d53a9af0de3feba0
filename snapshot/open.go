package snapshot

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// mountOptions are the read-only mount options per file system type. A
// snapshot of a mounted file system looks like one that crashed: replaying
// its journal would write to the snapshot (and fail read-only), so journal
// recovery is skipped (noload, norecovery). XFS also refuses a second mount
// of the same UUID while the origin is mounted (nouuid).
var mountOptions = map[string]string{
	"ext2": "ro",
	"ext3": "ro,noload",
	"ext4": "ro,noload",
	"xfs":  "ro,nouuid,norecovery",
}

// reader streams a snapshot (device or file) and turns a stream that ends
// before the expected size into an error rather than a short image.
type reader struct {
	f       *os.File
	name    string
	size    int64
	off     int64
	cleanup func() error // unmounts for the file layout
	onClose func()       // unregisters from the Set

	once     sync.Once
	closeErr error
}

func (r *reader) Read(p []byte) (int, error) {
	n, err := r.f.Read(p)
	r.off += int64(n)
	switch {
	case err == io.EOF && r.off != r.size:
		return n, fmt.Errorf("read %s: ended at %d of %d bytes: %w", r.name, r.off, r.size, io.ErrUnexpectedEOF)
	case err != nil && err != io.EOF:
		return n, fmt.Errorf("read %s at offset %d: %w", r.name, r.off, err)
	}
	return n, err
}

// ReadAt reads at off (pread), for parallel readers of the snapshot.
func (r *reader) ReadAt(p []byte, off int64) (int, error) {
	n, err := r.f.ReadAt(p, off)
	if err != nil && err != io.EOF {
		err = fmt.Errorf("read %s at offset %d: %w", r.name, off+int64(n), err)
	}
	return n, err
}

// Seek passes SEEK_DATA and SEEK_HOLE queries to the file, so a backup
// skips the holes of an image file; it moves the offset Read uses.
func (r *reader) Seek(off int64, whence int) (int64, error) {
	n, err := r.f.Seek(off, whence)
	if err == nil {
		r.off = n
	}
	return n, err
}

// Close closes the file and, for the file layout, unmounts the snapshot.
// Calling it again returns the first result.
func (r *reader) Close() error {
	r.once.Do(func() {
		err := r.f.Close()
		if r.cleanup != nil {
			err = errors.Join(err, r.cleanup())
		}
		if r.onClose != nil {
			r.onClose()
		}
		r.closeErr = err
	})
	return r.closeErr
}

// Open opens a snapshot for reading, like Set.Open, for callers that manage
// snapshots themselves. Close the reader to unmount.
func Open(ctx context.Context, r Runner, snap LV, file string) (io.ReadCloser, int64, error) {
	rd, err := open(ctx, r, snap, file)
	if err != nil {
		return nil, 0, err
	}
	return rd, rd.size, nil
}

func open(ctx context.Context, r Runner, snap LV, file string) (*reader, error) {
	if file == "" {
		return openDevice(snap.DevicePath())
	}
	return openInFS(ctx, r, snap, file)
}

func openDevice(dev string) (*reader, error) {
	f, err := os.Open(dev)
	if err != nil {
		return nil, fmt.Errorf("open snapshot device: %w", err)
	}
	// Seeking to the end is how a block device tells its size.
	size, err := f.Seek(0, io.SeekEnd)
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("size of %s: %w", dev, err)
	}
	return &reader{f: f, name: dev, size: size}, nil
}

// FSType returns the file system type blkid finds on a device ("ext4").
func FSType(ctx context.Context, r Runner, dev string) (string, error) {
	out, err := r.Run(ctx, "blkid", "-o", "value", "-s", "TYPE", dev)
	t := strings.TrimSpace(string(out))
	if err != nil || t == "" {
		var ce *CommandError
		if err == nil || (errors.As(err, &ce) && ce.ExitCode == 2) {
			return "", fmt.Errorf("no file system found on %s", dev)
		}
		return "", fmt.Errorf("detect file system on %s: %w", dev, err)
	}
	return t, nil
}

func openInFS(ctx context.Context, r Runner, snap LV, file string) (rd *reader, err error) {
	rel := filepath.Clean(strings.TrimPrefix(file, "/"))
	if !filepath.IsLocal(rel) {
		return nil, fmt.Errorf("image file %q must be a path inside the file system", file)
	}
	dev := snap.DevicePath()
	fstype, err := FSType(ctx, r, dev)
	if err != nil {
		return nil, err
	}
	opts, ok := mountOptions[fstype]
	if !ok {
		return nil, fmt.Errorf("file system %s on %s is not supported for image files (ext2/3/4, xfs)", fstype, dev)
	}
	dir, err := os.MkdirTemp("", "vmvault-snap-")
	if err != nil {
		return nil, fmt.Errorf("mount point: %w", err)
	}
	if _, err := r.Run(ctx, "mount", "-t", fstype, "-o", opts, dev, dir); err != nil {
		os.Remove(dir)
		return nil, fmt.Errorf("mount snapshot %s: %w", snap, err)
	}
	unmount := func() error {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
		defer cancel()
		if _, err := r.Run(ctx, "umount", dir); err != nil {
			return fmt.Errorf("unmount snapshot %s from %s: %w", snap, dir, err)
		}
		if err := os.Remove(dir); err != nil {
			return fmt.Errorf("remove mount point: %w", err)
		}
		return nil
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, unmount())
		}
	}()
	// os.Root keeps symlinks inside the snapshot from reaching host files.
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("open mounted snapshot: %w", err)
	}
	defer root.Close()
	f, err := root.Open(rel)
	if err != nil {
		return nil, fmt.Errorf("open %s in snapshot %s: %w", rel, snap, err)
	}
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		f.Close()
		if err == nil {
			err = fmt.Errorf("%s in snapshot %s is not a regular file", rel, snap)
		}
		return nil, err
	}
	return &reader{f: f, name: snap.String() + ":" + rel, size: st.Size(), cleanup: unmount}, nil
}
