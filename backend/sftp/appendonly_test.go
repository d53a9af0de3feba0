package sftp

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	sftplib "github.com/pkg/sftp"

	"vmvault/backend"
	"vmvault/backend/backendtest"
	"vmvault/backend/retry"
	"vmvault/internal/testsshd"
)

// appendOnlyCommand is the ForceCommand docs/server.md recommends.
const appendOnlyCommand = "ForceCommand internal-sftp -P remove,rmdir,rename,posix-rename,setstat,fsetstat,lsetstat,symlink -u 0222"

func TestAppendOnlyAccount(t *testing.T) {
	chroot := srvDir(t)
	repoDir := filepath.Join(chroot, "repo")
	makeLayout(t, repoDir, "backup")
	s := testsshd.Start(t, testsshd.Options{User: "backup", Config: []string{
		"Match User backup",
		"  ChrootDirectory " + chroot,
		"  " + appendOnlyCommand,
	}})
	ctx := context.Background()
	cfg := serverConfig(s, "/repo") // path inside the chroot
	cfg.Create = true               // must cope with the pre-created layout
	b, err := Open(ctx, cfg)
	if err != nil {
		t.Fatalf("open append-only repository: %v\nsshd log:\n%s", err, s.Log())
	}
	defer b.Close()

	data := backendtest.RandomBytes(t, 1<<20)
	name := backendtest.DataName(data)
	if err := b.Put(ctx, name, data); err != nil {
		t.Fatalf("put: %v\nsshd log:\n%s", err, s.Log())
	}
	if err := b.Put(ctx, "locks/l1", []byte("lock")); err != nil {
		t.Fatalf("put lock: %v", err)
	}
	if err := b.Put(ctx, name, []byte("replacement")); !errors.Is(err, backend.ErrExist) {
		t.Fatalf("put over an existing object: %v, want ErrExist", err)
	}
	got, err := b.Get(ctx, name, 0, -1)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("get: %v", err)
	}
	var listed []string
	if err := b.List(ctx, "data/", func(oi backend.ObjectInfo) error {
		listed = append(listed, oi.Name)
		return nil
	}); err != nil {
		t.Fatalf("list: %v", err)
	}
	if len(listed) != 1 || listed[0] != name {
		t.Fatalf("list data/ = %v (temporary files must be hidden)", listed)
	}
	err = b.Delete(ctx, name)
	if !errors.Is(err, backend.ErrReadOnly) || !strings.Contains(err.Error(), "append-only") || !strings.Contains(err.Error(), "on the server") {
		t.Fatalf("delete on append-only account: %v, want ErrReadOnly explaining prune runs on the server", err)
	}
	// The retry wrapper must not retry a refusal.
	if err := retry.New(b, retry.Options{}).Delete(ctx, name); !errors.Is(err, backend.ErrReadOnly) {
		t.Fatalf("delete through retry: %v", err)
	}

	// The same key over raw SFTP: nothing may destroy or change the object.
	onServer := filepath.Join(repoDir, name)
	st, err := os.Stat(onServer)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o444 {
		t.Errorf("uploaded object has mode %v, want 0444 (internal-sftp -u 0222)", st.Mode().Perm())
	}
	raw, err := sftplib.NewClient(s.Dial())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	obj := "/repo/" + name
	attacks := map[string]func() error{
		"remove":       func() error { return raw.Remove(obj) },
		"rename":       func() error { return raw.Rename(obj, "/repo/data/moved") },
		"posix-rename": func() error { return raw.PosixRename(obj, "/repo/data/moved") },
		"posix-rename over": func() error {
			return raw.PosixRename("/repo/locks/l1", obj)
		},
		"chmod":    func() error { return raw.Chmod(obj, 0o666) },
		"truncate": func() error { return raw.Truncate(obj, 0) },
		"rmdir":    func() error { return raw.RemoveDirectory("/repo/data/00") },
		// A symlink under a future object's name would make that
		// object's uploads report ErrExist forever.
		"symlink": func() error { return raw.Symlink("/repo/locks/l1", "/repo/data/00/00future") },
		"open for truncate": func() error {
			f, err := raw.OpenFile(obj, os.O_WRONLY|os.O_TRUNC)
			if err == nil {
				f.Close()
			}
			return err
		},
		"open for write": func() error {
			f, err := raw.OpenFile(obj, os.O_RDWR)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = f.WriteAt([]byte("overwrite"), 0)
			return err
		},
		"create over": func() error {
			f, err := raw.Create(obj)
			if err == nil {
				f.Close()
			}
			return err
		},
	}
	for what, attack := range attacks {
		if err := attack(); err == nil {
			t.Errorf("%s succeeded on an append-only account", what)
		} else if !errors.Is(err, fs.ErrPermission) {
			t.Logf("%s refused with %v", what, err)
		}
	}
	after, err := os.ReadFile(onServer)
	if err != nil || !bytes.Equal(after, data) {
		t.Fatalf("object changed by the attacks (err %v)", err)
	}
	if lock, _ := os.ReadFile(filepath.Join(repoDir, "locks/l1")); string(lock) != "lock" {
		t.Fatalf("lock object changed: %q", lock)
	}
}

func TestUnwritableDirectory(t *testing.T) {
	base := srvDir(t)
	repoDir := filepath.Join(base, "repo")
	makeLayout(t, repoDir, "root") // readable, not writable, for backup
	s := testsshd.Start(t, testsshd.Options{User: "backup"})
	ctx := context.Background()
	b, err := Open(ctx, serverConfig(s, repoDir))
	if err != nil {
		t.Fatalf("open: %v\nsshd log:\n%s", err, s.Log())
	}
	defer b.Close()
	err = retry.New(b, retry.Options{}).Put(ctx, "data/ab/abcd", []byte("x"))
	if !errors.Is(err, fs.ErrPermission) || !strings.Contains(err.Error(), "no write permission") || !strings.Contains(err.Error(), "data/ab") {
		t.Fatalf("put into an unwritable directory: %v", err)
	}
	// Reading still works.
	if err := os.WriteFile(filepath.Join(repoDir, "keys", "k1"), []byte("key"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := b.Get(ctx, "keys/k1", 0, -1); err != nil || string(got) != "key" {
		t.Fatalf("get: %q %v", got, err)
	}
}
