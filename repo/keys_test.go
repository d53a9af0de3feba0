package repo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"vmvault/backend"
	"vmvault/backend/local"
	"vmvault/crypto"
)

// plantKeyFile writes a key file that parses, with the given parameters
// and content no password opens, as someone with add access could.
func plantKeyFile(t *testing.T, be backend.Backend, name string, p crypto.KDFParams) {
	t.Helper()
	salt, _ := crypto.NewSalt()
	kf := keyFile{Version: 1, Created: time.Now().UTC(), KDF: "argon2id", Params: p, Salt: salt, Data: bytes.Repeat([]byte{1}, 80)}
	b, _ := json.Marshal(kf)
	if err := be.Put(context.Background(), name, b); err != nil {
		t.Fatal(err)
	}
}

func openWith(t *testing.T, tr *testRepo, password, cache string) (*Repository, error) {
	t.Helper()
	be, err := local.Open(tr.dir)
	if err != nil {
		t.Fatal(err)
	}
	r, err := Open(context.Background(), be, []byte(password), Options{CacheDir: cache})
	if err == nil {
		t.Cleanup(func() { r.Close() })
	}
	return r, err
}

// A key file named to sort first, with the most expensive parameters the
// format used to accept (t=100, m=4 GiB, p=255), made every command run
// ten minutes at 4 GB. Parameters beyond what init and key add write are
// now refused before any derivation.
func TestPlantedExpensiveKeyRefusedByParameters(t *testing.T) {
	issue := crypto.KDFParams{Time: 100, Memory: 4 << 20, Threads: 255}
	if err := issue.Validate(); err == nil {
		t.Fatal("t=100 m=4GiB p=255 accepted")
	}
	if err := crypto.CalibrateKDF(10 * time.Millisecond).Validate(); err != nil {
		t.Fatalf("calibrated parameters refused: %v", err)
	}
	if err := crypto.MaxKDFParams.Validate(); err != nil {
		t.Fatal(err)
	}
	tr := newTestRepo(t)
	// Within the old limits, beyond the new: 1 GiB, derived in full
	// (and allocated) before the fix.
	plantKeyFile(t, tr.be, "keys/0000000000000000000000000000000000000000000000000000000000000000",
		crypto.KDFParams{Time: 1, Memory: 1 << 20, Threads: 1})
	plantKeyFile(t, tr.be, "keys/0000000000000000000000000000000000000000000000000000000000000001", issue)
	var err error
	n := allocatedBy(func() { _, err = openWith(t, tr, "secret", t.TempDir()) })
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("open with planted key files: %d MiB allocated", n>>20)
	if n > 256<<20 {
		t.Fatalf("opening with planted expensive key files allocated %d MiB", n>>20)
	}
}

// Junk in keys/ must not break key list or key remove: it is reported
// once and otherwise ignored.
func TestJunkKeyFilesIgnored(t *testing.T) {
	tr := newTestRepo(t)
	ctx := context.Background()
	for _, n := range []string{"keys/x", "keys/" + strings.Repeat("ab", 32)} {
		if err := tr.be.Put(ctx, n, []byte("not a key file")); err != nil {
			t.Fatal(err)
		}
	}
	id, err := tr.storeKey(ctx, []byte("other"), fastKDF)
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	r, err := openWith(t, tr, "secret", tr.cache)
	if err != nil {
		t.Fatal(err)
	}
	r.log = slog.New(slog.NewTextHandler(&logs, nil))
	keys, err := r.Keys(ctx)
	if err != nil || len(keys) != 2 {
		t.Fatalf("key list with junk: %v %+v", err, keys)
	}
	if c := strings.Count(logs.String(), "keys/x"); c != 1 {
		t.Fatalf("junk keys/x reported %d times: %s", c, logs.String())
	}
	if err := r.RemoveKey(ctx, id[:8]); err != nil {
		t.Fatalf("key remove with junk: %v", err)
	}
	if _, err := openWith(t, tr, "other", t.TempDir()); !errors.Is(err, ErrWrongPassword) {
		t.Fatalf("removed key still opens: %v", err)
	}
}

// The key file this host's cache last opened is tried first, so cheaper
// key files of other passwords (or planted ones) cost nothing.
func TestKeyHintTriedFirst(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "repo")
	be, err := local.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	real := crypto.KDFParams{Time: 1, Memory: 32 << 10, Threads: 1}
	r, err := Init(context.Background(), be, []byte("secret"), Options{KDF: real, CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	for _, pw := range []string{"a", "b"} {
		if _, err := r.storeKey(context.Background(), []byte(pw), crypto.KDFParams{Time: 1, Memory: 8 << 10, Threads: 1}); err != nil {
			t.Fatal(err)
		}
	}
	r.Close()
	tr := &testRepo{dir: dir}
	cache := t.TempDir()
	// Cold: the cheaper key files are tried first (8+8+32 MiB).
	cold := allocatedBy(func() { _, err = openWith(t, tr, "secret", cache) })
	if err != nil {
		t.Fatal(err)
	}
	warm := allocatedBy(func() { _, err = openWith(t, tr, "secret", cache) })
	if err != nil {
		t.Fatal(err)
	}
	// Each derivation allocates its memory twice (crypto.DeriveKey warms
	// the heap first): the hint saves the two 8 MiB key files' share.
	t.Logf("open: cold %d MiB, with the hint %d MiB allocated", cold>>20, warm>>20)
	if cold-warm < 12<<20 {
		t.Fatalf("cold open allocated %d MiB, warm %d MiB: the hint was not used", cold>>20, warm>>20)
	}
}

// Ctrl-C during a key derivation ends the open at once with the context's
// error; before, the derivation ran on and the command reported a wrong
// password (exit 12).
func TestUnlockInterruptedDuringDerivation(t *testing.T) {
	tr := newTestRepo(t)
	plantKeyFile(t, tr.be, "keys/ffff", crypto.MaxKDFParams)
	ctx, cancel := context.WithCancel(context.Background())
	be, _ := local.Open(tr.dir)
	// Free heap pages go back to the kernel, so the derivation's memory
	// shows in the resident size (it reuses resident free pages otherwise).
	debug.FreeOSMemory()
	base := rssKiB()
	go func() {
		// Cancel once the planted key's derivation holds its memory.
		for rssKiB() < base+int(crypto.MaxKDFParams.Memory)/2 {
			time.Sleep(5 * time.Millisecond)
		}
		cancel()
	}()
	_, err := Open(ctx, be, []byte("wrong"), Options{CacheDir: t.TempDir()})
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrWrongPassword) {
		t.Fatalf("interrupted unlock: %v", err)
	}
}

// rssKiB returns this process's resident memory.
func rssKiB() int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 1 << 40
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.Atoi(f[1])
			return kb
		}
	}
	return 1 << 40
}

// key add refuses a password in use; after key passwd the old password
// no longer opens the repository, even where it opened two key files
// (made before add refused duplicates).
func TestPasswordChangeRetiresOldPassword(t *testing.T) {
	tr := newTestRepo(t)
	ctx := context.Background()
	if _, err := tr.AddKey(ctx, []byte("secret"), fastKDF); !errors.Is(err, ErrPasswordInUse) {
		t.Fatalf("key add with the password in use: %v", err)
	}
	if _, err := tr.storeKey(ctx, []byte("secret"), fastKDF); err != nil {
		t.Fatal(err)
	}
	if _, err := tr.AddKey(ctx, []byte("second"), fastKDF); err != nil {
		t.Fatal(err)
	}
	if _, err := tr.ChangePassword(ctx, []byte("second"), fastKDF); !errors.Is(err, ErrPasswordInUse) {
		t.Fatalf("passwd to another key's password: %v", err)
	}
	if _, err := tr.ChangePassword(ctx, []byte("new"), fastKDF); err != nil {
		t.Fatal(err)
	}
	if _, err := openWith(t, tr, "secret", t.TempDir()); !errors.Is(err, ErrWrongPassword) {
		t.Fatalf("old password after passwd: %v", err)
	}
	for _, pw := range []string{"new", "second"} {
		if _, err := openWith(t, tr, pw, t.TempDir()); err != nil {
			t.Fatalf("%s: %v", pw, err)
		}
	}
}

// init without --kdf-params writes RFC 9106's argon2id setting for
// 64 MiB (t=3, p=4); round 1 calibrated on fresh memory and wrote t=1.
func TestInitWritesDefaultKDF(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "repo")
	be, err := local.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	r, err := Init(context.Background(), be, []byte("secret"), Options{CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	names, err := filepath.Glob(filepath.Join(dir, "keys", "*"))
	if err != nil || len(names) != 1 {
		t.Fatalf("key files %v, %v", names, err)
	}
	b, err := os.ReadFile(names[0])
	if err != nil {
		t.Fatal(err)
	}
	var kf keyFile
	if err := json.Unmarshal(b, &kf); err != nil {
		t.Fatal(err)
	}
	want := crypto.KDFParams{Time: 3, Memory: 64 * 1024, Threads: 4}
	if kf.Params != want || crypto.DefaultKDFParams != want {
		t.Fatalf("init wrote %+v (default %+v), want %+v", kf.Params, crypto.DefaultKDFParams, want)
	}
	tr := &testRepo{dir: dir}
	if _, err := openWith(t, tr, "secret", t.TempDir()); err != nil {
		t.Fatal(err)
	}
}
