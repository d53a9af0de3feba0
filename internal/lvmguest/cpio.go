package lvmguest

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"path"
	"strings"
)

// cpioWriter writes the "newc" cpio format the kernel unpacks into its
// initramfs. It is hand-written because the format is small and the kernel
// accepts several archives concatenated, which lets the cached base image and
// the per-run files be written separately.
type cpioWriter struct {
	w    *bufio.Writer
	n    int64
	ino  uint32
	dirs map[string]bool
}

// Mode bits of cpio entries (the same as in struct stat).
const (
	modeDir     = 0o040000
	modeFile    = 0o100000
	modeSymlink = 0o120000
	modeCharDev = 0o020000
)

func newCPIOWriter(w io.Writer) *cpioWriter {
	return &cpioWriter{w: bufio.NewWriterSize(w, 1<<20), ino: 1, dirs: map[string]bool{"": true, ".": true, "/": true}}
}

func (c *cpioWriter) write(p []byte) error {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return err
}

func (c *cpioWriter) pad() error {
	if r := c.n % 4; r != 0 {
		return c.write(make([]byte, 4-r))
	}
	return nil
}

// entry writes one header, name and body. name is relative ("bin/sh").
func (c *cpioWriter) entry(name string, mode uint32, rdevMajor, rdevMinor uint32, size int64, body io.Reader) error {
	c.ino++
	nlink := 1
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	if err := c.write([]byte(hdr)); err != nil {
		return err
	}
	if err := c.write(append([]byte(name), 0)); err != nil {
		return err
	}
	if err := c.pad(); err != nil {
		return err
	}
	if body != nil {
		n, err := io.Copy(writerFunc(c.write), io.LimitReader(body, size))
		if err != nil {
			return err
		}
		if n != size {
			return fmt.Errorf("cpio entry %s: short body (%d of %d bytes)", name, n, size)
		}
	}
	return c.pad()
}

type writerFunc func([]byte) error

func (f writerFunc) Write(p []byte) (int, error) {
	if err := f(p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func clean(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

// Mkdir writes name and any missing parents.
func (c *cpioWriter) Mkdir(name string) error {
	name = clean(name)
	if c.dirs[name] {
		return nil
	}
	if err := c.Mkdir(path.Dir(name)); err != nil {
		return err
	}
	c.dirs[name] = true
	return c.entry(name, modeDir|0o755, 0, 0, 0, nil)
}

// File writes a regular file, creating its parent directories.
func (c *cpioWriter) File(name string, perm uint32, size int64, body io.Reader) error {
	name = clean(name)
	if err := c.Mkdir(path.Dir(name)); err != nil {
		return err
	}
	return c.entry(name, modeFile|perm, 0, 0, size, body)
}

// Bytes writes a regular file from memory.
func (c *cpioWriter) Bytes(name string, perm uint32, data []byte) error {
	return c.File(name, perm, int64(len(data)), bytes.NewReader(data))
}

// Symlink writes a symbolic link name -> target.
func (c *cpioWriter) Symlink(name, target string) error {
	name = clean(name)
	if err := c.Mkdir(path.Dir(name)); err != nil {
		return err
	}
	return c.entry(name, modeSymlink|0o777, 0, 0, int64(len(target)), strings.NewReader(target))
}

// CharDev writes a character device node.
func (c *cpioWriter) CharDev(name string, major, minor uint32) error {
	name = clean(name)
	if err := c.Mkdir(path.Dir(name)); err != nil {
		return err
	}
	return c.entry(name, modeCharDev|0o600, major, minor, 0, nil)
}

// Close writes the trailer and flushes; it does not close the underlying writer.
func (c *cpioWriter) Close() error {
	if err := c.entry("TRAILER!!!", 0, 0, 0, 0, nil); err != nil {
		return err
	}
	return c.w.Flush()
}
