package lvmguest

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRunBootsGuest boots a real guest and checks the pieces callers rely on:
// disks by serial, LVM and device-mapper present, environment and files
// passed in, the exit code and the result directory passed back.
func TestRunBootsGuest(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a qemu guest (≈10 s); skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	work := t.TempDir()
	script := `
set -e
echo "serials: $(ls /dev/disk/by-serial | tr '\n' ' ')"
test -b /dev/disk/by-serial/data1
echo "lvm: $(lvm version | head -1)"
test -c /dev/mapper/control && echo "dm: ok"
grep -q dm_snapshot /proc/modules && echo "dm-snapshot: loaded"
echo "greeting: $GREETING $(cat /etc/hello.txt)"
echo "size: $(blockdev --getsize64 /dev/disk/by-serial/data1)"
echo result-data > $VMVAULT_RESULT/out.txt
mkdir -p $VMVAULT_RESULT/sub && echo nested > $VMVAULT_RESULT/sub/n.txt
exit 3
`
	res, err := Run(ctx, Spec{
		Script:          script,
		Files:           map[string][]byte{"/etc/hello.txt": []byte("from-file")},
		Env:             map[string]string{"GREETING": "it's here"},
		Disks:           []Disk{{Serial: "data1", SizeBytes: 16 << 20}},
		ResultSizeBytes: 8 << 20,
		WorkDir:         work,
		Timeout:         3 * time.Minute,
		Console:         LineWriter(func(l string) { t.Log("guest: " + l) }),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("boot to script %v, whole run %v, PVH %v", res.Boot.Round(time.Millisecond), res.Elapsed.Round(time.Millisecond), res.PVH)
	if res.ExitCode != 3 {
		t.Errorf("exit code %d, want 3; output:\n%s", res.ExitCode, res.Output)
	}
	for _, want := range []string{"serials: data1 vmvault-result", "lvm:   LVM version", "dm: ok", "dm-snapshot: loaded", "greeting: it's here from-file", "size: 16777216"} {
		if !strings.Contains(res.Output, want) {
			t.Errorf("output lacks %q:\n%s", want, res.Output)
		}
	}
	for name, want := range map[string]string{"out.txt": "result-data\n", "sub/n.txt": "nested\n"} {
		got, err := os.ReadFile(filepath.Join(res.ResultDir, name))
		if err != nil || string(got) != want {
			t.Errorf("result %s = %q, %v; want %q", name, got, err, want)
		}
	}
}

// TestRunHostForward checks that the guest reaches a listener on the host's
// loopback through HostForwardArgs (how an SFTP test reaches sshd).
func TestRunHostForward(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a qemu guest (≈10 s); skipped with -short")
	}
	if _, err := exec.LookPath("socat"); err != nil {
		t.Fatal("socat not found: install socat")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- err.Error()
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		got <- string(b)
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	res, err := Run(ctx, Spec{
		Script:   fmt.Sprintf("echo hello-from-guest | nc -w 5 %s %d && echo sent", GuestHostIP, port),
		QemuArgs: HostForwardArgs(port),
		WorkDir:  t.TempDir(),
		Timeout:  3 * time.Minute,
		Console:  LineWriter(func(l string) { t.Log("guest: " + l) }),
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 || !strings.Contains(res.Output, "sent") {
		t.Fatalf("guest script failed (%d):\n%s", res.ExitCode, res.Output)
	}
	select {
	case s := <-got:
		if s != "hello-from-guest\n" {
			t.Errorf("host received %q", s)
		}
	case <-time.After(10 * time.Second):
		t.Error("host received nothing")
	}
}
