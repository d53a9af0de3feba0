package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"vmvault/internal/testio"
	"vmvault/internal/testsshd"
	"vmvault/nbd"
)

// needQemuUtils skips when qemu's NBD clients are missing.
func needQemuUtils(t *testing.T) {
	t.Helper()
	for _, p := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s not installed (package qemu-utils; scripts/deps.sh installs it)", p)
		}
	}
}

// serveChild is a running `vmvault serve` (this test binary, see TestMain).
type serveChild struct {
	t      *testing.T
	cmd    *exec.Cmd
	sock   string
	stderr *lockedWriter
	done   chan error
}

// startServe runs vmvault with args (which must include the repository
// flags and "serve … --listen unix:SOCK") and waits until sock accepts.
func startServe(t *testing.T, sock string, args ...string) *serveChild {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"--"}, args...)...)
	cmd.Env = append(os.Environ(), "VMVAULT_HELPER_MAIN=1")
	s := &serveChild{t: t, cmd: cmd, sock: sock, stderr: &lockedWriter{}, done: make(chan error, 1)}
	cmd.Stderr = s.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.done <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-s.done
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return s
		}
		select {
		case err := <-s.done:
			t.Fatalf("serve exited before listening: %v\n%s", err, s.stderr)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve did not listen within 60 s:\n%s", s.stderr)
		}
	}
}

// stop sends SIGTERM and checks serve exits 0 and removes its socket.
func (s *serveChild) stop() {
	s.t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.done:
		if err != nil {
			s.t.Fatalf("serve after SIGTERM: %v\n%s", err, s.stderr)
		}
	case <-time.After(30 * time.Second):
		s.t.Fatalf("serve did not stop within 30 s of SIGTERM:\n%s", s.stderr)
	}
	if !strings.Contains(s.stderr.String(), "stopped serving") {
		s.t.Fatalf("no clean stop logged:\n%s", s.stderr)
	}
	if _, err := os.Lstat(s.sock); !errors.Is(err, fs.ErrNotExist) {
		s.t.Fatalf("socket %s left behind: %v", s.sock, err)
	}
}

func (s *serveChild) url(export string) string {
	return "nbd+unix:///" + export + "?socket=" + s.sock
}

// treeHash hashes every file of a repository directory (names, modes and
// contents) except locks/, which a reader legitimately writes.
func treeHash(t *testing.T, dir string) string {
	t.Helper()
	h := sha256.New()
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if d.IsDir() && rel == "locks" {
			return fs.SkipDir
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		io.WriteString(h, rel+"\x00"+fi.Mode().String()+"\x00")
		if d.Type().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			h.Write(b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// qemu runs a qemu tool and returns its output, failing on non-zero exit.
func qemu(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// sparseImage writes a 24 MiB image: random data with a 6 MiB zero run
// from 12 MiB (writeImage), so at least one 4 MiB segment is all zero.
func sparseImage(t *testing.T, path string) []byte {
	return writeImage(t, path, 11, 24<<20)
}

// backedUp returns an env whose repository holds one generation of vm01
// backed up from sparseImage at src.
func backedUp(t *testing.T) (*env, string, []byte) {
	t.Helper()
	needQemuUtils(t)
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	img := sparseImage(t, src)
	e.ok("backup", "vm01", "--source", src)
	return e, src, img
}

// diskName returns the name of the only disk of vm's latest generation.
func diskName(t *testing.T, e *env, vm string) string {
	t.Helper()
	var gens []generationJSON
	if err := json.Unmarshal([]byte(e.ok("snapshots", vm, "--json").stdout), &gens); err != nil || len(gens) == 0 {
		t.Fatalf("snapshots: %v", err)
	}
	return gens[len(gens)-1].Disks[0].Name
}

// TestServeNBD: a backup served over NBD reads byte-identical through
// qemu (default export and by disk name, several clients at once), qemu
// sees its zero runs as holes, writes are refused, SIGTERM stops it
// cleanly, and the repository is unchanged.
func TestServeNBD(t *testing.T) {
	e, src, img := backedUp(t)
	disk := diskName(t, e, "vm01")
	before := treeHash(t, e.repo)

	sock := filepath.Join(e.dir, "nbd.sock")
	s := startServe(t, sock, "--repo", e.repo, "--password-file", e.pw, "--cache-dir", e.cache, "serve", "vm01", "latest", "--listen", "unix:"+sock)
	qemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.url(""))

	var m []struct {
		Start, Length int64
		Data, Zero    bool
	}
	if err := json.Unmarshal([]byte(qemu(t, "qemu-img", "map", "--output=json", "-f", "raw", s.url(""))), &m); err != nil {
		t.Fatal(err)
	}
	holeAt := func(off int64) bool {
		for _, x := range m {
			if off >= x.Start && off < x.Start+x.Length {
				return !x.Data && x.Zero
			}
		}
		return false
	}
	if !holeAt(13<<20) || holeAt(1<<20) || holeAt(20<<20) {
		t.Fatalf("qemu-img map does not show the zero run as the only hole: %+v", m)
	}

	out := filepath.Join(e.dir, "out.raw")
	qemu(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", s.url(disk), out)
	got, _ := os.ReadFile(out)
	if sum(got) != sum(img) {
		t.Fatal("converted export differs from the image")
	}

	var wg sync.WaitGroup
	for _, export := range []string{"", disk, "", disk} {
		wg.Go(func() {
			if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.url(export)).CombinedOutput(); err != nil {
				t.Errorf("concurrent compare of export %q: %v %s", export, err, out)
			}
		})
	}
	wg.Wait()

	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 1M", s.url("")).CombinedOutput(); err == nil && !strings.Contains(string(out), "rror") {
		t.Fatalf("write to a read-only export succeeded: %s", out)
	}
	// snapshot=on keeps a guest's writes in qemu's temporary file.
	qemu(t, "qemu-io", "-s", "-f", "raw", "-c", "write -P 0xab 1M 4k", "-c", "read -P 0xab 1M 4k", s.url(""))
	qemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.url(""))
	// The shared lock keeps prune from deleting what is being read.
	e.fails(exitLocked, "lock", "prune")

	s.stop()
	if treeHash(t, e.repo) != before {
		t.Fatal("serving changed the repository")
	}
}

// TestServeWritable: with --writable, qemu-io writes land in the overlay
// and read back, the rest still reads from the backup, the overlay file
// is removed on stop, and the repository is unchanged.
func TestServeWritable(t *testing.T) {
	e, src, _ := backedUp(t)
	before := treeHash(t, e.repo)
	ovDir := filepath.Join(e.dir, "overlays")
	os.Mkdir(ovDir, 0o700)

	sock := filepath.Join(e.dir, "nbd.sock")
	s := startServe(t, sock, "--repo", e.repo, "--password-file", e.pw, "--cache-dir", e.cache,
		"serve", "vm01", "latest", "--listen", "unix:"+sock, "--writable", "--overlay", ovDir)
	qemu(t, "qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 1M", "-c", "write -z 13M 64k", "-c", "flush", s.url(""))
	qemu(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0xab 1M 1M", "-c", "read -P 0 13M 64k", s.url(""))
	// Apply the same writes to a copy: everything else must still match.
	want := filepath.Join(e.dir, "want.raw")
	data, _ := os.ReadFile(src)
	os.WriteFile(want, data, 0o600)
	qemu(t, "qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 1M", "-c", "write -z 13M 64k", want)
	qemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", want, s.url(""))
	if ents, _ := os.ReadDir(ovDir); len(ents) != 1 {
		t.Fatalf("overlay dir holds %d files while serving, want 1", len(ents))
	}

	s.stop()
	if ents, _ := os.ReadDir(ovDir); len(ents) != 0 {
		t.Fatalf("overlay files left after stop: %v", ents)
	}
	if treeHash(t, e.repo) != before {
		t.Fatal("writes through the overlay changed the repository")
	}
}

// TestServeDamagedChunk: a flipped byte in a chunk makes the NBD read of
// its range fail with an I/O error, never return other bytes, and the
// log names the object.
func TestServeDamagedChunk(t *testing.T) {
	e, src, _ := backedUp(t)
	victim := filepath.Base(testio.FlipLargestObject(t, e.repo))
	sock := filepath.Join(e.dir, "nbd.sock")
	s := startServe(t, sock, "--repo", e.repo, "--password-file", e.pw, "--cache-dir", e.cache, "serve", "vm01", "latest", "--listen", "unix:"+sock)
	checkDamageIsEIO(t, s, src, victim)
	conv := filepath.Join(e.dir, "out.raw")
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "raw", s.url(""), conv).CombinedOutput(); err == nil {
		t.Fatalf("convert of a damaged backup succeeded: %s", out)
	}
	s.stop()
	if !strings.Contains(s.stderr.String(), victim) {
		t.Fatalf("serve log does not name the damaged object %s:\n%s", victim, s.stderr)
	}
}

// checkDamageIsEIO compares the export with the image it was backed up
// from: the damaged range must fail with an I/O error, never differ.
func checkDamageIsEIO(t *testing.T, s *serveChild, src, victim string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.url("")).CombinedOutput()
	if err == nil || strings.Contains(string(out), "Content mismatch") || !strings.Contains(string(out), "Input/output error") {
		t.Fatalf("compare against a backup with %s damaged: %v %s", victim, err, out)
	}
}

// TestServeSFTP: the same export, writable, over an SFTP repository, and
// reached through an SSH tunnel to its unix socket; then a damaged chunk
// on the server gives EIO.
func TestServeSFTP(t *testing.T) {
	needQemuUtils(t)
	e := newEnv(t)
	srv := testsshd.Start(t, testsshd.Options{})
	repoDir := filepath.Join(e.dir, "sftp-repo")
	base := sftpArgs(srv, repoDir, e)
	if r := runArgs(nil, append(base, "init", "--kdf-params", "t=1,m=8192,p=1", "--segment-size", "4194304")...); r.code != 0 {
		t.Fatalf("init over sftp: %d %s", r.code, r.stderr)
	}
	src := filepath.Join(e.dir, "vm01.raw")
	sparseImage(t, src)
	if r := runArgs(nil, append(base, "backup", "vm01", "--source", src)...); r.code != 0 {
		t.Fatalf("backup over sftp: %d %s", r.code, r.stderr)
	}
	before := treeHash(t, repoDir)
	sock := filepath.Join(e.dir, "nbd.sock")
	s := startServe(t, sock, append(base, "serve", "vm01", "latest", "--listen", "unix:"+sock, "--writable")...)
	qemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.url(""))
	qemu(t, "qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 1M", s.url(""))
	qemu(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0xab 1M 1M", s.url(""))

	// The unix socket through an SSH tunnel, as docs/nbd.md shows.
	local := filepath.Join(e.dir, "tunnel.sock")
	tunnel := exec.Command("ssh", "-N", "-p", fmt.Sprint(srv.Port), "-i", srv.ClientKeyFile, "-o", "IdentitiesOnly=yes",
		"-o", "BatchMode=yes", "-o", "UserKnownHostsFile="+srv.KnownHostsFile, "-o", "StrictHostKeyChecking=yes",
		"-o", "ExitOnForwardFailure=yes", "-L", local+":"+sock, srv.User+"@127.0.0.1")
	var tunnelErr bytes.Buffer
	tunnel.Stderr = &tunnelErr
	if err := tunnel.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { tunnel.Process.Kill(); tunnel.Wait() }()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(local); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ssh tunnel socket did not appear: %s", tunnelErr.String())
		}
	}
	qemu(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0xab 1M 1M", "nbd+unix:///?socket="+local)
	s.stop()
	if treeHash(t, repoDir) != before {
		t.Fatal("serving over sftp changed the repository")
	}

	// A flipped byte in a chunk on the server: EIO, never other bytes.
	victim := filepath.Base(testio.FlipLargestObject(t, repoDir))
	s = startServe(t, sock, append(base, "serve", "vm01", "latest", "--listen", "unix:"+sock)...)
	checkDamageIsEIO(t, s, src, victim)
	s.stop()
	if !strings.Contains(s.stderr.String(), victim) {
		t.Fatalf("serve log does not name the damaged object %s:\n%s", victim, s.stderr)
	}
}

// TestServeBadInput: bad flags and names fail at once with a one-line
// error and the documented exit code, before anything listens.
func TestServeBadInput(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	writeImage(t, src, 2, 4<<20)
	e.ok("backup", "vm01", "--source", src)
	sock := "unix:" + filepath.Join(e.dir, "s")
	e.fails(exitUsage, "serve needs --listen", "serve", "vm01", "latest")
	e.fails(exitUsage, "bad listen address", "serve", "vm01", "latest", "--listen", "10809")
	e.fails(exitUsage, "need --writable", "serve", "vm01", "latest", "--listen", sock, "--overlay", e.dir)
	e.fails(exitUsage, "need --writable", "serve", "vm01", "latest", "--listen", sock, "--keep-overlay")
	e.fails(exitUsage, "--cache-mib must be positive", "serve", "vm01", "latest", "--listen", sock, "--cache-mib", "0")
	e.fails(exitError, "has no generations", "serve", "vm99", "latest", "--listen", sock)
	e.fails(exitError, `no disk "nope"`, "serve", "vm01", "latest", "--listen", sock, "--disk", "nope")
	file := filepath.Join(e.dir, "file")
	os.WriteFile(file, []byte("keep"), 0o600)
	e.fails(exitError, "not a socket", "serve", "vm01", "latest", "--listen", "unix:"+file)
	if b, _ := os.ReadFile(file); string(b) != "keep" {
		t.Fatal("serve overwrote a regular file at the socket path")
	}
	e.fails(exitError, "overlay", "serve", "vm01", "latest", "--listen", sock, "--writable", "--overlay", filepath.Join(e.dir, "missing-dir"))
}

// TestServeDocs: every `vmvault serve` line in docs/nbd.md and in the
// command's examples parses: known flags, two arguments, a valid --listen.
func TestServeDocs(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "nbd.md"))
	if err != nil {
		t.Fatal(err)
	}
	a := &app{stdout: io.Discard, stderr: io.Discard}
	lines := regexp.MustCompile(`(?m)^\s*(vmvault serve .*)$`).FindAllStringSubmatch(string(doc)+"\n"+a.serveCommand().Example, -1)
	if len(lines) < 3 {
		t.Fatalf("only %d serve command lines found", len(lines))
	}
	for _, l := range lines {
		fields := strings.Fields(l[1])
		cmd := a.rootCommand()
		sub, args, err := cmd.Find(fields[1:])
		if err != nil || sub.Name() != "serve" {
			t.Fatalf("%q: %v", l[1], err)
		}
		if err := sub.ParseFlags(args); err != nil {
			t.Errorf("%q: %v", l[1], err)
			continue
		}
		if n := len(sub.Flags().Args()); n != 2 {
			t.Errorf("%q: %d arguments, want VM and generation", l[1], n)
		}
		listen, _ := sub.Flags().GetString("listen")
		if _, _, err := nbd.ParseListen(listen); err != nil {
			t.Errorf("%q: %v", l[1], err)
		}
	}
}

// TestServeDisks: every disk of a generation is exported by name; the
// default export is the first disk, or --disk; with --writable each disk
// has its own overlay.
func TestServeDisks(t *testing.T) {
	needQemuUtils(t)
	e := newEnv(t)
	a, b := filepath.Join(e.dir, "a.raw"), filepath.Join(e.dir, "b.raw")
	writeImage(t, a, 31, 4<<20)
	writeImage(t, b, 32, 6<<20)
	e.ok("backup", "vm01", "--source", "hda="+a, "--source", "hdb="+b)
	ovDir := filepath.Join(e.dir, "ov")
	os.Mkdir(ovDir, 0o700)
	sock := filepath.Join(e.dir, "nbd.sock")
	base := []string{"--repo", e.repo, "--password-file", e.pw, "--cache-dir", e.cache, "serve", "vm01", "latest", "--listen", "unix:" + sock}

	s := startServe(t, sock, append(base, "--writable", "--overlay", ovDir)...)
	for export, img := range map[string]string{"": a, "hda": a, "hdb": b} {
		qemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", img, s.url(export))
	}
	if ents, _ := os.ReadDir(ovDir); len(ents) != 2 {
		t.Fatalf("%d overlay files for 2 disks", len(ents))
	}
	s.stop()

	s = startServe(t, sock, append(base, "--disk", "hdb")...)
	qemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", b, s.url(""))
	qemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", a, s.url("hda"))
	s.stop()
}

// TestServeKeepOverlay: with --keep-overlay what the client flushed
// survives serve being killed (kill -9) and a clean restart; without it
// the next session starts from the backup; the repository is unchanged
// throughout.
func TestServeKeepOverlay(t *testing.T) {
	e, src, _ := backedUp(t)
	before := treeHash(t, e.repo)
	ovDir := filepath.Join(e.dir, "ov")
	os.Mkdir(ovDir, 0o700)
	sock := filepath.Join(e.dir, "nbd.sock")
	args := []string{"--repo", e.repo, "--password-file", e.pw, "--cache-dir", e.cache,
		"serve", "vm01", "latest", "--listen", "unix:" + sock, "--writable", "--overlay", ovDir}
	kept := append(args, "--keep-overlay")

	s := startServe(t, sock, kept...)
	qemu(t, "qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 1M", "-c", "flush", s.url(""))
	s.cmd.Process.Kill()
	<-s.done
	if ents, _ := os.ReadDir(ovDir); len(ents) != 2 {
		t.Fatalf("kept overlay: %d files, want the overlay and its map", len(ents))
	}

	// The killed server left its socket behind: the next one replaces it.
	s = startServe(t, sock, kept...)
	qemu(t, "qemu-io", "-f", "raw", "-c", "read -P 0xab 1M 1M", "-c", "write -P 0xcd 3M 64k", s.url(""))
	s.stop()
	if !strings.Contains(s.stderr.String(), "resuming kept overlay") {
		t.Fatalf("second session did not say it resumed:\n%s", s.stderr)
	}
	s = startServe(t, sock, kept...)
	qemu(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0xab 1M 1M", "-c", "read -P 0xcd 3M 64k", s.url(""))
	s.stop()

	s = startServe(t, sock, args...)
	qemu(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.url(""))
	s.stop()
	if treeHash(t, e.repo) != before {
		t.Fatal("the repository changed")
	}
}

// The heap's soft limit grows by the readers' caches: with the default
// limit (sized for a backup) a cache of a few hundred MiB kept the garbage
// collector running all the time. GOMEMLIMIT, when set, is left alone.
func TestServeRaisesMemoryLimit(t *testing.T) {
	e, _, _ := backedUp(t)
	for _, env := range []string{"", "1GiB"} {
		sock := filepath.Join(e.dir, "mem.sock")
		t.Setenv("GOMEMLIMIT", env)
		s := startServe(t, sock, "--repo", e.repo, "--password-file", e.pw, "--cache-dir", e.cache, "serve", "vm01", "latest", "--cache-mib", "300", "--listen", "unix:"+sock)
		s.stop() // the log is complete after it
		var limit int64
		for _, f := range strings.Fields(s.stderr.String()) {
			if v, ok := strings.CutPrefix(f, "memory_limit="); ok {
				limit, _ = strconv.ParseInt(v, 10, 64)
			}
		}
		want := int64(memoryLimit + 300<<20)
		if env != "" {
			want = 1 << 30
			if limit != want {
				t.Fatalf("GOMEMLIMIT=%s: memory limit %d, want it kept", env, limit)
			}
			continue
		}
		if limit < want {
			t.Fatalf("memory limit %d with a 300 MiB cache, want at least %d:\n%s", limit, want, s.stderr)
		}
	}
}
