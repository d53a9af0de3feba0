// Package nbd serves disk images over the Network Block Device protocol
// (fixed newstyle handshake, structured replies, base:allocation block
// status), so qemu, qemu-img and other NBD clients can read a backup — and
// with an Overlay, write to it — without restoring it first.
//
// Rules the code keeps:
//   - Never wrong data. A read whose Export.ReadAt fails is answered with
//     EIO for that request (an error chunk, or an error simple reply with
//     no payload); no byte of a failed read reaches the client as if it
//     were good.
//   - The export is never written unless it is a WritableExport; every
//     write-type command to a read-only export is refused with EPERM.
//   - An Overlay never writes its base. Its file only ever holds whole
//     blocks (a partial first write copies the rest of the block from the
//     base first), so a block is either wholly the base's or wholly the
//     overlay's, and the in-memory map says which.
//   - Untrusted bytes are parsed in small functions in wire.go, bounded
//     before anything is allocated for them (option payloads, names,
//     request lengths), and fuzzed.
//   - Replies to one connection never interleave inside a chunk: a whole
//     reply chunk (header and payload) is written under the connection's
//     write lock, so requests can be served concurrently.
//   - Serve returns only after every connection it accepted is closed, so
//     a caller may release the exports (and the repository) after it.
package nbd

import (
	"errors"
	"io"
)

// Export is a read-only disk image served over NBD. It must be safe for
// concurrent use.
type Export interface {
	// Size is the image's length in bytes.
	Size() int64
	// ReadAt reads len(p) bytes at off, which lie inside the image. Any
	// error, including a short read, fails the client's request with EIO.
	ReadAt(p []byte, off int64) (int, error)
	// Extents describes [off, off+length) as consecutive extents in order,
	// covering the range without gaps (the first may start before off,
	// the last may end after it). A Hole extent reads as zeros without stored data, so clients
	// can skip it.
	Extents(off, length int64) ([]Extent, error)
}

// Extent is a run of an image with one allocation state.
type Extent struct {
	// Offset and Length place the extent in the image.
	Offset, Length int64
	// Hole reports that the extent reads as zeros and stores nothing.
	Hole bool
}

// SliceExport is an Export that can also hand out a range as read-only
// slices of its own memory, so that a read is sent without a copy.
type SliceExport interface {
	Export
	// ReadSlices returns the length bytes at off, which lie inside the
	// image, as slices the caller only reads, and the function that
	// gives them back: the caller calls it exactly once (also after an
	// error) when it no longer uses the slices, and the export must not
	// change their bytes before. Any error fails the client's request
	// with EIO.
	ReadSlices(off, length int64) ([][]byte, func(), error)
}

// WritableExport is an Export that also accepts writes (NBD_CMD_WRITE,
// WRITE_ZEROES, TRIM and FLUSH).
type WritableExport interface {
	Export
	// WriteAt writes p at off, inside the image.
	WriteAt(p []byte, off int64) (int, error)
	// WriteZeroes makes [off, off+length) read as zeros.
	WriteZeroes(off, length int64) error
	// Flush makes completed writes durable.
	Flush() error
}

// readParts returns the length bytes of e at off: as e's own slices where
// it is a SliceExport, else read into a buffer of s. done releases them,
// once sent; call it also after an error.
func (s *Server) readParts(e Export, off, length int64) (parts [][]byte, done func(), err error) {
	if se, ok := e.(SliceExport); ok {
		parts, done, err := se.ReadSlices(off, length)
		n := int64(0)
		for _, p := range parts {
			n += int64(len(p))
		}
		if err == nil && n != length {
			err = io.ErrUnexpectedEOF
		}
		return parts, done, err
	}
	buf, done := s.buffer(length)
	if err := readFull(e, buf, off); err != nil {
		return nil, done, err
	}
	return [][]byte{buf}, done, nil
}

// readFull reads exactly len(p) bytes from e at off: an io.EOF with a full
// buffer is success, anything short is an error.
func readFull(e Export, p []byte, off int64) error {
	n, err := e.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return err
}
