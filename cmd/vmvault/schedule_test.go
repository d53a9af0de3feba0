package main

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// unitFile is a systemd unit parsed into section → key → values.
type unitFile map[string]map[string][]string

// parseUnit parses a unit file strictly enough for our own units: every
// non-comment line is a [section] or key=value inside a section.
func parseUnit(t *testing.T, path string) unitFile {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	u := unitFile{}
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" || strings.TrimSpace(k) == "" {
				t.Fatalf("%s:%d: not a key=value in a section: %q", path, n, line)
			}
			k = strings.TrimSpace(k)
			u[section][k] = append(u[section][k], strings.TrimSpace(v))
		}
	}
	return u
}

func (u unitFile) one(t *testing.T, section, key string) string {
	t.Helper()
	v := u[section][key]
	if len(v) != 1 {
		t.Fatalf("[%s] %s: %q, want one value", section, key, v)
	}
	return v[0]
}

// parseArgs checks that a vmvault command line from the docs is accepted
// by the CLI: the command exists and every flag parses.
func parseArgs(t *testing.T, args []string) {
	t.Helper()
	root := (&app{stdout: os.Stdout, stderr: os.Stderr}).rootCommand()
	cmd, rest, err := root.Find(args)
	if err != nil || cmd == root {
		t.Fatalf("%q: no such command: %v", args, err)
	}
	if err := cmd.ParseFlags(rest); err != nil {
		t.Fatalf("%q: %v", args, err)
	}
	if err := cmd.ValidateArgs(cmd.Flags().Args()); err != nil {
		t.Fatalf("%q: %v", args, err)
	}
}

func TestSchedulingDocs(t *testing.T) {
	dir := filepath.Join("..", "..", "docs", "systemd")
	svc := parseUnit(t, filepath.Join(dir, "vmvault-backup.service"))
	tmr := parseUnit(t, filepath.Join(dir, "vmvault-backup.timer"))

	if got := tmr.one(t, "Timer", "Persistent"); got != "true" {
		t.Errorf("timer Persistent=%s", got)
	}
	if got := tmr.one(t, "Timer", "Unit"); got != "vmvault-backup.service" {
		t.Errorf("timer Unit=%s", got)
	}
	tmr.one(t, "Timer", "OnCalendar")
	if got := tmr.one(t, "Install", "WantedBy"); got != "timers.target" {
		t.Errorf("timer WantedBy=%s", got)
	}
	// oneshot is what keeps the timer from starting a second, overlapping run.
	if got := svc.one(t, "Service", "Type"); got != "oneshot" {
		t.Errorf("service Type=%s", got)
	}
	exe := strings.Fields(svc.one(t, "Service", "ExecStart"))
	if exe[0] != "/usr/local/bin/vmvault" || exe[1] != "backup" {
		t.Fatalf("ExecStart %q", exe)
	}
	parseArgs(t, exe[1:])

	// The cron lines of scheduling.md: five time fields, a user, a
	// command under flock, vmvault arguments the CLI accepts.
	md, err := os.ReadFile(filepath.Join("..", "..", "docs", "scheduling.md"))
	if err != nil {
		t.Fatal(err)
	}
	blocks := regexp.MustCompile("(?s)```cron\n(.*?)```").FindAllSubmatch(md, -1)
	if len(blocks) < 2 {
		t.Fatalf("%d cron blocks in scheduling.md", len(blocks))
	}
	for _, b := range blocks {
		f := strings.Fields(string(b[1]))
		if len(f) < 9 || f[5] != "root" || f[6] != "flock" {
			t.Fatalf("cron line %q", b[1])
		}
		i := 7
		for strings.HasPrefix(f[i], "-") || strings.HasPrefix(f[i], "/run/") {
			i++
		}
		if f[i] != "/usr/local/bin/vmvault" {
			t.Fatalf("cron line runs %q", f[i])
		}
		parseArgs(t, f[i+1:])
	}

	// systemd's own verdict, when systemd-analyze is installed (package
	// systemd). ExecStart must name an existing executable: the test
	// binary stands in for vmvault.
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Log("systemd-analyze not installed (apt-get install systemd): checked by parsing only")
		return
	}
	tmp := t.TempDir()
	self, _ := filepath.Abs(os.Args[0])
	for _, name := range []string{"vmvault-backup.service", "vmvault-backup.timer"} {
		b, _ := os.ReadFile(filepath.Join(dir, name))
		b = bytes.ReplaceAll(b, []byte("/usr/local/bin/vmvault"), []byte(self))
		os.WriteFile(filepath.Join(tmp, name), b, 0o644)
	}
	cmd := exec.Command(analyze, "verify", "--man=no", filepath.Join(tmp, "vmvault-backup.timer"), filepath.Join(tmp, "vmvault-backup.service"))
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify: %v: %s", err, out)
	}
	out, err = exec.Command(analyze, "calendar", tmr.one(t, "Timer", "OnCalendar")).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze calendar: %v: %s", err, out)
	}
}

// The monitoring and exit-code docs agree with the code: every metric is
// documented, the alert rules are valid YAML using real metric names, and
// the exit-code table lists exactly the codes of --help.
func TestOperationsDocs(t *testing.T) {
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join("..", "..", "docs", name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	mon := read("monitoring.md")
	for _, d := range metricDefs {
		if !strings.Contains(mon, d.name) {
			t.Errorf("monitoring.md does not mention %s", d.name)
		}
	}
	m := regexp.MustCompile("(?s)```yaml\n(.*?)```").FindStringSubmatch(mon)
	if m == nil {
		t.Fatal("no yaml block in monitoring.md")
	}
	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert, Expr string
			}
		}
	}
	if err := yaml.Unmarshal([]byte(m[1]), &rules); err != nil {
		t.Fatalf("alert rules: %v", err)
	}
	names := map[string]bool{}
	for _, d := range metricDefs {
		names[d.name] = true
	}
	found := false
	for _, r := range rules.Groups[0].Rules {
		for _, metric := range regexp.MustCompile(`vmvault_[a-z_]+`).FindAllString(r.Expr, -1) {
			if !names[metric] {
				t.Errorf("rule %s uses unknown metric %s", r.Alert, metric)
			}
		}
		if r.Expr == "time() - vmvault_backup_last_success_timestamp_seconds > 26 * 3600" {
			found = true
		}
	}
	if !found {
		t.Error("no 26 h alert rule")
	}

	codes := regexp.MustCompile(`(?m)^\| (\d+) \|`).FindAllStringSubmatch(read("exit-codes.md"), -1)
	help := regexp.MustCompile(`(?m)^  (\d+) `).FindAllStringSubmatch(exitCodesHelp, -1)
	if len(codes) != len(help) || len(codes) != 8 {
		t.Fatalf("exit-codes.md lists %d codes, --help %d", len(codes), len(help))
	}
	for i := range codes {
		if codes[i][1] != help[i][1] {
			t.Errorf("exit code %d: docs %s, --help %s", i, codes[i][1], help[i][1])
		}
	}
}

// Every relative link in the README and the operations docs names a file
// that exists.
func TestDocLinks(t *testing.T) {
	root := filepath.Join("..", "..")
	files := []string{"README.md"}
	for _, f := range []string{"install", "quickstart", "scheduling", "monitoring", "exit-codes", "disaster-recovery", "security"} {
		files = append(files, filepath.Join("docs", f+".md"))
	}
	link := regexp.MustCompile(`\]\(([^)#]+)(#[^)]*)?\)`)
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range link.FindAllStringSubmatch(string(b), -1) {
			if strings.Contains(m[1], "://") {
				continue
			}
			if _, err := os.Stat(filepath.Join(root, filepath.Dir(f), m[1])); err != nil {
				t.Errorf("%s: broken link %s", f, m[1])
			}
		}
	}
}
