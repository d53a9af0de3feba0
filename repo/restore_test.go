package repo

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vmvault/backend"
	"vmvault/backend/local"
	"vmvault/chunk"
)

// An existing larger target with other content becomes exactly the image
// (cut only at the end); an unaligned image size takes the buffered path
// for its tail while the aligned runs go through O_DIRECT; a block of
// zeros over old data becomes zero.
func TestRestoreToOverLargerTarget(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(12, 13<<20+1234)
	clear(img[2<<20 : 3<<20])
	m := backupBytes(t, tr.Repository, "vm01", img)
	target := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(target, bytes.Repeat([]byte{0x5a}, 20<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := tr.RestoreTo(context.Background(), m, "", target)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(target)
	if !bytes.Equal(got, img) {
		t.Fatalf("target (%d bytes) differs from the image (%d bytes)", len(got), len(img))
	}
	if st.Bytes != int64(len(img)) || st.Written != int64(len(img)) {
		t.Fatalf("stats %+v: every byte differed and had to be written", st)
	}
	// Again: nothing differs, nothing is written.
	st, err = tr.RestoreTo(context.Background(), m, "", target)
	if err != nil || st.Written != 0 || st.Skipped != int64(len(img)) {
		t.Fatalf("second restore over an equal target: %+v, %v", st, err)
	}
}

// A restore into a new file leaves every zero range of the image a hole:
// the blocks allocated ahead of the direct writes cover only the data.
func TestRestoreToNewFileHolesStayHoles(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(21, 24<<20+777)
	clear(img[5<<20+100 : 17<<20]) // 12 MiB of zeros across segments
	m := backupBytes(t, tr.Repository, "vm01", img)
	target := filepath.Join(t.TempDir(), "disk.raw")
	if _, err := tr.RestoreTo(context.Background(), m, "", target); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(target)
	if !bytes.Equal(got, img) {
		t.Fatalf("target (%d bytes) differs from the image (%d bytes)", len(got), len(img))
	}
	var data int64
	for off := 0; off < len(img); off += compareBlock {
		if !chunk.IsZero(img[off:min(off+compareBlock, len(img))]) {
			data += compareBlock
		}
	}
	var st unix.Stat_t
	if err := unix.Stat(target, &st); err != nil {
		t.Fatal(err)
	}
	// A file system may round each written run out to its blocks and
	// add metadata blocks: allow 1 MiB.
	if alloc := st.Blocks * 512; alloc > data+1<<20 {
		t.Fatalf("target allocates %d bytes, the image holds %d bytes of data: zero ranges were allocated", alloc, data)
	}
	hole, err := unix.Seek(int(mustOpen(t, target).Fd()), 5<<20+100, unix.SEEK_HOLE)
	if err != nil || hole >= 17<<20 {
		t.Fatalf("no hole in the image's zero range: SEEK_HOLE from %d gave %d, %v", 5<<20+100, hole, err)
	}
}

func mustOpen(t *testing.T, name string) *os.File {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// loopDevice attaches a loop device (a real block device) over a file of
// size bytes filled with fill, and detaches it when the test ends. Needs
// root and the loop driver; the test is skipped without them.
func loopDevice(t *testing.T, size int64, fill byte) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("a loop device needs root")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skipf("no loop devices here: %v", err)
	}
	backing := filepath.Join(t.TempDir(), "device")
	if err := os.WriteFile(backing, bytes.Repeat([]byte{fill}, int(size)), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "-f", "--show", backing).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// A block device is restored in place: the image over its start, zero
// ranges zeroed by the kernel, the bytes beyond the image untouched; the
// device's size (not a multiple of a page here) is never changed; a
// second restore writes nothing, a third rewrites only what was damaged.
func TestRestoreToBlockDevice(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(22, 13<<20+1234)
	clear(img[3<<20+513 : 6<<20]) // zeros over the device's old bytes
	clear(img[len(img)-200<<10:]) // and up to an end that is not page-aligned
	m := backupBytes(t, tr.Repository, "vm01", img)
	size := int64(len(img)) + 2048 - int64(len(img))%512 // a whole number of sectors, not of pages
	dev := loopDevice(t, size, 0x5a)
	st, err := tr.RestoreTo(context.Background(), m, "", dev)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dev)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(got)) != size {
		t.Fatalf("device holds %d bytes after the restore, had %d", len(got), size)
	}
	if !bytes.Equal(got[:len(img)], img) {
		t.Fatal("device differs from the image")
	}
	if !bytes.Equal(got[len(img):], bytes.Repeat([]byte{0x5a}, int(size)-len(img))) {
		t.Fatal("restore changed the device beyond the image")
	}
	if st.Written != int64(len(img)) {
		t.Fatalf("stats %+v: every byte differed and had to be written", st)
	}
	st, err = tr.RestoreTo(context.Background(), m, "", dev)
	if err != nil || st.Written != 0 {
		t.Fatalf("second restore onto an equal device: %+v, %v", st, err)
	}
	// Damage a data block and a zero block: only those are rewritten.
	f, err := os.OpenFile(dev, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{9<<20 + 7, 4<<20 + 3} {
		if _, err := f.WriteAt([]byte("garbage"), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	st, err = tr.RestoreTo(context.Background(), m, "", dev)
	if err != nil {
		t.Fatal(err)
	}
	got, _ = os.ReadFile(dev)
	if !bytes.Equal(got[:len(img)], img) || st.Written > 2*compareBlock {
		t.Fatalf("repair of two damaged blocks: equal=%v, wrote %d bytes", bytes.Equal(got[:len(img)], img), st.Written)
	}
}

// An all-zero segment is zeroed by a device that can (a loop device
// passes write-zeroes to its file) without being read back: the restore
// reads from the device only around the data, yet a device full of other
// bytes ends up equal to the image. Before, every byte of the device was
// read back and compared.
func TestRestoreToBlockDeviceZeroesHolesUnread(t *testing.T) {
	tr := newTestRepo(t)
	const mib = 1 << 20
	img := testImage(24, 40*mib)
	clear(img[4*mib : 36*mib])
	m := backupBytes(t, tr.Repository, "vm01", img)
	dev := loopDevice(t, int64(len(img)), 0x5a)
	before := sectorsRead(t, dev)
	st, err := tr.RestoreTo(context.Background(), m, "", dev)
	if err != nil {
		t.Fatal(err)
	}
	read := (sectorsRead(t, dev) - before) * 512
	got, err := os.ReadFile(dev)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, img) {
		t.Fatal("device differs from the image")
	}
	// Segments are at most 6 MiB here: the 32 MiB of zeros hold at
	// least 20 MiB of whole zero segments.
	if st.Zeroed < 16*mib || read > int64(len(img))-st.Zeroed+2*mib {
		t.Fatalf("zeroed %d bytes, read %d bytes back from the device (stats %+v)", st.Zeroed, read, st)
	}
	if st.Written+st.Skipped+st.Zeroed != int64(len(img)) {
		t.Fatalf("stats %+v do not add up to the image's %d bytes", st, len(img))
	}
}

// sectorsRead is how many 512-byte sectors were read from block device
// dev so far (its /sys/block/NAME/stat).
func sectorsRead(t *testing.T, dev string) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "stat"))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		t.Fatalf("%s stat: %q", dev, b)
	}
	n, err := strconv.ParseInt(f[2], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// A device smaller than the image is refused before anything is written.
func TestRestoreToSmallBlockDevice(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(23, 6<<20)
	m := backupBytes(t, tr.Repository, "vm01", img)
	dev := loopDevice(t, 5<<20, 0x5a)
	_, err := tr.RestoreTo(context.Background(), m, "", dev)
	if !errors.Is(err, ErrTargetIncomplete) || !strings.Contains(err.Error(), "the image needs") {
		t.Fatalf("restore onto a small device: %v", err)
	}
	got, _ := os.ReadFile(dev)
	if !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 5<<20)) {
		t.Fatal("a refused restore changed the device")
	}
}

// fetchRecorder is a backend that records, for every GetInto of a data
// object, the buffer it was given and the object's size.
type fetchRecorder struct {
	backend.Backend
	mu          sync.Mutex
	calls       int
	bufBytes    int64
	storedBytes int64
	inFlight    int
	maxInFlight int
}

func (f *fetchRecorder) GetInto(ctx context.Context, name string, buf []byte) (int, error) {
	f.mu.Lock()
	f.inFlight++
	f.maxInFlight = max(f.maxInFlight, f.inFlight)
	f.mu.Unlock()
	n, err := backend.GetInto(ctx, f.Backend, name, buf)
	f.mu.Lock()
	f.inFlight--
	if err == nil && strings.HasPrefix(name, "data/") {
		f.calls++
		f.bufBytes += int64(len(buf))
		f.storedBytes += int64(n) + 1
	}
	f.mu.Unlock()
	return n, err
}

// openRecorded opens tr's repository again through a fetchRecorder.
func openRecorded(t *testing.T, tr *testRepo) (*Repository, *fetchRecorder) {
	t.Helper()
	be, err := local.Open(tr.dir)
	if err != nil {
		t.Fatal(err)
	}
	rec := &fetchRecorder{Backend: be}
	r, err := Open(context.Background(), rec, []byte("secret"), Options{CacheDir: tr.cache})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r, rec
}

// A restore sizes each chunk's fetch (its buffer, and so its weight in
// the budget of bytes in flight) by the chunk's stored size from the
// index, not by what its length allows: compressible chunks take a
// fraction of that, and as many more fetches fit in flight. Before, every
// buffer was the chunk's length plus overhead (4.6 times the stored bytes
// of this text).
func TestRestoreSizesFetchesFromIndex(t *testing.T) {
	tr := newTestRepo(t)
	rng := rand.New(rand.NewPCG(21, 1))
	words := strings.Fields("backup restore chunk segment index manifest prune check mount serve repository snapshot volume guest host disk")
	var text []byte // compresses about 3:1
	for len(text) < 24<<20 {
		text = append(text, words[rng.IntN(len(words))]...)
		text = append(text, " \n"[rng.IntN(2)])
	}
	img := text[:24<<20]
	m := backupBytes(t, tr.Repository, "vm01", img)
	r, rec := openRecorded(t, tr)
	if got := restoreBytes(t, r, m); !bytes.Equal(got, img) {
		t.Fatal("restored image differs")
	}
	t.Logf("%d fetches: %d buffer bytes for %d stored, at most %d in flight", rec.calls, rec.bufBytes, rec.storedBytes, rec.maxInFlight)
	if rec.calls == 0 || rec.bufBytes != rec.storedBytes {
		t.Fatalf("%d fetches took buffers of %d bytes for %d stored bytes: not sized by the index", rec.calls, rec.bufBytes, rec.storedBytes)
	}
}

// The index only hints: a restore whose index understates every chunk's
// size (damaged or forged) still restores the image, reading each chunk
// again into the buffer its length allows; one that overstates them
// reads them all the same.
func TestRestoreIndexSizesWrong(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(22, 9<<20)
	m := backupBytes(t, tr.Repository, "vm01", img)
	for _, tc := range []struct {
		name   string
		adjust func(uint32) uint32
	}{
		{"understated", func(n uint32) uint32 { return n / 2 }},
		{"overstated", func(n uint32) uint32 { return n * 2 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, rec := openRecorded(t, tr)
			ix, err := r.LoadIndex(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			wrong := 0
			d, err := m.Disk("")
			if err != nil {
				t.Fatal(err)
			}
			if err := r.resolveSegments(context.Background(), d); err != nil {
				t.Fatal(err)
			}
			for i := range d.segmentCount() {
				id, zero := d.SegmentID(i)
				if zero {
					continue
				}
				for _, e := range segmentEntries(t, r, id) {
					if ie, ok := ix.Lookup(e.ID); ok && !e.Zero {
						ie.Size = tc.adjust(ie.Size)
						ix.add(ie)
						wrong++
					}
				}
			}
			if wrong == 0 {
				t.Fatal("no index entry changed")
			}
			if got := restoreBytes(t, r, m); !bytes.Equal(got, img) {
				t.Fatal("restored image differs")
			}
			t.Logf("%d entries wrong, %d fetches", wrong, rec.calls)
		})
	}
}

// A restore into a new file keeps many direct writes in flight at once,
// not one per writer: the writes of a segment go out in pieces without
// waiting for one another. Every direct write here waits at a gate that
// opens only once eight have started (on two cores); before, each of the
// four writers had one write of a whole run in flight, the gate never
// opened, and the restore stalled until the test's timer let the writes
// go.
func TestRestoreToFileWritesInFlight(t *testing.T) {
	tr := newTestRepo(t)
	img := make([]byte, 40<<20)
	rng := rand.New(rand.NewPCG(24, 1))
	for i := range img {
		img[i] = byte(rng.Uint32())
	}
	m := backupBytes(t, tr.Repository, "vm01", img)
	// Two writers per core, each with a segment of at least 2 MiB (two
	// pieces) in flight: eight on two cores, where one write per writer
	// made four.
	want := min(8, 4*workers())
	var (
		mu      sync.Mutex
		started int
		gate    = make(chan struct{})
		timer   = time.NewTimer(20 * time.Second)
		opened  = make(chan bool, 1)
		open    sync.Once
	)
	defer timer.Stop()
	go func() {
		select {
		case <-gate:
			opened <- true
		case <-timer.C:
			opened <- false
			open.Do(func() { close(gate) })
		}
	}()
	tr.beforeDirectWrite = func() {
		mu.Lock()
		started++
		if started == want {
			open.Do(func() { close(gate) })
		}
		mu.Unlock()
		<-gate
	}
	target := filepath.Join(t.TempDir(), "disk.raw")
	if _, err := tr.RestoreTo(context.Background(), m, "", target); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	n := started
	mu.Unlock()
	if n == 0 {
		t.Skip("the file system here refuses O_DIRECT: no direct writes to count")
	}
	if !<-opened {
		t.Fatalf("never %d direct writes in flight at once (%d writes in all)", want, n)
	}
	got, _ := os.ReadFile(target)
	if !bytes.Equal(got, img) {
		t.Fatal("target differs from the image")
	}
}
