// Package fusefs shows a repository's generations as a read-only FUSE
// file system:
//
//	MOUNTPOINT/VM/<short-id>/<disk>     one directory per generation
//	MOUNTPOINT/VM/latest                -> <short-id> of the newest
//	MOUNTPOINT/VM/<RFC 3339 time>       -> <short-id> (UTC, e.g. 2026-11-30T02:00:00Z)
//
// Rules the code keeps:
//   - Nothing is written: every node is read-only, and the repository is
//     only ever read (through repo.DiskReader).
//   - A read returns authenticated bytes or fails: a range that touches a
//     damaged object is an I/O error (EIO) for that read, logged with the
//     object's name; it is never answered with other bytes.
//   - The tree is built from the manifests once, at mount time; a disk's
//     segment tables are fetched when the disk is first opened, so
//     mounting costs one listing and one read per generation.
//   - A disk's reader (and its cache) lives while the disk is open and is
//     closed with the last handle, so memory is bounded by the open disks
//     times the cache size.
//   - Disk files are opened for direct I/O where the kernel also allows
//     mmap on such files (Linux 6.6 and later): reads then reach the
//     reader as requests of up to 1 MiB and are answered from its cache
//     without a copy, instead of being cut into page-cache read-ahead;
//     elsewhere they go through the page cache. Both give the same bytes.
//   - Unmounting waits until nothing uses the mount point; Serve reports
//     a busy mount point instead of leaving a stale one behind.
package fusefs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"vmvault/repo"
)

// Source is what the file system shows; *repo.Repository is one.
type Source interface {
	Manifests(ctx context.Context, vm string) ([]*repo.Manifest, error)
	OpenDisk(ctx context.Context, m *repo.Manifest, disk string, opts repo.ReaderOptions) (*repo.DiskReader, error)
}

// Options configure a mount.
type Options struct {
	// Reader tunes each open disk's reader (cache size, read-ahead).
	Reader repo.ReaderOptions
	// Logger receives failed reads (naming the damaged object) and
	// unmount progress; nil discards.
	Logger *slog.Logger
	// Debug logs every FUSE request (very verbose).
	Debug bool
	// PageCache serves disk files through the kernel's page cache even
	// where direct I/O is possible.
	PageCache bool
}

// ErrMountPoint means the mount point cannot be used: missing, not a
// directory, not empty, already mounted, or a stale mount.
var ErrMountPoint = errors.New("unusable mount point")

// CheckMountPoint reports why dir cannot take a mount, or nil.
func CheckMountPoint(dir string) error {
	stale := func(err error) bool { return errors.Is(err, syscall.ENOTCONN) || errors.Is(err, syscall.ECONNABORTED) }
	staleErr := fmt.Errorf("%s is a stale FUSE mount (its server died): run 'umount %s' first: %w", dir, dir, ErrMountPoint)
	fi, err := os.Stat(dir)
	switch {
	case stale(err):
		return staleErr
	case err != nil:
		return fmt.Errorf("mount point: %w: %w", err, ErrMountPoint)
	case !fi.IsDir():
		return fmt.Errorf("mount point %s is not a directory: %w", dir, ErrMountPoint)
	}
	// The kernel may still answer stat from its cache after a FUSE
	// server died; opening and listing reach the dead connection.
	f, err := os.Open(dir)
	if stale(err) {
		return staleErr
	}
	if err != nil {
		return fmt.Errorf("mount point: %w: %w", err, ErrMountPoint)
	}
	defer f.Close()
	names, err := f.Readdirnames(1)
	if stale(err) {
		return staleErr
	}
	if mounted, err := isMountPoint(dir); err == nil && mounted {
		return fmt.Errorf("%s is already a mount point (busy): unmount it or choose another directory: %w", dir, ErrMountPoint)
	}
	if len(names) > 0 {
		return fmt.Errorf("mount point %s is not empty: %w", dir, ErrMountPoint)
	}
	return nil
}

// isMountPoint reports whether dir is the root of a mount, by comparing
// its device with its parent's.
func isMountPoint(dir string) (bool, error) {
	var st, parent syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		return false, err
	}
	if err := syscall.Stat(dir+"/..", &parent); err != nil {
		return false, err
	}
	return st.Dev != parent.Dev || st.Ino == parent.Ino, nil
}

// Mounted is a live mount.
type Mounted struct {
	dir    string
	server *fuse.Server
	log    *slog.Logger
	root   *rootNode
}

// Mount loads every generation from src and mounts the tree on dir. It
// returns once the file system answers requests.
func Mount(ctx context.Context, dir string, src Source, opts Options) (*Mounted, error) {
	if err := CheckMountPoint(dir); err != nil {
		return nil, err
	}
	ms, err := src.Manifests(ctx, "")
	if err != nil {
		return nil, err
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	root := &rootNode{src: src, opts: opts, log: log, manifests: ms}
	// Content never changes: let the kernel cache names, attributes and
	// pages for long.
	timeout := time.Hour
	mo := fuse.MountOptions{
		FsName:       "vmvault",
		Name:         "vmvault",
		DirectMount:  os.Geteuid() == 0,
		MaxReadAhead: 1 << 20,
		MaxWrite:     maxRead, // also the largest read request
		Debug:        opts.Debug,
		Options:      []string{"ro", "default_permissions"},
		// Direct I/O reads of one request run in parallel, and mmap
		// still works on direct I/O files.
		ExtraCapabilities: fuse.CAP_ASYNC_DIO | fuse.CAP_DIRECT_IO_ALLOW_MMAP,
		// Replies are vectors of cached slices: the splice path would
		// only set up a pipe per reply to find it cannot be used.
		DisableSplice: true,
	}
	server, err := fs.Mount(dir, root, &fs.Options{MountOptions: mo, EntryTimeout: &timeout, AttrTimeout: &timeout})
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	// The kernel's INIT has been answered by now: without mmap on direct
	// I/O files (before Linux 6.6) a loop mount would still work, but a
	// program that maps the disk file would not.
	if !opts.PageCache && server.KernelSettings().Flags64()&fuse.CAP_DIRECT_IO_ALLOW_MMAP != 0 {
		root.directIO.Store(true)
	} else {
		raiseReadAhead(dir, log)
	}
	return &Mounted{dir: dir, server: server, log: log, root: root}, nil
}

// maxRead is the largest read request the kernel sends (go-fuse's and
// the kernel's default limit).
const maxRead = 1 << 20

// kernelReadAheadKiB is the page-cache read-ahead asked of the kernel for
// the mount when disk files go through the page cache. FUSE starts at
// 128 KiB, which cuts a sequential read into many small requests; with
// 4 MiB, cat of a 2 GiB disk file took 3.5-4.1 s instead of 4.4 s (sys
// time 0.6 s instead of 2.7 s).
const kernelReadAheadKiB = 4096

// raiseReadAhead sets the mount's backing-device read-ahead (root only;
// best effort: a failure only costs speed).
func raiseReadAhead(dir string, log *slog.Logger) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return
	}
	knob := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	if err := os.WriteFile(knob, []byte(fmt.Sprint(kernelReadAheadKiB)), 0); err != nil {
		log.Debug("kernel read-ahead left at its default", "err", err)
	}
}

// DirectIO reports whether disk files are opened for direct I/O (see the
// package rules) rather than through the page cache.
func (m *Mounted) DirectIO() bool { return m.root.directIO.Load() }

// LargestRead is the largest read request the kernel has sent so far, in
// bytes: with direct I/O, reads of 1 MiB or more arrive as requests of
// 1 MiB (the size the mount negotiates), not of the kernel's default
// 128 KiB, which would cost eight round trips for each.
func (m *Mounted) LargestRead() int64 { return m.root.largest.Load() }

// Unmount detaches the file system. It fails with EBUSY while something
// (a loop mount, an open file, a shell's working directory) uses it.
func (m *Mounted) Unmount() error {
	if err := m.unmount(); err != nil {
		return err
	}
	m.server.Wait()
	return nil
}

// unmount asks the kernel directly (root), else fusermount3; the kernel's
// EBUSY is reported as such rather than as fusermount's failure.
func (m *Mounted) unmount() error {
	err := unix.Unmount(m.dir, 0)
	if errors.Is(err, unix.EPERM) {
		err = m.server.Unmount()
	}
	if err != nil {
		return fmt.Errorf("unmount %s: %w", m.dir, err)
	}
	return nil
}

// Serve keeps the file system mounted until ctx is cancelled (SIGINT,
// SIGTERM) or it is unmounted from outside (umount), then unmounts it.
// A busy mount point is retried every second, with a log line saying what
// to do, until it can be unmounted: the process never leaves a stale
// mount behind.
func (m *Mounted) Serve(ctx context.Context) error {
	done := make(chan struct{})
	go func() { m.server.Wait(); close(done) }()
	select {
	case <-done:
		return nil // unmounted from outside
	case <-ctx.Done():
	}
	for attempt := 0; ; attempt++ {
		err := m.unmount()
		if err == nil {
			<-done
			return nil
		}
		select {
		case <-done:
			return nil
		default:
		}
		if attempt%10 == 0 {
			m.log.Error("mount point is busy: unmount what uses it (a loop mount, an open file, a shell inside it); retrying", "mountpoint", m.dir, "err", err)
		}
		time.Sleep(time.Second)
	}
}

// rootNode is MOUNTPOINT: one directory per VM.
type rootNode struct {
	fs.Inode
	src       Source
	opts      Options
	log       *slog.Logger
	manifests []*repo.Manifest
	directIO  atomic.Bool  // open disk files for direct I/O
	largest   atomic.Int64 // the largest read request so far, in bytes
}

var _ = (fs.NodeOnAdder)((*rootNode)(nil))

// OnAdd builds the whole tree: VMs, generations, links, disk files.
func (n *rootNode) OnAdd(ctx context.Context) {
	byVM := map[string][]*repo.Manifest{}
	var vms []string
	for _, m := range n.manifests {
		if _, ok := byVM[m.VM]; !ok {
			vms = append(vms, m.VM)
		}
		byVM[m.VM] = append(byVM[m.VM], m) // oldest first
	}
	for _, vm := range vms {
		if !validName(vm) {
			n.log.Warn("VM name cannot be a file name; not shown", "vm", vm)
			continue
		}
		vmDir := n.NewPersistentInode(ctx, &fs.Inode{}, fs.StableAttr{Mode: syscall.S_IFDIR})
		n.AddChild(vm, vmDir, false)
		ms := byVM[vm]
		for _, m := range ms {
			genDir := vmDir.NewPersistentInode(ctx, &fs.Inode{}, fs.StableAttr{Mode: syscall.S_IFDIR})
			vmDir.AddChild(m.ShortID(), genDir, false)
			for i := range m.Disks {
				d := &m.Disks[i]
				if !validName(d.Name) {
					n.log.Warn("disk name cannot be a file name; not shown", "vm", vm, "generation", m.ShortID(), "disk", d.Name)
					continue
				}
				f := &diskNode{root: n, m: m, disk: d.Name, size: d.Size}
				genDir.AddChild(d.Name, genDir.NewPersistentInode(ctx, f, fs.StableAttr{Mode: syscall.S_IFREG}), false)
			}
			// The first generation of a given second keeps the time name.
			name := m.Time.UTC().Format(time.RFC3339)
			if vmDir.GetChild(name) == nil {
				vmDir.AddChild(name, vmDir.NewPersistentInode(ctx, &fs.MemSymlink{Data: []byte(m.ShortID())}, fs.StableAttr{Mode: syscall.S_IFLNK}), false)
			}
		}
		latest := ms[len(ms)-1].ShortID()
		vmDir.AddChild("latest", vmDir.NewPersistentInode(ctx, &fs.MemSymlink{Data: []byte(latest)}, fs.StableAttr{Mode: syscall.S_IFLNK}), false)
	}
}

// validName reports whether s can be one path component.
func validName(s string) bool {
	return s != "" && s != "." && s != ".." && s != "latest" && !strings.ContainsAny(s, "/\x00")
}

// diskNode is one disk image, a read-only file.
type diskNode struct {
	fs.Inode
	root *rootNode
	m    *repo.Manifest
	disk string
	size int64

	mu     sync.Mutex
	dr     *repo.DiskReader
	opened int              // open handles
	closed repo.ReaderStats // counters of readers already closed
}

var (
	_ = (fs.NodeGetattrer)((*diskNode)(nil))
	_ = (fs.NodeOpener)((*diskNode)(nil))
	_ = (fs.NodeReader)((*diskNode)(nil))
	_ = (fs.NodeReleaser)((*diskNode)(nil))
	_ = (fs.NodeLseeker)((*diskNode)(nil))
)

// Getattr reports the image size; mode 0400: disk images hold the guest's
// secrets.
func (n *diskNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFREG | 0o400
	out.Size = uint64(n.size)
	out.Blocks = (uint64(n.size) + 511) / 512
	// The preferred I/O size (st_blksize): cat, cp and other tools size
	// their reads by it, and with direct I/O each read is one request.
	out.Blksize = maxRead
	t := n.m.Time
	out.SetTimes(&t, &t, &t)
	return 0
}

// Open opens the disk's reader on first use; writes are refused.
func (n *diskNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC|syscall.O_APPEND) != 0 {
		return nil, 0, syscall.EROFS
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.dr == nil {
		dr, err := n.root.src.OpenDisk(ctx, n.m, n.disk, n.root.opts.Reader)
		if err != nil {
			// The kernel interrupts a request when a signal reaches the
			// thread that made it (the Go runtime preempts goroutines
			// with SIGURG): EINTR then, which the caller retries, never
			// EIO, which it takes for a broken disk.
			if ctx.Err() != nil {
				return nil, 0, syscall.EINTR
			}
			n.root.log.Error("open disk failed", "vm", n.m.VM, "generation", n.m.ShortID(), "disk", n.disk, "err", err)
			return nil, 0, syscall.EIO
		}
		n.dr = dr
	}
	n.opened++
	if n.root.directIO.Load() {
		return nil, fuse.FOPEN_DIRECT_IO, 0
	}
	// The content never changes: keep the page cache across opens.
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

// Read serves a range through the reader, as slices of its cache written
// to the kernel without a copy; a damaged object is EIO.
func (n *diskNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	n.mu.Lock()
	dr := n.dr
	n.mu.Unlock()
	if dr == nil {
		return nil, syscall.EBADF
	}
	storeMax(&n.root.largest, int64(len(dest)))
	v, err := dr.ReadSlices(ctx, off, len(dest))
	if err != nil && v.N < len(dest) && off+int64(v.N) < dr.Size() {
		v.Release()
		if ctx.Err() != nil {
			return nil, syscall.EINTR
		}
		n.root.log.Error("read failed", "disk", dr.Name(), "offset", off, "length", len(dest), "err", err)
		return nil, syscall.EIO
	}
	return viewResult{v}, 0
}

// storeMax raises a to v if v is larger.
func storeMax(a *atomic.Int64, v int64) {
	for {
		old := a.Load()
		if v <= old || a.CompareAndSwap(old, v) {
			return
		}
	}
}

// viewResult sends a reader's view to the kernel in one writev (go-fuse
// uses Slices when a result has it) and releases the view once sent.
type viewResult struct{ v *repo.View }

func (r viewResult) Size() int { return r.v.N }

func (r viewResult) Done() { r.v.Release() }

func (r viewResult) Slices() ([][]byte, fuse.Status) { return r.v.Bufs, fuse.OK }

func (r viewResult) Bytes(buf []byte) ([]byte, fuse.Status) {
	buf = buf[:0]
	for _, b := range r.v.Bufs {
		buf = append(buf, b...)
	}
	return buf, fuse.OK
}

// Lseek answers SEEK_DATA and SEEK_HOLE from the reader's extents, so
// cp --sparse, qemu-img and other hole-aware readers skip zero ranges
// without reading them.
func (n *diskNode) Lseek(ctx context.Context, fh fs.FileHandle, off uint64, whence uint32) (uint64, syscall.Errno) {
	n.mu.Lock()
	dr := n.dr
	n.mu.Unlock()
	if dr == nil {
		return 0, syscall.EBADF
	}
	if whence != unix.SEEK_DATA && whence != unix.SEEK_HOLE {
		return 0, syscall.EINVAL
	}
	if int64(off) >= dr.Size() {
		return 0, syscall.ENXIO
	}
	// Extents a window at a time: a hole-aware copier seeks once per
	// extent, and each seek should cost the extents up to the answer,
	// not those up to the end of the disk.
	wantZero := whence == unix.SEEK_HOLE
	const window = 64 << 20
	for pos := int64(off); pos < dr.Size(); pos += window {
		ext, err := dr.Extents(ctx, pos, window)
		if err != nil {
			if ctx.Err() != nil {
				return 0, syscall.EINTR
			}
			n.root.log.Error("seek failed", "disk", dr.Name(), "offset", off, "err", err)
			return 0, syscall.EIO
		}
		for _, e := range ext {
			if e.Zero == wantZero {
				return uint64(max(e.Off, int64(off))), 0
			}
		}
	}
	if wantZero {
		return uint64(dr.Size()), 0 // the end counts as a hole
	}
	return 0, syscall.ENXIO
}

// Release closes the reader with the last handle.
func (n *diskNode) Release(ctx context.Context, fh fs.FileHandle) syscall.Errno {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.opened--
	if n.opened == 0 && n.dr != nil {
		n.closed = addStats(n.closed, n.dr.Stats())
		n.dr.Close()
		n.dr = nil
	}
	return 0
}

// Stats sums the reader counters of every disk since the mount.
func (m *Mounted) Stats() repo.ReaderStats {
	var st repo.ReaderStats
	m.root.walkDisks(func(n *diskNode) {
		n.mu.Lock()
		st = addStats(st, n.closed)
		if n.dr != nil {
			st = addStats(st, n.dr.Stats())
		}
		n.mu.Unlock()
	})
	return st
}

func addStats(a, b repo.ReaderStats) repo.ReaderStats {
	a.BytesRead += b.BytesRead
	a.FetchedBytes += b.FetchedBytes
	a.ChunksFetched += b.ChunksFetched
	a.ListsFetched += b.ListsFetched
	a.CacheHits += b.CacheHits
	a.Waits += b.Waits
	a.WaitTime += b.WaitTime
	a.BuffersReused += b.BuffersReused
	return a
}

func (n *rootNode) walkDisks(fn func(*diskNode)) {
	for _, vm := range n.Children() {
		for _, gen := range vm.Children() {
			for _, f := range gen.Children() {
				if d, ok := f.Operations().(*diskNode); ok {
					fn(d)
				}
			}
		}
	}
}
