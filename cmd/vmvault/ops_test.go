package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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

	"github.com/creack/pty"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/spf13/cobra"

	"vmvault/repo"
)

// TestMain lets the test binary stand in for the vmvault binary: with
// VMVAULT_HELPER_MAIN=1 it runs the arguments after "--" as main does
// (signals included), so tests can interrupt it or give it a terminal.
func TestMain(m *testing.M) {
	if os.Getenv("VMVAULT_HELPER_MAIN") == "1" {
		for i, a := range os.Args {
			if a == "--" {
				os.Exit(runMain(os.Args[i+1:]))
			}
		}
		fmt.Fprintln(os.Stderr, "helper: no -- in arguments")
		os.Exit(99)
	}
	os.Exit(m.Run())
}

// helper returns a command running vmvault (this test binary) with args.
func helper(e *env, args ...string) *exec.Cmd {
	full := append([]string{"--", "--repo", e.repo, "--password-file", e.pw, "--cache-dir", e.cache}, args...)
	cmd := exec.Command(os.Args[0], full...)
	cmd.Env = append(os.Environ(), "VMVAULT_HELPER_MAIN=1")
	return cmd
}

// syslogSink is a unixgram socket in a temp dir standing in for /dev/log.
type syslogSink struct {
	path string
	mu   sync.Mutex
	msgs []syslogMsg
	last time.Time
}

type syslogMsg struct {
	pri  int
	text string
}

var syslogPRI = regexp.MustCompile(`^<(\d+)>`)

func newSyslogSink(t *testing.T) *syslogSink {
	t.Helper()
	s := &syslogSink{path: filepath.Join(t.TempDir(), "log")}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: s.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			m := syslogPRI.FindSubmatch(buf[:n])
			if m == nil {
				t.Errorf("syslog message without <PRI>: %q", buf[:n])
				continue
			}
			pri, _ := strconv.Atoi(string(m[1]))
			s.mu.Lock()
			s.msgs = append(s.msgs, syslogMsg{pri, string(buf[len(m[0]):n])})
			s.last = time.Now()
			s.mu.Unlock()
		}
	}()
	return s
}

// take waits until no message arrived for 100 ms and returns (and
// forgets) what arrived.
func (s *syslogSink) take() []syslogMsg {
	for {
		time.Sleep(50 * time.Millisecond)
		s.mu.Lock()
		if time.Since(s.last) > 100*time.Millisecond {
			out := s.msgs
			s.msgs = nil
			s.mu.Unlock()
			return out
		}
		s.mu.Unlock()
	}
}

// find returns the first message containing text, and whether there is one.
func findMsg(msgs []syslogMsg, text string) (syslogMsg, bool) {
	for _, m := range msgs {
		if strings.Contains(m.text, text) {
			return m, true
		}
	}
	return syslogMsg{}, false
}

// Daemon facility (3) × 8 + severity.
const (
	priErr     = 3*8 + 3
	priWarning = 3*8 + 4
	priInfo    = 3*8 + 6
	priDebug   = 3*8 + 7
)

func TestSyslog(t *testing.T) {
	e := newEnv(t)
	sink := newSyslogSink(t)
	src := filepath.Join(e.dir, "vm01.raw")
	writeImage(t, src, 20, 3<<20)

	// --syslog: the summary at info, stderr unchanged.
	r := e.ok("--syslog", "--syslog-socket", sink.path, "backup", "vm01", "--source", src)
	msgs := sink.take()
	m, ok := findMsg(msgs, "vm01: ok, 1 disk")
	if !ok || m.pri != priInfo {
		t.Fatalf("summary in syslog: %v %+v (all: %+v)", ok, m, msgs)
	}
	if !strings.Contains(m.text, "vmvault[") {
		t.Errorf("syslog message has no vmvault[PID] tag: %q", m.text)
	}
	if !strings.Contains(r.stderr, "vm01: ok, 1 disk") {
		t.Errorf("stderr lost the summary: %q", r.stderr)
	}
	// -vv: debug records carry severity 7 (the repository logs at debug).
	e.ok("--syslog", "--syslog-socket", sink.path, "-vv", "snapshots")
	msgs = sink.take()
	debug := 0
	for _, m := range msgs {
		if m.pri == priDebug {
			debug++
		}
	}
	if debug == 0 {
		t.Errorf("no debug-severity messages with -vv: %+v", msgs)
	}

	// Errors at severity 3; -q quiets stderr, not syslog.
	wrong := filepath.Join(e.dir, "wrong")
	os.WriteFile(wrong, []byte("not it"), 0o600)
	e.fails(exitWrongPass, "wrong password", "--password-file", wrong, "--syslog", "--syslog-socket", sink.path, "-q", "snapshots")
	msgs = sink.take()
	if m, ok := findMsg(msgs, "wrong password"); !ok || m.pri != priErr || !strings.Contains(m.text, "exit=12") {
		t.Fatalf("error in syslog: %v %+v (all %+v)", ok, m, msgs)
	}

	// The configuration turns syslog on and sets its level.
	cfg := func(level string) string {
		p := filepath.Join(e.dir, level+".toml")
		os.WriteFile(p, fmt.Appendf(nil, "[repository]\nurl = %q\npassword_file = %q\ncache_dir = %q\n\n[log]\nsyslog = true\nlevel = %q\n\n[vm.vm02]\ndisk.hda = { path = %q }\n",
			e.repo, e.pw, e.cache, level, src), 0o600)
		return p
	}
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"--config", cfg("info"), "--syslog-socket", sink.path, "backup", "vm02"}, nil, &out, &errb); code != 0 {
		t.Fatalf("configured backup: exit %d: %s", code, errb.String())
	}
	if m, ok := findMsg(sink.take(), "vm02: ok, 1 disk"); !ok || m.pri != priInfo {
		t.Fatalf("[log] syslog = true: summary %v %+v", ok, m)
	}
	if code := run(context.Background(), []string{"--config", cfg("error"), "--syslog-socket", sink.path, "backup", "vm02"}, nil, &out, &errb); code != 0 {
		t.Fatalf("configured backup: exit %d: %s", code, errb.String())
	}
	for _, m := range sink.take() {
		if m.pri != priErr {
			t.Errorf("level = error let through %+v", m)
		}
	}

	// No socket: a warning, not a silent loss, and not a dead command
	// (TestSyslogUnavailableFallsBackToStderr runs the binary).
	if r := e.ok("--syslog", "--syslog-socket", filepath.Join(e.dir, "nosock"), "snapshots"); !strings.Contains(r.stderr, "syslog is unavailable") {
		t.Fatalf("no syslog socket: no warning: %q", r.stderr)
	}
}

func TestLogFormatJSON(t *testing.T) {
	e := newEnv(t)
	r := e.ok("--log-format", "json", "-v", "snapshots")
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	n := 0
	for _, l := range lines {
		if !strings.HasPrefix(l, "{") {
			continue
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(l), &rec); err != nil {
			t.Fatalf("log line is not JSON: %q", l)
		}
		if rec["level"] == nil || rec["msg"] == nil || rec["time"] == nil {
			t.Fatalf("log record lacks level/msg/time: %q", l)
		}
		n++
	}
	if n == 0 {
		t.Fatalf("no JSON log records with -v: %q", r.stderr)
	}
	e.fails(exitUsage, "--log-format", "--log-format", "xml", "snapshots")
}

// parseMetricsFile parses a textfile-collector file with Prometheus's own
// strict parser.
func parseMetricsFile(t *testing.T, path string) map[string]map[string]float64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(f)
	if err != nil {
		t.Fatalf("metrics file does not parse: %v", err)
	}
	out := map[string]map[string]float64{}
	for name, fam := range fams {
		if fam.GetType() != dto.MetricType_GAUGE || fam.GetHelp() == "" {
			t.Errorf("%s: type %v help %q", name, fam.GetType(), fam.GetHelp())
		}
		out[name] = map[string]float64{}
		for _, m := range fam.GetMetric() {
			if len(m.GetLabel()) != 1 || m.GetLabel()[0].GetName() != "vm" {
				t.Fatalf("%s: labels %v", name, m.GetLabel())
			}
			out[name][m.GetLabel()[0].GetValue()] = m.GetGauge().GetValue()
		}
	}
	return out
}

func TestMetricsFile(t *testing.T) {
	e := newEnv(t)
	prom := filepath.Join(e.dir, "textfile", "vmvault.prom")
	os.MkdirAll(filepath.Dir(prom), 0o755)
	src := filepath.Join(e.dir, "vm01.raw")
	img := writeImage(t, src, 21, 5<<20)
	before := time.Now().Unix()

	var s1, s2 vmOutcome
	json.Unmarshal([]byte(e.ok("backup", "vm01", "--source", src, "--metrics-file", prom, "--json").stdout), &s1)
	// A second VM, with every kind of character a VM name may have.
	odd := "vm_02.b+c-d"
	json.Unmarshal([]byte(e.ok("backup", odd, "--source", src, "--metrics-file", prom, "--json").stdout), &s2)
	m := parseMetricsFile(t, prom)
	if len(m) != len(metricDefs) {
		t.Fatalf("%d metric families, want %d", len(m), len(metricDefs))
	}
	for _, vm := range []string{"vm01", odd} {
		if got := m["vmvault_backup_last_success_timestamp_seconds"][vm]; got < float64(before) || got > float64(time.Now().Unix()) {
			t.Errorf("%s last success %v", vm, got)
		}
		if got := m["vmvault_backup_last_status"][vm]; got != metricOK {
			t.Errorf("%s status %v", vm, got)
		}
		if got := m["vmvault_backup_read_bytes"][vm]; got != float64(len(img)) {
			t.Errorf("%s read %v, want %d", vm, got, len(img))
		}
	}
	if m["vmvault_backup_new_bytes"]["vm01"] != float64(s1.BytesNew) || m["vmvault_backup_stored_bytes"]["vm01"] != float64(s1.BytesStored) ||
		m["vmvault_backup_duration_seconds"]["vm01"] != s1.Duration || s1.BytesNew == 0 {
		t.Errorf("vm01 metrics %v / summary %+v", m, s1)
	}
	if m["vmvault_backup_new_bytes"][odd] != 0 || m["vmvault_backup_stored_bytes"][odd] != float64(s2.BytesStored) {
		t.Errorf("deduplicated VM: new %v stored %v, summary %+v", m["vmvault_backup_new_bytes"][odd], m["vmvault_backup_stored_bytes"][odd], s2)
	}
	success := m["vmvault_backup_last_success_timestamp_seconds"]["vm01"]

	// vm01 fails: its status says so, its last success and sizes stay,
	// the other VM is untouched.
	time.Sleep(1100 * time.Millisecond)
	e.fails(exitError, "no such file", "backup", "vm01", "--source", filepath.Join(e.dir, "gone.raw"), "--metrics-file", prom)
	m2 := parseMetricsFile(t, prom)
	if m2["vmvault_backup_last_status"]["vm01"] != metricFailed || m2["vmvault_backup_last_success_timestamp_seconds"]["vm01"] != success ||
		m2["vmvault_backup_last_run_timestamp_seconds"]["vm01"] <= success || m2["vmvault_backup_read_bytes"]["vm01"] != float64(len(img)) {
		t.Errorf("after a failure: %v", m2)
	}
	for name := range m {
		if m2[name][odd] != m[name][odd] {
			t.Errorf("%s of the other VM changed: %v → %v", name, m[name][odd], m2[name][odd])
		}
	}
	// Wrong password: recorded as a failure too (cron's run did nothing).
	wrong := filepath.Join(e.dir, "wrong")
	os.WriteFile(wrong, []byte("nope"), 0o600)
	e.fails(exitWrongPass, "wrong password", "--password-file", wrong, "backup", "vm03", "--source", src, "--metrics-file", prom)
	m3 := parseMetricsFile(t, prom)
	if m3["vmvault_backup_last_status"]["vm03"] != metricFailed || m3["vmvault_backup_last_success_timestamp_seconds"]["vm03"] != 0 {
		t.Errorf("vm03 after wrong password: %v", m3)
	}
	// No temporary files left beside it (the collector reads *.prom only,
	// but the directory must not fill up).
	ents, _ := os.ReadDir(filepath.Dir(prom))
	for _, de := range ents {
		if de.Name() != "vmvault.prom" && de.Name() != "vmvault.prom.lock" {
			t.Errorf("left behind: %s", de.Name())
		}
	}
	// Env var, and an unwritable location is a warning (exit 3), the
	// backup itself committed.
	t.Setenv("VMVAULT_METRICS_FILE", filepath.Join(e.dir, "missing-dir", "x.prom"))
	r := e.run(nil, "backup", "vm04", "--source", src)
	if r.code != exitPartial || !strings.Contains(r.stderr, "recording metrics failed") || !strings.Contains(r.stderr, "vm04: ok") {
		t.Fatalf("unwritable metrics file: exit %d: %s", r.code, r.stderr)
	}
}

// The configured backup's per-VM summary object, field by field, with
// the metrics of a warning.
func TestConfiguredSummaryJSON(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	img := writeImage(t, src, 22, 4<<20)
	key := filepath.Join(e.dir, "key")
	os.WriteFile(key, []byte("not a key"), 0o600)
	known := filepath.Join(e.dir, "known_hosts")
	os.WriteFile(known, nil, 0o600)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := l.Addr().(*net.TCPAddr).Port
	l.Close()
	cfg := filepath.Join(e.dir, "vmvault.toml")
	os.WriteFile(cfg, fmt.Appendf(nil, `[repository]
url = %q
password_file = %q
cache_dir = %q

[vm.vm01]
disk.hda = { path = %q }
disk.hdb = { path = %q }

[vm.vm02]
guest = { ssh = "root@127.0.0.1:%d", key = %q, known_hosts = %q }
disk.hda = { path = %q }
`, e.repo, e.pw, e.cache, src, src, closed, key, known, src), 0o600)
	prom := filepath.Join(e.dir, "vmvault.prom")
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"--config", cfg, "backup", "--all", "--json", "--metrics-file", prom}, nil, &out, &errb)
	if code != exitPartial {
		t.Fatalf("--all with an unreachable guest: exit %d, want %d: %s", code, exitPartial, errb.String())
	}
	dec := json.NewDecoder(&out)
	var objs []map[string]any
	for dec.More() {
		var o map[string]any
		if err := dec.Decode(&o); err != nil {
			t.Fatal(err)
		}
		objs = append(objs, o)
	}
	if len(objs) != 2 {
		t.Fatalf("%d JSON objects, want one per VM: %s", len(objs), out.String())
	}
	ok, failed := objs[0], objs[1]
	want := map[string]any{"vm": "vm01", "status": "ok", "bytes_read": float64(2 * len(img)), "guest_held_seconds": float64(0), "snapshot_peak_percent": float64(0)}
	for k, v := range want {
		if ok[k] != v {
			t.Errorf("vm01 %s = %v, want %v", k, ok[k], v)
		}
	}
	if id, _ := ok["id"].(string); len(id) != 64 {
		t.Errorf("vm01 generation ID %q", ok["id"])
	}
	if d, _ := ok["disks"].([]any); len(d) != 2 || d[0] != "hda" || d[1] != "hdb" {
		t.Errorf("vm01 disks %v", ok["disks"])
	}
	for _, k := range []string{"bytes_new", "bytes_stored", "duration_seconds", "time"} {
		if _, there := ok[k]; !there {
			t.Errorf("vm01 summary lacks %s", k)
		}
	}
	if failed["vm"] != "vm02" || failed["status"] != "failed" || !strings.Contains(failed["error"].(string), "vm02") {
		t.Errorf("vm02 summary %v", failed)
	}
	if !strings.Contains(errb.String(), "1 of 2 VM backups failed") {
		t.Errorf("stderr: %s", errb.String())
	}
	m := parseMetricsFile(t, prom)
	if m["vmvault_backup_last_status"]["vm01"] != metricOK || m["vmvault_backup_last_status"]["vm02"] != metricFailed {
		t.Errorf("metrics after --all: %v", m["vmvault_backup_last_status"])
	}
	// The text summary line carries the fields.
	out.Reset()
	errb.Reset()
	run(context.Background(), []string{"--config", cfg, "backup", "vm01"}, nil, &out, &errb)
	if !regexp.MustCompile(`vm01: ok, 2 disks, 8\.0 MiB read, [0-9.]+ [KM]?i?B new \([0-9.]+ [KM]?i?B stored\), [0-9.]+m?s, generation [0-9a-f]{8}`).MatchString(errb.String()) {
		t.Errorf("summary line: %q", errb.String())
	}
}

// Every documented exit code, one by one (the configured test and the
// prune tests cover 3 and 11 in more situations).
func TestExitCodes(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	writeImage(t, src, 23, 4<<20)
	wrong := filepath.Join(e.dir, "wrong")
	os.WriteFile(wrong, []byte("nope"), 0o600)

	t.Run("0 success", func(t *testing.T) { e.ok("backup", "vm01", "--source", src) })
	t.Run("1 error", func(t *testing.T) { e.fails(exitError, "no such generation", "restore", "vm01", "deadbeef") })
	t.Run("2 usage", func(t *testing.T) { e.fails(exitUsage, "unknown command", "bogus") })
	t.Run("3 partial", func(t *testing.T) {
		r := e.run(nil, "backup", "vm01", "--source", src, "--metrics-file", filepath.Join(e.dir, "no", "such", "dir.prom"))
		if r.code != exitPartial {
			t.Fatalf("exit %d: %s", r.code, r.stderr)
		}
	})
	t.Run("10 no repository", func(t *testing.T) {
		e.fails(exitNoRepo, "no such file", "--repo", filepath.Join(e.dir, "nope"), "snapshots")
	})
	t.Run("11 locked", func(t *testing.T) {
		a := &app{stdout: io.Discard, stderr: io.Discard, repoURL: e.repo, passwordFile: e.pw, cacheDir: e.cache, logFormat: "text"}
		a.setup()
		r, err := a.openRepo(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		l, err := r.Lock(context.Background(), repo.ExclusiveLock, "prune (test)", 0)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Unlock()
		e.fails(exitLocked, "locked", "backup", "vm01", "--source", src)
	})
	t.Run("12 wrong password", func(t *testing.T) {
		e.fails(exitWrongPass, "wrong password", "--password-file", wrong, "snapshots")
	})
	t.Run("130 interrupted", func(t *testing.T) {
		big := filepath.Join(e.dir, "big.raw")
		img := writeImage(t, big, 24, 48<<20)
		before := countObjects(e.repo)
		child := helper(e, "backup", "vm05", "--source", "-")
		stdin, _ := child.StdinPipe()
		var errb bytes.Buffer
		child.Stderr = &errb
		if err := child.Start(); err != nil {
			t.Fatal(err)
		}
		// Feed part of the image and keep the pipe open: the child is
		// mid-backup, blocked reading its input, when SIGINT comes (the
		// write returns once the child has taken all but a pipe buffer).
		stdin.Write(img[:32<<20])
		deadline := time.Now().Add(30 * time.Second)
		for countObjects(e.repo) < before+5 && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		time.Sleep(300 * time.Millisecond)
		child.Process.Signal(syscall.SIGINT)
		done := make(chan error, 1)
		go func() { done <- child.Wait() }()
		var err error
		select {
		case err = <-done:
		case <-time.After(20 * time.Second):
			child.Process.Kill()
			<-done
			t.Fatal("no exit within 20 s of SIGINT while reading stdin")
		}
		stdin.Close()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != exitInterrupted || !strings.Contains(errb.String(), "interrupted") {
			t.Fatalf("after SIGINT: %v, stderr %q", err, errb.String())
		}
		if r := e.run(nil, "snapshots", "vm05", "--json"); r.code != exitError || !strings.Contains(r.stderr, "has no generations") {
			t.Fatalf("interrupted backup committed: %s", r.stdout)
		}
		// The lock was released on the way out: an exclusive command runs.
		r := e.ok("prune")
		if !strings.Contains(r.stderr, "prune: removed") {
			t.Fatalf("prune after interrupt: %q", r.stderr)
		}
	})
}

// Progress bars appear on a terminal and never in a pipe.
func TestProgress(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	writeImage(t, src, 25, 24<<20)

	// stderr a pipe: the summary, no bar.
	child := helper(e, "backup", "vm01", "--source", src)
	var errb bytes.Buffer
	child.Stderr = &errb
	if err := child.Run(); err != nil {
		t.Fatalf("backup: %v: %s", err, errb.String())
	}
	if s := errb.String(); strings.ContainsAny(s, "\r\x1b") || strings.Contains(s, "%") || !strings.Contains(s, "vm01: ok") {
		t.Fatalf("stderr as a pipe has progress output: %q", s)
	}

	// stderr a pseudo-terminal: a bar per disk with bytes, rate and ETA.
	ptmx, tty, err := pty.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer ptmx.Close()
	pty.Setsize(ptmx, &pty.Winsize{Rows: 40, Cols: 160})
	child = helper(e, "backup", "vm02", "--source", "a="+src, "--source", "b="+src)
	var out bytes.Buffer
	child.Stdout = &out
	child.Stderr = tty
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	tty.Close()
	var term bytes.Buffer
	copied := make(chan struct{})
	go func() { io.Copy(&term, ptmx); close(copied) }() // ends with EIO when the child exits
	err = child.Wait()
	<-copied
	s := term.String()
	if err != nil {
		t.Fatalf("backup on a terminal: %v: %q", err, s)
	}
	for _, want := range []string{"vm02/a", "vm02/b", "100%", "24/24 MiB", "vm02: ok, 2 disks"} {
		if !strings.Contains(s, want) {
			t.Errorf("terminal output lacks %q: %q", want, s)
		}
	}
	if !regexp.MustCompile(`[0-9.]+ [KMGT]?i?B/s`).MatchString(s) {
		t.Errorf("no rate on the bar: %q", s)
	}
	// ETA: the bar shows [elapsed:remaining].
	if !regexp.MustCompile(`\[[0-9smh]+:[0-9smh]+\]`).MatchString(s) {
		t.Errorf("no [elapsed:remaining] on the bar: %q", s)
	}
	if out.Len() != 0 {
		t.Errorf("progress leaked to stdout: %q", out.String())
	}
}

// walkCommands calls fn for every command below and including c.
func walkCommands(c *cobra.Command, fn func(*cobra.Command)) {
	fn(c)
	for _, sub := range c.Commands() {
		walkCommands(sub, fn)
	}
}

func TestEveryCommandHasAnExample(t *testing.T) {
	root := (&app{stdout: io.Discard, stderr: io.Discard}).rootCommand()
	n := 0
	walkCommands(root, func(c *cobra.Command) {
		if c.Hidden || c.Name() == cobra.ShellCompRequestCmd || c.Name() == cobra.ShellCompNoDescRequestCmd {
			return
		}
		n++
		path := strings.Fields(c.CommandPath())[1:]
		var out, errb bytes.Buffer
		code := run(context.Background(), append(path, "--help"), nil, &out, &errb)
		if code != 0 || !strings.Contains(out.String(), "Examples:\n  ") {
			t.Errorf("%s --help: exit %d, no example: %q", c.CommandPath(), code, out.String())
		}
	})
	if n < 25 {
		t.Errorf("only %d commands walked", n)
	}
	// The exit-code table is in the top-level help.
	var out bytes.Buffer
	run(context.Background(), []string{"--help"}, nil, &out, io.Discard)
	for _, code := range []string{"0 ", "1 ", "2 ", "3 ", "10 ", "11 ", "12 ", "130 "} {
		if !strings.Contains(out.String(), "\n  "+code) {
			t.Errorf("--help lacks exit code %s", code)
		}
	}
}

func TestCompletion(t *testing.T) {
	for shell, want := range map[string]string{"bash": "__start_vmvault", "zsh": "#compdef vmvault", "fish": "complete -c vmvault"} {
		var out, errb bytes.Buffer
		if code := run(context.Background(), []string{"completion", shell}, nil, &out, &errb); code != 0 || !strings.Contains(out.String(), want) {
			t.Errorf("completion %s: exit %d, %q missing: %s", shell, code, want, errb.String())
		}
	}
	// The script really completes: bash sources it and asks for the
	// words after "vmvault ba" and "vmvault backup --so".
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("bash not installed (apt-get install bash)")
	}
	bin := filepath.Join(t.TempDir(), "vmvault")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v: %s", err, out)
	}
	// The script needs _get_comp_words_by_ref from the bash-completion
	// package; without it, a minimal stand-in for plain words.
	script := `if [ -r /usr/share/bash-completion/bash_completion ]; then source /usr/share/bash-completion/bash_completion
else _get_comp_words_by_ref() { cur=${COMP_WORDS[COMP_CWORD]}; prev=${COMP_WORDS[COMP_CWORD-1]}; words=("${COMP_WORDS[@]}"); cword=$COMP_CWORD; }; fi
source <("$BIN" completion bash)
COMP_WORDS=(vmvault ba); COMP_CWORD=1; COMP_LINE="vmvault ba"; COMP_POINT=${#COMP_LINE}
__start_vmvault; echo "1:${COMPREPLY[*]}"
COMP_WORDS=(vmvault backup --so); COMP_CWORD=2; COMP_LINE="vmvault backup --so"; COMP_POINT=${#COMP_LINE}
__start_vmvault; echo "2:${COMPREPLY[*]}"`
	cmd := exec.Command(bash, "-c", script)
	cmd.Env = append(os.Environ(), "BIN="+bin, "PATH="+filepath.Dir(bin)+":"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "1:backup") || !strings.Contains(string(out), "2:--source") {
		t.Fatalf("bash completion: %v: %s", err, out)
	}
}

func TestManPages(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "man1")
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"docs", "man", dir}, nil, &out, &errb); code != 0 {
		t.Fatalf("docs man: exit %d: %s", code, errb.String())
	}
	for _, page := range []string{"vmvault.1", "vmvault-backup.1", "vmvault-key-passwd.1", "vmvault-completion-bash.1"} {
		b, err := os.ReadFile(filepath.Join(dir, page))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(b, []byte(".nh\n.TH \"VMVAULT\" \"1\"")) || !bytes.Contains(b, []byte(".SH EXAMPLE")) {
			t.Errorf("%s is not a man page with an example: %.200q", page, b)
		}
	}
	// groff renders it without warnings, if installed.
	if groff, err := exec.LookPath("groff"); err == nil {
		cmd := exec.Command(groff, "-man", "-Tutf8", "-ww", filepath.Join(dir, "vmvault-backup.1"))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		rendered, err := cmd.Output()
		if err != nil || stderr.Len() > 0 || !bytes.Contains(rendered, []byte("--source")) {
			t.Errorf("groff: %v: %s", err, stderr.String())
		}
	}
}

// prune and check print one JSON object with a per-VM part, and one
// stderr line per VM.
func TestPruneCheckSummaries(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "img")
	for i, day := range []string{"01", "02", "03"} {
		writeImage(t, src, uint64(30+i), 2<<20)
		at, _ := time.Parse(time.RFC3339, "2026-01-"+day+"T00:00:00Z")
		backupAt(t, e, "vm01", src, at)
	}
	e.ok("backup", "vm02", "--source", src)

	r := e.ok("prune", "--keep-last", "1", "--json", "--safety-margin", "0")
	var pr forgetResult
	if err := json.Unmarshal([]byte(r.stdout), &pr); err != nil {
		t.Fatalf("prune --json: %v: %q", err, r.stdout)
	}
	if pr.Status != "ok" || pr.Removed != 2 || pr.Prune == nil || pr.Prune.ObjectsRemoved == 0 || pr.Duration <= 0 ||
		len(pr.VMs) != 2 || pr.VMs[0] != (retentionVM{"vm01", 1, 2}) || pr.VMs[1] != (retentionVM{"vm02", 1, 0}) {
		t.Fatalf("prune summary %+v", pr)
	}
	r = e.ok("prune", "--keep-last", "1")
	if !strings.Contains(r.stderr, "vm01: kept 1, removed 0 generation(s)") || !strings.Contains(r.stderr, "vm02: kept 1, removed 0") {
		t.Fatalf("prune lines: %q", r.stderr)
	}

	r = e.ok("check", "--json")
	var cr checkResult
	if err := json.Unmarshal([]byte(r.stdout), &cr); err != nil {
		t.Fatalf("check --json: %v: %q", err, r.stdout)
	}
	if cr.Status != "ok" || cr.Manifests != 2 || len(cr.Damage) != 0 || len(cr.VMs) != 2 || cr.VMs[0] != (checkVM{"vm01", 1, 0}) {
		t.Fatalf("check summary %+v", cr)
	}
	// Damage the largest object: status damaged, the VM's generation named.
	var victim string
	var size int64
	filepath.WalkDir(filepath.Join(e.repo, "data"), func(p string, d os.DirEntry, err error) error {
		if fi, err := d.Info(); err == nil && !d.IsDir() && fi.Size() > size {
			victim, size = p, fi.Size()
		}
		return nil
	})
	os.Chmod(victim, 0o600)
	os.WriteFile(victim, []byte("short"), 0o600)
	r = e.run(nil, "check", "--json")
	cr = checkResult{}
	if err := json.Unmarshal([]byte(r.stdout), &cr); err != nil || r.code != exitError {
		t.Fatalf("check --json of a damaged repository: exit %d, %v: %q", r.code, err, r.stdout)
	}
	if cr.Status != "damaged" || len(cr.Damage) == 0 || cr.VMs[0].Damaged+cr.VMs[1].Damaged == 0 {
		t.Fatalf("damaged check summary %+v", cr)
	}
	if r = e.run(nil, "check"); !strings.Contains(r.stderr, "vm01: DAMAGED, 1 of 1 generation(s) affected") {
		t.Fatalf("no per-VM damage line: %q", r.stderr)
	}
}

// [log] metrics_file in the configuration works like --metrics-file.
func TestMetricsFileFromConfig(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	writeImage(t, src, 23, 3<<20)
	prom := filepath.Join(e.dir, "vmvault.prom")
	cfg := filepath.Join(e.dir, "vmvault.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("[repository]\nurl = %q\npassword_file = %q\ncache_dir = %q\n[log]\nmetrics_file = %q\n[vm.vm01]\ndisk.hda = { path = %q }\n",
		e.repo, e.pw, e.cache, prom, src)), 0o600)
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"--config", cfg, "backup", "vm01"}, nil, &out, &errb); code != 0 {
		t.Fatalf("configured backup: exit %d %s", code, errb.String())
	}
	m := parseMetricsFile(t, prom)
	if m["vmvault_backup_last_status"]["vm01"] != metricOK {
		t.Fatalf("metrics from the configured file: %v", m)
	}
}
