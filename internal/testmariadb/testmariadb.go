// Package testmariadb starts a private, throwaway MariaDB server for tests.
//
// Each server lives in its own directory, listens on 127.0.0.1 on a free
// high port and on a Unix socket in that directory, and is stopped by its
// own PID only. The server binaries come from the Debian package
// mariadb-server; a test on a machine without them fails with a message
// naming that package.
package testmariadb

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
)

// installHint is appended to every "binary not found" error so a developer
// knows at once how to make the test runnable.
const installHint = "install it with: apt-get install mariadb-server"

// maxSocketPath is the usable length of sockaddr_un.sun_path on Linux.
const maxSocketPath = 107

// Server is a running MariaDB server owned by the test that started it.
type Server struct {
	// Dir holds the data directory, socket, PID file and error log.
	Dir string
	// Addr is the TCP address the server listens on, "127.0.0.1:PORT".
	Addr string
	// Port is the TCP port of Addr.
	Port int
	// Socket is the Unix socket path.
	Socket string
	// ErrorLog is the server's error log, useful when a test fails.
	ErrorLog string

	cmd     *exec.Cmd
	exited  chan struct{} // closed when cmd.Wait returns
	waitErr error
}

// Start initialises a data directory under dir and starts mariadbd on
// 127.0.0.1 with a free port. extraArgs are appended to the mariadbd
// command line (for example "--ssl-cert=…"). dir must be short enough for
// a Unix socket path (about 100 bytes). The caller must call Stop.
//
// The server has a user 'root'@'127.0.0.1' without password and all
// privileges, reachable through RootDSN.
func Start(dir string, extraArgs ...string) (*Server, error) {
	installDB, err := lookBinary("mariadb-install-db")
	if err != nil {
		return nil, err
	}
	mariadbd, err := lookBinary("mariadbd")
	if err != nil {
		return nil, err
	}
	dir, err = filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("testmariadb: %w", err)
	}
	socket := filepath.Join(dir, "mysql.sock")
	if len(socket) > maxSocketPath {
		return nil, fmt.Errorf("testmariadb: socket path %s is longer than %d bytes; use a shorter directory", socket, maxSocketPath)
	}
	me, err := user.Current()
	if err != nil {
		return nil, fmt.Errorf("testmariadb: current user: %w", err)
	}
	datadir := filepath.Join(dir, "data")
	if err := os.MkdirAll(datadir, 0o700); err != nil {
		return nil, fmt.Errorf("testmariadb: %w", err)
	}
	// --no-defaults must be the first argument, or the host's my.cnf
	// (with its own socket and datadir) leaks into the test server.
	install := exec.Command(installDB, "--no-defaults",
		"--datadir="+datadir,
		"--user="+me.Username,
		"--auth-root-authentication-method=normal",
		"--skip-test-db",
		"--skip-name-resolve")
	if out, err := install.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("testmariadb: mariadb-install-db: %w\n%s", err, tail(out, 2000))
	}

	// The port is chosen by the kernel and released just before mariadbd
	// binds it; another process could take it in between, so retry.
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		s, err := launch(mariadbd, dir, datadir, socket, me.Username, extraArgs)
		if err == nil {
			return s, nil
		}
		lastErr = err
	}
	return nil, lastErr
}

func launch(mariadbd, dir, datadir, socket, username string, extraArgs []string) (*Server, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	s := &Server{
		Dir:      dir,
		Addr:     net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		Port:     port,
		Socket:   socket,
		ErrorLog: filepath.Join(dir, "error.log"),
		exited:   make(chan struct{}),
	}
	args := []string{"--no-defaults",
		"--user=" + username,
		"--datadir=" + datadir,
		"--bind-address=127.0.0.1",
		"--port=" + strconv.Itoa(port),
		"--socket=" + socket,
		"--pid-file=" + filepath.Join(dir, "mariadbd.pid"),
		"--log-error=" + s.ErrorLog,
		"--skip-name-resolve",
		"--skip-log-bin",
		// Small buffers: tests need seconds of startup, not throughput.
		"--innodb-buffer-pool-size=16M",
		"--innodb-log-file-size=8M",
	}
	args = append(args, extraArgs...)
	s.cmd = exec.Command(mariadbd, args...)
	// If the test binary dies without calling Stop, the kernel ends the
	// server too instead of leaving it listening.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("testmariadb: start mariadbd: %w", err)
	}
	go func() {
		s.waitErr = s.cmd.Wait()
		close(s.exited)
	}()
	if err := s.waitReady(30 * time.Second); err != nil {
		s.Stop()
		return nil, err
	}
	// With skip-name-resolve, 'root'@'localhost' matches only the socket;
	// tests connect over TCP. Whether install-db also made
	// 'root'@'127.0.0.1' varies with its options, so make sure of it.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.execSocket(ctx,
		"CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'",
		"ALTER USER 'root'@'127.0.0.1' IDENTIFIED BY ''",
		"GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION",
	); err != nil {
		s.Stop()
		return nil, err
	}
	return s, nil
}

// New starts a server in a fresh temporary directory and registers its
// Stop and the directory's removal with t.Cleanup. It fails the test if
// the server cannot start.
func New(t testing.TB, extraArgs ...string) *Server {
	t.Helper()
	// t.TempDir paths grow with the test name and may exceed the socket
	// path limit, so use a short directory of our own.
	dir, err := os.MkdirTemp("", "testmariadb-")
	if err != nil {
		t.Fatalf("testmariadb: %v", err)
	}
	s, err := Start(dir, extraArgs...)
	if err != nil {
		os.RemoveAll(dir)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Errorf("testmariadb: stop: %v", err)
		}
		os.RemoveAll(dir)
	})
	return s
}

// RootDSN returns a go-sql-driver DSN for the password-less root user over
// TCP.
func (s *Server) RootDSN() string {
	return "root@tcp(" + s.Addr + ")/"
}

// DSN returns a go-sql-driver DSN for user over TCP, without a password
// (quiesce passes passwords separately).
func (s *Server) DSN(user string) string {
	return user + "@tcp(" + s.Addr + ")/"
}

// Exec runs statements in order as root.
func (s *Server) Exec(ctx context.Context, stmts ...string) error {
	db, err := sql.Open("mysql", s.RootDSN())
	if err != nil {
		return fmt.Errorf("testmariadb: %w", err)
	}
	defer db.Close()
	return execAll(ctx, db, stmts)
}

// CreateUser creates 'name'@'127.0.0.1' with password (empty for none)
// and grants it privs on *.* (for example "RELOAD", "LOCK TABLES", which
// is all a backup user needs). require, if not empty, is appended as a
// REQUIRE clause, for example "X509" for certificate authentication.
func (s *Server) CreateUser(ctx context.Context, name, password, require string, privs ...string) error {
	create := fmt.Sprintf("CREATE USER %s@'127.0.0.1' IDENTIFIED BY %s", quote(name), quote(password))
	if require != "" {
		create += " REQUIRE " + require
	}
	stmts := []string{create}
	if len(privs) > 0 {
		stmts = append(stmts, fmt.Sprintf("GRANT %s ON *.* TO %s@'127.0.0.1'", strings.Join(privs, ", "), quote(name)))
	}
	return s.Exec(ctx, stmts...)
}

// Stop ends the server: SIGTERM to its own PID, SIGKILL after ten seconds.
// It is safe to call more than once.
func (s *Server) Stop() error {
	if s.cmd == nil || s.cmd.Process == nil {
		return nil
	}
	select {
	case <-s.exited:
		return nil
	default:
	}
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("testmariadb: signal mariadbd pid %d: %w", s.cmd.Process.Pid, err)
	}
	select {
	case <-s.exited:
		return nil
	case <-time.After(10 * time.Second):
	}
	if err := s.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("testmariadb: kill mariadbd pid %d: %w", s.cmd.Process.Pid, err)
	}
	<-s.exited
	return nil
}

// PID returns the server's process ID.
func (s *Server) PID() int {
	return s.cmd.Process.Pid
}

func (s *Server) waitReady(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		select {
		case <-s.exited:
			return fmt.Errorf("testmariadb: mariadbd exited during startup (%v):\n%s", s.waitErr, s.logTail())
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := s.pingSocket(ctx)
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("testmariadb: mariadbd not ready after %v: %v\n%s", limit, err, s.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *Server) socketDB() (*sql.DB, error) {
	cfg := mysql.NewConfig()
	cfg.User = "root"
	cfg.Net = "unix"
	cfg.Addr = s.Socket
	conn, err := mysql.NewConnector(cfg)
	if err != nil {
		return nil, fmt.Errorf("testmariadb: %w", err)
	}
	return sql.OpenDB(conn), nil
}

func (s *Server) pingSocket(ctx context.Context) error {
	db, err := s.socketDB()
	if err != nil {
		return err
	}
	defer db.Close()
	return db.PingContext(ctx)
}

func (s *Server) execSocket(ctx context.Context, stmts ...string) error {
	db, err := s.socketDB()
	if err != nil {
		return err
	}
	defer db.Close()
	return execAll(ctx, db, stmts)
}

func (s *Server) logTail() string {
	b, err := os.ReadFile(s.ErrorLog)
	if err != nil {
		return "(no error log: " + err.Error() + ")"
	}
	return tail(b, 2000)
}

func execAll(ctx context.Context, db *sql.DB, stmts []string) error {
	for _, q := range stmts {
		if _, err := db.ExecContext(ctx, q); err != nil {
			return fmt.Errorf("testmariadb: %s: %w", firstWords(q), err)
		}
	}
	return nil
}

// firstWords keeps passwords in IDENTIFIED BY clauses out of error text.
func firstWords(q string) string {
	if i := strings.Index(strings.ToUpper(q), " IDENTIFIED"); i >= 0 {
		return q[:i] + " …"
	}
	return q
}

func lookBinary(name string) (string, error) {
	// Debian installs mariadbd in /usr/sbin, which is not on every PATH.
	for _, p := range []string{name, "/usr/sbin/" + name, "/usr/bin/" + name} {
		if path, err := exec.LookPath(p); err == nil {
			return path, nil
		}
	}
	return "", fmt.Errorf("testmariadb: %s not found; %s", name, installHint)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("testmariadb: find free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// quote makes a SQL string literal; test inputs only, but keep it correct.
func quote(s string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'"
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
