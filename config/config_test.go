package config

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"vmvault/retention"
)

// errorsOf returns the *Error values inside err (a join of them).
func errorsOf(t *testing.T, err error) []*Error {
	t.Helper()
	var errs []error
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	} else if err != nil {
		errs = []error{err}
	}
	var out []*Error
	for _, e := range errs {
		var ce *Error
		if !errors.As(e, &ce) {
			t.Fatalf("error %v (%T) is not a *config.Error", e, e)
		}
		out = append(out, ce)
	}
	return out
}

// writeFile writes a file with the given mode (chmod, so umask does not
// interfere) and returns its path.
func writeFile(t *testing.T, dir, name, content string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadFull(t *testing.T) {
	dir := t.TempDir()
	f := map[string]string{
		"password":  writeFile(t, dir, "password", "repo secret\n", 0o600),
		"sshkey":    writeFile(t, dir, "backup_key", "KEY", 0o600),
		"known":     writeFile(t, dir, "known_hosts", "", 0o644),
		"guestkey":  writeFile(t, dir, "guest_key", "KEY", 0o400),
		"dbpass":    writeFile(t, dir, "db-vm01", "db secret", 0o600),
		"ca":        writeFile(t, dir, "tls/ca.pem", "CA", 0o644),
		"cert":      writeFile(t, dir, "tls/client.pem", "CERT", 0o644),
		"tlskey":    writeFile(t, dir, "tls/client.key", "KEY", 0o600),
		"imagefile": writeFile(t, dir, "vm02-data.raw", "", 0o644),
	}
	text := fmt.Sprintf(`
[repository]
url = "sftp://backup@192.168.1.1:2222/srv/vmvault"
password_file = %[1]q
ssh_key = %[2]q
known_hosts = %[3]q
cache_dir = "/var/cache/vmvault"

[log]
syslog = true
level = "debug"

[limits]
read = 50
upload = 20
io_priority = "best-effort"

[backup]
full_every = "3d"
verify_unchanged = 0.5

[retention]
keep_daily = 7
keep_weekly = 4
keep_yearly = -1
keep_within = "30d"
keep_tag = ["keep"]

[vm.vm01]
sudo = true
retention = { keep_daily = 14 }
guest = { ssh = "root@10.0.0.5", key = %[4]q, known_hosts = %[3]q, before_snapshot = ["rm -rf /tmp/x", "true"], freeze = ["/", "/var"] }
disk.hdb = { lv = "vg0/media", file = "vm01/vm01-hdb.raw", snapshot_size = "1G", cbt = false }
disk.hda = { lv = "vg0/vm01-hda", snapshot_size = "2G" }
database.main = { dsn = "backup@tcp(10.0.0.5:3306)/", password_file = %[5]q, required = false }

[vm.vm02]
guest = { ssh = "admin@[fd00::2]:2200", key = %[4]q, freeze_timeout = "5s" }
disk.data = { path = %[9]q }

[vm.vm02.database.shop]
dsn = "backup@tcp(10.0.0.6:3306)/"
tls_ca = %[6]q
tls_cert = %[7]q
tls_key = %[8]q
required = true
`, f["password"], f["sshkey"], f["known"], f["guestkey"], f["dbpass"], f["ca"], f["cert"], f["tlskey"], f["imagefile"])
	path := writeFile(t, dir, "vmvault.toml", text, 0o644)

	got, err := Load(path)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	want := &Config{
		Path: path,
		Repository: Repository{
			URL: "sftp://backup@192.168.1.1:2222/srv/vmvault", PasswordFile: f["password"],
			SSHKey: f["sshkey"], KnownHosts: f["known"], CacheDir: "/var/cache/vmvault",
		},
		Log:       Log{Syslog: true, Level: slog.LevelDebug},
		Retention: retention.Policy{Daily: 7, Weekly: 4, Yearly: -1, Within: 30 * retention.Day, Tags: []string{"keep"}},
		Limits:    Limits{ReadMiB: 50, UploadMiB: 20, IOPriority: "best-effort"},
		Backup:    Backup{FullEvery: 3 * retention.Day, VerifyUnchanged: 0.5},
		VMs: map[string]*VM{
			"vm01": {
				Name: "vm01", Sudo: true,
				Retention: &retention.Policy{Daily: 14},
				Guest: &Guest{
					User: "root", Host: "10.0.0.5", Port: 22, Key: f["guestkey"], KnownHosts: f["known"],
					BeforeSnapshot: []string{"rm -rf /tmp/x", "true"}, Freeze: []string{"/", "/var"},
					FreezeTimeout: DefaultFreezeTimeout,
				},
				Disks: []Disk{
					{Name: "hda", LV: LV{VG: "vg0", Name: "vm01-hda"}, SnapshotSize: 2 << 30, CBT: true},
					{Name: "hdb", LV: LV{VG: "vg0", Name: "media"}, File: "vm01/vm01-hdb.raw", SnapshotSize: 1 << 30},
				},
				Databases: []Database{{Name: "main", DSN: "backup@tcp(10.0.0.5:3306)/", PasswordFile: f["dbpass"]}},
			},
			"vm02": {
				Name:  "vm02",
				Guest: &Guest{User: "admin", Host: "fd00::2", Port: 2200, Key: f["guestkey"], FreezeTimeout: 5 * time.Second},
				Disks: []Disk{{Name: "data", Path: f["imagefile"]}},
				Databases: []Database{{
					Name: "shop", DSN: "backup@tcp(10.0.0.6:3306)/",
					TLSCA: f["ca"], TLSCert: f["cert"], TLSKey: f["tlskey"], Required: true,
				}},
			},
		},
	}
	if !reflect.DeepEqual(got, want) {
		for _, n := range want.VMNames() {
			if !reflect.DeepEqual(got.VMs[n], want.VMs[n]) {
				t.Errorf("vm %s:\n got %+v\nwant %+v", n, got.VMs[n], want.VMs[n])
			}
		}
		t.Fatalf("Load:\n got %+v\nwant %+v", got, want)
	}
	if names := got.VMNames(); !slices.Equal(names, []string{"vm01", "vm02"}) {
		t.Errorf("VMNames() = %q", names)
	}
	if dev := got.VMs["vm01"].Disks[0].LV.Device(); dev != "/dev/vg0/vm01-hda" {
		t.Errorf("Device = %q", dev)
	}
	// The printable form holds no secret.
	printed := fmt.Sprintf("%+v %+v %+v", got, *got.VMs["vm01"], *got.VMs["vm02"])
	for _, secret := range []string{"repo secret", "db secret", "KEY"} {
		if strings.Contains(printed, secret) {
			t.Errorf("printed config contains the secret %q", secret)
		}
	}
}

func TestDefaults(t *testing.T) {
	cfg, err := Parse("min.toml", []byte(`
[repository]
url = "/srv/vmvault"
password_file = "/etc/vmvault/password"
`), Options{SkipFileChecks: true})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Log.Level != slog.LevelInfo || cfg.Log.Syslog {
		t.Errorf("default log = %+v", cfg.Log)
	}
	if !cfg.Retention.Empty() || len(cfg.VMs) != 0 || cfg.VMs == nil {
		t.Errorf("defaults: retention %v, vms %v", cfg.Retention, cfg.VMs)
	}
}

// exampleWithFiles copies the shipped example with every path under /etc,
// /root and /var moved into dir, where a private file is created for it.
func exampleWithFiles(t *testing.T, dir string) string {
	data, err := os.ReadFile("../docs/vmvault.example.toml")
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`"(/(?:etc|root|var)/[^"]+)"`)
	text := re.ReplaceAllStringFunc(string(data), func(m string) string {
		p := filepath.Join(dir, strings.Trim(m, `"`))
		if _, err := os.Stat(p); err != nil {
			writeFile(t, filepath.Dir(p), filepath.Base(p), "x\n", 0o600)
		}
		return fmt.Sprintf("%q", p)
	})
	return writeFile(t, dir, "vmvault.toml", text, 0o644)
}

func TestExampleParses(t *testing.T) {
	cfg, err := LoadWith("../docs/vmvault.example.toml", Options{SkipFileChecks: true})
	if err != nil {
		t.Fatalf("the shipped example does not parse:\n%v", err)
	}
	if got := cfg.VMNames(); !slices.Equal(got, []string{"archive", "vm01", "vm02"}) {
		t.Errorf("VMNames() = %q", got)
	}
	vm01 := cfg.VMs["vm01"]
	if len(vm01.Disks) != 2 || vm01.Disks[1].File != "vm01/vm01-hdb.raw" || vm01.Guest == nil || len(vm01.Databases) != 1 {
		t.Errorf("vm01 = %+v", vm01)
	}
	if cfg.Retention.Daily != 7 || vm01.Retention == nil || vm01.Retention.Daily != 14 {
		t.Errorf("retention %v, vm01 %v", cfg.Retention, vm01.Retention)
	}

	// With every referenced file present and private, the full checks pass.
	path := exampleWithFiles(t, t.TempDir())
	if _, err := Load(path); err != nil {
		t.Fatalf("example with files present:\n%v", err)
	}
}

func TestSyntaxError(t *testing.T) {
	_, err := Parse("bad.toml", []byte("[repository]\nurl = \"/x\"\npassword_file = \n"), Options{SkipFileChecks: true})
	errs := errorsOf(t, err)
	if len(errs) != 1 || errs[0].Line != 3 || errs[0].File != "bad.toml" || !strings.Contains(errs[0].Msg, "syntax error") {
		t.Fatalf("got %v", err)
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.toml"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Load of a missing file: %v", err)
	}
}

func TestMetricsFile(t *testing.T) {
	base := "[repository]\nurl = \"/srv/vmvault\"\npassword_file = \"/etc/vmvault/password\"\n[log]\n"
	cfg, err := Parse("m.toml", []byte(base+"metrics_file = \"/var/lib/node_exporter/vmvault.prom\"\n"), Options{SkipFileChecks: true})
	if err != nil || cfg.Log.MetricsFile != "/var/lib/node_exporter/vmvault.prom" {
		t.Fatalf("metrics_file: %v %+v", err, cfg)
	}
	_, err = Parse("m.toml", []byte(base+"metrics_file = \"vmvault.prom\"\n"), Options{SkipFileChecks: true})
	if err == nil || !strings.Contains(err.Error(), "m.toml:5") || !strings.Contains(err.Error(), "absolute") {
		t.Fatalf("relative metrics_file: %v", err)
	}
}
