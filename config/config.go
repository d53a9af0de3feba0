// Package config reads and validates the vmvault TOML configuration file.
//
// Loading is strict: unknown keys, values of the wrong type or form,
// missing required keys, referenced files that do not exist and secret
// files that group or others can access are all errors. Every problem
// found is reported, each as an *Error naming the file, line and key,
// joined with errors.Join so that printing the error gives one line each.
//
// The Config holds paths to secrets, never the secrets themselves, so it is
// safe to print or log. Read a secret with ReadSecretFile when it is needed.
// docs/configuration.md documents every key.
package config

import (
	"fmt"
	"log/slog"
	"slices"
	"time"

	"vmvault/retention"
)

// DefaultPath is where vmvault looks for its configuration when neither
// --config nor VMVAULT_CONFIG names another file.
const DefaultPath = "/etc/vmvault/vmvault.toml"

// DefaultFreezeTimeout is how long a guest filesystem may stay frozen when
// the configuration does not say.
const DefaultFreezeTimeout = 30 * time.Second

// Config is a validated configuration file.
type Config struct {
	Path       string // the file it was loaded from
	Repository Repository
	Log        Log
	// Retention is the default policy of forget/prune; the zero Policy
	// (Retention.Empty()) when the file sets none.
	Retention retention.Policy
	VMs       map[string]*VM
	// Limits pace backups and restores; command-line flags override them.
	Limits Limits
	// Backup holds the safety nets of change tracking.
	Backup Backup
}

// DefaultFullEvery is full_every when the file does not set it.
const DefaultFullEvery = 7 * 24 * time.Hour

// DefaultVerifyUnchanged is verify_unchanged when the file does not set it.
const DefaultVerifyUnchanged = 1.0

// Backup is the [backup] table: how far backups trust change tracking.
type Backup struct {
	// FullEvery is how long a disk whose changes are tracked may go
	// without being read whole (full_every, e.g. "7d").
	FullEvery time.Duration
	// VerifyUnchanged is the percentage (0–100) of the segments change
	// tracking reports unchanged that each backup reads anyway and
	// compares (verify_unchanged); --verify-unchanged overrides it.
	VerifyUnchanged float64
}

// Limits are the [limits] table: bandwidth caps in MiB/s (0: none) and
// the I/O priority of reading disks.
type Limits struct {
	ReadMiB     int    // reading the disks (read = …)
	UploadMiB   int    // to the repository (upload = …)
	DownloadMiB int    // from the repository (download = …)
	IOPriority  string // io_priority: "idle" (default), "best-effort" or "none"
}

// VMNames returns the names of the configured VMs, sorted.
func (c *Config) VMNames() []string {
	names := make([]string, 0, len(c.VMs))
	for n := range c.VMs {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Repository says where backups go and how to open the repository.
type Repository struct {
	// URL is "sftp://user@host[:port]/path", "s3:https://host/bucket[/prefix]"
	// or an absolute local path.
	URL          string
	PasswordFile string // the repository password; a secret
	SSHKey       string // private key for sftp://; a secret
	// KnownHosts verifies the SFTP server's host key; empty means the
	// default, ~/.ssh/known_hosts of the user running vmvault.
	KnownHosts string
	// CacheDir holds the local index cache; empty means the default.
	CacheDir string
	// S3 settings (s3: urls only); see backend/s3.Config. The secret key
	// lives in a file, like the password.
	S3AccessKeyID         string
	S3SecretAccessKeyFile string
	S3Profile             string
	S3Region              string
	S3CAFile              string
	S3PathStyle           bool
	S3ObjectLockDays      int
}

// Log configures logging.
type Log struct {
	Syslog bool       // also log to the local syslog
	Level  slog.Level // minimum level: debug, info, warn or error
	// MetricsFile is a Prometheus textfile-collector file that backup
	// updates after each VM (empty: none).
	MetricsFile string
}

// VM is one virtual machine to back up.
type VM struct {
	Name string
	// Sudo runs LVM and mount commands through `sudo -n`, so vmvault can run
	// as an unprivileged user with a sudoers entry.
	Sudo bool
	// Retention overrides Config.Retention for this VM; nil if not set.
	Retention *retention.Policy
	Guest     *Guest // nil when the guest is not quiesced over SSH
	Disks     []Disk // sorted by name; at least one
	Databases []Database
}

// Guest is how to reach a VM's operating system to flush and freeze it.
type Guest struct {
	User string
	Host string // a host name or IP address, IPv6 without brackets
	Port int    // 22 unless set
	Key  string // private key; a secret
	// KnownHosts verifies the guest's host key; empty means the default,
	// ~/.ssh/known_hosts of the user running vmvault.
	KnownHosts string
	// BeforeSnapshot are shell commands run in the guest, in order, before
	// the databases are locked (e.g. emptying temp dirs); vmvault runs
	// `sync` after them.
	BeforeSnapshot []string
	// Freeze lists guest mount points to `fsfreeze -f` while the snapshots
	// are created.
	Freeze []string
	// FreezeTimeout bounds how long the filesystems may stay frozen.
	FreezeTimeout time.Duration
}

// Disk is one disk of a VM. Exactly one of LV and Path is set.
type Disk struct {
	Name string
	// LV is the logical volume that is snapshotted; zero for a Path disk.
	LV LV
	// File, if set, is the VM image's path inside the filesystem on LV
	// (relative to its root): the snapshot is mounted read-only and the
	// file read. Empty means the LV itself is the disk.
	File string
	// Path is a plain file or block device read as it is, without a
	// snapshot: for VMs that are stopped or stores that snapshot themselves.
	Path string
	// SnapshotSize is the copy-on-write space of the LVM snapshot in bytes
	// (unused when the LV is thin: its snapshot shares the pool).
	SnapshotSize int64
	// CBT tracks changes when LV is a thin LV and File is empty (cbt,
	// default true): the snapshot is kept as the next backup's base, which
	// then reads only what changed.
	CBT bool
}

// LV names an LVM logical volume.
type LV struct {
	VG   string // volume group
	Name string // logical volume
}

// IsZero reports whether l names no volume.
func (l LV) IsZero() bool { return l.VG == "" && l.Name == "" }

// String returns "vg/lv", the form lvcreate and lvs accept.
func (l LV) String() string { return l.VG + "/" + l.Name }

// Device returns the LV's device path, /dev/vg/lv.
func (l LV) Device() string { return "/dev/" + l.VG + "/" + l.Name }

// Database is a MySQL or MariaDB server to lock while the snapshots are
// created.
type Database struct {
	Name string
	// DSN is a go-sql-driver/mysql data source name without a password,
	// e.g. "backup@tcp(10.0.0.5:3306)/".
	DSN          string
	PasswordFile string // a secret; empty for certificate authentication
	TLSCA        string // CA certificate that verifies the server
	TLSCert      string // client certificate
	TLSKey       string // client key; a secret
	// Required makes an unreachable server fail the backup instead of
	// giving a warning.
	Required bool
}

// Error is one problem in a configuration file.
type Error struct {
	File string
	Line int    // 1-based; 0 when unknown
	Key  string // dotted TOML key, e.g. "vm.vm01.disk.hda.lv"; may be empty
	Msg  string
}

// Error formats the problem as "file:line: key: message".
func (e *Error) Error() string {
	s := e.File
	if e.Line > 0 {
		s += fmt.Sprintf(":%d", e.Line)
	}
	if e.Key != "" {
		s += ": " + e.Key
	}
	return s + ": " + e.Msg
}
