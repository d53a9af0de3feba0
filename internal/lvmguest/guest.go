// Package lvmguest boots the installed Debian kernel under qemu (TCG) with a
// hand-made initramfs that holds busybox, LVM and the caller's programs, runs
// a shell script in it against real virtio disks, and returns what the script
// printed. It exists because the host kernel has no device-mapper, so LVM
// snapshots can only be tested for real inside a guest.
package lvmguest

import (
	"archive/tar"
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

//go:embed guestfs/init
var initScript []byte

//go:embed guestfs/lvm.conf
var lvmConf []byte

// ResultSerial is the serial of the disk the guest writes its /result
// directory to (as a tar) when Spec.ResultSizeBytes is set.
const ResultSerial = "vmvault-result"

// Console markers printed by the guest's init around the script.
const (
	startMarker = "VMVAULT-GUEST-START"
	exitMarker  = "VMVAULT-GUEST-EXIT="
)

// Disk is one virtio disk of the guest. The guest finds it as
// /dev/disk/by-serial/<Serial>.
type Disk struct {
	// Serial names the disk in the guest (at most 20 bytes).
	Serial string
	// Path is an existing raw image to attach. If empty, a sparse file of
	// SizeBytes is created in the work directory.
	Path string
	// SizeBytes is the size of a new disk when Path is empty.
	SizeBytes int64
}

// Spec describes one guest run.
type Spec struct {
	// Script is run by /bin/sh (busybox ash) in the guest, in /tmp, with
	// PATH set, LVM_SUPPRESS_FD_WARNINGS=1 and VMVAULT_RESULT=/result.
	Script string
	// Binaries maps guest paths to host files copied into the guest as
	// executables. They must be static (e.g. CGO_ENABLED=0 Go binaries).
	Binaries map[string]string
	// Files maps guest paths to file contents (configuration, keys).
	Files map[string][]byte
	// Env is exported to the script.
	Env map[string]string
	// HostTools names additional dynamically linked host programs (e.g.
	// "mkfs.xfs") copied into the guest's /usr/sbin with their libraries.
	HostTools []string
	// Modules names additional kernel modules (e.g. "xfs", "loop") loaded
	// at boot with their dependencies.
	Modules []string
	// Disks are attached in order (/dev/vda, /dev/vdb, …).
	Disks []Disk
	// ResultSizeBytes, if positive, attaches a result disk of that size;
	// files the script leaves in /result are copied to Result.ResultDir.
	ResultSizeBytes int64
	// Timeout bounds the whole qemu run (default 5 minutes).
	Timeout time.Duration
	// MemoryMiB is the guest memory (default 1024).
	MemoryMiB int
	// WorkDir holds the run's initramfs, new disks and results. If empty,
	// a temporary directory is made; the caller removes it.
	WorkDir string
	// CacheDir holds the cached kernel and base initramfs (default
	// os.UserCacheDir()/vmvault/lvmguest).
	CacheDir string
	// QemuArgs are appended to the qemu command line (e.g. -netdev user,…
	// and -device virtio-net-pci,… for a test that talks to the host).
	QemuArgs []string
	// KernelArgs are appended to the kernel command line.
	KernelArgs []string
	// Console, if set, receives the raw serial console as it arrives.
	Console io.Writer
}

// Result is the outcome of a guest run.
type Result struct {
	// Console is everything the guest printed on its serial console.
	Console string
	// Output is the script's part of the console, with carriage returns
	// removed.
	Output string
	// ExitCode is the script's exit status.
	ExitCode int
	// ResultDir holds the files the script left in /result (empty unless
	// Spec.ResultSizeBytes was set).
	ResultDir string
	// WorkDir is the directory the run used.
	WorkDir string
	// Boot is the time from starting qemu to the script's start, Elapsed
	// the whole run.
	Boot, Elapsed time.Duration
	// PVH reports whether the uncompressed kernel was booted directly.
	PVH bool
}

var serialRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,20}$`)

// Run boots the guest, runs spec.Script and powers off. The error is non-nil
// when the guest could not be prepared or did not report an exit code (timeout,
// kernel panic); a script that fails is reported through Result.ExitCode.
func Run(ctx context.Context, spec Spec) (res *Result, err error) {
	start := time.Now()
	if spec.Timeout <= 0 {
		spec.Timeout = 5 * time.Minute
	}
	if spec.MemoryMiB <= 0 {
		spec.MemoryMiB = 1024
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil, fmt.Errorf("qemu-system-x86_64 not found (install qemu-system-x86): %w", err)
	}
	timeoutBin, err := exec.LookPath("timeout")
	if err != nil {
		return nil, fmt.Errorf("timeout not found (install coreutils): %w", err)
	}
	cacheDir := spec.CacheDir
	if cacheDir == "" {
		uc, err := os.UserCacheDir()
		if err != nil {
			return nil, fmt.Errorf("no cache directory, set Spec.CacheDir: %w", err)
		}
		cacheDir = filepath.Join(uc, "vmvault", "lvmguest")
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("cache dir: %w", err)
	}
	work := spec.WorkDir
	if work == "" {
		if work, err = os.MkdirTemp("", "lvmguest-"); err != nil {
			return nil, err
		}
		defer func() {
			if res == nil {
				os.RemoveAll(work) // nothing to inspect: the guest never ran
			}
		}()
	}
	res = &Result{WorkDir: work}

	vmlinuz, kver, err := findKernel()
	if err != nil {
		return nil, err
	}
	kernel, pvh := bootableKernel(ctx, cacheDir, vmlinuz)
	res.PVH = pvh
	layout, err := planBase(ctx, kver, spec.HostTools, spec.Modules)
	if err != nil {
		return nil, err
	}
	base, err := buildBase(ctx, cacheDir, layout)
	if err != nil {
		return nil, fmt.Errorf("build initramfs: %w", err)
	}

	disks := append([]Disk(nil), spec.Disks...)
	if spec.ResultSizeBytes > 0 {
		disks = append(disks, Disk{Serial: ResultSerial, SizeBytes: spec.ResultSizeBytes})
	}
	args := []string{
		"--kill-after=10s", strconv.Itoa(int(spec.Timeout.Seconds() + 0.999)), qemu,
		"-accel", "tcg,thread=multi", "-cpu", "max", "-machine", "q35", "-smp", "2",
		"-m", strconv.Itoa(spec.MemoryMiB), "-nodefaults", "-nographic",
		"-serial", "stdio", "-monitor", "none", "-no-reboot",
		"-kernel", kernel,
		"-append", strings.Join(append([]string{"console=ttyS0", "loglevel=3", "panic=-1", "rdinit=/init", "mitigations=off", "cryptomgr.notests"}, spec.KernelArgs...), " "),
	}
	for i, d := range disks {
		if !serialRE.MatchString(d.Serial) {
			return nil, fmt.Errorf("disk %d: serial %q must be 1–20 characters of [A-Za-z0-9._-]", i, d.Serial)
		}
		p := d.Path
		if p == "" {
			if d.SizeBytes <= 0 {
				return nil, fmt.Errorf("disk %s: neither Path nor SizeBytes", d.Serial)
			}
			p = filepath.Join(work, "disk-"+d.Serial+".raw")
			if err := createSparse(p, d.SizeBytes); err != nil {
				return nil, err
			}
		}
		args = append(args,
			"-drive", fmt.Sprintf("file=%s,format=raw,if=none,id=d%d,cache=unsafe", qemuEscape(p), i),
			"-device", fmt.Sprintf("virtio-blk-pci,drive=d%d,serial=%s", i, d.Serial))
	}

	initrd := filepath.Join(work, "initramfs.cpio")
	if err := assembleInitrd(initrd, base, &spec, len(disks)); err != nil {
		return nil, fmt.Errorf("initramfs: %w", err)
	}
	args = append(args, "-initrd", initrd)
	args = append(args, spec.QemuArgs...)

	var console bytes.Buffer
	var out io.Writer = &console
	bootSeen := &markerWatch{marker: []byte(startMarker), start: start}
	out = io.MultiWriter(out, bootSeen)
	if spec.Console != nil {
		out = io.MultiWriter(out, spec.Console)
	}
	cmd := exec.CommandContext(ctx, timeoutBin, args...)
	cmd.Stdout = out
	cmd.Stderr = out
	// timeout forwards SIGTERM to qemu, so cancellation stops the guest
	// instead of orphaning it.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 15 * time.Second
	runErr := cmd.Run()
	res.Elapsed = time.Since(start)
	res.Boot = bootSeen.at
	res.Console = console.String()
	res.Output = scriptOutput(res.Console)
	code, ok := exitCode(res.Console)
	if !ok {
		tail := res.Console
		if len(tail) > 4000 {
			tail = tail[len(tail)-4000:]
		}
		if runErr == nil {
			runErr = errors.New("guest powered off")
		}
		return res, fmt.Errorf("guest did not report an exit code after %v (%v); console tail:\n%s", res.Elapsed.Round(time.Millisecond), runErr, tail)
	}
	res.ExitCode = code
	if spec.ResultSizeBytes > 0 {
		res.ResultDir = filepath.Join(work, "result")
		if err := untarDisk(filepath.Join(work, "disk-"+ResultSerial+".raw"), res.ResultDir); err != nil {
			return res, fmt.Errorf("read result disk: %w", err)
		}
	}
	return res, nil
}

// qemuEscape doubles commas, qemu's escape inside option values.
func qemuEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func createSparse(p string, size int64) error {
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// assembleInitrd concatenates the cached base archive and the per-run
// archive; the kernel unpacks both.
func assembleInitrd(dst, base string, spec *Spec, ndisks int) error {
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer out.Close()
	in, err := os.Open(base)
	if err != nil {
		return err
	}
	defer in.Close()
	if _, err := io.Copy(out, in); err != nil {
		return err
	}
	if err := writeRunArchive(out, spec, ndisks); err != nil {
		return err
	}
	return out.Close()
}

// markerWatch records when a marker first appears in a stream.
type markerWatch struct {
	marker []byte
	start  time.Time
	tail   []byte
	at     time.Duration
}

func (m *markerWatch) Write(p []byte) (int, error) {
	if m.at == 0 {
		m.tail = append(m.tail, p...)
		if bytes.Contains(m.tail, m.marker) {
			m.at = time.Since(m.start)
			m.tail = nil
		} else if len(m.tail) > len(m.marker) {
			m.tail = m.tail[len(m.tail)-len(m.marker):]
		}
	}
	return len(p), nil
}

var exitRE = regexp.MustCompile(exitMarker + `(\d+)`)

func exitCode(console string) (int, bool) {
	m := exitRE.FindAllStringSubmatch(console, -1)
	if m == nil {
		return 0, false
	}
	n, err := strconv.Atoi(m[len(m)-1][1])
	return n, err == nil
}

// scriptOutput cuts the console between the start and exit markers.
func scriptOutput(console string) string {
	s := strings.ReplaceAll(console, "\r", "")
	if i := strings.Index(s, startMarker); i >= 0 {
		s = s[i:]
		if j := strings.IndexByte(s, '\n'); j >= 0 {
			s = s[j+1:]
		}
	}
	if i := strings.LastIndex(s, exitMarker); i >= 0 {
		s = s[:i]
	}
	return s
}

// untarDisk extracts the tar the guest wrote to the start of a raw disk.
func untarDisk(disk, dir string) error {
	f, err := os.Open(disk)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		name := filepath.Clean(h.Name)
		if name == "." {
			continue
		}
		if !filepath.IsLocal(name) {
			return fmt.Errorf("result entry %q escapes the result directory", h.Name)
		}
		p := filepath.Join(dir, name)
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return err
			}
			w, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
			if err != nil {
				return err
			}
			if _, err := io.Copy(w, tr); err != nil {
				w.Close()
				return err
			}
			if err := w.Close(); err != nil {
				return err
			}
		}
	}
}

// GuestHostIP is the address at which HostForwardArgs makes host ports
// reachable from the guest.
const GuestHostIP = "10.0.2.100"

// HostForwardArgs returns qemu arguments for a restricted user-mode network
// in which the guest reaches the host's 127.0.0.1:port as
// GuestHostIP:port, for each port, and nothing else. The guest's init
// configures eth0. It needs socat on the host.
func HostForwardArgs(ports ...int) []string {
	netdev := "user,id=n0,restrict=on"
	for _, p := range ports {
		netdev += fmt.Sprintf(",guestfwd=tcp:%s:%d-cmd:socat STDIO TCP:127.0.0.1:%d", GuestHostIP, p, p)
	}
	return []string{"-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"}
}

// LineWriter returns a writer that calls fn for each complete line written
// to it, without the line end; useful to pass the console to t.Log.
func LineWriter(fn func(line string)) io.Writer {
	return &lineWriter{fn: fn}
}

type lineWriter struct {
	fn  func(string)
	buf []byte
}

func (l *lineWriter) Write(p []byte) (int, error) {
	l.buf = append(l.buf, p...)
	for {
		i := bytes.IndexByte(l.buf, '\n')
		if i < 0 {
			return len(p), nil
		}
		l.fn(strings.TrimRight(string(l.buf[:i]), "\r"))
		l.buf = l.buf[i+1:]
	}
}
