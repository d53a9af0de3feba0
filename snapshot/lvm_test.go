package snapshot

import (
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseStatus(t *testing.T) {
	tests := []struct {
		name    string
		out     string
		want    Status
		invalid bool
		wantErr bool
	}{
		{name: "active separator", out: "  swi-a-s---|12.50|/dev/vg0/vm01-root-vmvault|4194304\n",
			want: Status{Attr: "swi-a-s---", Percent: 12.5, Path: "/dev/vg0/vm01-root-vmvault", Size: 4194304}},
		{name: "invalid", out: "  swi-I-s---|100.00|/dev/vg0/s|4194304\n",
			want: Status{Attr: "swi-I-s---", Percent: 100, Path: "/dev/vg0/s", Size: 4194304}, invalid: true},
		{name: "invalid with empty percent", out: "  swi-I-s---||/dev/vg0/s|4194304\n",
			want: Status{Attr: "swi-I-s---", Percent: 100, Path: "/dev/vg0/s", Size: 4194304}, invalid: true},
		{name: "decimal comma", out: "  swi-a-s---|  3,27|/dev/vg0/s|8388608",
			want: Status{Attr: "swi-a-s---", Percent: 3.27, Path: "/dev/vg0/s", Size: 8388608}},
		{name: "blank separated", out: "  swi-a-s--- 0.01 /dev/vg0/s\n",
			want: Status{Attr: "swi-a-s---", Percent: 0.01, Path: "/dev/vg0/s"}},
		{name: "blank separated comma", out: "\n  swi-a-s--- 81,00 /dev/vg0/s\n",
			want: Status{Attr: "swi-a-s---", Percent: 81, Path: "/dev/vg0/s"}},
		{name: "blank separated invalid no percent", out: "  swi-I-s--- /dev/vg0/s\n",
			want: Status{Attr: "swi-I-s---", Percent: 100, Path: "/dev/vg0/s"}, invalid: true},
		{name: "merging invalid", out: "Swi-S-s---|100.00|/dev/vg0/s|1",
			want: Status{Attr: "Swi-S-s---", Percent: 100, Path: "/dev/vg0/s", Size: 1}, invalid: true},
		{name: "origin", out: "owi-aos---||/dev/vg0/lv|33554432",
			want: Status{Attr: "owi-aos---", Path: "/dev/vg0/lv", Size: 33554432}},
		{name: "empty", out: "\n  \n", wantErr: true},
		{name: "garbage percent", out: "swi-a-s---|abc|/dev/vg0/s|1", wantErr: true},
		{name: "percent over 100", out: "swi-a-s---|140.0|/dev/vg0/s|1", wantErr: true},
		{name: "short attr", out: "swi|1.0|/dev/vg0/s|1", wantErr: true},
		{name: "too few fields", out: "swi-a-s---|1.0", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStatus(tt.out)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("parseStatus(%q) = %+v, want error", tt.out, got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("parseStatus(%q) = %+v, want %+v", tt.out, got, tt.want)
			}
			if got.Invalid() != tt.invalid {
				t.Errorf("Invalid() = %v, want %v", got.Invalid(), tt.invalid)
			}
		})
	}
}

func TestParseLV(t *testing.T) {
	lv, err := ParseLV("vg0/vm01_root")
	if err != nil || lv != (LV{VG: "vg0", Name: "vm01_root"}) || lv.String() != "vg0/vm01_root" || lv.DevicePath() != "/dev/vg0/vm01_root" {
		t.Errorf("ParseLV = %+v, %v", lv, err)
	}
	if lv, err := ParseLV("vg0/a.b+c-d"); err != nil || lv.Name != "a.b+c-d" {
		t.Errorf("ParseLV(vg0/a.b+c-d) = %+v, %v", lv, err)
	}
	for _, bad := range []string{"/dev/vg0/a", "vg0", "vg0/", "/lv", "vg0/-x", "vg0/a b", "vg 0/a", "vg0/a/b", "vg0/..", "vg0/$(x)", "vg0/" + strings.Repeat("a", 128)} {
		if lv, err := ParseLV(bad); err == nil {
			t.Errorf("ParseLV(%q) = %+v, want error", bad, lv)
		}
	}
}

func TestParseLeftovers(t *testing.T) {
	out := `  root|||
  web-root-vmvault|root|vmvault,vmvault-vm=web
  web-data-vmvault|data||
  web-db-root-vmvault|root|vmvault,vmvault-vm=web-db
  web-x-vmvault||
  web-vmvault|root|
  webx-root-vmvault|root|
  other-root-vmvault|root|vmvault,vmvault-vm=other
`
	got := parseLeftovers(out, "vg0", "web")
	want := []LV{{"vg0", "web-root-vmvault"}, {"vg0", "web-data-vmvault"}}
	if len(got) != len(want) {
		t.Fatalf("parseLeftovers = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("parseLeftovers[%d] = %v, want %v", i, got[i], want[i])
		}
	}
	if got := parseLeftovers(out, "vg0", "web-db"); len(got) != 1 || got[0].Name != "web-db-root-vmvault" {
		t.Errorf("parseLeftovers(web-db) = %v", got)
	}
}

func TestOverflowErrorMessage(t *testing.T) {
	err := error(&OverflowError{LV: LV{"vg0", "vm01-root-vmvault"}, Percent: 100, Size: 4 << 20})
	want := "snapshot vg0/vm01-root-vmvault overflowed (100% of 4.0 MiB): raise snapshot_size"
	if err.Error() != want {
		t.Errorf("got %q, want %q", err.Error(), want)
	}
	var oe *OverflowError
	if !errors.As(error(errors.Join(errors.New("x"), err)), &oe) {
		t.Error("errors.As does not find the OverflowError")
	}
}

// TestReaderShortRead checks that a stream ending before the size the
// reader promised is an error, not a silently short image.
func TestReaderShortRead(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(p, make([]byte, 1000), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	r := &reader{f: f, name: p, size: 4096}
	n, err := io.Copy(io.Discard, r)
	if !errors.Is(err, io.ErrUnexpectedEOF) || n != 1000 {
		t.Errorf("io.Copy = %d, %v; want 1000, ErrUnexpectedEOF", n, err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	rd, err := openDevice(p) // a regular file sizes the same way
	if err != nil || rd.size != 1000 {
		t.Fatalf("openDevice = %+v, %v", rd, err)
	}
	defer rd.Close()
	if n, err := io.Copy(io.Discard, rd); n != 1000 || err != nil {
		t.Errorf("full read = %d, %v", n, err)
	}
}

// TestExecCommandError checks that a failing command's stderr and exit code
// end up in the error (it runs the real sh).
func TestExecCommandError(t *testing.T) {
	out, err := Exec{}.Run(t.Context(), "sh", "-c", "echo out; echo 'Failed to find logical volume \"vg/x\"' >&2; exit 5")
	var ce *CommandError
	if !errors.As(err, &ce) || ce.ExitCode != 5 || !strings.Contains(err.Error(), "Failed to find logical volume") {
		t.Fatalf("err = %v", err)
	}
	if string(out) != "out\n" {
		t.Errorf("stdout = %q", out)
	}
	if !notFound(err) {
		t.Error("notFound does not recognise LVM's message")
	}
	if out, err := (Exec{Env: []string{"X_TEST=1"}}).Run(t.Context(), "sh", "-c", "echo $X_TEST $LC_ALL"); err != nil || string(out) != "1 C\n" {
		t.Errorf("env: %q, %v", out, err)
	}
}

// TestExecSudo checks that Sudo prefixes "sudo -n" (which never prompts).
func TestExecSudo(t *testing.T) {
	_, err := Exec{Sudo: true}.Run(t.Context(), "sh", "-c", "exit 3")
	var ce *CommandError
	if !errors.As(err, &ce) || strings.Join(ce.Args[:3], " ") != "sudo -n sh" {
		t.Fatalf("err = %v, want a CommandError for sudo -n sh", err)
	}
	if _, lookErr := exec.LookPath("sudo"); lookErr == nil && ce.ExitCode != 3 {
		t.Errorf("exit code through sudo = %d, want 3 (%v)", ce.ExitCode, err)
	}
}

// TestExecCancel checks that a cancelled command is interrupted and the
// error says so.
func TestExecCancel(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := Exec{}.Run(ctx, "sleep", "10")
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 5*time.Second {
		t.Errorf("cancelled sleep: %v after %v", err, time.Since(start))
	}
}
