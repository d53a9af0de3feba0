package lvmguest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// baseTools are the host programs every guest gets, with their libraries:
// LVM itself, dmsetup to inspect device-mapper state, mke2fs to make test file
// systems and blkid because the snapshot package detects file system types
// with it.
var baseTools = []string{"lvm", "dmsetup", "mke2fs", "blkid"}

// lvmCommands are the names LVM dispatches on when run through a symlink.
var lvmCommands = []string{
	"lvcreate", "lvremove", "lvs", "lvchange", "lvextend", "lvrename", "lvdisplay", "lvscan",
	"pvcreate", "pvremove", "pvs", "pvscan", "vgcreate", "vgremove", "vgs", "vgchange", "vgscan",
	"vgdisplay", "lvmconfig",
}

// pdataCommands are the names thin-provisioning-tools' multi-call binary
// pdata_tools dispatches on; a guest with the HostTool "pdata_tools" gets
// them as symlinks (thin LVM: lvm runs thin_check on every pool
// activation, vmvault runs thin_delta).
var pdataCommands = []string{"thin_check", "thin_delta", "thin_dump", "thin_ls", "thin_repair", "thin_restore"}

// baseModules are loaded in the guest in dependency order.
var baseModules = []string{"virtio_pci", "virtio_blk", "virtio_net", "dm-snapshot", "ext4"}

// hostFile is one file copied from the host into the guest.
type hostFile struct {
	guest string // absolute path in the guest
	host  string // path on the host
}

// baseLayout lists what goes into the cached part of the initramfs.
type baseLayout struct {
	kver     string
	files    []hostFile
	symlinks map[string]string // guest path -> target
	modules  []string          // module paths in load order
	extra    map[string][]byte // generated files
}

// resolveTool finds a host program by name in PATH and the sbin directories.
func resolveTool(name string) (string, error) {
	if strings.Contains(name, "/") {
		if _, err := os.Stat(name); err != nil {
			return "", err
		}
		return name, nil
	}
	for _, dir := range append(filepath.SplitList(os.Getenv("PATH")), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin") {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in PATH or sbin directories", name)
}

// sharedLibs returns the libraries and loader ldd lists for a program; nil for
// a static program.
func sharedLibs(ctx context.Context, prog string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "ldd", prog).CombinedOutput()
	if err != nil {
		if bytes.Contains(out, []byte("not a dynamic executable")) || bytes.Contains(out, []byte("statically linked")) {
			return nil, nil
		}
		return nil, fmt.Errorf("ldd %s: %w: %s", prog, err, bytes.TrimSpace(out))
	}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0])
		case len(f) >= 3 && f[1] == "=>" && f[2] == "not":
			return nil, fmt.Errorf("ldd %s: library %s not found", prog, f[0])
		}
	}
	return libs, nil
}

// moduleOrder lists the module files modprobe would insert for names, in
// order, without duplicates. Built-in modules are skipped.
func moduleOrder(ctx context.Context, kver string, names []string) ([]string, error) {
	seen := map[string]bool{}
	var order []string
	for _, n := range names {
		out, err := exec.CommandContext(ctx, "modprobe", "-S", kver, "--show-depends", n).CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("modprobe -S %s --show-depends %s: %w: %s", kver, n, err, bytes.TrimSpace(out))
		}
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) >= 2 && f[0] == "insmod" && !seen[f[1]] {
				seen[f[1]] = true
				order = append(order, f[1])
			}
		}
	}
	return order, nil
}

// planBase decides the content of the cached base archive.
func planBase(ctx context.Context, kver string, tools, modules []string) (*baseLayout, error) {
	l := &baseLayout{kver: kver, symlinks: map[string]string{}, extra: map[string][]byte{}}
	bb, err := resolveTool("busybox")
	if err != nil {
		return nil, fmt.Errorf("busybox (install busybox-static): %w", err)
	}
	if libs, err := sharedLibs(ctx, bb); err != nil || libs != nil {
		return nil, fmt.Errorf("%s is not static (install busybox-static)", bb)
	}
	l.files = append(l.files, hostFile{guest: "/bin/busybox", host: bb})
	list, err := exec.CommandContext(ctx, bb, "--list-full").Output()
	if err != nil {
		return nil, fmt.Errorf("busybox --list-full: %w", err)
	}
	for _, a := range strings.Fields(string(list)) {
		if a != "bin/busybox" {
			l.symlinks["/"+a] = "/bin/busybox"
		}
	}
	libSeen := map[string]bool{}
	for _, t := range append(append([]string{}, baseTools...), tools...) {
		p, err := resolveTool(t)
		if err != nil {
			return nil, fmt.Errorf("guest tool: %w (install lvm2 e2fsprogs util-linux)", err)
		}
		guest := "/usr/sbin/" + filepath.Base(p)
		l.files = append(l.files, hostFile{guest: guest, host: p})
		delete(l.symlinks, guest)
		if filepath.Base(p) == "pdata_tools" {
			for _, c := range pdataCommands {
				l.symlinks["/usr/sbin/"+c] = "pdata_tools"
			}
		}
		libs, err := sharedLibs(ctx, p)
		if err != nil {
			return nil, err
		}
		for _, lib := range libs {
			if !libSeen[lib] {
				libSeen[lib] = true
				l.files = append(l.files, hostFile{guest: lib, host: lib})
			}
		}
	}
	for _, c := range lvmCommands {
		l.symlinks["/usr/sbin/"+c] = "lvm"
	}
	for _, c := range []string{"mkfs.ext4", "mkfs.ext2", "mke2fs"} {
		l.symlinks["/sbin/"+c] = "/usr/sbin/mke2fs"
	}
	delete(l.symlinks, "/usr/sbin/mke2fs")
	if _, err := os.Stat("/etc/mke2fs.conf"); err == nil {
		l.files = append(l.files, hostFile{guest: "/etc/mke2fs.conf", host: "/etc/mke2fs.conf"})
	}
	mods, err := moduleOrder(ctx, kver, append(append([]string{}, baseModules...), modules...))
	if err != nil {
		return nil, fmt.Errorf("kernel modules (install linux-image-amd64 and kmod): %w", err)
	}
	l.modules = mods
	for _, m := range mods {
		l.files = append(l.files, hostFile{guest: m, host: m})
	}
	l.extra["/vmvault/modules"] = []byte(strings.Join(mods, "\n") + "\n")
	return l, nil
}

// key is a digest of everything the base archive is made of, so a change of
// any host file, the kernel or the harness rebuilds it.
func (l *baseLayout) key() (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "lvmguest base v1\nkver %s\n", l.kver)
	for _, f := range l.files {
		st, err := os.Stat(f.host)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "file %s %s %d %d\n", f.guest, f.host, st.Size(), st.ModTime().UnixNano())
	}
	for _, k := range sortedKeys(l.symlinks) {
		fmt.Fprintf(h, "link %s %s\n", k, l.symlinks[k])
	}
	for _, k := range sortedKeys(l.extra) {
		fmt.Fprintf(h, "extra %s %x\n", k, sha256.Sum256(l.extra[k]))
	}
	fmt.Fprintf(h, "init %x\nlvmconf %x\n", sha256.Sum256(initScript), sha256.Sum256(lvmConf))
	return hex.EncodeToString(h.Sum(nil))[:24], nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// buildBase returns the path of the cached base archive, building it if
// needed. Concurrent builders each write a temporary file and rename it.
func buildBase(ctx context.Context, cacheDir string, l *baseLayout) (string, error) {
	key, err := l.key()
	if err != nil {
		return "", fmt.Errorf("initramfs cache key: %w", err)
	}
	out := filepath.Join(cacheDir, "base-"+key+".cpio")
	if _, err := os.Stat(out); err == nil {
		now := time.Now()
		_ = os.Chtimes(out, now, now) // marks it as in use for pruneCache
		return out, nil
	}
	pruneCache(cacheDir)
	depmod, err := depmodFiles(ctx, cacheDir, l)
	if err != nil {
		return "", err
	}
	tmp, err := os.CreateTemp(cacheDir, "base-*.tmp")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	c := newCPIOWriter(tmp)
	for _, d := range []string{"dev", "proc", "sys", "run", "tmp", "mnt", "result", "etc/lvm", "usr/local/bin"} {
		if err := c.Mkdir(d); err != nil {
			return "", err
		}
	}
	if err := c.CharDev("dev/console", 5, 1); err != nil {
		return "", err
	}
	if err := c.CharDev("dev/null", 1, 3); err != nil {
		return "", err
	}
	for _, f := range l.files {
		if err := copyHostFile(c, f); err != nil {
			return "", err
		}
	}
	for _, k := range sortedKeys(l.symlinks) {
		if err := c.Symlink(k, l.symlinks[k]); err != nil {
			return "", err
		}
	}
	for _, k := range sortedKeys(l.extra) {
		if err := c.Bytes(k, 0o644, l.extra[k]); err != nil {
			return "", err
		}
	}
	for _, k := range sortedKeys(depmod) {
		if err := c.Bytes(k, 0o644, depmod[k]); err != nil {
			return "", err
		}
	}
	if err := c.Bytes("/init", 0o755, initScript); err != nil {
		return "", err
	}
	if err := c.Bytes("/etc/lvm/lvm.conf", 0o644, lvmConf); err != nil {
		return "", err
	}
	if err := c.Close(); err != nil {
		return "", fmt.Errorf("write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return "", err
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return "", err
	}
	return out, nil
}

func copyHostFile(c *cpioWriter, f hostFile) error {
	in, err := os.Open(f.host)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	if err := c.File(f.guest, uint32(st.Mode().Perm()), st.Size(), in); err != nil {
		return fmt.Errorf("add %s: %w", f.host, err)
	}
	return nil
}

// pruneCache removes base archives unused for a day, left behind when the
// host's tools or the harness changed.
func pruneCache(cacheDir string) {
	old, _ := filepath.Glob(filepath.Join(cacheDir, "base-*.cpio"))
	for _, p := range old {
		if st, err := os.Stat(p); err == nil && time.Since(st.ModTime()) > 24*time.Hour {
			os.Remove(p)
		}
	}
}

// depmodFiles runs depmod on a staging tree holding only the chosen modules,
// so busybox modprobe works in the guest for scripts that want it.
func depmodFiles(ctx context.Context, cacheDir string, l *baseLayout) (map[string][]byte, error) {
	stage, err := os.MkdirTemp(cacheDir, "depmod-*")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(stage)
	modDir := path.Join("/lib/modules", l.kver)
	for _, m := range l.modules {
		dst := filepath.Join(stage, m)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return nil, err
		}
		if err := os.Symlink(m, dst); err != nil {
			return nil, err
		}
	}
	for _, f := range []string{"modules.order", "modules.builtin", "modules.builtin.modinfo"} {
		data, err := os.ReadFile(filepath.Join(modDir, f))
		if err != nil {
			continue
		}
		if err := os.WriteFile(filepath.Join(stage, modDir, f), data, 0o644); err != nil {
			return nil, err
		}
	}
	if out, err := exec.CommandContext(ctx, "depmod", "-b", stage, l.kver).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("depmod -b %s %s: %w: %s", stage, l.kver, err, bytes.TrimSpace(out))
	}
	files := map[string][]byte{}
	entries, err := os.ReadDir(filepath.Join(stage, modDir))
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		data, err := os.ReadFile(filepath.Join(stage, modDir, e.Name()))
		if err != nil {
			return nil, err
		}
		files[path.Join(modDir, e.Name())] = data
	}
	return files, nil
}

// writeRunArchive writes the per-run archive: the caller's files, script and
// environment. It is appended to the base archive uncompressed.
func writeRunArchive(w io.Writer, s *Spec, ndisks int) error {
	c := newCPIOWriter(w)
	for _, g := range sortedKeys(s.Binaries) {
		if err := copyHostFile(c, hostFile{guest: g, host: s.Binaries[g]}); err != nil {
			return err
		}
	}
	for _, g := range sortedKeys(s.Files) {
		if err := c.Bytes(g, 0o644, s.Files[g]); err != nil {
			return err
		}
	}
	var env bytes.Buffer
	env.WriteString("export LVM_SUPPRESS_FD_WARNINGS=1 VMVAULT_RESULT=/result\n")
	for _, k := range sortedKeys(s.Env) {
		fmt.Fprintf(&env, "export %s=%s\n", k, shellQuote(s.Env[k]))
	}
	if err := c.Bytes("/vmvault/env", 0o644, env.Bytes()); err != nil {
		return err
	}
	if err := c.Bytes("/vmvault/ndisks", 0o644, fmt.Appendf(nil, "%d\n", ndisks)); err != nil {
		return err
	}
	if err := c.Bytes("/vmvault/script.sh", 0o755, []byte(s.Script)); err != nil {
		return err
	}
	return c.Close()
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
