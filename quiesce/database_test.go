package quiesce

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"database/sql"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"vmvault/internal/testmariadb"
)

// mdb is the MariaDB server shared by this package's tests.
var mdb *testmariadb.Server

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "quiesce-mdb-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	mdb, err = testmariadb.Start(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	if err := mdb.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

const backupPassword = "pw-Zq8-never-in-logs"

var setupOnce sync.Once

// setupDB creates the schema and the backup user once per test binary.
func setupDB(t *testing.T) {
	t.Helper()
	var err error
	setupOnce.Do(func() {
		ctx := context.Background()
		err = mdb.Exec(ctx,
			"CREATE DATABASE app",
			"CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(20)) ENGINE=InnoDB",
			"INSERT INTO app.t (v) VALUES ('seed')")
		if err == nil {
			err = mdb.CreateUser(ctx, "backup", backupPassword, "", "RELOAD", "LOCK TABLES")
		}
		if err == nil {
			err = mdb.CreateUser(ctx, "noreload", backupPassword, "", "LOCK TABLES")
		}
	})
	if err != nil {
		t.Fatal(err)
	}
}

func rootDB(t *testing.T) *sql.DB {
	t.Helper()
	db, err := sql.Open("mysql", mdb.RootDSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// insertAsync starts an INSERT from another connection and returns a
// channel that receives its result.
func insertAsync(t *testing.T, db *sql.DB) <-chan error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_, err := db.ExecContext(ctx, "INSERT INTO app.t (v) VALUES ('during')")
		done <- err
	}()
	return done
}

// assertWritable fails unless an INSERT completes within five seconds,
// which it cannot while any FLUSH TABLES WITH READ LOCK is held.
func assertWritable(t *testing.T, db *sql.DB) {
	t.Helper()
	select {
	case err := <-insertAsync(t, db):
		if err != nil {
			t.Fatalf("insert: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("insert still blocked: a read lock leaked")
	}
}

// waitForQuery waits until a statement matching the LIKE pattern runs.
func waitForQuery(t *testing.T, db *sql.DB, like string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		var n int
		if err := db.QueryRow("SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE ?", like).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("statement %q never started", like)
}

func backupDB() Database {
	return Database{Name: "appdb", DSN: mdb.DSN("backup"), Password: backupPassword}
}

func logTo(buf *bytes.Buffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func TestLockBlocksWritersUntilRelease(t *testing.T) {
	setupDB(t)
	root := rootDB(t)
	var logs bytes.Buffer
	q := New(Config{VM: "vm01", Databases: []Database{backupDB()}, Logger: logTo(&logs)})
	ctx := context.Background()
	h, err := q.Hold(ctx)
	if err != nil {
		t.Fatal(err)
	}
	done := insertAsync(t, root)
	select {
	case err := <-done:
		h.Release(ctx)
		t.Fatalf("insert finished while the lock was held (err %v)", err)
	case <-time.After(300 * time.Millisecond):
	}
	rep := h.Release(ctx)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("insert after release: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("insert still blocked after Release")
	}
	if rep.Err != nil {
		t.Errorf("release error: %v", rep.Err)
	}
	if len(rep.Databases) != 1 || rep.Databases[0].Status != DBLocked || rep.Databases[0].Addr != mdb.Addr {
		t.Errorf("outcomes = %+v, want one locked at %s", rep.Databases, mdb.Addr)
	}
	if rep.Held < 300*time.Millisecond {
		t.Errorf("Held = %v, want at least the 300ms we waited", rep.Held)
	}
	if again := h.Release(ctx); again.Held != rep.Held {
		t.Errorf("second Release returned a different report: %v vs %v", again.Held, rep.Held)
	}
	if strings.Contains(logs.String(), backupPassword) {
		t.Errorf("password in logs:\n%s", logs.String())
	}
}

func TestConcurrentReleaseFromSignalPath(t *testing.T) {
	setupDB(t)
	q := New(Config{VM: "vm01", Databases: []Database{backupDB(), backupDB()}})
	h, err := q.Hold(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	reps := make([]Report, 4)
	for i := range reps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A cancelled context, as in a signal handler after Ctrl-C:
			// Release must still unlock.
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			reps[i] = h.Release(ctx)
		}()
	}
	wg.Wait()
	for i, r := range reps {
		if r.Err != nil || r.Held != reps[0].Held {
			t.Errorf("report %d = %+v, want no error and the same Held as report 0", i, r)
		}
	}
	assertWritable(t, rootDB(t))
}

func TestDatabaseDownIsWarningUnlessRequired(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there now: connection refused
	down := Database{Name: "gone", DSN: "backup@tcp(" + addr + ")/", Password: backupPassword}

	var logs bytes.Buffer
	q := New(Config{VM: "vm01", Databases: []Database{down}, Logger: logTo(&logs)})
	h, err := q.Hold(context.Background())
	if err != nil {
		t.Fatalf("down database not required: Hold error %v", err)
	}
	rep := h.Release(context.Background())
	if len(rep.Databases) != 1 || rep.Databases[0].Status != DBDown {
		t.Fatalf("outcomes = %+v, want one down", rep.Databases)
	}
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), addr) {
		t.Errorf("no warning naming %s in logs:\n%s", addr, logs.String())
	}
	if rep.Held != 0 {
		t.Errorf("Held = %v with nothing locked", rep.Held)
	}

	down.Required = true
	_, err = New(Config{VM: "vm01", Databases: []Database{down}}).Hold(context.Background())
	var de *DatabaseError
	if !errors.As(err, &de) || de.Status != DBDown {
		t.Fatalf("required down database: err %v, want *DatabaseError with status down", err)
	}
	for _, want := range []string{"vm01", "gone", addr, "connection refused"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestWrongPasswordIsErrorWithoutPassword(t *testing.T) {
	setupDB(t)
	const wrong = "wrong-Kx7-secret"
	d := backupDB()
	d.Password = wrong
	// A first database that locks fine proves Hold undoes it on failure.
	var logs bytes.Buffer
	q := New(Config{VM: "vm01", Databases: []Database{backupDB(), d}, Logger: logTo(&logs)})
	_, err := q.Hold(context.Background())
	if err == nil {
		t.Fatal("Hold with a wrong password succeeded")
	}
	msg := err.Error()
	for _, want := range []string{"vm01", "appdb", mdb.Addr, "backup", "1045", "Access denied"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not mention %q", msg, want)
		}
	}
	for _, secret := range []string{wrong, backupPassword} {
		if strings.Contains(msg, secret) || strings.Contains(logs.String(), secret) {
			t.Errorf("a password appears in the error or logs: %q\n%s", msg, logs.String())
		}
	}
	assertWritable(t, rootDB(t))
}

func TestMissingReloadPrivilege(t *testing.T) {
	setupDB(t)
	d := backupDB()
	d.DSN = mdb.DSN("noreload")
	_, err := New(Config{VM: "vm01", Databases: []Database{d}}).Hold(context.Background())
	if err == nil || !strings.Contains(err.Error(), "RELOAD") {
		t.Fatalf("err = %v, want a hint about the RELOAD privilege", err)
	}
}

func TestFailedUnlockStillReleasesLock(t *testing.T) {
	setupDB(t)
	root := rootDB(t)
	q := New(Config{VM: "vm01", Databases: []Database{backupDB()}})
	// A real server rejects this statement, leaving the session locked:
	// only closing the connection can release it.
	q.unlockSQL = "UNLOCK TABLEZ"
	h, err := q.Hold(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	rep := h.Release(context.Background())
	if rep.Err == nil || !strings.Contains(rep.Err.Error(), "UNLOCK TABLES") {
		t.Fatalf("release err = %v, want the failed unlock reported", rep.Err)
	}
	assertWritable(t, root)
	var n int
	if err := root.QueryRow("SELECT COUNT(*) FROM information_schema.processlist WHERE user = 'backup'").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Errorf("%d sessions of the backup user remain after Release", n)
	}
}

func TestLockTimeoutLeavesUserQueryAlone(t *testing.T) {
	setupDB(t)
	root := rootDB(t)
	// A long write is in progress; FTWRL must wait for it, time out, and
	// leave it running to completion.
	slow := make(chan error, 1)
	go func() {
		_, err := root.Exec("UPDATE app.t SET v = IF(SLEEP(5) = 0, 'slow', 'x') WHERE id = 1")
		slow <- err
	}()
	waitForQuery(t, root, "UPDATE app.t SET v = IF(SLEEP%")
	start := time.Now()
	h, err := New(Config{VM: "vm01", Databases: []Database{backupDB()}, LockTimeout: time.Second}).Hold(context.Background())
	if err == nil {
		h.Release(context.Background())
	}
	if err == nil || !strings.Contains(err.Error(), "lock not acquired") {
		t.Fatalf("err = %v, want a lock timeout", err)
	}
	if took := time.Since(start); took > 4*time.Second {
		t.Errorf("lock attempt took %v with a 1s timeout", took)
	}
	if err := <-slow; err != nil {
		t.Errorf("the user's long query was disturbed: %v", err)
	}
	assertWritable(t, root)
}

func TestMaxHoldReleasesForgottenHold(t *testing.T) {
	setupDB(t)
	q := New(Config{VM: "vm01", Databases: []Database{backupDB()}, MaxHold: 300 * time.Millisecond})
	h, err := q.Hold(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(600 * time.Millisecond)
	assertWritable(t, rootDB(t))
	if rep := h.Release(context.Background()); !rep.Expired {
		t.Errorf("Expired = false after MaxHold ran out")
	}
}

// TestTLSClientCertificate runs a second server with TLS and an account
// that authenticates with a client certificate instead of a password.
func TestTLSClientCertificate(t *testing.T) {
	dir := t.TempDir()
	pki := writePKI(t, dir)
	srv := testmariadb.New(t, "--ssl-ca="+pki.ca, "--ssl-cert="+pki.serverCert, "--ssl-key="+pki.serverKey)
	ctx := context.Background()
	if err := srv.CreateUser(ctx, "certuser", "", "X509", "RELOAD", "LOCK TABLES"); err != nil {
		t.Fatal(err)
	}
	d := Database{Name: "tlsdb", DSN: srv.DSN("certuser"), TLSCA: pki.ca, TLSCert: pki.clientCert, TLSKey: pki.clientKey}
	h, err := New(Config{VM: "vm01", Databases: []Database{d}}).Hold(ctx)
	if err != nil {
		t.Fatalf("Hold with client certificate: %v", err)
	}
	rep := h.Release(ctx)
	if rep.Err != nil || rep.Databases[0].Status != DBLocked {
		t.Fatalf("report %+v", rep)
	}

	// Same account over TLS but without a client certificate is refused.
	d.TLSCert, d.TLSKey = "", ""
	_, err = New(Config{VM: "vm01", Databases: []Database{d}}).Hold(ctx)
	if err == nil || !strings.Contains(err.Error(), "1045") {
		t.Fatalf("without client certificate: err %v, want access denied", err)
	}
}

type pkiFiles struct{ ca, serverCert, serverKey, clientCert, clientKey string }

// writePKI makes a CA, a server certificate for 127.0.0.1 and a client
// certificate, as PEM files in dir.
func writePKI(t *testing.T, dir string) pkiFiles {
	t.Helper()
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	writeKey := func(name string, k *ecdsa.PrivateKey) string {
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return write(name, "PRIVATE KEY", der)
	}
	now := time.Now()
	caKey := newKey()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "vmvault test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	issue := func(serial int64, cn string, usage x509.ExtKeyUsage, ips []net.IP) ([]byte, *ecdsa.PrivateKey) {
		k := newKey()
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: ips,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return der, k
	}
	srvDER, srvKey := issue(2, "127.0.0.1", x509.ExtKeyUsageServerAuth, []net.IP{net.ParseIP("127.0.0.1")})
	cliDER, cliKey := issue(3, "certuser", x509.ExtKeyUsageClientAuth, nil)
	return pkiFiles{
		ca:         write("ca.pem", "CERTIFICATE", caDER),
		serverCert: write("server.pem", "CERTIFICATE", srvDER),
		serverKey:  writeKey("server-key.pem", srvKey),
		clientCert: write("client.pem", "CERTIFICATE", cliDER),
		clientKey:  writeKey("client-key.pem", cliKey),
	}
}
