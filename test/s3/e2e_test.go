// Package s3test runs the vmvault command against a real MinIO that the
// test starts on 127.0.0.1: round trip with check --read-data, a backup
// killed mid-upload and rerun, a server answering 503 for a while, an
// append-only (no-delete) credential, object lock, and several hosts
// backing up into one repository at once with a prune from a third.
//
// The vmvault binary is built once by TestMain; each "host" is a process
// in its own UTS namespace (unshare -u) with its own host name and cache.
package s3test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"vmvault/backend"
	"vmvault/backend/s3"
	"vmvault/internal/testminio"
)

var vmvaultBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "vmvault-s3test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	vmvaultBin = filepath.Join(dir, "vmvault")
	if out, err := exec.Command("go", "build", "-o", vmvaultBin, "vmvault/cmd/vmvault").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build vmvault: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// cred is an S3 access key pair.
type cred struct{ id, secret string }

// env is one repository on one MinIO.
type env struct {
	t    *testing.T
	srv  *testminio.Server
	dir  string
	repo string // s3:http://…/bucket/prefix
	pw   string
	root cred
}

// newEnv starts MinIO and names a repository in a fresh bucket; it does
// not run init.
func newEnv(t *testing.T) *env {
	t.Helper()
	srv := testminio.Start(t, testminio.Options{})
	dir := t.TempDir()
	e := &env{t: t, srv: srv, dir: dir, repo: srv.URL("vmvault/fleet"), pw: filepath.Join(dir, "pw"),
		root: cred{srv.RootUser, srv.RootPassword}}
	if err := os.WriteFile(e.pw, []byte("correct horse\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return e
}

// result of one vmvault run.
type result struct {
	code           int
	stdout, stderr string
}

// host is a machine running vmvault: its host name (empty: this one's),
// cache and credential.
type host struct {
	name  string
	cache string
	cred  cred
}

func (e *env) host(name string, c cred) host {
	return host{name: name, cache: filepath.Join(e.dir, "cache-"+name), cred: c}
}

// command returns the vmvault command line for h, in its own UTS
// namespace when h has a name.
func (e *env) command(h host, args ...string) *exec.Cmd {
	full := append([]string{"--repo", e.repo, "--password-file", e.pw, "--cache-dir", h.cache}, args...)
	var cmd *exec.Cmd
	if h.name != "" {
		cmd = exec.Command("unshare", append([]string{"-u", "sh", "-c", `hostname "$0" && exec "$@"`, h.name, vmvaultBin}, full...)...)
	} else {
		cmd = exec.Command(vmvaultBin, full...)
	}
	cmd.Env = append(cleanEnv(), "AWS_ACCESS_KEY_ID="+h.cred.id, "AWS_SECRET_ACCESS_KEY="+h.cred.secret)
	return cmd
}

// cleanEnv is the environment without AWS and vmvault settings.
func cleanEnv() []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "AWS_") && !strings.HasPrefix(kv, "VMVAULT_") {
			out = append(out, kv)
		}
	}
	return out
}

func (e *env) run(h host, stdin []byte, args ...string) result {
	e.t.Helper()
	cmd := e.command(h, args...)
	var out, errb bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(stdin), &out, &errb
	err := cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			e.t.Fatalf("vmvault %v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	return result{code, out.String(), errb.String()}
}

func (e *env) ok(h host, args ...string) result {
	e.t.Helper()
	r := e.run(h, nil, args...)
	if r.code != 0 {
		e.t.Fatalf("vmvault %v on %q: exit %d: %s", args, h.name, r.code, r.stderr)
	}
	return r
}

// backend opens the repository's bucket directly, as root.
func (e *env) backend() backend.Backend {
	e.t.Helper()
	e.t.Setenv("AWS_ACCESS_KEY_ID", e.root.id)
	e.t.Setenv("AWS_SECRET_ACCESS_KEY", e.root.secret)
	b, err := s3.Open(context.Background(), s3.Config{URL: e.repo, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { b.Close() })
	return b
}

// stored counts the objects under prefix and their bytes.
func (e *env) stored(prefix string) (n int, bytes int64) {
	e.t.Helper()
	err := e.backend().List(context.Background(), prefix, func(oi backend.ObjectInfo) error {
		n++
		bytes += oi.Size
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return n, bytes
}

// image writes size pseudo-random bytes from seed (incompressible) to
// path and returns them.
func image(t *testing.T, path string, seed uint64, size int) []byte {
	t.Helper()
	img := make([]byte, size)
	rng := rand.New(rand.NewPCG(seed, 7))
	for i := 0; i+8 <= size; i += 8 {
		v := rng.Uint64()
		for j := range 8 {
			img[i+j] = byte(v >> (8 * j))
		}
	}
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	return img
}

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// initArgs makes a small, fast repository (cheap KDF, 4 MiB segments).
var initArgs = []string{"init", "--kdf-params", "t=1,m=8192,p=1", "--segment-size", "4194304"}

// Every command works against MinIO: init, backup, snapshots, restore
// (byte-identical), check --read-data, forget, prune, stats.
func TestRoundTrip(t *testing.T) {
	e := newEnv(t)
	h := e.host("", e.root)
	e.ok(h, initArgs...)
	img := image(t, filepath.Join(e.dir, "vm01.raw"), 1, 24<<20)
	e.ok(h, "backup", "vm01", "--source", filepath.Join(e.dir, "vm01.raw"))
	// A second generation with one changed MiB.
	copy(img[5<<20:], bytes.Repeat([]byte{0xab}, 1<<20))
	os.WriteFile(filepath.Join(e.dir, "vm01.raw"), img, 0o600)
	e.ok(h, "backup", "vm01", "--source", filepath.Join(e.dir, "vm01.raw"))
	if out := e.ok(h, "snapshots", "vm01").stdout; strings.Count(out, "vm01") != 2 {
		t.Fatalf("snapshots shows not two generations:\n%s", out)
	}
	if out := e.ok(h, "restore", "vm01", "latest").stdout; sum([]byte(out)) != sum(img) {
		t.Fatal("restore from s3 differs from the image")
	}
	e.ok(h, "check", "--read-data")
	e.ok(h, "stats")
	e.ok(h, "forget", "--keep-last", "1")
	e.ok(h, "prune")
	if out := e.ok(h, "snapshots", "vm01").stdout; strings.Count(out, "vm01") != 1 {
		t.Fatalf("after forget --keep-last 1:\n%s", out)
	}
	if out := e.ok(h, "restore", "vm01", "latest").stdout; sum([]byte(out)) != sum(img) {
		t.Fatal("restore after prune differs")
	}
	e.ok(h, "check", "--read-data")
	// A fresh cache (another machine) finds everything in the store.
	other := e.host("", e.root)
	other.cache = filepath.Join(e.dir, "fresh-cache")
	if out := e.ok(other, "restore", "vm01", "latest").stdout; sum([]byte(out)) != sum(img) {
		t.Fatal("restore with a fresh cache differs")
	}
}

// A missing bucket is "repository missing" (exit 10), one line.
func TestMissingRepository(t *testing.T) {
	e := newEnv(t)
	r := e.run(e.host("", e.root), nil, "snapshots")
	if r.code != 10 || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 || !strings.Contains(r.stderr, "vmvault") {
		t.Fatalf("snapshots on a missing bucket: exit %d, %q", r.code, r.stderr)
	}
}

// The command finds S3 credentials in every documented place, with no
// AWS_* variable set: the configuration's [repository] s3_* keys, the
// shared credentials file's profile named by AWS_PROFILE or by
// s3_profile, and the default file ~/.aws/credentials. Wrong or missing
// credentials fail with one line naming the fix.
func TestCredentialSourcesCLI(t *testing.T) {
	e := newEnv(t)
	h := e.host("", e.root)
	e.ok(h, initArgs...)
	home := filepath.Join(e.dir, "home")
	secret := filepath.Join(e.dir, "s3-secret")
	shared := filepath.Join(e.dir, "aws-credentials")
	write := func(path, text string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(secret, e.root.secret+"\n")
	write(shared, fmt.Sprintf("[default]\naws_access_key_id = nobody\naws_secret_access_key = wrong-secret-0123\n\n[vmvault]\naws_access_key_id = %s\naws_secret_access_key = %s\n", e.root.id, e.root.secret))
	// run writes a configuration with the given extra [repository] keys
	// and lists the generations with it, without --repo.
	run := func(keys string, env ...string) result {
		t.Helper()
		cfg := filepath.Join(e.dir, "vmvault.toml")
		write(cfg, fmt.Sprintf("[repository]\nurl = %q\npassword_file = %q\ncache_dir = %q\ns3_path_style = true\n%s", e.repo, e.pw, h.cache, keys))
		cmd := exec.Command(vmvaultBin, "generations")
		cmd.Env = append(cleanEnv(), append([]string{"VMVAULT_CONFIG=" + cfg, "HOME=" + home}, env...)...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		code := 0
		if err := cmd.Run(); err != nil {
			ee, ok := err.(*exec.ExitError)
			if !ok {
				t.Fatal(err)
			}
			code = ee.ExitCode()
		}
		return result{code, out.String(), errb.String()}
	}
	keys := fmt.Sprintf("s3_access_key_id = %q\ns3_secret_access_key_file = %q\n", e.root.id, secret)
	for _, tc := range []struct {
		name, keys string
		env        []string
		fail       string // "" for success, else a piece of the error
	}{
		{"configuration keys", keys, nil, ""},
		{"AWS_PROFILE", "", []string{"AWS_SHARED_CREDENTIALS_FILE=" + shared, "AWS_PROFILE=vmvault"}, ""},
		{"s3_profile", "s3_profile = \"vmvault\"\n", []string{"AWS_SHARED_CREDENTIALS_FILE=" + shared}, ""},
		{"file's default profile is wrong", "", []string{"AWS_SHARED_CREDENTIALS_FILE=" + shared}, "a wrong access key or secret"},
		{"no credentials anywhere", "", nil, "no s3 credentials"},
	} {
		r := run(tc.keys, tc.env...)
		switch {
		case tc.fail == "" && r.code != 0:
			t.Errorf("%s: exit %d: %s", tc.name, r.code, r.stderr)
		case tc.fail != "" && (r.code == 0 || !strings.Contains(r.stderr, tc.fail) || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0):
			t.Errorf("%s: exit %d, stderr %q; want one line containing %q", tc.name, r.code, r.stderr, tc.fail)
		}
	}
	// The default file, ~/.aws/credentials, with its default profile.
	write(filepath.Join(home, ".aws", "credentials"), fmt.Sprintf("[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n", e.root.id, e.root.secret))
	if r := run(""); r.code != 0 {
		t.Errorf("~/.aws/credentials: exit %d: %s", r.code, r.stderr)
	}
}

// appendOnlyPolicy is the bucket policy docs/server.md gives for a host's
// credential: read, write and list, no delete. (Kept identical to the
// documentation by TestDocumentedPolicy.)
const appendOnlyPolicy = `{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
      "Resource": ["arn:aws:s3:::vmvault"]
    },
    {
      "Effect": "Allow",
      "Action": ["s3:GetObject", "s3:PutObject", "s3:GetObjectRetention", "s3:PutObjectRetention"],
      "Resource": ["arn:aws:s3:::vmvault/*"]
    }
  ]
}`

// appendOnlyUser creates a MinIO user with appendOnlyPolicy, with the mc
// commands docs/server.md shows.
func (e *env) appendOnlyUser(name string) cred {
	e.t.Helper()
	pol := filepath.Join(e.dir, "vmvault-append.json")
	if err := os.WriteFile(pol, []byte(appendOnlyPolicy), 0o600); err != nil {
		e.t.Fatal(err)
	}
	c := cred{name, "secret-" + name + "-0123456789"}
	e.srv.MC(e.t, "admin", "user", "add", "t", c.id, c.secret)
	if out, err := e.srv.TryMC(e.t, "admin", "policy", "create", "t", "vmvault-append", pol); err != nil && !strings.Contains(out, "already") {
		e.t.Fatalf("mc admin policy create: %v\n%s", err, out)
	}
	e.srv.MC(e.t, "admin", "policy", "attach", "t", "vmvault-append", "--user", c.id)
	return c
}

// A host credential that may get, put and list but not delete backs up
// and restores; forget and prune refuse with one clear line and delete
// nothing; the administrator's credential prunes afterwards.
func TestNoDeleteCredential(t *testing.T) {
	e := newEnv(t)
	admin := e.host("", e.root)
	e.ok(admin, initArgs...)
	h := e.host("", e.appendOnlyUser("host01"))
	img := image(t, filepath.Join(e.dir, "vm01.raw"), 2, 12<<20)
	for range 2 {
		e.ok(h, "backup", "vm01", "--source", filepath.Join(e.dir, "vm01.raw"))
	}
	if out := e.ok(h, "restore", "vm01", "latest").stdout; sum([]byte(out)) != sum(img) {
		t.Fatal("restore with the no-delete credential differs")
	}
	e.ok(h, "check", "--read-data")
	before, _ := e.stored("")
	for _, args := range [][]string{{"forget", "--keep-last", "1"}, {"prune"}} {
		r := e.run(h, nil, args...)
		t.Logf("vmvault %v: exit %d: %s", args, r.code, r.stderr)
		if r.code == 0 || !strings.Contains(r.stderr, "append-only") || !strings.Contains(r.stderr, "S3 credential that may delete") ||
			strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Fatalf("vmvault %v with a no-delete credential: exit %d, stderr %q; want one line saying append-only", args, r.code, r.stderr)
		}
	}
	after, _ := e.stored("")
	if out := e.ok(h, "snapshots", "vm01").stdout; strings.Count(out, "vm01") != 2 || after < before {
		t.Fatalf("refused forget/prune changed the repository: %d → %d objects\n%s", before, after, out)
	}
	// The server side (administrator) prunes.
	e.ok(admin, "forget", "--keep-last", "1")
	e.ok(admin, "prune")
	e.ok(h, "check", "--read-data")
}

// A backup killed with SIGKILL in the middle of its uploads leaves a
// repository that the rerun completes: the rerun succeeds, the restore is
// byte-identical and check --read-data passes.
func TestKilledMidUpload(t *testing.T) {
	e := newEnv(t)
	h := e.host("", e.root)
	e.ok(h, initArgs...)
	src := filepath.Join(e.dir, "vm01.raw")
	img := image(t, src, 3, 96<<20)
	cmd := e.command(h, "backup", "vm01", "--source", src)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if n, _ := e.stored("data/"); n >= 20 {
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("backup uploaded nothing in 2 minutes: %s", errb.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	cmd.Process.Kill()
	err := cmd.Wait()
	if err == nil {
		t.Fatal("backup finished before it could be killed: make the image larger")
	}
	if n, _ := e.stored("manifests/"); n != 0 {
		t.Fatalf("a killed backup committed %d manifests", n)
	}
	e.ok(h, "backup", "vm01", "--source", src)
	if out := e.ok(h, "restore", "vm01", "latest").stdout; sum([]byte(out)) != sum(img) {
		t.Fatal("restore after a killed and rerun backup differs")
	}
	e.ok(h, "check", "--read-data")
}

// flakyProxy stands in front of MinIO and answers 503 SlowDown to every
// request while failing is set, the way a busy object store sheds load.
type flakyProxy struct {
	addr     string
	failing  atomic.Bool
	requests atomic.Int64
	refused  atomic.Int64
}

func startFlakyProxy(t *testing.T, target string) *flakyProxy {
	t.Helper()
	p := &flakyProxy{}
	u, _ := url.Parse("http://" + target)
	rp := &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) {
		r.SetURL(u)
		r.Out.Host = r.In.Host // the request is signed for the proxy's address
	}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = l.Addr().String()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.requests.Add(1)
		if p.failing.Load() {
			p.refused.Add(1)
			w.Header().Set("Content-Type", "application/xml")
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>`)
			return
		}
		rp.ServeHTTP(w, r)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return p
}

// A store that answers 503 SlowDown to everything for a while: the
// backup and the restore retry with backoff, say so in the log, and
// succeed once the store recovers.
func TestServerBusy(t *testing.T) {
	e := newEnv(t)
	p := startFlakyProxy(t, e.srv.Endpoint)
	e.repo = "s3:http://" + p.addr + "/vmvault/fleet"
	h := e.host("", e.root)
	e.ok(h, initArgs...)
	src := filepath.Join(e.dir, "vm01.raw")
	img := image(t, src, 4, 32<<20)
	run := func(args ...string) result {
		cmd := e.command(h, args...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Fail for two seconds once the command is under way.
		start := p.requests.Load()
		for p.requests.Load() < start+10 {
			time.Sleep(5 * time.Millisecond)
		}
		p.failing.Store(true)
		time.Sleep(2 * time.Second)
		p.failing.Store(false)
		err := cmd.Wait()
		if err != nil {
			t.Fatalf("vmvault %v through a store that answered 503 for 2 s: %v\n%s", args, err, errb.String())
		}
		return result{0, out.String(), errb.String()}
	}
	r := run("backup", "vm01", "--source", src)
	if !strings.Contains(r.stderr, "retrying") || !strings.Contains(r.stderr, "SlowDown") {
		t.Fatalf("backup did not log its retries:\n%s", r.stderr)
	}
	r = run("restore", "vm01", "latest")
	if sum([]byte(r.stdout)) != sum(img) {
		t.Fatal("restore through the busy store differs")
	}
	if p.refused.Load() == 0 {
		t.Fatal("the proxy refused nothing: the test tested nothing")
	}
	t.Logf("%d requests, %d answered 503", p.requests.Load(), p.refused.Load())
	e.ok(h, "check", "--read-data")
}

// hostImage is the shared base image with one host-specific 4 MiB region
// at region (in MiB).
func hostImage(t *testing.T, path string, base []byte, seed uint64, region int) []byte {
	t.Helper()
	img := bytes.Clone(base)
	own := image(t, path, seed, 4<<20)
	copy(img[region<<20:], own)
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	return img
}

// Two hosts (each vmvault in its own UTS namespace with its own host
// name and cache) back up at the same time into one repository; the base
// image they share is stored once. Then they back up again while a third
// host prunes: every command either succeeds or is refused for the lock
// (exit 11), never anything else, and afterwards every generation restores
// byte-identically and check --read-data passes.
func TestManyHosts(t *testing.T) {
	if out, err := exec.Command("unshare", "-u", "true").CombinedOutput(); err != nil {
		t.Fatalf("unshare -u (util-linux, needs root): %v %s", err, out)
	}
	e := newEnv(t)
	admin := e.host("", e.root)
	e.ok(admin, initArgs...)
	base := image(t, filepath.Join(e.dir, "base.raw"), 10, 64<<20)
	hosts := []host{e.host("host-a", e.root), e.host("host-b", e.root)}
	imgs := make([][]byte, len(hosts))
	for i := range hosts {
		imgs[i] = hostImage(t, filepath.Join(e.dir, hosts[i].name+".raw"), base, uint64(20+i), 4+8*i)
	}
	parallel := func(cmds ...*exec.Cmd) []result {
		res := make([]result, len(cmds))
		outs := make([]*bytes.Buffer, len(cmds))
		for i, c := range cmds {
			outs[i] = &bytes.Buffer{}
			c.Stderr = outs[i]
			if err := c.Start(); err != nil {
				t.Fatal(err)
			}
		}
		for i, c := range cmds {
			err := c.Wait()
			res[i] = result{stderr: outs[i].String()}
			if ee, ok := err.(*exec.ExitError); ok {
				res[i].code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
		}
		return res
	}
	backups := func() []*exec.Cmd {
		var cmds []*exec.Cmd
		for _, h := range hosts {
			cmds = append(cmds, e.command(h, "backup", "vm-"+h.name, "--source", filepath.Join(e.dir, h.name+".raw")))
		}
		return cmds
	}
	for i, r := range parallel(backups()...) {
		if r.code != 0 {
			t.Fatalf("concurrent backup on %s: exit %d: %s", hosts[i].name, r.code, r.stderr)
		}
	}
	_, dataBytes := e.stored("data/")
	// Ideal: 60 + 2 × 4 = 68 MiB; each host's own region also disturbs the
	// chunks and keyed segment boundaries next to it, by an amount that
	// varies with the repository's keys (74–77 MiB seen; with a 32 MiB base
	// 52 MiB was once seen against a 46 MiB bound); without dedup across
	// hosts it is 128 MiB.
	if dataBytes > 96<<20 {
		t.Fatalf("two 64 MiB images sharing 60 MiB stored %d MiB of data: the base was not deduplicated across hosts", dataBytes>>20)
	}
	t.Logf("two hosts, 2 × 64 MiB sharing a 60 MiB base: %.1f MiB stored", float64(dataBytes)/(1<<20))
	out := e.ok(admin, "snapshots", "--json").stdout
	for _, h := range hosts {
		if !strings.Contains(out, `"host": "`+h.name+`"`) && !strings.Contains(out, `"host":"`+h.name+`"`) {
			t.Fatalf("snapshots do not name host %s:\n%s", h.name, out)
		}
	}

	// Round two: new data on both hosts while host-c prunes.
	prev := make([][]byte, len(hosts))
	for i := range hosts {
		prev[i] = bytes.Clone(imgs[i])
		copy(imgs[i][20<<20:], bytes.Repeat([]byte{byte(0x40 + i)}, 2<<20))
		os.WriteFile(filepath.Join(e.dir, hosts[i].name+".raw"), imgs[i], 0o600)
	}
	pruner := e.host("host-c", e.root)
	cmds := append(backups(), e.command(pruner, "prune"))
	want := imgs
	for i, r := range parallel(cmds...) {
		if r.code != 0 && r.code != 11 {
			t.Fatalf("command %d during concurrent backups and prune: exit %d: %s", i, r.code, r.stderr)
		}
		if r.code == 11 && i < len(hosts) {
			want[i] = prev[i] // refused for the lock: the first generation is the latest
		}
		t.Logf("command %d: exit %d", i, r.code)
	}
	e.ok(pruner, "prune")
	e.ok(pruner, "check", "--read-data")
	for i, h := range hosts {
		if out := e.ok(pruner, "restore", "vm-"+h.name, "latest").stdout; sum([]byte(out)) != sum(want[i]) {
			t.Fatalf("restore of %s on host-c differs from its latest image", h.name)
		}
	}
}

// killBackup starts a backup of src and kills it with SIGKILL once it has
// uploaded some data, leaving unreferenced objects behind.
func (e *env) killBackup(h host, vm, src string, extra ...string) {
	e.t.Helper()
	before, _ := e.stored("data/")
	cmd := e.command(h, append(extra, "backup", vm, "--source", src)...)
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if n, _ := e.stored("data/"); n >= before+10 {
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			e.t.Fatal("backup uploaded nothing in 2 minutes")
		}
		time.Sleep(20 * time.Millisecond)
	}
	cmd.Process.Kill()
	if cmd.Wait() == nil {
		e.t.Fatal("backup finished before it could be killed: make the image larger")
	}
	// Requests the killed process had fully sent still complete on the
	// server afterwards: wait until the store's count settles, so callers
	// compare against what the kill really left.
	last, _ := e.stored("data/")
	for settle := time.Now().Add(30 * time.Second); time.Now().Before(settle); {
		time.Sleep(300 * time.Millisecond)
		n, _ := e.stored("data/")
		if n == last {
			return
		}
		last = n
	}
	e.t.Fatal("the store kept changing for 30 s after the backup was killed")
}

// With s3_object_lock_days, init creates the bucket with object lock and
// every object is written under retention: prune keeps (and reports)
// unreferenced objects it may not delete yet, forget refuses a retained
// generation with one line, and the repository stays whole.
func TestObjectLock(t *testing.T) {
	e := newEnv(t)
	conf := filepath.Join(e.dir, "vmvault.toml")
	text := fmt.Sprintf("[repository]\nurl = %q\npassword_file = %q\ns3_object_lock_days = 1\n", e.repo, e.pw)
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	h := e.host("", e.root)
	cfgArg := []string{"--config", conf}
	e.ok(h, append(cfgArg, initArgs...)...)
	if out := e.srv.MC(t, "stat", "t/vmvault"); !strings.Contains(out, "Versioning: Enabled") {
		t.Fatalf("init did not create the bucket with object lock (which needs versioning):\n%s", out)
	}
	src := filepath.Join(e.dir, "vm01.raw")
	image(t, src, 7, 8<<20)
	e.ok(h, append(cfgArg, "backup", "vm01", "--source", src)...)
	img := image(t, src, 5, 8<<20)
	e.ok(h, append(cfgArg, "backup", "vm01", "--source", src)...)
	big := filepath.Join(e.dir, "vm02.raw")
	image(t, big, 6, 96<<20)
	e.killBackup(h, "vm02", big, cfgArg...)
	dataBefore, _ := e.stored("data/")

	r := e.run(h, nil, append(cfgArg, "prune", "--safety-margin", "0")...)
	if r.code != 0 || !strings.Contains(r.stderr, "retention") {
		t.Fatalf("prune of a locked repository: exit %d, want 0 and a notice of retained objects:\n%s", r.code, r.stderr)
	}
	if dataAfter, _ := e.stored("data/"); dataAfter != dataBefore {
		t.Fatalf("prune removed %d retained data objects", dataBefore-dataAfter)
	}
	r = e.run(h, nil, append(cfgArg, "forget", "--keep-last", "1")...)
	if r.code == 0 || !strings.Contains(r.stderr, "retained until") || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
		t.Fatalf("forget of a retained generation: exit %d, stderr %q; want one line naming the retention", r.code, r.stderr)
	}
	if out := e.ok(h, "restore", "vm01", "latest").stdout; sum([]byte(out)) != sum(img) {
		t.Fatal("restore from the locked repository differs")
	}
	e.ok(h, "check", "--read-data")
}

// docs/server.md shows exactly the policy and the mc commands these tests
// use.
func TestDocumentedPolicy(t *testing.T) {
	doc, err := os.ReadFile("../../docs/server.md")
	if err != nil {
		t.Fatal(err)
	}
	text := string(doc)
	if !strings.Contains(text, "```json\n"+appendOnlyPolicy+"\n```") {
		t.Fatal("docs/server.md does not show the tested append-only policy (appendOnlyPolicy)")
	}
	for _, cmd := range []string{"mc mb --with-lock t/vmvault", "mc admin user add t vmhost1", "mc admin policy create t vmvault-append vmvault-append.json",
		"mc admin policy attach t vmvault-append --user vmhost1", "mc retention set --default compliance"} {
		if !strings.Contains(text, cmd) {
			t.Errorf("docs/server.md lacks the tested command %q", cmd)
		}
	}
}
