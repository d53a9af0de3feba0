package config

import (
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/go-sql-driver/mysql"

	"vmvault/internal/bytesize"
	"vmvault/retention"
	"vmvault/snapshot"
)

// config reads the top level of the file.
func (d *doc) config(root *table) *Config {
	cfg := &Config{Path: d.file, VMs: make(map[string]*VM), Log: Log{Level: slog.LevelInfo}}
	if t := root.sub("repository"); t != nil {
		cfg.Repository = d.repository(t)
	} else if !root.has("repository") {
		d.errs = append(d.errs, &Error{File: d.file, Key: "repository", Msg: "missing required table [repository]"})
	}
	if t := root.sub("log"); t != nil {
		cfg.Log = d.log(t)
	}
	if t := root.sub("retention"); t != nil {
		cfg.Retention = d.policy(t)
	}
	cfg.Limits = Limits{IOPriority: "idle"}
	if t := root.sub("limits"); t != nil {
		cfg.Limits = d.limits(t)
	}
	cfg.Backup = Backup{FullEvery: DefaultFullEvery, VerifyUnchanged: DefaultVerifyUnchanged}
	if t := root.sub("backup"); t != nil {
		cfg.Backup = d.backup(t)
	}
	if t := root.sub("vm"); t != nil {
		for _, name := range t.keys() {
			n, _ := t.get(name)
			if vt := d.table(n); vt != nil {
				cfg.VMs[name] = d.vm(vt)
			}
		}
	}
	root.done()
	return cfg
}

func (d *doc) repository(t *table) Repository {
	var r Repository
	u, un, ok := t.requiredStr("url")
	sftp := false
	if ok {
		sftp = d.repositoryURL(un, u)
		r.URL = u
	}
	if p, n, ok := t.requiredStr("password_file"); ok {
		r.PasswordFile = d.secretFile(n, p)
	}
	if p, n, ok := t.str("ssh_key"); ok {
		if !sftp && un.key != nil {
			d.errorf(n, "only used with an sftp:// url")
		}
		r.SSHKey = d.secretFile(n, p)
	} else if sftp && !t.has("ssh_key") {
		t.missing("ssh_key")
	}
	if p, n, ok := t.str("known_hosts"); ok {
		if !sftp && un.key != nil {
			d.errorf(n, "only used with an sftp:// url")
		}
		r.KnownHosts = d.existingFile(n, p)
	}
	if p, n, ok := t.str("cache_dir"); ok {
		r.CacheDir, _ = d.absPath(n, p)
	}
	d.s3Keys(t, &r, strings.HasPrefix(u, "s3:"))
	t.done()
	return r
}

// s3Keys reads the [repository] keys of an s3: repository.
func (d *doc) s3Keys(t *table, r *Repository, s3 bool) {
	for _, k := range []string{"s3_access_key_id", "s3_secret_access_key_file", "s3_profile", "s3_region", "s3_ca_file", "s3_path_style", "s3_object_lock_days"} {
		if n, ok := t.get(k); ok && !s3 {
			d.errorf(n, "only used with an s3: url")
		}
	}
	r.S3AccessKeyID, _, _ = t.str("s3_access_key_id")
	if p, n, ok := t.str("s3_secret_access_key_file"); ok {
		r.S3SecretAccessKeyFile = d.secretFile(n, p)
	}
	if (r.S3AccessKeyID == "") != (r.S3SecretAccessKeyFile == "") {
		n, _ := t.get("s3_access_key_id")
		if r.S3AccessKeyID == "" {
			n, _ = t.get("s3_secret_access_key_file")
		}
		d.errorf(n, "s3_access_key_id and s3_secret_access_key_file go together")
	}
	r.S3Profile, _, _ = t.str("s3_profile")
	r.S3Region, _, _ = t.str("s3_region")
	if p, n, ok := t.str("s3_ca_file"); ok {
		r.S3CAFile = d.existingFile(n, p)
	}
	r.S3PathStyle = t.boolean("s3_path_style")
	if days, n, ok := t.integer("s3_object_lock_days"); ok {
		if days < 1 || days > 36500 {
			d.errorf(n, "want a number of days from 1 to 36500")
		}
		r.S3ObjectLockDays = days
	}
}

// repositoryURL checks an sftp:// URL or a local path and reports whether
// it is SFTP.
func (d *doc) repositoryURL(n node, s string) bool {
	if rest, ok := strings.CutPrefix(s, "s3:"); ok {
		if u, err := url.Parse(rest); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || strings.Trim(u.Path, "/") == "" {
			d.errorf(n, "%q: want s3:https://HOST[:PORT]/BUCKET[/PREFIX] or s3:http://…", s)
		}
		return false
	}
	if !strings.Contains(s, "://") {
		if !filepath.IsAbs(s) {
			d.errorf(n, "%q is neither an sftp://user@host/path url nor an absolute local path", s)
		}
		return false
	}
	u, err := url.Parse(s)
	sftp := err == nil && u.Scheme == "sftp"
	switch {
	case err != nil:
		d.errorf(n, "not a valid url: %v", err)
	case u.Scheme != "sftp":
		d.errorf(n, "unsupported scheme %q: want sftp://user@host[:port]/path, s3:https://host[:port]/bucket[/prefix] or a local path", u.Scheme)
	case u.Hostname() == "":
		d.errorf(n, "no host in %q", s)
	case u.Path == "" || u.Path == "/":
		d.errorf(n, "no repository path in %q", s)
	case u.RawQuery != "" || u.Fragment != "":
		d.errorf(n, "unexpected query or fragment in %q", s)
	default:
		if _, hasPassword := u.User.Password(); hasPassword {
			d.errorf(n, "the url contains a password; vmvault authenticates to the server with ssh_key")
		} else if p := u.Port(); p != "" {
			if _, err := parsePort(p); err != nil {
				d.errorf(n, "%v", err)
			}
		}
	}
	return sftp
}

func (d *doc) log(t *table) Log {
	l := Log{Level: slog.LevelInfo}
	l.Syslog = t.boolean("syslog")
	if s, n, ok := t.str("metrics_file"); ok {
		if p, abs := d.absPath(n, s); abs {
			l.MetricsFile = p
		}
	}
	if s, n, ok := t.str("level"); ok {
		levels := map[string]slog.Level{"debug": slog.LevelDebug, "info": slog.LevelInfo, "warn": slog.LevelWarn, "error": slog.LevelError}
		if lv, known := levels[s]; known {
			l.Level = lv
		} else {
			d.errorf(n, "unknown level %q: want debug, info, warn or error", s)
		}
	}
	t.done()
	return l
}

// limits reads a [limits] table.
func (d *doc) limits(t *table) Limits {
	l := Limits{IOPriority: "idle"}
	for _, c := range []struct {
		key string
		dst *int
	}{{"read", &l.ReadMiB}, {"upload", &l.UploadMiB}, {"download", &l.DownloadMiB}} {
		if v, n, ok := t.integer(c.key); ok {
			if v < 0 {
				d.errorf(n, "must be 0 (no limit) or a positive number of MiB/s")
			}
			*c.dst = v
		}
	}
	if s, n, ok := t.str("io_priority"); ok {
		if s != "idle" && s != "best-effort" && s != "none" {
			d.errorf(n, "unknown I/O priority %q: want idle, best-effort or none", s)
		}
		l.IOPriority = s
	}
	t.done()
	return l
}

// backup reads a [backup] table.
func (d *doc) backup(t *table) Backup {
	b := Backup{FullEvery: DefaultFullEvery, VerifyUnchanged: DefaultVerifyUnchanged}
	if s, n, ok := t.str("full_every"); ok {
		every, err := retention.ParseDuration(s)
		if err != nil || every <= 0 {
			d.errorf(n, "%q: want a positive duration such as \"7d\" or \"36h\"", s)
		} else {
			b.FullEvery = every
		}
	}
	var pct float64
	if n, ok := t.decode("verify_unchanged", &pct, "a number (percent)"); ok {
		if pct < 0 || pct > 100 {
			d.errorf(n, "%v: want a percentage from 0 to 100", pct)
		}
		b.VerifyUnchanged = pct
	}
	t.done()
	return b
}

// policy reads the keep_* keys of a [retention] table.
func (d *doc) policy(t *table) retention.Policy {
	var p retention.Policy
	for _, c := range []struct {
		key string
		dst *int
	}{
		{"keep_last", &p.Last}, {"keep_hourly", &p.Hourly}, {"keep_daily", &p.Daily},
		{"keep_weekly", &p.Weekly}, {"keep_monthly", &p.Monthly}, {"keep_yearly", &p.Yearly},
	} {
		if v, n, ok := t.integer(c.key); ok {
			if v < retention.Unlimited {
				d.errorf(n, "%d: want -1 (unlimited), 0 (off) or a positive count", v)
			}
			*c.dst = v
		}
	}
	if s, n, ok := t.str("keep_within"); ok {
		w, err := retention.ParseDuration(s)
		if err != nil {
			d.errorf(n, "%v", err)
		}
		p.Within = w
	}
	if tags, n, ok := t.strings("keep_tag"); ok {
		if slices.Contains(tags, "") {
			d.errorf(n, "empty tag")
		}
		p.Tags = tags
	}
	t.done()
	return p
}

// namePattern is what VM, disk and database names may look like: they
// become parts of LVM snapshot names, file names and log lines.
var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.+-]*$`)

// maxLVName is LVM's limit on the length of a logical volume name.
const maxLVName = 127

// CheckName applies the one rule for VM, disk and database names, in the
// configuration file and on the command line alike: letters, digits and
// _ . + -, starting with a letter or digit, at most 127 characters (LVM's
// limit, since names become parts of snapshot names). what names the kind
// of name in the error ("VM").
func CheckName(what, name string) error {
	if !namePattern.MatchString(name) || len(name) > maxLVName {
		return fmt.Errorf("invalid %s name %q: use letters, digits and _ . + - (not first), at most %d characters", what, name, maxLVName)
	}
	return nil
}

func (d *doc) checkName(n node, what string) {
	if err := CheckName(what, n.name()); err != nil {
		d.errorf(n, "%v", err)
	}
}

func (d *doc) vm(t *table) *VM {
	vm := &VM{Name: t.self.name()}
	d.checkName(t.self, "VM")
	vm.Sudo = t.boolean("sudo")
	if rt := t.sub("retention"); rt != nil {
		p := d.policy(rt)
		vm.Retention = &p
	}
	if gt := t.sub("guest"); gt != nil {
		vm.Guest = d.guest(gt)
	}
	dt := t.sub("disk")
	if dt != nil {
		for _, name := range dt.keys() {
			n, _ := dt.get(name)
			if diskT := d.table(n); diskT != nil {
				disk := d.disk(diskT)
				if snap := snapshot.SnapshotName(vm.Name, disk.Name); disk.Path == "" && len(snap) > maxLVName {
					d.errorf(n, "snapshot name %q is longer than LVM's %d characters: shorten the VM or disk name", snap, maxLVName)
				}
				vm.Disks = append(vm.Disks, disk)
			}
		}
	}
	if dt != nil && len(dt.fields) == 0 || !t.has("disk") {
		d.errorf(t.self, "no disks: add at least one disk.NAME = { lv = \"vg/lv\", snapshot_size = \"1G\" } or { path = \"…\" }")
	}
	if dbt := t.sub("database"); dbt != nil {
		for _, name := range dbt.keys() {
			n, _ := dbt.get(name)
			if dbT := d.table(n); dbT != nil {
				vm.Databases = append(vm.Databases, d.database(dbT))
			}
		}
	}
	t.done()
	return vm
}

func (d *doc) guest(t *table) *Guest {
	g := &Guest{Port: 22, FreezeTimeout: DefaultFreezeTimeout}
	if s, n, ok := t.requiredStr("ssh"); ok {
		user, host, port, err := parseSSHTarget(s)
		if err != nil {
			d.errorf(n, "%v", err)
		}
		g.User, g.Host = user, host
		if port != 0 {
			g.Port = port
		}
	}
	if p, n, ok := t.requiredStr("key"); ok {
		g.Key = d.secretFile(n, p)
	}
	if p, n, ok := t.str("known_hosts"); ok {
		g.KnownHosts = d.existingFile(n, p)
	}
	if cmds, n, ok := t.strings("before_snapshot"); ok {
		for _, c := range cmds {
			if strings.TrimSpace(c) == "" {
				d.errorf(n, "empty command")
				break
			}
		}
		g.BeforeSnapshot = cmds
	}
	if mounts, n, ok := t.strings("freeze"); ok {
		for _, m := range mounts {
			if !path.IsAbs(m) {
				d.errorf(n, "%q: want an absolute mount point in the guest", m)
			}
		}
		g.Freeze = mounts
	}
	if s, n, ok := t.str("freeze_timeout"); ok {
		to, err := time.ParseDuration(s)
		if err != nil || to <= 0 {
			d.errorf(n, "%q: want a positive duration such as \"30s\"", s)
		} else {
			g.FreezeTimeout = to
		}
	}
	t.done()
	return g
}

// parseSSHTarget splits "user@host[:port]"; an IPv6 host with a port is
// written "user@[::1]:2222".
func parseSSHTarget(s string) (user, host string, port int, err error) {
	at := strings.LastIndexByte(s, '@')
	if at <= 0 || at == len(s)-1 {
		return "", "", 0, fmt.Errorf("%q: want user@host or user@host:port", s)
	}
	user, hostport := s[:at], s[at+1:]
	if strings.ContainsAny(user, " \t:/@") {
		return "", "", 0, fmt.Errorf("%q: invalid user name %q", s, user)
	}
	switch {
	case strings.HasPrefix(hostport, "[") && strings.HasSuffix(hostport, "]"):
		host = hostport[1 : len(hostport)-1]
	case strings.Count(hostport, ":") == 0:
		host = hostport
	case strings.Count(hostport, ":") == 1 || strings.HasPrefix(hostport, "["):
		var p string
		host, p, err = net.SplitHostPort(hostport)
		if err != nil {
			return "", "", 0, fmt.Errorf("%q: %v", s, err)
		}
		if port, err = parsePort(p); err != nil {
			return "", "", 0, fmt.Errorf("%q: %v", s, err)
		}
	default:
		if net.ParseIP(hostport) == nil {
			return "", "", 0, fmt.Errorf("%q: want user@host:port", s)
		}
		host = hostport // a bare IPv6 address
	}
	if host == "" || strings.ContainsAny(host, " \t/@[]") {
		return "", "", 0, fmt.Errorf("%q: invalid host %q", s, host)
	}
	return user, host, port, nil
}

func parsePort(s string) (int, error) {
	p, err := strconv.Atoi(s)
	if err != nil || p < 1 || p > 65535 {
		return 0, fmt.Errorf("invalid port %q", s)
	}
	return p, nil
}

func (d *doc) disk(t *table) Disk {
	disk := Disk{Name: t.self.name()}
	d.checkName(t.self, "disk")
	lvS, lvN, hasLV := t.str("lv")
	pathS, pathN, hasPath := t.str("path")
	switch {
	case hasLV && hasPath:
		d.errorf(pathN, "a disk has either lv (snapshotted) or path (read as is), not both")
	case !hasLV && !hasPath && !t.has("lv") && !t.has("path"):
		d.errorf(t.self, "needs lv = \"vg/lv\" or path = \"/file/or/device\"")
	case hasLV:
		lv, err := parseLV(lvS)
		if err != nil {
			d.errorf(lvN, "%v", err)
		}
		disk.LV = lv
	case hasPath:
		disk.Path = d.existingFile(pathN, pathS)
	}
	if f, n, ok := t.str("file"); ok {
		switch {
		case !hasLV:
			d.errorf(n, "file needs lv: it names an image file on the filesystem inside the LV")
		case f == "" || path.IsAbs(f) || path.Clean(f) != f || f == "." || strings.HasPrefix(f, "../"):
			d.errorf(n, "%q: want a clean path relative to the root of the LV's filesystem, e.g. \"images/vm01.raw\"", f)
		}
		disk.File = f
	}
	disk.CBT = hasLV
	if n, ok := t.get("cbt"); ok {
		var on bool
		if _, ok := t.decode("cbt", &on, "a boolean (true or false)"); ok {
			if !hasLV {
				d.errorf(n, "cbt needs lv: change tracking works on thin LVs")
			}
			disk.CBT = on && hasLV
		}
	}
	if s, n, ok := t.str("snapshot_size"); ok {
		size, err := parseSize(s)
		switch {
		case err != nil:
			d.errorf(n, "%v", err)
		case !hasLV && hasPath:
			d.errorf(n, "snapshot_size needs lv: a path disk is not snapshotted")
		}
		disk.SnapshotSize = size
	} else if hasLV && !t.has("snapshot_size") {
		t.get("snapshot_size")
		t.missing("snapshot_size")
	}
	t.done()
	return disk
}

// parseLV checks "vg/lv" by LVM's rule (package snapshot's, which will
// use the name).
func parseLV(s string) (LV, error) {
	lv, err := snapshot.ParseLV(s)
	if err != nil {
		return LV{}, err
	}
	return LV{VG: lv.VG, Name: lv.Name}, nil
}

// parseSize parses a snapshot size such as "2G", "512M", "1.5g", "1GiB"
// (bytesize.Parse) and refuses one smaller than an LVM extent.
func parseSize(s string) (int64, error) {
	v, err := bytesize.Parse(s)
	if err != nil {
		return 0, err
	}
	if v < 1<<20 {
		return 0, fmt.Errorf("size %q is too small: LVM snapshots are at least one extent (usually 4M)", s)
	}
	return v, nil
}

func (d *doc) database(t *table) Database {
	db := Database{Name: t.self.name()}
	d.checkName(t.self, "database")
	if s, n, ok := t.requiredStr("dsn"); ok {
		mc, err := mysql.ParseDSN(s)
		switch {
		case err != nil:
			// The error could quote the DSN; the DSN might hold a password.
			d.errorf(n, "not a valid DSN: want e.g. \"backup@tcp(10.0.0.5:3306)/\"")
		case mc.Passwd != "":
			d.errorf(n, "the DSN contains a password: move it to password_file")
		case mc.User == "":
			d.errorf(n, "the DSN names no user: want e.g. \"backup@tcp(10.0.0.5:3306)/\"")
		default:
			db.DSN = s
		}
	}
	if p, n, ok := t.str("password_file"); ok {
		db.PasswordFile = d.secretFile(n, p)
	}
	if p, n, ok := t.str("tls_ca"); ok {
		db.TLSCA = d.existingFile(n, p)
	}
	certS, certN, hasCert := t.str("tls_cert")
	keyS, keyN, hasKey := t.str("tls_key")
	if hasCert {
		db.TLSCert = d.existingFile(certN, certS)
	}
	if hasKey {
		db.TLSKey = d.secretFile(keyN, keyS)
	}
	switch {
	case hasCert && !t.has("tls_key"):
		t.missing("tls_key")
	case hasKey && !t.has("tls_cert"):
		t.missing("tls_cert")
	}
	db.Required = t.boolean("required")
	t.done()
	return db
}
