package config

import (
	"strings"
	"testing"
)

// header is a valid [repository] of three lines; cases start on line 4.
const header = `[repository]
url = "/srv/vmvault"
password_file = "/etc/vmvault/password"
`

type wantErr struct {
	line int
	key  string
	msg  string // substring of the message
}

func TestErrors(t *testing.T) {
	tests := []struct {
		name string
		text string // appended to header unless noHeader
		// noHeader: text is the whole file.
		noHeader bool
		want     []wantErr
	}{
		{name: "unknown top-level key", noHeader: true, text: "colour = \"blue\"\n" + header,
			want: []wantErr{{1, "colour", "unknown key"}}},
		{name: "unknown key after a table header belongs to the table", text: `colour = "blue"`,
			want: []wantErr{{4, "repository.colour", "unknown key"}}},
		{name: "string instead of an array", text: "[vm.a]\ndisk.x = { path = \"/dev/sdb\" }\nguest = { ssh = \"root@h\", key = \"/k\", before_snapshot = \"sync\" }",
			want: []wantErr{{6, "vm.a.guest.before_snapshot", "want an array of strings, got a string"}}},
		{name: "table instead of a string", text: "[vm.a]\ndisk.x = { path = { p = 1 } }",
			want: []wantErr{{5, "vm.a.disk.x.path", "want a string, got a table"}}},
		{name: "integer instead of a table", text: "[vm.a]\ndisk.x = { path = \"/dev/sdb\" }\nguest = 1",
			want: []wantErr{{6, "vm.a.guest", "want a table, got an integer"}}},
		{name: "unknown key in a table", text: "[log]\nsyslg = true",
			want: []wantErr{{5, "log.syslg", "unknown key"}}},
		{name: "unknown key in an inline table",
			text: "[vm.a]\n\ndisk.hda = { lv = \"vg/a\", snapshot_size = \"1G\", snapshotsize = \"2G\" }",
			want: []wantErr{{6, "vm.a.disk.hda.snapshotsize", "unknown key"}}},
		{name: "unknown key in the repository", text: "pasword_file = \"/x\"",
			want: []wantErr{{4, "repository.pasword_file", "unknown key"}}},
		{name: "bad size", text: "[vm.a]\ndisk.hda = { lv = \"vg/a\", snapshot_size = \"2X\" }",
			want: []wantErr{{5, "vm.a.disk.hda.snapshot_size", "invalid size \"2X\""}}},
		{name: "size without unit", text: "[vm.a]\ndisk.hda = { lv = \"vg/a\", snapshot_size = \"2048\" }",
			want: []wantErr{{5, "vm.a.disk.hda.snapshot_size", "invalid size"}}},
		{name: "size as a number", text: "[vm.a]\ndisk.hda = { lv = \"vg/a\", snapshot_size = 2048 }",
			want: []wantErr{{5, "vm.a.disk.hda.snapshot_size", "want a string, got an integer"}}},
		{name: "size too small", text: "[vm.a]\ndisk.hda = { lv = \"vg/a\", snapshot_size = \"4K\" }",
			want: []wantErr{{5, "vm.a.disk.hda.snapshot_size", "too small"}}},
		{name: "lv not vg/lv", text: "[vm.a]\n\n\ndisk.hda = { lv = \"vg0-vm01\", snapshot_size = \"1G\" }",
			want: []wantErr{{7, "vm.a.disk.hda.lv", "want vg/lv"}}},
		{name: "lv as a device path", text: "[vm.a]\ndisk.hda = { lv = \"/dev/vg0/vm01\", snapshot_size = \"1G\" }",
			want: []wantErr{{5, "vm.a.disk.hda.lv", "want vg/lv"}}},
		{name: "lv with three parts", text: "[vm.a]\ndisk.hda = { lv = \"vg0/a/b\", snapshot_size = \"1G\" }",
			want: []wantErr{{5, "vm.a.disk.hda.lv", "want vg/lv"}}},
		{name: "cbt on a path disk", text: "[vm.a]\ndisk.x = { path = \"/dev/null\", cbt = true }",
			want: []wantErr{{5, "vm.a.disk.x.cbt", "cbt needs lv"}}},
		{name: "cbt not a boolean", text: "[vm.a]\ndisk.hda = { lv = \"vg/a\", snapshot_size = \"1G\", cbt = \"no\" }",
			want: []wantErr{{5, "vm.a.disk.hda.cbt", "want a boolean"}}},
		{name: "full_every not a duration", text: "[backup]\nfull_every = \"weekly\"",
			want: []wantErr{{5, "backup.full_every", "want a positive duration"}}},
		{name: "full_every zero", text: "[backup]\nfull_every = \"0s\"",
			want: []wantErr{{5, "backup.full_every", "want a positive duration"}}},
		{name: "verify_unchanged over 100", text: "[backup]\nverify_unchanged = 101",
			want: []wantErr{{5, "backup.verify_unchanged", "from 0 to 100"}}},
		{name: "verify_unchanged a string", text: "[backup]\nverify_unchanged = \"1%\"",
			want: []wantErr{{5, "backup.verify_unchanged", "want a number"}}},
		{name: "unknown key in backup", text: "[backup]\nfull = true",
			want: []wantErr{{5, "backup.full", "unknown key"}}},
		{name: "lv without snapshot_size", text: "[vm.a]\ndisk.hda = { lv = \"vg0/a\" }",
			want: []wantErr{{5, "vm.a.disk.hda", `missing required key "snapshot_size"`}}},
		{name: "disk with lv and path", text: "[vm.a.disk.hda]\nlv = \"vg0/a\"\nsnapshot_size = \"1G\"\npath = \"/dev/sdb\"",
			want: []wantErr{{7, "vm.a.disk.hda.path", "not both"}}},
		{name: "disk with neither lv nor path", text: "[vm.a]\ndisk.hda = { snapshot_size = \"1G\" }",
			want: []wantErr{{5, "vm.a.disk.hda", "needs lv"}}},
		{name: "file without lv", text: "[vm.a]\ndisk.hda = { path = \"/dev/sdb\", file = \"x.raw\" }",
			want: []wantErr{{5, "vm.a.disk.hda.file", "file needs lv"}}},
		{name: "absolute file", text: "[vm.a]\ndisk.hda = { lv = \"vg/a\", file = \"/x.raw\", snapshot_size = \"1G\" }",
			want: []wantErr{{5, "vm.a.disk.hda.file", "relative"}}},
		{name: "file escaping the filesystem", text: "[vm.a]\ndisk.hda = { lv = \"vg/a\", file = \"../x.raw\", snapshot_size = \"1G\" }",
			want: []wantErr{{5, "vm.a.disk.hda.file", "relative"}}},
		{name: "snapshot_size on a path disk", text: "[vm.a]\ndisk.hda = { path = \"/dev/sdb\", snapshot_size = \"1G\" }",
			want: []wantErr{{5, "vm.a.disk.hda.snapshot_size", "needs lv"}}},
		{name: "snapshot name too long", text: "[vm.a]\ndisk." + strings.Repeat("d", 120) + " = { lv = \"vg/a\", snapshot_size = \"1G\" }",
			want: []wantErr{{5, "vm.a.disk." + strings.Repeat("d", 120), "longer than LVM's 127"}}},
		{name: "VM with no disks", text: "\n[vm.a]\nsudo = true",
			want: []wantErr{{5, "vm.a", "no disks"}}},
		{name: "VM with an empty disk table", text: "[vm.a]\ndisk = {}",
			want: []wantErr{{4, "vm.a", "no disks"}}},
		{name: "disk that is not a table", text: "[vm.a]\ndisk.hda = \"vg/a\"",
			want: []wantErr{{5, "vm.a.disk.hda", "want a table, got a string"}}},
		{name: "invalid VM name", text: "[vm.\"bad name\"]\ndisk.hda = { path = \"/dev/sdb\" }",
			want: []wantErr{{4, `vm."bad name"`, "invalid VM name"}}},
		{name: "guest ssh without user", text: "[vm.a]\ndisk.x = { path = \"/dev/sdb\" }\nguest = { ssh = \"10.0.0.5\", key = \"/k\" }",
			want: []wantErr{{6, "vm.a.guest.ssh", "want user@host"}}},
		{name: "guest ssh with a bad port", text: "[vm.a]\ndisk.x = { path = \"/dev/sdb\" }\nguest = { ssh = \"root@h:99999\", key = \"/k\" }",
			want: []wantErr{{6, "vm.a.guest.ssh", "invalid port"}}},
		{name: "guest without key", text: "[vm.a]\ndisk.x = { path = \"/dev/sdb\" }\n[vm.a.guest]\nssh = \"root@h\"",
			want: []wantErr{{6, "vm.a.guest", `missing required key "key"`}}},
		{name: "guest freeze not absolute", text: "[vm.a]\ndisk.x = { path = \"/dev/sdb\" }\nguest = { ssh = \"root@h\", key = \"/k\", freeze = [\"var\"] }",
			want: []wantErr{{6, "vm.a.guest.freeze", "absolute mount point"}}},
		{name: "guest bad freeze_timeout", text: "[vm.a]\ndisk.x = { path = \"/dev/sdb\" }\nguest = { ssh = \"root@h\", key = \"/k\", freeze_timeout = \"soon\" }",
			want: []wantErr{{6, "vm.a.guest.freeze_timeout", "positive duration"}}},
		{name: "sudo not a boolean", text: "[vm.a]\nsudo = \"yes\"\ndisk.x = { path = \"/dev/sdb\" }",
			want: []wantErr{{5, "vm.a.sudo", "want a boolean"}}},
		{name: "keep count below -1", text: "[retention]\nkeep_daily = -2",
			want: []wantErr{{5, "retention.keep_daily", "want -1 (unlimited)"}}},
		{name: "bad keep_within", text: "[retention]\nkeep_within = \"7x\"",
			want: []wantErr{{5, "retention.keep_within", "invalid duration"}}},
		{name: "bad per-VM retention", text: "[vm.a]\ndisk.x = { path = \"/dev/sdb\" }\nretention = { keep_dayly = 3 }",
			want: []wantErr{{6, "vm.a.retention.keep_dayly", "unknown key"}}},
		{name: "unknown log level", text: "[log]\nlevel = \"verbose\"",
			want: []wantErr{{5, "log.level", "unknown level"}}},
		{name: "DSN with a password", text: "[vm.a]\ndisk.x = { path = \"/dev/sdb\" }\ndatabase.main = { dsn = \"backup:hunter2@tcp(h:3306)/\" }",
			want: []wantErr{{6, "vm.a.database.main.dsn", "move it to password_file"}}},
		{name: "invalid DSN", text: "[vm.a]\ndisk.x = { path = \"/dev/sdb\" }\ndatabase.main = { dsn = \"backup@h:3306\" }",
			want: []wantErr{{6, "vm.a.database.main.dsn", "not a valid DSN"}}},
		{name: "database without dsn", text: "[vm.a]\ndisk.x = { path = \"/dev/sdb\" }\ndatabase.main = { required = true }",
			want: []wantErr{{6, "vm.a.database.main", `missing required key "dsn"`}}},
		{name: "tls_cert without tls_key", text: "[vm.a]\ndisk.x = { path = \"/dev/sdb\" }\ndatabase.main = { dsn = \"b@tcp(h:3306)/\", tls_cert = \"/c.pem\" }",
			want: []wantErr{{6, "vm.a.database.main", `missing required key "tls_key"`}}},
		{name: "relative secret path", noHeader: true,
			text: "[repository]\nurl = \"/srv/vmvault\"\npassword_file = \"password\"",
			want: []wantErr{{3, "repository.password_file", "want an absolute path"}}},
		{name: "missing url", noHeader: true,
			text: "# comment\n[repository]\npassword_file = \"/p\"",
			want: []wantErr{{2, "repository", `missing required key "url"`}}},
		{name: "missing repository table", noHeader: true,
			text: "[log]\nlevel = \"info\"",
			want: []wantErr{{0, "repository", "missing required table"}}},
		{name: "relative local repository", noHeader: true,
			text: "[repository]\nurl = \"backups\"\npassword_file = \"/p\"",
			want: []wantErr{{2, "repository.url", "absolute local path"}}},
		{name: "s3 url in the wrong form", noHeader: true,
			text: "[repository]\nurl = \"s3://bucket/x\"\npassword_file = \"/p\"",
			want: []wantErr{{2, "repository.url", `s3:https://`}}},
		{name: "unsupported url scheme", noHeader: true,
			text: "[repository]\nurl = \"ftp://h/x\"\npassword_file = \"/p\"",
			want: []wantErr{{2, "repository.url", `unsupported scheme "ftp"`}}},
		{name: "sftp url with a password", noHeader: true,
			text: "[repository]\nurl = \"sftp://u:pw@h/x\"\npassword_file = \"/p\"\nssh_key = \"/k\"",
			want: []wantErr{{2, "repository.url", "contains a password"}}},
		{name: "sftp without ssh_key", noHeader: true,
			text: "[repository]\nurl = \"sftp://backup@h/srv/vmvault\"\npassword_file = \"/p\"",
			want: []wantErr{{1, "repository", `missing required key "ssh_key"`}}},
		{name: "ssh_key on a local repository", text: "ssh_key = \"/k\"",
			want: []wantErr{{4, "repository.ssh_key", "only used with an sftp"}}},
		{
			name: "all errors are collected, in file order",
			text: "colour = 1\n[vm.a]\nsudo = 1\ndisk.hda = { lv = \"bad\", snapshot_size = \"1Q\" }\n[log]\nlevel = \"loud\"",
			want: []wantErr{
				{4, "repository.colour", "unknown key"},
				{6, "vm.a.sudo", "want a boolean"},
				{7, "vm.a.disk.hda.lv", "want vg/lv"},
				{7, "vm.a.disk.hda.snapshot_size", "invalid size"},
				{9, "log.level", "unknown level"},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			text := tt.text
			if !tt.noHeader {
				text = header + text
			}
			cfg, err := Parse("test.toml", []byte(text), Options{SkipFileChecks: true})
			if err == nil {
				t.Fatalf("no error; config %+v", cfg)
			}
			if cfg != nil {
				t.Error("a config was returned with the error")
			}
			errs := errorsOf(t, err)
			if len(errs) != len(tt.want) {
				t.Fatalf("got %d errors, want %d:\n%v", len(errs), len(tt.want), err)
			}
			lines := strings.Split(err.Error(), "\n")
			if len(lines) != len(tt.want) {
				t.Errorf("error text has %d lines, want one per error:\n%v", len(lines), err)
			}
			for i, w := range tt.want {
				e := errs[i]
				if e.File != "test.toml" || e.Line != w.line || e.Key != w.key || !strings.Contains(e.Msg, w.msg) {
					t.Errorf("error %d = %q (line %d, key %q), want line %d, key %q, message containing %q",
						i, e.Error(), e.Line, e.Key, w.line, w.key, w.msg)
				}
				if w.line > 0 && !strings.HasPrefix(e.Error(), "test.toml:") {
					t.Errorf("error %q does not start with file:line", e.Error())
				}
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Errorf("error text leaks a password: %v", err)
			}
		})
	}
}
