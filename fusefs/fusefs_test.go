package fusefs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vmvault/backend/local"
	"vmvault/crypto"
	"vmvault/internal/testio"
	"vmvault/repo"
)

// These tests mount for real: they need root (direct mount) and /dev/fuse.
func needFUSE(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the FUSE tests mount directly: run the suite as root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Fatal("the FUSE tests need /dev/fuse")
	}
}

// ext4Image makes a file system image from a directory tree with
// mkfs.ext4 -d: a random file, text files, a nested directory.
func ext4Image(t *testing.T, dir string, seed uint64) (img string, tree string) {
	t.Helper()
	tree = filepath.Join(dir, "tree")
	rng := rand.New(rand.NewPCG(seed, 5))
	big := make([]byte, 9<<20+123)
	for i := range big {
		big[i] = byte(rng.Uint32())
	}
	files := map[string][]byte{
		"big.bin":             big,
		"etc/hostname":        []byte("vm01\n"),
		"etc/fstab":           []byte("/dev/vda1 / ext4 defaults 0 1\n"),
		"var/log/syslog":      bytes.Repeat([]byte("Nov 30 02:00:00 vm01 cron[1]: ok\n"), 20000),
		"home/user/notes.txt": []byte("seed " + string(rune('a'+seed%26)) + "\n"),
	}
	for name, b := range files {
		p := filepath.Join(tree, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	img = filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 48<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", tree, img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	return img, tree
}

func newRepo(t testing.TB) (*repo.Repository, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "repo")
	be, err := local.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	r, err := repo.Init(context.Background(), be, []byte("pw"), repo.Options{KDF: crypto.MinKDFParams, CacheDir: t.TempDir(), SegmentSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r, dir
}

func backupFile(t testing.TB, r *repo.Repository, vm, path string, at time.Time) *repo.Manifest {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	m, err := r.Backup(context.Background(), repo.BackupRequest{VM: vm, Time: at,
		Disks: []repo.DiskSource{{Name: "hda", Source: path, Reader: f, Size: fi.Size()}}})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// mountTest mounts src on a fresh directory and serves it until the test
// ends (or stop is called); stop returns Serve's error.
func mountTest(t *testing.T, src Source) (dir string, m *Mounted, stop func() error) {
	return mountTestOpts(t, src, Options{})
}

func mountTestOpts(t *testing.T, src Source, opts Options) (dir string, m *Mounted, stop func() error) {
	t.Helper()
	dir = t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	m, err := Mount(ctx, dir, src, opts)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- m.Serve(ctx) }()
	stopped := false
	var serr error
	stop = func() error {
		if !stopped {
			stopped = true
			cancel()
			select {
			case serr = <-served:
			case <-time.After(30 * time.Second):
				t.Fatal("Serve did not return after cancel")
			}
		}
		return serr
	}
	t.Cleanup(func() { stop() })
	return dir, m, stop
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	var s [32]byte
	h.Sum(s[:0])
	return s
}

// The tree holds every generation by short ID, latest and time links; a
// disk file equals the image byte for byte; a loop mount of it shows the
// same files as the tree the image was made from; unmounting on cancel
// leaves no mount behind.
func TestMountTreeAndLoopMount(t *testing.T) {
	needFUSE(t)
	r, _ := newRepo(t)
	work := t.TempDir()
	img1, _ := ext4Image(t, filepath.Join(work, "1"), 1)
	img2, tree2 := ext4Image(t, filepath.Join(work, "2"), 2)
	t1 := time.Date(2026, 11, 29, 2, 0, 0, 0, time.UTC)
	m1 := backupFile(t, r, "vm01", img1, t1)
	m2 := backupFile(t, r, "vm01", img2, t1.Add(24*time.Hour))

	dir, mnt, stop := mountTest(t, r)
	for _, p := range []string{"vm01/" + m1.ShortID() + "/hda", "vm01/" + m2.ShortID() + "/hda", "vm01/latest/hda",
		"vm01/2026-11-29T02:00:00Z/hda", "vm01/2026-11-30T02:00:00Z/hda"} {
		if _, err := os.Stat(filepath.Join(dir, p)); err != nil {
			t.Fatalf("tree: %v", err)
		}
	}
	if l, _ := os.Readlink(filepath.Join(dir, "vm01/latest")); l != m2.ShortID() {
		t.Fatalf("latest -> %q, want %s", l, m2.ShortID())
	}
	if fileSum(t, filepath.Join(dir, "vm01", m1.ShortID(), "hda")) != fileSum(t, img1) {
		t.Fatal("generation 1's disk file differs from the image")
	}
	if fileSum(t, filepath.Join(dir, "vm01/latest/hda")) != fileSum(t, img2) {
		t.Fatal("latest disk file differs from the image")
	}
	if err := os.WriteFile(filepath.Join(dir, "vm01/latest/hda"), []byte("x"), 0o600); err == nil {
		t.Fatal("writing a disk file succeeded")
	}
	if err := CheckMountPoint(dir); !errors.Is(err, ErrMountPoint) || !strings.Contains(err.Error(), "already a mount point") {
		t.Fatalf("CheckMountPoint on a live mount: %v", err)
	}

	loop := t.TempDir()
	if out, err := exec.Command("mount", "-o", "ro,loop,noload", filepath.Join(dir, "vm01/latest/hda"), loop).CombinedOutput(); err != nil {
		t.Fatalf("loop mount: %v: %s", err, out)
	}
	defer exec.Command("umount", loop).Run()
	n := 0
	filepath.WalkDir(tree2, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(tree2, p)
		if fileSum(t, filepath.Join(loop, rel)) != fileSum(t, p) {
			t.Errorf("%s differs in the loop-mounted backup", rel)
		}
		n++
		return nil
	})
	if n < 5 {
		t.Fatalf("compared only %d files", n)
	}
	if st := mnt.Stats(); st.BytesRead == 0 || st.FetchedBytes == 0 {
		t.Fatalf("reader counters not kept: %+v", st)
	}
	if out, err := exec.Command("umount", loop).CombinedOutput(); err != nil {
		t.Fatalf("umount loop: %v: %s", err, out)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if mounted, _ := isMountPoint(dir); mounted {
		t.Fatal("still mounted after Serve returned")
	}
}

// Both ways of serving a disk file give the image's bytes to every kind
// of reader: large and small reads, a shared and a private mmap, and a
// loop mount. Direct I/O is used exactly when the kernel also allows mmap
// on direct I/O files.
func TestMountReadModes(t *testing.T) {
	needFUSE(t)
	r, _ := newRepo(t)
	img, tree := ext4Image(t, t.TempDir(), 6)
	backupFile(t, r, "vm01", img, time.Time{})
	want, _ := os.ReadFile(img)
	for _, pageCache := range []bool{false, true} {
		dir, mnt, stop := mountTestOpts(t, r, Options{PageCache: pageCache})
		if kernel := kernelAllowsDirectIOMmap(); mnt.DirectIO() != (kernel && !pageCache) {
			t.Fatalf("PageCache %v, kernel allows mmap on direct I/O %v: DirectIO() = %v", pageCache, kernel, mnt.DirectIO())
		}
		disk := filepath.Join(dir, "vm01/latest/hda")
		// Tools size their reads by st_blksize: one request's worth.
		var st unix.Stat_t
		if err := unix.Stat(disk, &st); err != nil || st.Blksize != maxRead {
			t.Fatalf("PageCache %v: st_blksize %d (%v), want %d", pageCache, st.Blksize, err, maxRead)
		}
		for _, block := range []int{4 << 20, 3<<10 + 7} {
			if testio.ReadExpectEIO(t, disk, want, block) != 0 {
				t.Fatalf("PageCache %v: a read of an undamaged disk failed", pageCache)
			}
			// Direct I/O: the 4 MiB reads reach the server as requests
			// of the negotiated 1 MiB, not of the kernel's default 128 KiB.
			if block == 4<<20 && mnt.DirectIO() && mnt.LargestRead() != maxRead {
				t.Fatalf("reads of %d bytes arrived as requests of at most %d bytes, want %d", block, mnt.LargestRead(), maxRead)
			}
		}
		for _, flags := range []int{unix.MAP_SHARED, unix.MAP_PRIVATE} {
			if err := mmapEqual(disk, want, flags); err != nil {
				t.Fatalf("PageCache %v: %v", pageCache, err)
			}
		}
		loop := t.TempDir()
		if out, err := exec.Command("mount", "-o", "ro,loop,noload", disk, loop).CombinedOutput(); err != nil {
			t.Fatalf("PageCache %v: loop mount: %v: %s", pageCache, err, out)
		}
		got, err := os.ReadFile(filepath.Join(loop, "big.bin"))
		exec.Command("umount", loop).Run()
		if wantBig, _ := os.ReadFile(filepath.Join(tree, "big.bin")); err != nil || !bytes.Equal(got, wantBig) {
			t.Fatalf("PageCache %v: big.bin from the loop mount differs (%v)", pageCache, err)
		}
		if err := stop(); err != nil {
			t.Fatal(err)
		}
	}
}

// mmapEqual maps the file at path in a child process (this test binary,
// run again) and compares it with want. Not in this process: a page fault
// on the mapping waits for the mount, which this process serves, and the
// faulting thread is not in a system call, so a garbage collection that
// stops the world meanwhile waits for it for ever while the goroutines
// that would answer the fault are stopped. (Under the race detector
// TestMountReadModes hung so for 14 minutes; ordinary runs only dodged
// it.) A read(2), as every other test here uses, does not: a thread in a
// system call lets the world stop.
func mmapEqual(path string, want []byte, flags int) error {
	sum := sha256.Sum256(want)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d:%d:%x:%s", mmapChildEnv, flags, len(want), sum, path))
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%v: %s", err, bytes.TrimSpace(out))
	}
	return nil
}

// mmapChildEnv carries the work of mmapEqual's child: FLAGS:LENGTH:SHA256:PATH
// (the path last: it may hold colons).
const mmapChildEnv = "VMVAULT_TEST_MMAP"

// TestMain runs mmapEqual's child when asked, and the tests otherwise.
func TestMain(m *testing.M) {
	if job := os.Getenv(mmapChildEnv); job != "" {
		if err := mmapChild(job); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// mmapChild maps the file a job names, with the job's flags, and checks
// the mapping's SHA-256; the file is closed and unmapped before it
// returns.
func mmapChild(job string) error {
	var flags, n int
	parts := strings.SplitN(job, ":", 4)
	if len(parts) != 4 {
		return fmt.Errorf("bad job %q", job)
	}
	if _, err := fmt.Sscanf(parts[0]+" "+parts[1], "%d %d", &flags, &n); err != nil {
		return fmt.Errorf("bad job %q: %v", job, err)
	}
	want, path := parts[2], parts[3]
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	b, err := unix.Mmap(int(f.Fd()), 0, n, unix.PROT_READ, flags)
	if err != nil {
		return fmt.Errorf("mmap (flags %#x): %w", flags, err)
	}
	defer unix.Munmap(b)
	if got := fmt.Sprintf("%x", sha256.Sum256(b)); got != want {
		return fmt.Errorf("mmap (flags %#x) differs from the image", flags)
	}
	return nil
}

// kernelAllowsDirectIOMmap tells by the kernel's version, not as Mount
// does by the FUSE handshake: Linux 6.6 added FUSE_DIRECT_IO_ALLOW_MMAP.
func kernelAllowsDirectIOMmap() bool {
	var u unix.Utsname
	unix.Uname(&u)
	var major, minor int
	fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &major, &minor)
	return major > 6 || major == 6 && minor >= 6
}

// A flipped byte in a chunk: reads of that range fail with EIO, never
// with other bytes; every read that succeeds returns the image's bytes.
func TestMountDamagedChunkEIO(t *testing.T) {
	needFUSE(t)
	r, repoDir := newRepo(t)
	img, _ := ext4Image(t, t.TempDir(), 3)
	backupFile(t, r, "vm01", img, time.Time{})
	testio.FlipLargestObject(t, repoDir)

	dir, _, _ := mountTest(t, r)
	want, _ := os.ReadFile(img)
	if testio.ReadExpectEIO(t, filepath.Join(dir, "vm01/latest/hda"), want, 64<<10) == 0 {
		t.Fatal("no read failed although a chunk is damaged")
	}
}

func TestCheckMountPoint(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "f")
	os.WriteFile(file, nil, 0o600)
	for _, tc := range []struct{ path, want string }{
		{dir, "not empty"},
		{file, "not a directory"},
		{filepath.Join(dir, "missing"), "no such file"},
	} {
		if err := CheckMountPoint(tc.path); !errors.Is(err, ErrMountPoint) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("CheckMountPoint(%s) = %v, want %q", tc.path, err, tc.want)
		}
	}
	if err := CheckMountPoint(t.TempDir()); err != nil {
		t.Errorf("an empty directory: %v", err)
	}
}

// A partitioned disk (MBR; ext4 at sector 2048, XFS behind it) mounted
// from the FUSE file by offset, as docs/disaster-recovery.md shows: both
// file systems show their files.
func TestMountPartitionsByOffset(t *testing.T) {
	needFUSE(t)
	r, _ := newRepo(t)
	work := t.TempDir()
	tree := filepath.Join(work, "tree")
	os.MkdirAll(tree, 0o755)
	os.WriteFile(filepath.Join(tree, "hello"), []byte("from ext4\n"), 0o644)
	img := filepath.Join(work, "disk.raw")
	os.WriteFile(img, nil, 0o600)
	os.Truncate(img, 400<<20)
	const p1Start, p1Sectors, p2Start, p2Sectors = 2048, 61440, 63488, 655360
	run := func(name string, args ...string) {
		t.Helper()
		if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v: %s", name, args, err, out)
		}
	}
	run("mkfs.ext4", "-q", "-F", "-d", tree, "-E", "offset=1048576", img, "30M")
	xfs := filepath.Join(work, "xfs.img")
	os.WriteFile(xfs, nil, 0o600)
	os.Truncate(xfs, p2Sectors*512)
	run("mkfs.xfs", "-q", "-f", xfs)
	xmnt := t.TempDir()
	run("mount", "-o", "loop", xfs, xmnt)
	werr := os.WriteFile(filepath.Join(xmnt, "x.txt"), []byte("from xfs\n"), 0o644)
	run("umount", xmnt)
	if werr != nil {
		t.Fatal(werr)
	}
	x, _ := os.ReadFile(xfs)
	f, _ := os.OpenFile(img, os.O_RDWR, 0)
	f.WriteAt(x, p2Start*512)
	mbr := make([]byte, 66)
	for i, p := range [][2]uint32{{p1Start, p1Sectors}, {p2Start, p2Sectors}} {
		e := mbr[16*i:]
		e[4] = 0x83
		binary.LittleEndian.PutUint32(e[8:], p[0])
		binary.LittleEndian.PutUint32(e[12:], p[1])
	}
	mbr[64], mbr[65] = 0x55, 0xaa
	f.WriteAt(mbr, 446)
	f.Close()
	backupFile(t, r, "vm01", img, time.Time{})

	dir, _, _ := mountTest(t, r)
	disk := filepath.Join(dir, "vm01/latest/hda")
	for _, p := range []struct {
		opts, file, want string
	}{
		{fmt.Sprintf("ro,loop,noload,offset=%d,sizelimit=%d", p1Start*512, p1Sectors*512), "hello", "from ext4\n"},
		{fmt.Sprintf("ro,loop,norecovery,offset=%d,sizelimit=%d", p2Start*512, p2Sectors*512), "x.txt", "from xfs\n"},
	} {
		m := t.TempDir()
		run("mount", "-o", p.opts, disk, m)
		got, err := os.ReadFile(filepath.Join(m, p.file))
		run("umount", m)
		if err != nil || string(got) != p.want {
			t.Fatalf("partition (%s): %q, %v", p.opts, got, err)
		}
	}
}

// SEEK_DATA and SEEK_HOLE on a disk file walk exactly its data: the
// ranges between them hold the image's non-zero bytes, the holes zeros.
func TestMountSeekHoles(t *testing.T) {
	needFUSE(t)
	r, _ := newRepo(t)
	// The hole before 120 MiB is longer than the 64 MiB a seek looks at
	// in one go.
	img := make([]byte, 140<<20)
	rng := rand.New(rand.NewPCG(4, 4))
	for _, at := range []int{3 << 20, 17<<20 + 12345, 120 << 20} {
		for i := at; i < at+1<<20; i++ {
			img[i] = byte(rng.Uint32() | 1)
		}
	}
	path := filepath.Join(t.TempDir(), "sparse.raw")
	os.WriteFile(path, img, 0o600)
	backupFile(t, r, "vm01", path, time.Time{})
	dir, _, _ := mountTest(t, r)
	f, err := os.Open(filepath.Join(dir, "vm01/latest/hda"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	var data int64
	for off := int64(0); ; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, syscall.ENXIO) {
			break
		}
		if err != nil {
			t.Fatalf("SEEK_DATA at %d: %v", off, err)
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil || h <= d {
			t.Fatalf("SEEK_HOLE at %d: %d, %v", d, h, err)
		}
		if !bytes.Equal(img[off:d], make([]byte, d-off)) {
			t.Fatalf("hole [%d,%d) is not zero in the image", off, d)
		}
		data += h - d
		off = h
	}
	// Data extents cover whole chunks, so they may include some zeros;
	// but they must cover every non-zero byte and skip most of the holes.
	if data < 3<<20 || data > 12<<20 {
		t.Fatalf("SEEK_DATA/SEEK_HOLE report %d bytes of data for 3 MiB", data)
	}
}

// slowFirstOpen is the repository, except that its first OpenDisk waits
// until the request is interrupted (or 20 s pass) and fails: a fake of a
// slow store (tables fetched over a busy link), beside the real mount
// tests above.
type slowFirstOpen struct {
	*repo.Repository
	first       atomic.Bool
	interrupted atomic.Bool
}

func (s *slowFirstOpen) OpenDisk(ctx context.Context, m *repo.Manifest, disk string, opts repo.ReaderOptions) (*repo.DiskReader, error) {
	if s.first.CompareAndSwap(false, true) {
		select {
		case <-ctx.Done():
			s.interrupted.Store(true)
			return nil, ctx.Err()
		case <-time.After(20 * time.Second):
			return nil, errors.New("never interrupted")
		}
	}
	return s.Repository.OpenDisk(ctx, m, disk, opts)
}

// A signal reaching the thread that opens a disk file makes the kernel
// interrupt the open; the Go runtime sends such signals (SIGURG) to its
// own threads all the time. The mount answers EINTR, which the caller
// retries, not EIO: before, an open that took a while under load failed
// as if the disk were damaged (seen in CI: TestMountSFTP's open of
// vm01/latest/hda, "input/output error").
func TestMountOpenInterrupted(t *testing.T) {
	needFUSE(t)
	r, _ := newRepo(t)
	img := filepath.Join(t.TempDir(), "img")
	want := bytes.Repeat([]byte("interrupted open "), 1<<16)
	if err := os.WriteFile(img, want, 0o600); err != nil {
		t.Fatal(err)
	}
	backupFile(t, r, "vm01", img, time.Now())
	src := &slowFirstOpen{Repository: r}
	dir, _, _ := mountTest(t, src)

	type result struct {
		data []byte
		err  error
	}
	tid := make(chan int, 1)
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		tid <- unix.Gettid()
		data, err := os.ReadFile(filepath.Join(dir, "vm01/latest/hda"))
		done <- result{data, err}
	}()
	id := <-tid
	var res result
	for waiting := true; waiting; {
		select {
		case res = <-done:
			waiting = false
		case <-time.After(20 * time.Millisecond):
			// SIGURG: the runtime's own preemption signal, handled and
			// otherwise ignored by the Go program.
			if !src.interrupted.Load() {
				unix.Tgkill(os.Getpid(), id, unix.SIGURG)
			}
		}
	}
	if !src.interrupted.Load() {
		t.Fatalf("the open was never interrupted (%v)", res.err)
	}
	if res.err != nil || !bytes.Equal(res.data, want) {
		t.Fatalf("read after an interrupted open: %v (%d bytes)", res.err, len(res.data))
	}
}

// mmapEqual's child really compares: a plain file against its own bytes
// and against bytes with one flipped.
func TestMmapEqualChecks(t *testing.T) {
	want := make([]byte, 3<<20+5)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range want {
		want[i] = byte(rng.Uint32())
	}
	path := filepath.Join(t.TempDir(), "a:b.img") // a colon in the path, too
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, flags := range []int{unix.MAP_SHARED, unix.MAP_PRIVATE} {
		if err := mmapEqual(path, want, flags); err != nil {
			t.Fatalf("flags %#x: the file's own bytes: %v", flags, err)
		}
		other := bytes.Clone(want)
		other[2<<20] ^= 1
		if err := mmapEqual(path, other, flags); err == nil || !strings.Contains(err.Error(), "differs") {
			t.Fatalf("flags %#x: one flipped byte: %v, want a difference", flags, err)
		}
	}
}
