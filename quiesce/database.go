package quiesce

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/go-sql-driver/mysql"
)

// Database is one MySQL or MariaDB server whose tables are locked with
// FLUSH TABLES WITH READ LOCK for the instant of the snapshot. The account
// needs only the RELOAD and LOCK TABLES privileges.
type Database struct {
	// Name labels the database in logs, errors and the manifest.
	Name string
	// DSN is a go-sql-driver/mysql data source name, for example
	// "backup@tcp(10.0.0.5:3306)/". It is never logged, because it may
	// carry a password; put the password in Password instead.
	DSN string
	// Password, if not empty, replaces any password in DSN. The caller
	// reads it from a password file; it never appears in logs or errors.
	Password string
	// TLSCA is a PEM file of CA certificates that verify the server. With
	// TLSCert and TLSKey it enables TLS; without it, the system roots are
	// used.
	TLSCA string
	// TLSCert and TLSKey are a PEM client certificate and key, for
	// accounts created with REQUIRE X509 (or SUBJECT/ISSUER) instead of a
	// password.
	TLSCert, TLSKey string
	// Required makes an unreachable server an error instead of a warning.
	Required bool
}

// DBStatus is what happened to one database during Hold.
type DBStatus string

// Database outcomes as recorded in the manifest.
const (
	// DBLocked means FLUSH TABLES WITH READ LOCK succeeded and was held.
	DBLocked DBStatus = "locked"
	// DBDown means the server could not be reached; the backup went on
	// without locking it (only for databases that are not Required).
	DBDown DBStatus = "down"
	// DBFailed means connecting or locking failed for another reason (bad
	// credentials, missing privilege, lock timeout); Hold fails.
	DBFailed DBStatus = "error"
)

// DBOutcome records one database's outcome for logs and the manifest.
type DBOutcome struct {
	Name   string   `json:"name"`
	Addr   string   `json:"addr"`
	User   string   `json:"user"`
	Status DBStatus `json:"status"`
	// Detail says why a database is down or failed. It never contains
	// the password.
	Detail string `json:"detail,omitempty"`
}

// DatabaseError is the error for a database that could not be locked.
// It names the VM, the database and its address, never the password.
type DatabaseError struct {
	VM     string
	Name   string
	Addr   string
	User   string
	Status DBStatus // DBFailed, or DBDown for a Required database
	Err    error
}

// Error implements error.
func (e *DatabaseError) Error() string {
	what := "failed"
	if e.Status == DBDown {
		what = "is down and marked required"
	}
	return fmt.Sprintf("VM %s: database %s (%s@%s) %s: %v", e.VM, e.Name, e.User, e.Addr, what, e.Err)
}

// Unwrap returns the underlying error, for example a *mysql.MySQLError.
func (e *DatabaseError) Unwrap() error { return e.Err }

// MySQL server error numbers that deserve a hint in the error text.
const (
	errAccessDenied    = 1045 // wrong user, password or certificate
	errDBAccessDenied  = 1044
	errSpecificAccess  = 1227 // missing RELOAD privilege
	errLockWaitTimeout = 1205
)

// dbLock is one held FLUSH TABLES WITH READ LOCK. The lock belongs to the
// session of conn; db exists only for conn and is closed with it, so no
// pool can ever hand the locked session to someone else.
type dbLock struct {
	name      string
	connector driver.Connector
	db        *sql.DB
	conn      *sql.Conn
	connID    int64
	log       *slog.Logger
}

// dbOptions are the timeouts that apply to every database.
type dbOptions struct {
	connectTimeout time.Duration
	lockTimeout    time.Duration
}

// lockDatabase connects to d and takes FLUSH TABLES WITH READ LOCK on a
// dedicated connection. It returns the held lock, or nil and an outcome of
// DBDown (err nil unless d.Required) or DBFailed (err set).
func lockDatabase(ctx context.Context, vm string, d Database, opts dbOptions, log *slog.Logger) (*dbLock, DBOutcome, error) {
	out := DBOutcome{Name: d.Name, Status: DBFailed}
	fail := func(status DBStatus, err error) (*dbLock, DBOutcome, error) {
		out.Status = status
		out.Detail = err.Error()
		return nil, out, &DatabaseError{VM: vm, Name: d.Name, Addr: out.Addr, User: out.User, Status: status, Err: err}
	}

	cfg, err := mysql.ParseDSN(d.DSN)
	if err != nil {
		// ParseDSN errors do not quote the DSN, so the password stays out.
		return fail(DBFailed, fmt.Errorf("parse DSN: %w", err))
	}
	out.Addr, out.User = cfg.Addr, cfg.User
	if d.Password != "" {
		cfg.Passwd = d.Password
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = opts.connectTimeout
	}
	// The driver's default logger writes to stderr on its own; route its
	// messages (like "unexpected EOF" after we end a session) to our log.
	cfg.Logger = driverLogger{log}
	tlsConfig, err := d.tlsConfig()
	if err != nil {
		return fail(DBFailed, err)
	}
	if tlsConfig != nil {
		// A tls.Config in the Config, not mysql.RegisterTLSConfig: the
		// registry is process-global and names could collide.
		cfg.TLS = tlsConfig
	}
	connector, err := mysql.NewConnector(cfg)
	if err != nil {
		return fail(DBFailed, fmt.Errorf("configure driver: %w", err))
	}
	db := sql.OpenDB(connector)
	// One connection, never kept idle: when the held Conn is closed the
	// session ends instead of waiting in a pool with its lock.
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(0)

	cctx, cancel := context.WithTimeout(ctx, opts.connectTimeout)
	conn, err := db.Conn(cctx)
	if err == nil {
		err = conn.PingContext(cctx)
	}
	cancel()
	if err != nil {
		if conn != nil {
			discard(conn)
		}
		db.Close()
		if isDown(err) {
			if d.Required {
				return fail(DBDown, fmt.Errorf("cannot reach server: %w", err))
			}
			out.Status = DBDown
			out.Detail = err.Error()
			log.Warn("database is down; backing up without locking it",
				"database", d.Name, "addr", out.Addr, "err", err)
			return nil, out, nil
		}
		return fail(DBFailed, explain(err, opts.lockTimeout))
	}

	l := &dbLock{name: d.Name, connector: connector, db: db, conn: conn, log: log}
	if err := l.lock(ctx, opts.lockTimeout); err != nil {
		l.close()
		return fail(DBFailed, explain(err, opts.lockTimeout))
	}
	out.Status = DBLocked
	return l, out, nil
}

// lock runs FLUSH TABLES WITH READ LOCK, bounded by lockTimeout on the
// server (lock_wait_timeout) and by a context deadline just after it.
func (l *dbLock) lock(ctx context.Context, lockTimeout time.Duration) error {
	if err := l.conn.QueryRowContext(ctx, "SELECT CONNECTION_ID()").Scan(&l.connID); err != nil {
		return fmt.Errorf("read connection id: %w", err)
	}
	// FTWRL waits for running statements to release their tables and, while
	// waiting, already blocks writers. lock_wait_timeout makes the server
	// give up on its own; long user queries are never killed.
	secs := max(1, int64(math.Ceil(lockTimeout.Seconds())))
	if _, err := l.conn.ExecContext(ctx, fmt.Sprintf("SET SESSION lock_wait_timeout = %d", secs)); err != nil {
		return fmt.Errorf("set lock_wait_timeout: %w", err)
	}
	lctx, cancel := context.WithTimeout(ctx, time.Duration(secs)*time.Second+5*time.Second)
	defer cancel()
	start := time.Now()
	if _, err := l.conn.ExecContext(lctx, "FLUSH TABLES WITH READ LOCK"); err != nil {
		if lctx.Err() != nil {
			// The driver dropped the socket, but the server keeps waiting
			// (with the global read lock) until it notices; end our own
			// statement explicitly.
			l.killOwn(ctx)
		}
		return fmt.Errorf("FLUSH TABLES WITH READ LOCK: %w", err)
	}
	l.log.Info("database locked", "database", l.name, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// release runs UNLOCK TABLES on the locking connection and then closes that
// connection in every case. unlockSQL is "UNLOCK TABLES" except in tests
// that force the unlock to fail.
func (l *dbLock) release(ctx context.Context, unlockSQL string) error {
	_, uerr := l.conn.ExecContext(ctx, unlockSQL)
	if uerr != nil {
		// The session may still hold the lock. Closing the connection ends
		// it, and the server releases everything a session held when it
		// ends; if the connection is broken the server may not notice soon,
		// so also kill our own session through a fresh connection.
		l.close()
		l.killOwn(ctx)
		return fmt.Errorf("database %s: UNLOCK TABLES: %w (connection closed to release the lock)", l.name, uerr)
	}
	if err := l.close(); err != nil {
		return fmt.Errorf("database %s: %w", l.name, err)
	}
	return nil
}

// close discards the physical connection and closes the private pool.
func (l *dbLock) close() error {
	discard(l.conn)
	if err := l.db.Close(); err != nil {
		return fmt.Errorf("close connection: %w", err)
	}
	return nil
}

// killOwn ends the locking session through a new connection. Any account
// may kill its own sessions; this never touches other users' queries.
func (l *dbLock) killOwn(ctx context.Context) {
	if l.connID == 0 {
		return
	}
	kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	conn, err := l.connector.Connect(kctx)
	if err != nil {
		l.log.Warn("cannot connect to end locking session", "database", l.name, "err", err)
		return
	}
	defer conn.Close()
	execer, ok := conn.(driver.ExecerContext)
	if !ok {
		return
	}
	_, err = execer.ExecContext(kctx, fmt.Sprintf("KILL CONNECTION %d", l.connID), nil)
	var me *mysql.MySQLError
	if err != nil && !(errors.As(err, &me) && me.Number == 1094) { // 1094: unknown thread, already gone
		l.log.Warn("cannot end locking session", "database", l.name, "connection_id", l.connID, "err", err)
	}
}

// discard closes conn's physical connection instead of returning it to the
// pool: returning driver.ErrBadConn from Raw makes database/sql close it.
func discard(conn *sql.Conn) {
	_ = conn.Raw(func(any) error { return driver.ErrBadConn })
	_ = conn.Close()
}

// tlsConfig builds the TLS settings from the certificate paths, or nil.
func (d Database) tlsConfig() (*tls.Config, error) {
	if d.TLSCA == "" && d.TLSCert == "" && d.TLSKey == "" {
		return nil, nil
	}
	if (d.TLSCert == "") != (d.TLSKey == "") {
		return nil, errors.New("TLS client certificate and key must be given together")
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if d.TLSCA != "" {
		pem, err := os.ReadFile(d.TLSCA)
		if err != nil {
			return nil, fmt.Errorf("read TLS CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("TLS CA %s: no PEM certificates", d.TLSCA)
		}
		c.RootCAs = pool
	}
	if d.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(d.TLSCert, d.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("load TLS client certificate: %w", err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// isDown reports whether err means the server is not there (nothing
// listening, host unreachable, dial timeout), as opposed to a server that
// answered and refused us.
func isDown(err error) bool {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return true
	}
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) ||
		errors.Is(err, syscall.ENETUNREACH)
}

// explain adds the likely cause to well-known server errors.
func explain(err error, lockTimeout time.Duration) error {
	var me *mysql.MySQLError
	if !errors.As(err, &me) {
		return err
	}
	switch me.Number {
	case errAccessDenied:
		return fmt.Errorf("authentication failed (check the user, password file or client certificate): %w", err)
	case errDBAccessDenied, errSpecificAccess:
		return fmt.Errorf("permission denied (the account needs GRANT RELOAD, LOCK TABLES ON *.*): %w", err)
	case errLockWaitTimeout:
		return fmt.Errorf("lock not acquired within %v, probably behind a long-running statement, which was left running: %w", lockTimeout, err)
	}
	return err
}

// driverLogger adapts slog to the mysql driver's Logger interface.
type driverLogger struct{ log *slog.Logger }

// Print implements mysql.Logger.
func (l driverLogger) Print(v ...any) {
	l.log.Debug("mysql driver: " + fmt.Sprint(v...))
}
