package retry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"vmvault/backend"
	"vmvault/backend/local"
)

// flaky injects failures in front of a real local backend: connection
// drops cannot be produced on a local filesystem, and the SFTP tests
// (backend/sftp) cover real ones against a killed sshd.
type flaky struct {
	backend.Backend
	fail       []error // returned by successive calls before delegating
	calls      int
	reconnects int
}

func (f *flaky) next() error {
	f.calls++
	if len(f.fail) == 0 {
		return nil
	}
	err := f.fail[0]
	f.fail = f.fail[1:]
	return err
}

func (f *flaky) Put(ctx context.Context, name string, data []byte) error {
	if err := f.next(); err != nil {
		return err
	}
	return f.Backend.Put(ctx, name, data)
}

func (f *flaky) List(ctx context.Context, prefix string, fn func(backend.ObjectInfo) error) error {
	if err := f.next(); err != nil {
		return err
	}
	return f.Backend.List(ctx, prefix, fn)
}

func (f *flaky) GetInto(ctx context.Context, name string, buf []byte) (int, error) {
	if err := f.next(); err != nil {
		return 0, err
	}
	return backend.GetInto(ctx, f.Backend, name, buf)
}

func (f *flaky) Reconnect(context.Context) error { f.reconnects++; return nil }

type transient struct{}

func (transient) Error() string   { return "link down" }
func (transient) Transient() bool { return true }

func newFlaky(t *testing.T, fail ...error) (*flaky, *Backend, *strings.Builder) {
	t.Helper()
	l, err := local.Create(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	f := &flaky{Backend: l, fail: fail}
	var logs strings.Builder
	r := New(f, Options{Attempts: 4, InitialDelay: time.Millisecond, MaxDelay: 4 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	return f, r, &logs
}

func TestTransient(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{nil, false},
		{fmt.Errorf("put x: %w", backend.ErrNotExist), false},
		{fmt.Errorf("put x: %w", backend.ErrExist), false},
		{fmt.Errorf("delete x: %w", backend.ErrReadOnly), false},
		{fmt.Errorf("put x: %w", os.ErrPermission), false},
		{context.Canceled, false},
		{fmt.Errorf("x: %w", context.DeadlineExceeded), false},
		{errors.New("disk full"), false},
		{fmt.Errorf("get: %w", io.ErrUnexpectedEOF), false}, // short object, not a dropped link
		{fmt.Errorf("get: %w", io.EOF), true},
		{fmt.Errorf("dial: %w", syscall.ECONNREFUSED), true},
		{fmt.Errorf("write: %w", syscall.ECONNRESET), true},
		{fmt.Errorf("x: %w", transient{}), true},
		{fmt.Errorf("x: %w", os.ErrDeadlineExceeded), true},
	} {
		if got := Transient(tc.err); got != tc.want {
			t.Errorf("Transient(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestRetriesThenSucceeds(t *testing.T) {
	f, r, logs := newFlaky(t, transient{}, fmt.Errorf("write: %w", syscall.ECONNRESET))
	if err := r.Put(context.Background(), "keys/a", []byte("a")); err != nil {
		t.Fatalf("put: %v", err)
	}
	if f.calls != 3 || f.reconnects != 2 {
		t.Fatalf("calls %d reconnects %d, want 3 and 2", f.calls, f.reconnects)
	}
	if got, err := r.Get(context.Background(), "keys/a", 0, -1); err != nil || string(got) != "a" {
		t.Fatalf("get: %q %v", got, err)
	}
	if n := strings.Count(logs.String(), "retrying"); n != 2 {
		t.Fatalf("%d retry log lines, want 2:\n%s", n, logs)
	}
}

func TestGivesUp(t *testing.T) {
	f, r, _ := newFlaky(t, transient{}, transient{}, transient{}, transient{}, transient{})
	err := r.Put(context.Background(), "keys/a", []byte("a"))
	if !errors.As(err, new(transient)) || f.calls != 4 {
		t.Fatalf("err %v after %d calls, want the transient error after 4", err, f.calls)
	}
}

func TestPermanentNotRetried(t *testing.T) {
	f, r, _ := newFlaky(t)
	ctx := context.Background()
	if err := r.Put(ctx, "keys/a", []byte("a")); err != nil {
		t.Fatal(err)
	}
	if err := r.Put(ctx, "keys/a", []byte("a")); !errors.Is(err, backend.ErrExist) || f.calls != 2 {
		t.Fatalf("put existing: %v after %d calls", err, f.calls)
	}
	if _, err := r.Get(ctx, "keys/missing", 0, -1); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("get missing: %v", err)
	}
	// An error from the caller's fn is returned as is, never retried,
	// even if it looks transient.
	listCalls := f.calls
	fnErr := fmt.Errorf("consumer: %w", io.EOF)
	if err := r.List(ctx, "keys/", func(backend.ObjectInfo) error { return fnErr }); err != fnErr || f.calls != listCalls+1 {
		t.Fatalf("list with failing fn: %v after %d calls", err, f.calls-listCalls)
	}
	if f.reconnects != 0 {
		t.Fatalf("reconnected %d times without a transient error", f.reconnects)
	}
}

func TestCancelDuringBackoff(t *testing.T) {
	l, err := local.Create(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	f := &flaky{Backend: l, fail: []error{transient{}, transient{}, transient{}}}
	r := New(f, Options{Attempts: 10, InitialDelay: time.Hour})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := r.Put(ctx, "keys/a", []byte("a")); err == nil {
		t.Fatalf("put succeeded although the context ended during backoff")
	}
	if time.Since(start) > 10*time.Second || f.calls != 1 {
		t.Fatalf("cancel did not stop the retries: %d calls in %v", f.calls, time.Since(start))
	}
}

// GetInto reaches the store's own GetInto through the wrapper, is retried
// after a transient failure, and ErrTooLarge is final.
func TestGetIntoRetried(t *testing.T) {
	f, r, _ := newFlaky(t)
	ctx := context.Background()
	if err := r.Put(ctx, "keys/a", []byte("abcde")); err != nil {
		t.Fatal(err)
	}
	f.fail = []error{transient{}}
	calls := f.calls
	buf := make([]byte, 10)
	if n, err := backend.GetInto(ctx, r, "keys/a", buf); err != nil || string(buf[:n]) != "abcde" || f.calls-calls != 2 {
		t.Fatalf("getinto after a transient failure: %q, %v, %d calls", buf[:n], err, f.calls-calls)
	}
	calls = f.calls
	if _, err := backend.GetInto(ctx, r, "keys/a", make([]byte, 5)); !errors.Is(err, backend.ErrTooLarge) || f.calls-calls != 1 {
		t.Fatalf("getinto into a full buffer: %v after %d calls, want ErrTooLarge after 1", err, f.calls-calls)
	}
}
