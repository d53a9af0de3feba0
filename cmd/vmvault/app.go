package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"vmvault/backend"
	"vmvault/backend/local"
	"vmvault/backend/retry"
	"vmvault/backend/s3"
	"vmvault/backend/sftp"
	"vmvault/config"
	"vmvault/internal/bytesize"
	"vmvault/repo"
)

// app holds what every command shares: streams, global flags, logger.
type app struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	code           int // exit code of a command that succeeded with warnings

	repoURL          string
	passwordFile     string
	cacheDir         string
	sshKey           string
	knownHosts       string
	acceptNewHostKey bool
	jsonOut          bool
	verbose          int
	quiet            bool
	logFormat        string
	syslog           bool
	syslogSocket     string
	retryLock        time.Duration
	configPath       string
	metricsFile      string

	cfg        *config.Config // loaded configuration, if any
	limitFlags limitFlags

	log      *slog.Logger // stderr, and syslog when enabled
	sys      *slog.Logger // syslog only (nil when off): summaries already printed on stderr
	closeLog func()
}

func (a *app) rootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "vmvault",
		Short: "Back up running virtual machines' disks: deduplicated, compressed, encrypted",
		Long: `vmvault backs up VM disk images (LVM snapshots, image files, block devices)
into a repository on a local path, an SFTP server or S3-compatible object
storage (--repo /path, sftp://user@host/path, s3:https://host/bucket).
Data is split into content-defined chunks, deduplicated, compressed with
zstd and encrypted (XChaCha20-Poly1305) on this host: the storage server
sees only ciphertext.

The repository is given by --repo or VMVAULT_REPOSITORY, its password by
--password-file or VMVAULT_PASSWORD_FILE (or a prompt on a terminal).

` + exitCodesHelp,
		Example: `  vmvault init --repo /srv/vmvault --password-file /etc/vmvault/password
  vmvault backup vm01 --source /var/lib/images/vm01.raw
  vmvault generations vm01
  vmvault restore vm01 latest > vm01.raw
  vmvault check --read-data-subset 10%`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			a.limitFlags.set = cmd.Flags()
			return a.setup()
		},
	}
	f := root.PersistentFlags()
	f.StringVarP(&a.repoURL, "repo", "r", os.Getenv("VMVAULT_REPOSITORY"), "repository: a local path, sftp://user@host[:port]/path or s3:https://host[:port]/bucket[/prefix] (env VMVAULT_REPOSITORY)")
	f.StringVarP(&a.passwordFile, "password-file", "p", os.Getenv("VMVAULT_PASSWORD_FILE"), "file holding the repository password, not readable by others (env VMVAULT_PASSWORD_FILE)")
	f.StringVar(&a.cacheDir, "cache-dir", "", "local cache directory (default $XDG_CACHE_HOME/vmvault)")
	f.StringVar(&a.sshKey, "ssh-key", "", "SSH private key for sftp:// repositories (default: ssh-agent and ~/.ssh/id_*)")
	f.StringVar(&a.knownHosts, "known-hosts", "", "known_hosts file for sftp:// repositories (default ~/.ssh/known_hosts)")
	f.BoolVar(&a.acceptNewHostKey, "accept-new-host-key", false, "trust an SFTP server's key on first contact and add it to known_hosts")
	f.BoolVar(&a.jsonOut, "json", false, "print results as JSON on stdout")
	f.CountVarP(&a.verbose, "verbose", "v", "more log output (repeat for debug)")
	f.BoolVarP(&a.quiet, "quiet", "q", false, "only errors and warnings")
	f.StringVar(&a.logFormat, "log-format", "text", "log format on stderr: text or json")
	f.BoolVar(&a.syslog, "syslog", false, "also log to the local syslog (journald, /var/log/syslog); config: [log] syslog = true")
	f.StringVar(&a.syslogSocket, "syslog-socket", "", "syslog socket instead of /dev/log (for tests)")
	f.MarkHidden("syslog-socket")
	f.StringVarP(&a.configPath, "config", "c", os.Getenv("VMVAULT_CONFIG"), "configuration file (env VMVAULT_CONFIG; default "+config.DefaultPath+" if it exists)")
	f.DurationVar(&a.retryLock, "retry-lock", 0, "wait up to this long for a locked repository (e.g. 10m)")
	a.limitFlags.addGlobal(f)
	root.AddCommand(a.initCommand(), a.backupCommand(), a.snapshotsCommand(), a.restoreCommand(),
		a.checkCommand(), a.repairCommand(), a.keyCommand(), a.versionCommand(), a.dumpCommand(), a.mountCommand(),
		a.forgetCommand(), a.pruneCommand(), a.statsCommand(), a.unlockCommand(), a.configCommand(), a.docsCommand())
	root.AddCommand(a.serveCommand())
	// Before the built-in commands exist: completion captures the writer.
	root.SetIn(a.stdin)
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	addBuiltinCommands(root)
	return root
}

func (a *app) setup() error {
	s := logSetup{format: a.logFormat, stderrLevel: slog.LevelInfo, syslog: a.syslog, syslogLevel: slog.LevelInfo, socket: a.syslogSocket}
	// The configuration's [log] section. A file that does not load is
	// reported by the command that needs it (or checked by config check).
	if cfg, err := a.loadConfig(configOptional); err == nil && cfg != nil {
		s.stderrLevel, s.syslogLevel = cfg.Log.Level, cfg.Log.Level
		s.syslog = s.syslog || cfg.Log.Syslog
	}
	// -q quiets the terminal (and cron mail) only; syslog keeps its level.
	switch {
	case a.quiet:
		s.stderrLevel = slog.LevelWarn
	case a.verbose >= 2:
		s.stderrLevel, s.syslogLevel = slog.LevelDebug-4, slog.LevelDebug-4
	case a.verbose == 1:
		s.stderrLevel, s.syslogLevel = min(s.stderrLevel, slog.LevelDebug), min(s.syslogLevel, slog.LevelDebug)
	}
	log, sys, closer, err := newLogger(a.stderr, s)
	if err != nil {
		return err
	}
	a.log, a.sys, a.closeLog = log, sys, closer
	return nil
}

// report prints a run's summary line on stderr (unless -q and all went
// well) and sends it to syslog when that is on.
func (a *app) report(level slog.Level, line string) {
	line = termSafe(line)
	if !a.jsonOut && (!a.quiet || level >= slog.LevelWarn) {
		fmt.Fprintln(a.stderr, line)
	}
	if a.sys != nil {
		a.sys.Log(context.Background(), level, line)
	}
}

// backendMode says whether openBackend opens a repository or makes one.
type backendMode bool

const (
	existingRepository backendMode = false
	newRepository      backendMode = true
)

// openBackend connects to the repository location: the one place that
// turns --repo into a backend.
func (a *app) openBackend(ctx context.Context, mode backendMode) (backend.Backend, error) {
	create := mode == newRepository
	if a.repoURL == "" {
		if _, err := a.loadConfig(configOptional); err != nil {
			return nil, err
		}
	}
	if a.repoURL == "" {
		return nil, withCode(exitUsage, errors.New("no repository: give --repo or set VMVAULT_REPOSITORY"))
	}
	if strings.HasPrefix(a.repoURL, "sftp://") {
		be, err := sftp.Open(ctx, sftp.Config{URL: a.repoURL, KeyFile: a.sshKey, KnownHostsFile: a.knownHosts,
			AcceptNewHostKey: a.acceptNewHostKey, Create: create, Logger: a.log})
		if err != nil {
			return nil, notFound(err)
		}
		return retry.New(be, retry.Options{Logger: a.log}), nil
	}
	if s3.IsURL(a.repoURL) {
		be, err := a.openS3(ctx, create)
		if err != nil {
			return nil, notFound(err)
		}
		return retry.New(be, retry.Options{Logger: a.log}), nil
	}
	if strings.Contains(a.repoURL, "://") {
		return nil, withCode(exitUsage, fmt.Errorf("unsupported repository URL %q: use a local path, sftp:// or s3:https://", a.repoURL))
	}
	if create {
		return local.Create(a.repoURL)
	}
	st, err := os.Stat(a.repoURL)
	if err != nil {
		return nil, withCode(exitNoRepo, fmt.Errorf("repository %s: %w", a.repoURL, err))
	}
	if !st.IsDir() {
		return nil, withCode(exitNoRepo, fmt.Errorf("repository %s is not a directory", a.repoURL))
	}
	return local.Open(a.repoURL)
}

// openS3 opens an s3: repository with the configuration's s3_* keys.
func (a *app) openS3(ctx context.Context, create bool) (*s3.Backend, error) {
	cfg := s3.Config{URL: a.repoURL, Create: create, Logger: a.log}
	if c, err := a.loadConfig(configOptional); err != nil {
		return nil, err
	} else if c != nil && c.Repository.URL == a.repoURL {
		r := c.Repository
		cfg.AccessKeyID, cfg.Profile, cfg.Region, cfg.CAFile = r.S3AccessKeyID, r.S3Profile, r.S3Region, r.S3CAFile
		cfg.PathStyle, cfg.ObjectLockDays = r.S3PathStyle, r.S3ObjectLockDays
		if r.S3SecretAccessKeyFile != "" {
			if cfg.SecretAccessKey, err = config.ReadSecretFile(r.S3SecretAccessKeyFile); err != nil {
				return nil, err
			}
		}
	}
	return s3.Open(ctx, cfg)
}

// readPasswordFile reads a password file by the one rule for secret
// files (config.ReadSecretFile): private mode, size cap, line breaks
// trimmed.
func readPasswordFile(path string) ([]byte, error) {
	s, err := config.ReadSecretFile(path)
	if err != nil {
		return nil, fmt.Errorf("password file: %w", err)
	}
	return []byte(s), nil
}

// promptMode says whether a password prompt asks once or twice (for a
// new password).
type promptMode bool

const (
	promptOnce  promptMode = false
	promptTwice promptMode = true
)

// password returns the repository password from --password-file or a
// terminal prompt.
func (a *app) password(prompt string, mode promptMode) ([]byte, error) {
	if a.passwordFile == "" {
		if _, err := a.loadConfig(configOptional); err != nil {
			return nil, err
		}
	}
	if a.passwordFile != "" {
		return readPasswordFile(a.passwordFile)
	}
	return promptPassword(prompt, mode)
}

func promptPassword(prompt string, mode promptMode) ([]byte, error) {
	tty, err := os.OpenFile("/dev/tty", os.O_RDWR, 0)
	if err != nil || !term.IsTerminal(int(tty.Fd())) {
		return nil, withCode(exitUsage, errors.New("no password: give --password-file or set VMVAULT_PASSWORD_FILE (no terminal to prompt on)"))
	}
	defer tty.Close()
	fmt.Fprint(tty, prompt+": ")
	pw, err := term.ReadPassword(int(tty.Fd()))
	fmt.Fprintln(tty)
	if err != nil {
		return nil, err
	}
	if mode == promptTwice {
		fmt.Fprint(tty, "again: ")
		pw2, err := term.ReadPassword(int(tty.Fd()))
		fmt.Fprintln(tty)
		if err != nil {
			return nil, err
		}
		if string(pw) != string(pw2) {
			return nil, errors.New("passwords do not match")
		}
	}
	if len(pw) == 0 {
		return nil, errors.New("empty password")
	}
	return pw, nil
}

// openRepo opens and unlocks the repository.
func (a *app) openRepo(ctx context.Context) (*repo.Repository, error) {
	be, err := a.openBackend(ctx, existingRepository)
	if err != nil {
		return nil, err
	}
	pw, err := a.password("repository password", promptOnce)
	if err != nil {
		be.Close()
		return nil, err
	}
	be = a.limitBackend(be)
	r, err := repo.Open(ctx, be, pw, repo.Options{CacheDir: a.cacheDir, Logger: a.log})
	if err != nil {
		be.Close()
		if errors.Is(err, fs.ErrPermission) {
			return nil, fmt.Errorf("open repository %s: %w", be.Location(), err)
		}
		return nil, err
	}
	a.log.Debug("opened repository", "location", be.Location(), "id", r.Config().ID[:8])
	return r, nil
}

// withRepo opens the repository, takes a lock, and runs fn.
func (a *app) withRepo(ctx context.Context, mode repo.LockMode, command string, fn func(*repo.Repository) error) error {
	return a.withLease(ctx, mode, command, func(_ context.Context, r *repo.Repository) error { return fn(r) })
}

// withLease is withRepo for work that must stop when the lock's lease is
// lost (a backup): fn's context is cancelled then.
func (a *app) withLease(ctx context.Context, mode repo.LockMode, command string, fn func(context.Context, *repo.Repository) error) error {
	r, err := a.openRepo(ctx)
	if err != nil {
		return err
	}
	defer r.Backend().Close()
	defer r.Close()
	l, err := r.Lock(ctx, mode, command, a.retryLock)
	if err != nil {
		return err
	}
	defer l.Unlock()
	return fn(l.Context(), r)
}

// humanBytes formats a byte count with binary units (bytesize.Format).
func humanBytes(n int64) string { return bytesize.Format(n) }
