// Package testminio starts a real MinIO server on 127.0.0.1 for tests.
//
// Each server gets a free port, its own temporary data directory, a root
// user with a random password, the console on loopback too, and
// MINIO_CI_CD=1 (without it, drives on the root disk are refused and every
// call answers XMinioServerNotInitialized). It is ready when
// /minio/health/cluster answers 200 (/minio/health/ready answers before the
// object layer is up). It is stopped by its PID with t.Cleanup; no other
// process is signalled.
//
// The minio and mc binaries are not in Debian: scripts/deps.sh builds them
// with `go install` into a cache directory outside the checkout
// (ToolsDir), in the background, and this package waits for them (up to
// WaitForBinary) so that other test packages run meanwhile.
package testminio

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// WaitForBinary bounds the wait for a binary that scripts/deps.sh is
// still building (the minio build takes about 7 CPU-minutes).
const WaitForBinary = 25 * time.Minute

// ToolsDir is where scripts/deps.sh installs minio and mc:
// $VMVAULT_TOOLS_BIN, else ${XDG_CACHE_HOME:-$HOME/.cache}/vmvault-tools/bin.
func ToolsDir() string {
	if d := os.Getenv("VMVAULT_TOOLS_BIN"); d != "" {
		return d
	}
	cache := os.Getenv("XDG_CACHE_HOME")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache")
	}
	return filepath.Join(cache, "vmvault-tools", "bin")
}

// Binary returns the path of a tool (minio or mc), waiting while
// scripts/deps.sh builds it. It fails the test with the fix when the
// binary does not appear.
func Binary(t testing.TB, name string) string {
	t.Helper()
	p := filepath.Join(ToolsDir(), name)
	deadline := time.Now().Add(WaitForBinary)
	logged := false
	for {
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p
		}
		building := buildRunning(name)
		if !building || time.Now().After(deadline) {
			t.Fatalf("%s not found at %s: run `bash scripts/deps.sh` (it builds minio and mc with go install; log in %s)",
				name, p, filepath.Join(ToolsDir(), "..", "build.log"))
		}
		if !logged {
			t.Logf("waiting for %s: scripts/deps.sh is still building it", name)
			logged = true
		}
		time.Sleep(2 * time.Second)
	}
}

// buildRunning reports whether scripts/deps.sh has marked a build of name
// as in progress (a marker file holding the building shell's PID).
func buildRunning(name string) bool {
	b, err := os.ReadFile(filepath.Join(ToolsDir(), "..", name+".building"))
	if err != nil {
		return false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return false
	}
	return syscall.Kill(pid, 0) == nil
}

// Server is a running MinIO.
type Server struct {
	// Endpoint is "127.0.0.1:port".
	Endpoint string
	// RootUser and RootPassword are the administrator's credentials.
	RootUser, RootPassword string
	// Dir is the data directory.
	Dir string
	// CAFile is the PEM certificate of the CA that signed the server's
	// certificate (TLS only).
	CAFile string

	t       testing.TB
	scheme  string
	client  *http.Client
	certDir string
	cmd     *exec.Cmd
	logFile string
	mcDir   string
	mu      sync.Mutex
}

// Options adjusts the server.
type Options struct {
	// Drives is the number of drives (directories); 0 or 1 means one.
	Drives int
	// TLS serves https with a certificate for 127.0.0.1 signed by a CA
	// made for this server (Server.CAFile).
	TLS bool
}

// freePort asks the kernel for an unused loopback port.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Start runs a MinIO server and stops it when the test ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	bin := Binary(t, "minio")
	dir := t.TempDir()
	pw := make([]byte, 16)
	rand.Read(pw)
	s := &Server{RootUser: "vmvaultadmin", RootPassword: hex.EncodeToString(pw), Dir: filepath.Join(dir, "data"),
		t: t, logFile: filepath.Join(dir, "minio.log"), mcDir: filepath.Join(dir, "mc"), scheme: "http", client: http.DefaultClient}
	if opts.TLS {
		s.makeCerts(t, filepath.Join(dir, "certs"))
	}
	drives := s.Dir
	if opts.Drives > 1 {
		drives = fmt.Sprintf("%s/d{1...%d}", s.Dir, opts.Drives)
		for i := 1; i <= opts.Drives; i++ {
			os.MkdirAll(filepath.Join(s.Dir, fmt.Sprintf("d%d", i)), 0o700)
		}
	}
	// A port can be taken between freePort and MinIO's bind: try again.
	for attempt := 0; ; attempt++ {
		s.Endpoint = fmt.Sprintf("127.0.0.1:%d", freePort(t))
		err := s.start(bin, drives, fmt.Sprintf("127.0.0.1:%d", freePort(t)))
		if err == nil {
			break
		}
		if attempt == 2 {
			t.Fatalf("minio did not start: %v\n%s", err, s.Log())
		}
	}
	t.Cleanup(s.Stop)
	return s
}

func (s *Server) start(bin, drives, console string) error {
	logf, err := os.OpenFile(s.logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	args := []string{"server", "--quiet", "--address", s.Endpoint, "--console-address", console}
	if s.certDir != "" {
		args = append(args, "--certs-dir", s.certDir)
	}
	cmd := exec.Command(bin, append(args, drives)...)
	cmd.Env = append(os.Environ(), "MINIO_ROOT_USER="+s.RootUser, "MINIO_ROOT_PASSWORD="+s.RootPassword,
		"MINIO_BROWSER=off", "MINIO_UPDATE=off", "MINIO_CI_CD=1")
	cmd.Stdout, cmd.Stderr = logf, logf
	// Should the test binary die without its cleanup (a panic, a
	// timeout), the server dies with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			return fmt.Errorf("minio exited: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
		resp, err := s.client.Get(s.scheme + "://" + s.Endpoint + "/minio/health/cluster")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				s.mu.Lock()
				s.cmd = cmd
				s.mu.Unlock()
				go func() { <-exited }()
				return nil
			}
		}
	}
	cmd.Process.Kill()
	<-exited
	return fmt.Errorf("minio not healthy on %s after 60 s", s.Endpoint)
}

// Stop terminates the server (SIGTERM, then SIGKILL after 10 s). It is
// safe to call more than once.
func (s *Server) Stop() {
	s.mu.Lock()
	cmd := s.cmd
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	for range 100 {
		if cmd.Process.Signal(syscall.Signal(0)) != nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	cmd.Process.Kill()
}

// Log returns the server's output so far.
func (s *Server) Log() string {
	b, _ := os.ReadFile(s.logFile)
	return string(b)
}

// URL is the repository URL of bucket/prefix on this server.
func (s *Server) URL(bucketAndPrefix string) string {
	return "s3:" + s.scheme + "://" + s.Endpoint + "/" + bucketAndPrefix
}

// MC runs the mc client against this server as the root user (alias
// "t") and returns its combined output; it fails the test on error.
func (s *Server) MC(t testing.TB, args ...string) string {
	t.Helper()
	out, err := s.TryMC(t, args...)
	if err != nil {
		t.Fatalf("mc %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// TryMC is MC that returns the error instead of failing.
func (s *Server) TryMC(t testing.TB, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(Binary(t, "mc"), append([]string{"--config-dir", s.mcDir, "--no-color"}, args...)...)
	cmd.Env = append(os.Environ(), fmt.Sprintf("MC_HOST_t=%s://%s:%s@%s", s.scheme, s.RootUser, s.RootPassword, s.Endpoint))
	if s.certDir != "" {
		cmd.Args = append(cmd.Args[:1], append([]string{"--insecure"}, cmd.Args[1:]...)...)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// makeCerts writes a CA and a certificate for 127.0.0.1 it signed, the
// way MinIO's --certs-dir wants them (public.crt, private.key).
func (s *Server) makeCerts(t testing.TB, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "vmvault test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	s.CAFile = filepath.Join(dir, "ca.pem")
	write := func(name, typ string, b []byte) {
		if err := os.WriteFile(name, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(s.CAFile, "CERTIFICATE", caDER)
	write(filepath.Join(dir, "public.crt"), "CERTIFICATE", der)
	write(filepath.Join(dir, "private.key"), "PRIVATE KEY", keyDER)
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	s.scheme, s.certDir = "https", dir
	s.client = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}
