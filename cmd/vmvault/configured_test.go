package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vmvault/internal/testmariadb"
	"vmvault/internal/testsshd"
	"vmvault/vmbackup"
)

// Backups driven by the configuration file, against a real sshd standing
// in for the guest and a real MariaDB. The disks are plain image files
// (this host's kernel has no device-mapper; test/lvm runs the LVM path in
// a qemu guest).
func TestConfiguredBackup(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	db := testmariadb.New(t)
	const dbPassword = "db-s3cret-Pa55"
	if err := db.CreateUser(ctx, "backup", dbPassword, "", "RELOAD", "LOCK TABLES"); err != nil {
		t.Fatal(err)
	}
	guest := testsshd.Start(t, testsshd.Options{})
	marker := filepath.Join(e.dir, "guest-flushed")

	dbpw := filepath.Join(e.dir, "db-pw")
	os.WriteFile(dbpw, []byte(dbPassword+"\n"), 0o600)
	badpw := filepath.Join(e.dir, "db-badpw")
	os.WriteFile(badpw, []byte("wrong-Pa55-xyz\n"), 0o600)
	img1 := writeImage(t, filepath.Join(e.dir, "vm01.raw"), 10, 5<<20)
	img2 := writeImage(t, filepath.Join(e.dir, "vm02.raw"), 11, 3<<20)
	// A port nobody listens on: the "database that is down".
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	downAddr := l.Addr().String()
	l.Close()
	host, port, _ := net.SplitHostPort(guest.Addr)
	emptyKnown := filepath.Join(e.dir, "known_hosts_empty")
	os.WriteFile(emptyKnown, nil, 0o600)

	cfgText := fmt.Sprintf(`
[repository]
url = %q
password_file = %q
cache_dir = %q

[vm.vm01]
guest = { ssh = "%s@%s:%s", key = %q, known_hosts = %q, before_snapshot = ["touch %s"] }
disk.hda = { path = %q }
database.main = { dsn = "backup@tcp(%s)/", password_file = %q }
database.stats = { dsn = "backup@tcp(%s)/", password_file = %q, required = false }

[vm.vm02]
disk.hda = { path = %q }

[vm.vm03]
disk.hda = { path = %q }
database.main = { dsn = "backup@tcp(%s)/", password_file = %q }

[vm.vm04]
guest = { ssh = "%s@%s:%s", key = %q, known_hosts = %q }
disk.hda = { path = %q }
`, e.repo, e.pw, e.cache, guest.User, host, port, guest.ClientKeyFile, guest.KnownHostsFile, marker,
		filepath.Join(e.dir, "vm01.raw"), db.Addr, dbpw, downAddr, dbpw,
		filepath.Join(e.dir, "vm02.raw"),
		filepath.Join(e.dir, "vm02.raw"), db.Addr, badpw,
		guest.User, host, port, guest.ClientKeyFile, emptyKnown, filepath.Join(e.dir, "vm04.raw"))
	cfgFile := filepath.Join(e.dir, "vmvault.toml")
	os.WriteFile(cfgFile, []byte(cfgText), 0o600)
	os.WriteFile(filepath.Join(e.dir, "vm04.raw"), img2, 0o600)

	// Every run logs at debug level to stderr and syslog and writes the
	// metrics file; no secret may appear in any of them.
	sink := newSyslogSink(t)
	prom := filepath.Join(e.dir, "vmvault.prom")
	var syslogged []syslogMsg
	runCfg := func(args ...string) result {
		var out, errb strings.Builder
		full := append([]string{"--config", cfgFile, "-vv", "--syslog", "--syslog-socket", sink.path}, args...)
		full = append(full, "--metrics-file", prom)
		code := run(ctx, full, nil, &out, &errb)
		r := result{code, out.String(), errb.String()}
		msgs := sink.take()
		syslogged = append(syslogged, msgs...)
		metrics, _ := os.ReadFile(prom)
		all := r.stdout + r.stderr + string(metrics)
		for _, m := range msgs {
			all += m.text + "\n"
		}
		for _, secret := range []string{dbPassword, "wrong-Pa55-xyz", "correct horse"} {
			if strings.Contains(all, secret) {
				t.Fatalf("a secret leaked into the output, syslog or metrics of %v", args)
			}
		}
		return r
	}

	// vm01: guest flushed, one database locked, one down (a warning: exit 3).
	r := runCfg("backup", "vm01", "--json")
	if r.code != exitPartial {
		t.Fatalf("vm01: exit %d, want %d (database down is a warning): %s", r.code, exitPartial, r.stderr)
	}
	var o vmOutcome
	if err := json.Unmarshal([]byte(r.stdout), &o); err != nil {
		t.Fatalf("--json: %v: %q", err, r.stdout)
	}
	if o.Status != "warning" || len(o.Warnings) != 1 || !strings.Contains(o.Warnings[0], "stats down") || o.BytesRead != int64(len(img1)) {
		t.Fatalf("vm01 outcome %+v", o)
	}
	if m, ok := findMsg(syslogged, "vm01: warning"); !ok || m.pri != priWarning {
		t.Fatalf("vm01's summary in syslog: %v %+v", ok, m)
	}
	if got := parseMetricsFile(t, prom)["vmvault_backup_last_status"]["vm01"]; got != metricWarning {
		t.Fatalf("vm01 metrics status %v, want %d", got, metricWarning)
	}
	if o.GuestHeld <= 0 {
		t.Fatalf("guest hold not reported: %+v", o)
	}
	if _, err := os.Stat(marker); err != nil {
		t.Fatal("before_snapshot command did not run in the guest:", err)
	}
	// The manifest records what the consistency step did.
	m := loadManifestJSON(t, e, "vm01")
	q := string(m.Quiesce)
	if !strings.Contains(q, `"synced":true`) || !strings.Contains(q, `"status":"locked"`) || !strings.Contains(q, `"status":"down"`) {
		t.Fatalf("manifest quiesce record: %s", q)
	}
	if out := e.ok("restore", "vm01", "latest").stdout; sum([]byte(out)) != sum(img1) {
		t.Fatal("vm01 restores wrong")
	}

	// vm03: wrong database password is an error naming VM and database.
	r = runCfg("backup", "vm03")
	if r.code != exitError || !strings.Contains(r.stderr, "vm03") || !strings.Contains(r.stderr, "main") || !strings.Contains(strings.ToLower(r.stderr), "access denied") {
		t.Fatalf("vm03 (bad db password): exit %d: %s", r.code, r.stderr)
	}

	if m, ok := findMsg(syslogged, "vm03: FAILED"); !ok || m.pri != priErr {
		t.Fatalf("vm03's failure in syslog: %v %+v", ok, m)
	}
	// Overlapping run of the same VM: exits at once with the lock code.
	unlock, err := vmbackup.FileLocks{Dir: e.cache}.Lock("vm02")
	if err != nil {
		t.Fatal(err)
	}
	r = runCfg("backup", "vm02")
	unlock()
	if r.code != exitLocked || !strings.Contains(r.stderr, "already running") {
		t.Fatalf("overlapping backup: exit %d: %s", r.code, r.stderr)
	}

	// --all: vm03 fails, and vm04's guest presents a host key that is not
	// in its known_hosts → refused; the others still run; exit 3.
	r = runCfg("backup", "--all")
	if r.code != exitPartial || !strings.Contains(r.stderr, "vm02: ok") || !strings.Contains(r.stderr, "vm03: FAILED") || !strings.Contains(r.stderr, "vm04: FAILED") || !strings.Contains(r.stderr, guest.HostKeyFingerprint) {
		t.Fatalf("--all: exit %d: %s", r.code, r.stderr)
	}
	if out := e.ok("restore", "vm02", "latest").stdout; sum([]byte(out)) != sum(img2) {
		t.Fatal("vm02 restores wrong")
	}

	// config check reports file, line and key.
	bad := filepath.Join(e.dir, "bad.toml")
	os.WriteFile(bad, []byte("[repository]\nurl = \"/x\"\npassword_file = \"/nonexistent\"\nbogus = 1\n"), 0o600)
	var out, errb strings.Builder
	code := run(ctx, []string{"--config", bad, "config", "check"}, nil, &out, &errb)
	if code != exitError || !strings.Contains(out.String(), "bad.toml:4") || !strings.Contains(out.String(), "bogus") {
		t.Fatalf("config check: exit %d: %s %s", code, out.String(), errb.String())
	}
	code = run(ctx, []string{"--config", cfgFile, "config", "check"}, nil, &out, &errb)
	if code != 0 {
		t.Fatalf("config check of a good file: exit %d: %s", code, errb.String())
	}
}

func loadManifestJSON(t *testing.T, e *env, vm string) struct{ Quiesce json.RawMessage } {
	t.Helper()
	r := e.ok("snapshots", vm, "--json")
	var gens []generationJSON
	json.Unmarshal([]byte(r.stdout), &gens)
	if len(gens) == 0 {
		t.Fatalf("no generation of %s", vm)
	}
	a := &app{stdout: os.Stdout, stderr: os.Stderr, repoURL: e.repo, passwordFile: e.pw, cacheDir: e.cache}
	a.setup()
	rp, err := a.openRepo(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer rp.Close()
	m, err := rp.LoadManifest(context.Background(), gens[len(gens)-1].ID)
	if err != nil {
		t.Fatal(err)
	}
	return struct{ Quiesce json.RawMessage }{m.Quiesce}
}
