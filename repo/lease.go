package repo

// Reading a file in place under a read lease.
//
// A mapped window of a file can change while a worker reads it, if anyone
// writes the file meanwhile: so a chunk to be stored is normally copied
// into private memory first and hashed and sealed from the copy
// (storeSegment). That copy, and the second hash of a changed chunk whose
// bytes were already hashed in place to compare them with the previous
// generation's, cost 5–10 % of a backup's time on a file image
// (docs/performance.md, "Session 16").
//
// A Linux read lease (fcntl F_SETLEASE, F_RDLCK) proves that no one can
// write: the kernel grants it only while no one has the file open for
// writing (a writable shared mapping counts), and anyone who then opens
// it for writing, or truncates it, must first break the lease. The
// opener waits until the holder releases it (or until
// /proc/sys/fs/lease-break-time passes), and F_GETLEASE tells the holder,
// from the moment the break starts, that the lease is going: it reports
// F_UNLCK instead of F_RDLCK. So the rule is:
//
//   - A chunk is sealed from the mapped bytes, its ID hashed over them,
//     and only then is the lease checked (held). If it is still held, no
//     write has happened yet: the sealed object holds the bytes its ID
//     names. If not, the sealed object is dropped and the chunk is
//     copied, hashed and sealed privately, as without a lease.
//   - A watcher polls the lease and releases it as soon as a break
//     starts, so a writer (a VM being started) waits at most about
//     leasePoll. Any check after that fails, so nothing read in place
//     after the release is stored.
//
// A lease is taken only on local file systems whose leases the kernel
// implements itself (a network or cluster file system may let another
// host write without breaking it), and never on block devices (no
// leases there). Without a lease, everything is as before.

import (
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// leasePoll is how often a lease's watcher looks for a break.
const leasePoll = 20 * time.Millisecond

// leaseFileSystems are the file systems whose leases are their kernel's
// generic ones, broken by every local opener for writing.
var leaseFileSystems = map[int64]bool{
	unix.EXT4_SUPER_MAGIC:  true, // also ext2, ext3
	unix.XFS_SUPER_MAGIC:   true,
	unix.BTRFS_SUPER_MAGIC: true,
	unix.TMPFS_MAGIC:       true,
	unix.F2FS_SUPER_MAGIC:  true,
}

// Counters over every backup in this process, for tests and debugging:
// chunks sealed from mapped bytes under a lease, chunks that had to be
// sealed again from a private copy because the lease went meanwhile, and
// leases released because a writer broke them.
var (
	chunksSealedInPlace atomic.Int64
	inPlaceRedone       atomic.Int64
	leasesBroken        atomic.Int64
)

// noLeases turns leases off, for benchmarks that compare.
var noLeases bool

// readLease is a read lease on an open file; nil is no lease.
type readLease struct {
	fd       int
	once     sync.Once // unlock
	stopOnce sync.Once
	stop     chan struct{}
	done     chan struct{}
	released atomic.Bool
}

// takeReadLease takes a read lease on f, a regular file opened read-only
// on a local file system, and starts its watcher; it returns nil where
// there can be none (someone has f open for writing, f is not ours and
// we lack CAP_LEASE, leases are disabled, another file system).
func takeReadLease(f *os.File) *readLease {
	if noLeases {
		return nil
	}
	fd := int(f.Fd())
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil || !leaseFileSystems[int64(st.Type)] {
		return nil
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETLEASE, unix.F_RDLCK); err != nil {
		return nil
	}
	l := &readLease{fd: fd, stop: make(chan struct{}), done: make(chan struct{})}
	go l.watch()
	return l
}

// held reports whether the lease is still held and no break has started:
// then no one has written the file since it was taken.
func (l *readLease) held() bool {
	if l == nil || l.released.Load() {
		return false
	}
	t, err := unix.FcntlInt(uintptr(l.fd), unix.F_GETLEASE, 0)
	return err == nil && t == unix.F_RDLCK
}

// watch releases the lease as soon as a writer breaks it.
func (l *readLease) watch() {
	defer close(l.done)
	tick := time.NewTicker(leasePoll)
	defer tick.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-tick.C:
			if !l.held() {
				leasesBroken.Add(1)
				l.unlock()
				return
			}
		}
	}
}

// unlock gives the lease back (once); held is false from then on.
func (l *readLease) unlock() {
	l.once.Do(func() {
		l.released.Store(true)
		unix.FcntlInt(uintptr(l.fd), unix.F_SETLEASE, unix.F_UNLCK)
	})
}

// release stops the watcher and gives the lease back. l may be nil.
func (l *readLease) release() {
	if l == nil {
		return
	}
	l.unlock()
	l.stopOnce.Do(func() { close(l.stop) })
	<-l.done
}
