// Package backendtest is the one conformance suite for backend.Backend.
// Every backend (local, SFTP, S3) runs it from its own tests:
//
//	func TestConformance(t *testing.T) {
//		backendtest.Run(t, func(t *testing.T) backend.Backend { return newEmptyBackend(t) })
//	}
//
// The suite checks the contract stated in package backend, nothing that
// one store happens to do: Put is exclusive (a second Put of a name fails
// with ErrExist and leaves the first bytes in place, also when many
// writers race) and atomic (a reader never sees part of an object); Get
// reads whole objects and ranges and reports ErrNotExist; Stat reports
// size and the store's write time; List finds exactly the objects under a
// prefix, also many of them (more than one page of an object store's
// listing); Delete removes and reports ErrNotExist for a missing object;
// all of it is safe for concurrent use.
//
// newBackend must return an empty, writable repository that no other test
// uses; the suite never closes it (the caller's cleanup does). Tests of
// what only one store has (append-only accounts, reconnects, ssh-agent,
// object lock) stay beside that backend.
package backendtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"vmvault/backend"
)

// Options adjusts the suite to what a store can honestly promise.
type Options struct {
	// ManyObjects is how many objects the listing test writes (default
	// 1100: more than one page of 1000 on an object store).
	ManyObjects int
}

// Run runs every conformance test as a subtest of t.
func Run(t *testing.T, newBackend func(t *testing.T) backend.Backend, opts Options) {
	if opts.ManyObjects <= 0 {
		opts.ManyObjects = 1100
	}
	t.Run("PutGet", func(t *testing.T) { testPutGet(t, newBackend(t)) })
	t.Run("PutExclusive", func(t *testing.T) { testPutExclusive(t, newBackend(t)) })
	t.Run("PutRace", func(t *testing.T) { testPutRace(t, newBackend(t)) })
	t.Run("GetRange", func(t *testing.T) { testGetRange(t, newBackend(t)) })
	t.Run("GetAll", func(t *testing.T) { testGetAll(t, newBackend(t)) })
	t.Run("GetInto", func(t *testing.T) { testGetInto(t, newBackend(t)) })
	t.Run("Stat", func(t *testing.T) { testStat(t, newBackend(t)) })
	t.Run("List", func(t *testing.T) { testList(t, newBackend(t)) })
	t.Run("ListMany", func(t *testing.T) { testListMany(t, newBackend(t), opts.ManyObjects) })
	t.Run("Delete", func(t *testing.T) { testDelete(t, newBackend(t)) })
	t.Run("InvalidNames", func(t *testing.T) { testInvalidNames(t, newBackend(t)) })
	t.Run("Concurrent", func(t *testing.T) { testConcurrent(t, newBackend(t)) })
}

// RandomBytes returns n random bytes.
func RandomBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// DataName returns a content-addressed name under data/xx/ for data, the
// shape of most objects in a repository.
func DataName(data []byte) string {
	sum := sha256.Sum256(data)
	h := hex.EncodeToString(sum[:])
	return "data/" + h[:2] + "/" + h
}

func put(t *testing.T, b backend.Backend, name string, data []byte) {
	t.Helper()
	if err := b.Put(context.Background(), name, data); err != nil {
		t.Fatalf("put %s: %v", name, err)
	}
}

func mustGet(t *testing.T, b backend.Backend, name string, want []byte) {
	t.Helper()
	got, err := b.Get(context.Background(), name, 0, -1)
	if err != nil {
		t.Fatalf("get %s: %v", name, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("get %s: %d bytes that differ from the %d stored", name, len(got), len(want))
	}
}

// list returns the sorted names under prefix.
func list(t *testing.T, b backend.Backend, prefix string) []string {
	t.Helper()
	var names []string
	err := b.List(context.Background(), prefix, func(oi backend.ObjectInfo) error {
		names = append(names, oi.Name)
		return nil
	})
	if err != nil {
		t.Fatalf("list %q: %v", prefix, err)
	}
	slices.Sort(names)
	return names
}

func testPutGet(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	for _, n := range []int{0, 1, 4096, 3<<20 + 17} {
		data := RandomBytes(t, n)
		name := DataName(data)
		put(t, b, name, data)
		mustGet(t, b, name, data)
	}
	// Names outside data/, in "directories" nothing created beforehand.
	put(t, b, "config", []byte("cfg"))
	put(t, b, "newdir/sub/x", []byte("x"))
	mustGet(t, b, "config", []byte("cfg"))
	mustGet(t, b, "newdir/sub/x", []byte("x"))
	if _, err := b.Get(ctx, "data/00/missing", 0, -1); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("get of a missing object: %v, want ErrNotExist", err)
	}
	if _, err := b.Get(ctx, "data/00/missing", 5, 10); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("range get of a missing object: %v, want ErrNotExist", err)
	}
}

func testPutExclusive(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	first := RandomBytes(t, 1000)
	name := DataName(first)
	put(t, b, name, first)
	for _, other := range [][]byte{[]byte("other"), nil, RandomBytes(t, 2000)} {
		if err := b.Put(ctx, name, other); !errors.Is(err, backend.ErrExist) {
			t.Fatalf("second put of %s: %v, want ErrExist", name, err)
		}
		mustGet(t, b, name, first)
	}
	if oi, err := b.Stat(ctx, name); err != nil || oi.Size != int64(len(first)) {
		t.Fatalf("stat after refused put: %+v %v", oi, err)
	}
}

// Many writers race for one name: exactly one wins, and the object holds
// that writer's bytes and nobody else's.
func testPutRace(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	const writers = 8
	name := "data/00/race"
	var wg sync.WaitGroup
	var mu sync.Mutex
	var winners []int
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := b.Put(ctx, name, bytes.Repeat([]byte{byte(i + 1)}, 1<<16))
			switch {
			case err == nil:
				mu.Lock()
				winners = append(winners, i)
				mu.Unlock()
			case !errors.Is(err, backend.ErrExist):
				t.Errorf("racing put %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	if len(winners) != 1 {
		t.Fatalf("%d writers succeeded on one name (%v), want exactly 1", len(winners), winners)
	}
	mustGet(t, b, name, bytes.Repeat([]byte{byte(winners[0] + 1)}, 1<<16))
}

func testGetRange(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	data := RandomBytes(t, 100000)
	name := DataName(data)
	put(t, b, name, data)
	n := int64(len(data))
	for _, r := range []struct{ off, length int64 }{
		{0, 1}, {1, 3}, {1000, 5000}, {n - 10, 10}, {n - 10, -1}, {0, -1}, {n, -1}, {n, 0}, {500, 0},
	} {
		got, err := b.Get(ctx, name, r.off, r.length)
		end := n
		if r.length >= 0 {
			end = r.off + r.length
		}
		if err != nil || !bytes.Equal(got, data[r.off:end]) {
			t.Fatalf("get %s [%d, +%d): %d bytes, %v; want %d bytes", name, r.off, r.length, len(got), err, end-r.off)
		}
	}
	// Past the end is an error, never a short read taken for the whole.
	for _, r := range []struct{ off, length int64 }{{n - 10, 20}, {n, 1}, {n + 5, 1}, {n + 5, -1}} {
		if got, err := b.Get(ctx, name, r.off, r.length); err == nil {
			t.Fatalf("get [%d, +%d) of a %d-byte object returned %d bytes and no error", r.off, r.length, n, len(got))
		}
	}
}

// GetAll returns whole objects up to its limit, refuses larger ones with
// ErrTooLarge, and reports a missing object as ErrNotExist.
func testGetAll(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	data := RandomBytes(t, 70000)
	name := DataName(data)
	put(t, b, name, data)
	for _, limit := range []int64{int64(len(data)), 1 << 20} {
		if got, err := b.GetAll(ctx, name, limit); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("getall %s limit %d: %d bytes, %v", name, limit, len(got), err)
		}
	}
	if got, err := b.GetAll(ctx, name, int64(len(data))-1); !errors.Is(err, backend.ErrTooLarge) || got != nil {
		t.Fatalf("getall over the limit: %d bytes, %v; want ErrTooLarge", len(got), err)
	}
	empty := "data/00/" + strings.Repeat("0", 64)
	put(t, b, empty, []byte{})
	if got, err := b.GetAll(ctx, empty, 10); err != nil || len(got) != 0 {
		t.Fatalf("getall of an empty object: %d bytes, %v", len(got), err)
	}
	if _, err := b.GetAll(ctx, "data/ff/"+strings.Repeat("f", 64), 10); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("getall of a missing object: %v; want ErrNotExist", err)
	}
}

// GetInto (the backend's own, or GetAll and a copy) fills a buffer
// larger than the object, whatever the object's size relative to a
// transfer's packets; a buffer the object fills or overflows is
// ErrTooLarge; a missing object is ErrNotExist.
func testGetInto(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	for _, size := range []int{1, 70000, 600 << 10} {
		data := RandomBytes(t, size)
		name := DataName(data)
		put(t, b, name, data)
		for _, room := range []int{size + 1, 1 << 20, 3 << 20} {
			buf := make([]byte, room)
			n, err := backend.GetInto(ctx, b, name, buf)
			if err != nil || n != size || !bytes.Equal(buf[:n], data) {
				t.Fatalf("getinto %d-byte object, %d-byte buffer: %d bytes, %v", size, room, n, err)
			}
		}
		for _, room := range []int{size, size - 1} {
			if _, err := backend.GetInto(ctx, b, name, make([]byte, room)); !errors.Is(err, backend.ErrTooLarge) {
				t.Fatalf("getinto %d-byte object, %d-byte buffer: %v; want ErrTooLarge", size, room, err)
			}
		}
	}
	empty := "data/00/" + strings.Repeat("0", 64)
	put(t, b, empty, []byte{})
	if n, err := backend.GetInto(ctx, b, empty, make([]byte, 10)); err != nil || n != 0 {
		t.Fatalf("getinto of an empty object: %d bytes, %v", n, err)
	}
	if _, err := backend.GetInto(ctx, b, "data/ff/"+strings.Repeat("f", 64), make([]byte, 10)); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("getinto of a missing object: %v; want ErrNotExist", err)
	}
}

func testStat(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	before := time.Now()
	data := RandomBytes(t, 12345)
	name := DataName(data)
	put(t, b, name, data)
	oi, err := b.Stat(ctx, name)
	if err != nil || oi.Size != int64(len(data)) || oi.Name != name {
		t.Fatalf("stat %s: %+v %v", name, oi, err)
	}
	// ModTime is the store's clock: on this machine it must be near ours.
	// (Object stores keep whole seconds.)
	if oi.ModTime.IsZero() || oi.ModTime.Before(before.Add(-2*time.Second)) || oi.ModTime.After(time.Now().Add(2*time.Second)) {
		t.Fatalf("stat %s: ModTime %v, want about %v", name, oi.ModTime, before)
	}
	put(t, b, "locks/empty", nil)
	if oi, err := b.Stat(ctx, "locks/empty"); err != nil || oi.Size != 0 {
		t.Fatalf("stat of an empty object: %+v %v", oi, err)
	}
	if _, err := b.Stat(ctx, "manifests/missing"); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("stat of a missing object: %v, want ErrNotExist", err)
	}
}

func testList(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	data := RandomBytes(t, 777)
	name := DataName(data)
	put(t, b, name, data)
	put(t, b, "locks/abc1", []byte("lock"))
	put(t, b, "locks/abd2", nil)
	put(t, b, "index/1", []byte("idx"))
	put(t, b, "config", []byte("c"))
	for _, tc := range []struct {
		prefix string
		want   []string
	}{
		{"data/", []string{name}},
		{name[:8], []string{name}},
		{"locks/", []string{"locks/abc1", "locks/abd2"}},
		{"locks/abc", []string{"locks/abc1"}},
		{"index/", []string{"index/1"}},
		{"nosuchdir/", nil},
		{"", []string{"config", name, "index/1", "locks/abc1", "locks/abd2"}},
	} {
		if got := list(t, b, tc.prefix); !slices.Equal(got, tc.want) {
			t.Errorf("list %q = %v, want %v", tc.prefix, got, tc.want)
		}
	}
	// Sizes and times come with the listing.
	err := b.List(ctx, "locks/abc", func(oi backend.ObjectInfo) error {
		if oi.Size != 4 || oi.ModTime.IsZero() {
			return fmt.Errorf("list entry %+v: want size 4 and a ModTime", oi)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	stop := errors.New("stop")
	calls := 0
	err = b.List(ctx, "locks/", func(backend.ObjectInfo) error { calls++; return stop })
	if !errors.Is(err, stop) || calls != 1 {
		t.Fatalf("list with failing fn: %v after %d calls, want the fn's error after 1", err, calls)
	}
}

func testListMany(t *testing.T, b backend.Backend, n int) {
	ctx := context.Background()
	want := make([]string, n)
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	for i := range n {
		want[i] = fmt.Sprintf("index/%06d", i)
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			if err := b.Put(ctx, want[i], []byte{byte(i)}); err != nil {
				t.Errorf("put %s: %v", want[i], err)
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	got := list(t, b, "index/")
	if !slices.Equal(got, want) {
		t.Fatalf("list index/ found %d objects, want %d", len(got), n)
	}
	var sub []string
	for _, name := range want {
		if strings.HasPrefix(name, "index/0001") {
			sub = append(sub, name)
		}
	}
	if got := list(t, b, "index/0001"); !slices.Equal(got, sub) {
		t.Fatalf("list index/0001 found %d objects, want %d", len(got), len(sub))
	}
}

func testDelete(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	put(t, b, "locks/a", []byte("a"))
	put(t, b, "locks/b", []byte("b"))
	if err := b.Delete(ctx, "locks/a"); err != nil {
		t.Fatalf("delete: %v", err)
	}
	if _, err := b.Stat(ctx, "locks/a"); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("stat after delete: %v", err)
	}
	if got := list(t, b, "locks/"); !slices.Equal(got, []string{"locks/b"}) {
		t.Fatalf("list after delete = %v", got)
	}
	if err := b.Delete(ctx, "locks/a"); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("delete of a missing object: %v, want ErrNotExist", err)
	}
	// The name is free again.
	put(t, b, "locks/a", []byte("again"))
	mustGet(t, b, "locks/a", []byte("again"))
}

func testInvalidNames(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	for _, bad := range []string{"", "/etc/passwd", "../x", "data/../../x", "data//x", "data/./x", "x/"} {
		if err := b.Put(ctx, bad, []byte("x")); err == nil {
			t.Errorf("put %q accepted", bad)
		}
	}
}

// Many goroutines put, get, stat and list at once, as a backup does.
func testConcurrent(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	const n = 64
	objs := make([][]byte, n)
	for i := range objs {
		objs[i] = RandomBytes(t, 1000+i*997)
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name := DataName(objs[i])
			if err := b.Put(ctx, name, objs[i]); err != nil {
				t.Errorf("put %s: %v", name, err)
				return
			}
			got, err := b.Get(ctx, name, 0, -1)
			if err != nil || !bytes.Equal(got, objs[i]) {
				t.Errorf("get %s: %v", name, err)
			}
			if oi, err := b.Stat(ctx, name); err != nil || oi.Size != int64(len(objs[i])) {
				t.Errorf("stat %s: %+v %v", name, oi, err)
			}
			if err := b.List(ctx, "data/", func(backend.ObjectInfo) error { return nil }); err != nil {
				t.Errorf("list: %v", err)
			}
		}()
	}
	wg.Wait()
	if got := list(t, b, "data/"); len(got) != n {
		t.Fatalf("list data/ after concurrent puts: %d objects, want %d", len(got), n)
	}
}
