package repo

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"vmvault/backend/local"
	"vmvault/chunk"
	"vmvault/internal/testio"
)

// streamOnly hides every interface but io.Reader, so the backup reads
// the image as a stream.
type streamOnly struct{ io.Reader }

// A sparse image file: its holes are never read (bytes_read counts only
// the data), it backs up to the same segments and digest as the same bytes
// read as a stream, and it restores byte-identical.
func TestBackupSparseFileSkipsHoles(t *testing.T) {
	tr := newTestRepo(t)
	const size = 256 << 20
	path := filepath.Join(t.TempDir(), "sparse.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	data := testImage(7, 3<<20)
	// Data at an unaligned offset inside a segment, across a segment
	// boundary, and at the very end.
	var dataBytes int64
	for _, off := range []int64{5<<20 + 4096, 64<<20 - 1<<20, size - 2<<20} {
		n, err := f.WriteAt(data[:2<<20], off)
		if err != nil {
			t.Fatal(err)
		}
		dataBytes += int64(n)
	}
	// Islands of data in a hole, as block writes leave them (windows
	// partly data, mapped with their holes), one with an 8 KiB hole
	// inside that falls within a chunk.
	for i, off := range []int64{100 << 20, 100<<20 + 300<<10, 101<<20 + 8192, 130<<20 + 4096} {
		n := []int{4096, 64 << 10, 200 << 10, 128 << 10}[i]
		if _, err := f.WriteAt(data[1<<20:1<<20+n], off); err != nil {
			t.Fatal(err)
		}
		dataBytes += int64(n)
	}
	if _, err := f.WriteAt(data[:8192], 101<<20+200<<10+8192+8192); err != nil {
		t.Fatal(err)
	}
	dataBytes += 8192
	mappedBefore := holedSegmentsMapped.Load()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 >= size/2 {
		t.Skip("the file system of the test's temp dir does not keep files sparse")
	}
	m, err := tr.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Source: path, Reader: f, Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	// Filesystems report data at block granularity: allow a little slack.
	if m.Stats.BytesRead < dataBytes || m.Stats.BytesRead > dataBytes+3<<20 {
		t.Fatalf("bytes_read %d for %d bytes of data in a %d-byte sparse file", m.Stats.BytesRead, dataBytes, int64(size))
	}
	if m.Stats.BytesZero < size-dataBytes-8<<20 { // zero runs inside data segments are found per 64 KiB block
		t.Fatalf("bytes_zero %d", m.Stats.BytesZero)
	}
	// Windows with data and holes are mapped, their holes never read.
	if n := holedSegmentsMapped.Load() - mappedBefore; n < 3 {
		t.Fatalf("%d segments with holes were cut from mapped windows, want at least 3", n)
	}
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ms, err := tr.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Reader: streamOnly{bytes.NewReader(img)}, Size: -1}}})
	if err != nil {
		t.Fatal(err)
	}
	if ms.Stats.BytesRead != size {
		t.Fatalf("stream: bytes_read %d of %d", ms.Stats.BytesRead, int64(size))
	}
	if ms.Disks[0].Digest != m.Disks[0].Digest {
		t.Fatal("the sparse file and the same bytes as a stream give different segments")
	}
	if ms.Stats.SegmentsNew != 0 {
		t.Fatalf("stream of the same image stored %d new segments", ms.Stats.SegmentsNew)
	}
	// --sha256 of the sparse file (mapped windows with holes: zeros hashed
	// in the holes' place) is the image's.
	mh, err := tr.Backup(context.Background(), BackupRequest{VM: "vm", SHA256: true, Disks: []DiskSource{{Name: "d", Source: path, Reader: f, Size: size}}})
	if err != nil {
		t.Fatal(err)
	}
	if want := sha256.Sum256(img); mh.Disks[0].SHA256 != hex.EncodeToString(want[:]) {
		t.Fatalf("sha256 of the sparse file %s, want %x", mh.Disks[0].SHA256, want)
	}
	r := tr.reopen(t)
	if got := restoreBytes(t, r, mustFind(t, r, "vm", m.ID[:8])); !bytes.Equal(got, img) {
		t.Fatal("restore of the sparse image differs")
	}
}

// Content that moves (here: 64 KiB inserted near the start, as a qcow2
// rewrite or a file system moves whole blocks) keeps its segments and
// chunks: the next backup stores a few segments' worth, not the image.
func TestBackupMovedContentKeepsSegments(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(41, 64<<20)
	m1 := backupBytes(t, tr.Repository, "vm", img)
	ins := testImage(42, 64<<10)
	for i := range ins {
		ins[i] |= 1 // data, not a zero run
	}
	moved := append(append(bytes.Clone(img[:1<<20+8192]), ins...), img[1<<20+8192:]...)
	m2 := backupBytes(t, tr.Repository, "vm", moved)
	t.Logf("%d of %d segments new, %d new bytes", m2.Stats.SegmentsNew, m2.Stats.SegmentsSeen, m2.Stats.BytesNew)
	// Boundaries are keyed per repository, so how soon the cuts after the
	// insertion fall back into step varies from run to run (up to 6 of
	// 18 segments and 13 MB were seen); fixed-offset segments stored 16
	// of 17 segments and 33.7 MB, half the image.
	if m2.Stats.SegmentsNew > 7 || m2.Stats.BytesNew > int64(len(img))/4 {
		t.Fatalf("after a 64 KiB insertion: %d of %d segments new, %d bytes of chunks new (of %d), %d stored",
			m2.Stats.SegmentsNew, m2.Stats.SegmentsSeen, m2.Stats.BytesNew, len(img), m2.Stats.BytesStored)
	}
	if m1.Stats.SegmentsSeen < 10 {
		t.Fatalf("only %d segments: the test needs several", m1.Stats.SegmentsSeen)
	}
	r := tr.reopen(t)
	if got := restoreBytes(t, r, mustFind(t, r, "vm", m2.ID[:8])); !bytes.Equal(got, moved) {
		t.Fatal("restore of the moved image differs")
	}
}

// A repository of format version 1 (fixed-size segments) is refused with
// a message that says what to do, not misread.
func TestOpenOldFormatFails(t *testing.T) {
	tr := newTestRepo(t)
	cfg := tr.cfg
	cfg.Version = 1
	raw, _ := json.Marshal(cfg)
	path := filepath.Join(tr.dir, configName)
	os.Chmod(path, 0o600)
	if err := os.WriteFile(path, tr.codec.seal(TypeConfig, configName, raw), 0o600); err != nil {
		t.Fatal(err)
	}
	be, _ := local.Open(tr.dir)
	_, err := Open(context.Background(), be, []byte("secret"), Options{CacheDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "version 1 is not supported") || !strings.Contains(err.Error(), "older vmvault") {
		t.Fatalf("open of a version-1 repository: %v", err)
	}
}

// A file is read through mapped windows: the windows hold the file's
// bytes, a window with a hole inside is mapped with its holes reported and
// left unread (no page of them enters the page cache), and a file shorter
// than announced is never mapped past its end.
func TestMapWindow(t *testing.T) {
	path := filepath.Join(t.TempDir(), "img.raw")
	img := testImage(11, 8<<20)
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ir := newImageReader(DiskSource{Source: path, Reader: f, Size: int64(len(img))}, 2)
	if !ir.mappable() {
		t.Fatal("a regular file is not mappable")
	}
	mem, holes, ok, err := ir.mapWindow(context.Background(), 1<<20, 5<<20)
	if err != nil || !ok || holes != nil {
		t.Fatalf("map a window: ok %v, holes %v, %v", ok, holes, err)
	}
	if !bytes.Equal(mem, img[1<<20:6<<20]) {
		t.Fatal("the mapped window differs from the file")
	}
	unmapWindow(mem)

	// Announced 12 MiB, has 8: no mapping past the end (a touch there
	// would fault); the window is read into a buffer instead, which says
	// what happened (before, the missing part read as a hole: zeros).
	ir = newImageReader(DiskSource{Source: path, Reader: f, Size: 12 << 20}, 2)
	if _, _, ok, err := ir.mapWindow(context.Background(), 4<<20, 8<<20); ok || err != nil {
		t.Fatalf("window past the end of the file: ok %v, %v", ok, err)
	}
	if ir.isHole(8<<20, 4<<20) {
		t.Fatal("the part missing from a file that shrank is a hole")
	}
	if _, err := ir.fill(context.Background(), make([]byte, 8<<20), 4<<20); err == nil || !strings.Contains(err.Error(), "ended early") {
		t.Fatalf("read past the end of the file: %v", err)
	}

	// A hole inside the window.
	sparse := filepath.Join(t.TempDir(), "sparse.raw")
	sf, err := os.Create(sparse)
	if err != nil {
		t.Fatal(err)
	}
	defer sf.Close()
	sf.Truncate(64 << 20)
	sf.WriteAt(img[:1<<20], 0)
	ir = newImageReader(DiskSource{Source: sparse, Reader: sf, Size: 64 << 20}, 2)
	if len(ir.dataSpans(0, 64<<20)) == 1 && ir.dataSpans(0, 64<<20)[0].end == 64<<20 {
		t.Skip("the file system of the test's temp dir does not keep files sparse")
	}
	mem, holes, ok, err = ir.mapWindow(context.Background(), 0, 12<<20)
	if err != nil || !ok {
		t.Fatalf("window with a hole: ok %v, %v", ok, err)
	}
	defer unmapWindow(mem)
	if want := []chunk.Hole{{Off: 1 << 20, End: 12 << 20}}; !slices.Equal(holes, want) {
		t.Fatalf("window with a hole: holes %v, want %v", holes, want)
	}
	if !bytes.Equal(mem[:1<<20], img[:1<<20]) {
		t.Fatal("the mapped window's data differs from the file")
	}
	// The data is resident; no page of the hole was read (mincore of a
	// file mapping says whether the page cache holds the page).
	page := os.Getpagesize()
	for i, in := range testio.Resident(t, mem) {
		if inHole := i*page >= 1<<20; in && inHole {
			t.Fatalf("page %d of the hole was read", i)
		} else if !in && !inHole {
			t.Fatalf("data page %d is not present", i)
		}
	}
	if all, _, ok, _ := ir.mapWindow(context.Background(), 16<<20, 12<<20); ok {
		unmapWindow(all)
		t.Fatal("a window of holes only was mapped")
	}
}

// A file that shrinks under a mapped window makes the next touch a
// memory fault: an error naming the source, not a crash.
func TestCatchFault(t *testing.T) {
	path := filepath.Join(t.TempDir(), "img.raw")
	if err := os.WriteFile(path, testImage(12, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ir := newImageReader(DiskSource{Source: path, Reader: f, Size: 1 << 20}, 2)
	mem, _, ok, err := ir.mapWindow(context.Background(), 0, 1<<20)
	if err != nil || !ok {
		t.Fatalf("map: ok %v, %v", ok, err)
	}
	defer unmapWindow(mem)
	if err := os.Truncate(path, 0); err != nil {
		t.Fatal(err)
	}
	touch := func() (sum byte, err error) {
		defer catchFault(path, &err)()
		for i := 0; i < len(mem); i += 4096 {
			sum += mem[i]
		}
		return sum, nil
	}
	_, err = touch()
	if !errors.Is(err, errSourceFault) || !strings.Contains(err.Error(), path) {
		t.Fatalf("touching a window of a truncated file: %v", err)
	}
}

// A backup of a mapped file gives the same generation as the same bytes
// read as a stream, and bytes_read counts each byte once although the
// mapped windows overlap.
func TestBackupMappedFileMatchesStream(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(13, 40<<20)
	clear(img[9<<20 : 10<<20]) // a zero run inside a data window
	path := filepath.Join(t.TempDir(), "img.raw")
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := tr.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Source: path, Reader: f, Size: int64(len(img))}}})
	if err != nil {
		t.Fatal(err)
	}
	if m.Stats.BytesRead != int64(len(img)) {
		t.Fatalf("bytes_read %d of %d", m.Stats.BytesRead, len(img))
	}
	ms, err := tr.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Reader: streamOnly{bytes.NewReader(img)}, Size: -1}}})
	if err != nil {
		t.Fatal(err)
	}
	if ms.Disks[0].Digest != m.Disks[0].Digest || ms.Stats.SegmentsNew != 0 {
		t.Fatalf("the mapped file and the stream differ: %d new segments", ms.Stats.SegmentsNew)
	}
	// Again from the file: every segment is found known.
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	again, err := tr.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Source: path, Reader: f, Size: int64(len(img))}}})
	if err != nil {
		t.Fatal(err)
	}
	if again.Disks[0].Digest != m.Disks[0].Digest || again.Stats.SegmentsNew != 0 {
		t.Fatalf("the mapped file backed up again differs: %d new segments", again.Stats.SegmentsNew)
	}
	r := tr.reopen(t)
	if got := restoreBytes(t, r, mustFind(t, r, "vm", m.ID[:8])); !bytes.Equal(got, img) {
		t.Fatal("restore of the mapped image differs")
	}
}

// A file shorter than announced (it shrank after its size was taken)
// fails the backup with a clear error, instead of being stored with
// zeros where its end went missing.
func TestBackupShrunkFileFails(t *testing.T) {
	tr := newTestRepo(t)
	path := filepath.Join(t.TempDir(), "img.raw")
	if err := os.WriteFile(path, testImage(14, 20<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, err = tr.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Source: path, Reader: f, Size: 48 << 20}}})
	if err == nil || !strings.Contains(err.Error(), "ended early") || !strings.Contains(err.Error(), path) {
		t.Fatalf("backup of a file shorter than announced: %v", err)
	}
}

// A mapped window is the page cache's own memory: a file written while it
// is backed up (a running VM's image backed up without a snapshot) changes
// under the workers. Whatever the generation records must then still be
// self-consistent: every stored chunk holds exactly the bytes its ID names
// (a torn image, as a read into buffers gives), and every segment ID is
// the keyed hash of its list. A chunk ID over other bytes than the chunk
// would poison deduplication: a later backup of the hashed bytes would
// reuse it and restore different data. Rounds after the first are split
// guided by the round before (chunks hashed in place and taken).
func TestBackupMappedFileWrittenMeanwhile(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(15, 40<<20)
	path := filepath.Join(t.TempDir(), "img.raw")
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	w, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	inPlace := chunksSealedInPlace.Load()
	defer func() {
		// The writer holds the file open: no lease, private copies.
		if n := chunksSealedInPlace.Load() - inPlace; n != 0 {
			t.Errorf("%d chunks sealed in place from a file open for writing", n)
		}
	}()
	for round := range 4 {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() { // the "guest"
			defer close(done)
			rewriteBlocks(w, len(img), uint64(round), stop)
		}()
		m, err := tr.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Source: path, Reader: f, Size: int64(len(img))}}})
		close(stop)
		<-done
		f.Close()
		if err != nil {
			t.Fatalf("round %d: backup of a file written meanwhile: %v", round, err)
		}
		r := tr.reopen(t)
		m = mustFind(t, r, "vm", m.ID[:8])
		restoreBytes(t, r, m) // verifies every chunk against its ID
		checkSegmentIDs(t, r, m)
		rep, err := r.Check(context.Background(), CheckOptions{ReadData: true})
		if err != nil || !rep.OK() {
			t.Fatalf("round %d: check --read-data: %v %v", round, err, rep.Damage)
		}
	}
}

// rewriteBlocks is a guest writing its disk, the file w of size bytes:
// it rewrites random 64 KiB blocks with random data as fast as it can
// until stop is closed, and returns the first write error.
func rewriteBlocks(w *os.File, size int, seed uint64, stop <-chan struct{}) error {
	rng := rand.New(rand.NewPCG(seed, 7))
	blk := make([]byte, 64<<10)
	for {
		select {
		case <-stop:
			return nil
		default:
		}
		for i := range blk {
			blk[i] = byte(rng.Uint32())
		}
		if _, err := w.WriteAt(blk, int64(rng.IntN(size/len(blk)))*int64(len(blk))); err != nil {
			return err
		}
	}
}
