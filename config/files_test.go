package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestFileChecks(t *testing.T) {
	dir := t.TempDir()
	private := writeFile(t, dir, "private", "secret\n", 0o600)
	public := writeFile(t, dir, "public", "x", 0o644)
	groupReadable := writeFile(t, dir, "group", "secret\n", 0o640)
	missing := filepath.Join(dir, "missing")
	subdir := filepath.Join(dir, "subdir")
	if err := os.Mkdir(subdir, 0o700); err != nil {
		t.Fatal(err)
	}

	// The file is built line by line so that each case's line is known.
	tests := []struct {
		name string
		line string // the file after its first two lines; its last line has the error
		key  string
		msg  string // "" means no error
	}{
		{"private password file", fmt.Sprintf("password_file = %q", private), "", ""},
		{"world-readable password file", fmt.Sprintf("password_file = %q", public), "repository.password_file", "chmod 600 " + public},
		{"group-readable password file", fmt.Sprintf("password_file = %q", groupReadable), "repository.password_file", "mode 0640"},
		{"missing password file", fmt.Sprintf("password_file = %q", missing), "repository.password_file", missing + " does not exist"},
		{"password file is a directory", fmt.Sprintf("password_file = %q", subdir), "repository.password_file", "not a regular file"},
		{"missing cache dir is fine", fmt.Sprintf("password_file = %q\ncache_dir = %q", private, missing), "", ""},
		{"world-readable ssh key", fmt.Sprintf("url = \"sftp://b@h/r\"\npassword_file = %q\nssh_key = %q", private, public), "repository.ssh_key", "chmod 600"},
		{"missing known_hosts", fmt.Sprintf("url = \"sftp://b@h/r\"\npassword_file = %q\nssh_key = %q\nknown_hosts = %q", private, private, missing), "repository.known_hosts", "does not exist"},
		{"world-readable known_hosts is fine", fmt.Sprintf("url = \"sftp://b@h/r\"\npassword_file = %q\nssh_key = %q\nknown_hosts = %q", private, private, public), "", ""},
		{"world-readable guest key", fmt.Sprintf("password_file = %q\n[vm.a]\ndisk.x = { path = %q }\nguest = { ssh = \"r@h\", key = %q }", private, public, public),
			"vm.a.guest.key", "chmod 600"},
		{"missing path disk", fmt.Sprintf("password_file = %q\n[vm.a]\ndisk.x = { path = %q }", private, missing), "vm.a.disk.x.path", "does not exist"},
		{"world-readable database password", fmt.Sprintf("password_file = %q\n[vm.a]\ndisk.x = { path = %q }\ndatabase.d = { dsn = \"u@tcp(h:1)/\", password_file = %q }", private, public, public),
			"vm.a.database.d.password_file", "chmod 600"},
		{"group-readable TLS key", fmt.Sprintf("password_file = %q\n[vm.a]\ndisk.x = { path = %q }\ndatabase.d = { dsn = \"u@tcp(h:1)/\", tls_cert = %q, tls_key = %q }", private, public, public, groupReadable),
			"vm.a.database.d.tls_key", "chmod 600 " + groupReadable},
		{"missing TLS CA", fmt.Sprintf("password_file = %q\n[vm.a]\ndisk.x = { path = %q }\ndatabase.d = { dsn = \"u@tcp(h:1)/\", tls_ca = %q }", private, public, missing),
			"vm.a.database.d.tls_ca", "does not exist"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			text := "# test\n[repository]\n" + tt.line + "\n"
			if !strings.Contains(tt.line, "url =") {
				text = "[repository]\nurl = \"/srv/vmvault\"\n" + tt.line + "\n"
			}
			path := writeFile(t, t.TempDir(), "vmvault.toml", text, 0o644)
			_, err := Load(path)
			if tt.msg == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			errs := errorsOf(t, err)
			if len(errs) != 1 {
				t.Fatalf("want one error, got %v", err)
			}
			e := errs[0]
			wantLine := 3 + strings.Count(tt.line, "\n")
			if e.File != path || e.Key != tt.key || e.Line != wantLine || !strings.Contains(e.Msg, tt.msg) {
				t.Errorf("got %q (line %d, key %q); want line %d, key %q, message containing %q", e.Error(), e.Line, e.Key, wantLine, tt.key, tt.msg)
			}
			// Skipping file checks accepts the same file.
			if _, err := LoadWith(path, Options{SkipFileChecks: true}); err != nil {
				t.Errorf("with SkipFileChecks: %v", err)
			}
		})
	}
}

func TestReadSecretFile(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name    string
		content string
		mode    os.FileMode
		want    string
		errMsg  string
	}{
		{"trailing newline", "hunter2\n", 0o600, "hunter2", ""},
		{"every trailing line break is trimmed", "hunter2\n\r\n", 0o600, "hunter2", ""},
		{"inner newlines are kept", "hunter\n2\n", 0o600, "hunter\n2", ""},
		{"CRLF", "hunter2\r\n", 0o400, "hunter2", ""},
		{"no newline", "hunter2", 0o600, "hunter2", ""},
		{"spaces are kept", " hunter2 \n", 0o600, " hunter2 ", ""},
		{"world-readable", "hunter2\n", 0o644, "", "chmod 600"},
		{"group-writable", "hunter2\n", 0o620, "", "chmod 600"},
		{"empty", "", 0o600, "", "empty"},
		{"only a newline", "\n", 0o600, "", "empty"},
		{"too large", strings.Repeat("x", maxSecretSize+1), 0o600, "", "larger than"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := writeFile(t, dir, fmt.Sprintf("secret%d", i), tt.content, tt.mode)
			got, err := ReadSecretFile(p)
			if tt.errMsg != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errMsg) || !strings.Contains(err.Error(), p) {
					t.Fatalf("error %v, want one naming %s and containing %q", err, p, tt.errMsg)
				}
				if strings.Contains(err.Error(), "hunter2") {
					t.Errorf("error leaks the secret: %v", err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ReadSecretFile = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
	if _, err := ReadSecretFile(filepath.Join(dir, "missing")); !os.IsNotExist(err) && !strings.Contains(fmt.Sprint(err), "no such file") {
		t.Errorf("missing file: %v", err)
	}
	if _, err := ReadSecretFile(dir); err == nil {
		t.Error("a directory was read as a secret")
	}
}
