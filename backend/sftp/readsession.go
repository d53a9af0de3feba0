package sftp

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"sync"

	"golang.org/x/crypto/ssh"
)

// A readSession is a second SFTP session on a connection that only reads
// objects: the path a restore's fetches take. It speaks the few SFTP v3
// requests a read needs (open, read, fstat, close) and reads each data
// reply from the channel straight into the caller's buffer.
//
// Why not the SFTP library: for every reply it allocates (and clears) a
// new buffer of the reply's size, copies the data out of it, and starts
// goroutines and channels for each ReadAt; on a restore that was a tenth
// of the client's CPU, and garbage the collector chased. Here a reply's
// data crosses memory once (channel buffer to caller), and nothing is
// allocated per byte.
//
// Rules the code keeps:
//   - A request's destination buffer belongs to the session from sending
//     until its reply has been read (or the session has failed): a caller
//     that gives up early (context done) detaches its call under mu, and
//     the reader then discards that reply's data instead of writing into
//     memory the caller may reuse. A call the reader already took is
//     being filled; the caller waits for it.
//   - Replies are matched to requests by id; a reply for no pending
//     request, a data reply longer than asked for, or any other packet
//     that breaks the protocol ends the session and the connection, so
//     that the retry wrapper reconnects: a confused stream is never read
//     on.
//   - Non-data replies are bounded (maxSmallReply): a server cannot make
//     the client allocate what it likes.
//   - Handles are always closed: by the caller after its reads, or by the
//     reader when the open's caller has given up.
type readSession struct {
	stream io.Closer // the session's channel
	w      io.Writer
	r      *bufio.Reader
	// maxRead is the largest read the server answers in full.
	maxRead int

	wmu  sync.Mutex // serialises writes of whole packets
	wbuf []byte     // guarded by wmu

	mu      sync.Mutex
	nextID  uint32
	pending map[uint32]*readCall
	err     error // set once the session has failed; then pending is empty
	onFail  func()
}

// SFTP v3 packet types and status codes used here (draft-ietf-secsh-
// filexfer-02).
const (
	fxpInit          = 1
	fxpVersion       = 2
	fxpOpen          = 3
	fxpClose         = 4
	fxpRead          = 5
	fxpFstat         = 8
	fxpStatus        = 101
	fxpHandle        = 102
	fxpData          = 103
	fxpAttrs         = 105
	fxpExtended      = 200
	fxpExtendedReply = 201

	fxOK               = 0
	fxEOF              = 1
	fxNoSuchFile       = 2
	fxPermissionDenied = 3

	fxfRead       = 1
	attrSize      = 1
	maxSmallReply = 64 << 10
	// readSessionBuffer is the channel reader's buffer: packet headers and
	// small replies come out of it; data of a read larger than it goes
	// straight to the caller.
	readSessionBuffer = 64 << 10
)

// readCall is one request in flight.
type readCall struct {
	id   uint32
	dst  []byte // a read's destination; nil: discard the data
	done chan struct{}
	// noWait marks a request nobody waits for (a close): its reply is
	// dropped.
	noWait bool
	// closeHandle marks an open whose caller gave up: the reader closes
	// the handle it returns.
	closeHandle bool

	// Filled by the reader before done is closed.
	typ    byte
	n      int    // data bytes received (fxpData)
	status uint32 // fxpStatus
	msg    string // fxpStatus
	small  []byte // payload of a handle, attrs or extended reply
	err    error  // the session failed
}

// startReadSession opens an SFTP session on client for reads. maxRead is
// the read size to use when the server does not report its limits.
func startReadSession(ctx context.Context, client *ssh.Client, maxRead int, onFail func()) (*readSession, error) {
	sess, err := client.NewSession()
	if err != nil {
		return nil, err
	}
	w, err := sess.StdinPipe()
	if err != nil {
		sess.Close()
		return nil, err
	}
	r, err := sess.StdoutPipe()
	if err != nil {
		sess.Close()
		return nil, err
	}
	if err := sess.RequestSubsystem("sftp"); err != nil {
		sess.Close()
		return nil, err
	}
	return newReadSession(ctx, w, r, sess, maxRead, onFail)
}

// newReadSession speaks SFTP over w and r, which closer closes.
func newReadSession(ctx context.Context, w io.Writer, r io.Reader, closer io.Closer, maxRead int, onFail func()) (*readSession, error) {
	s := &readSession{stream: closer, w: w, r: bufio.NewReaderSize(r, readSessionBuffer), maxRead: maxRead,
		pending: make(map[uint32]*readCall), onFail: onFail}
	exts, err := s.handshake()
	if err != nil {
		closer.Close()
		return nil, fmt.Errorf("sftp read session: %w", err)
	}
	go s.readLoop()
	if exts["limits@openssh.com"] {
		if err := s.limits(ctx); err != nil {
			s.close()
			return nil, fmt.Errorf("sftp read session: %w", err)
		}
	}
	return s, nil
}

// handshake sends INIT and reads VERSION, returning the extensions.
func (s *readSession) handshake() (map[string]bool, error) {
	if _, err := s.w.Write([]byte{0, 0, 0, 5, fxpInit, 0, 0, 0, 3}); err != nil {
		return nil, err
	}
	var hdr [5]byte
	if _, err := io.ReadFull(s.r, hdr[:]); err != nil {
		return nil, err
	}
	length := binary.BigEndian.Uint32(hdr[:4])
	if hdr[4] != fxpVersion || length < 5 || length > maxSmallReply {
		return nil, fmt.Errorf("unexpected answer to init (type %d, %d bytes)", hdr[4], length)
	}
	p := make([]byte, length-1)
	if _, err := io.ReadFull(s.r, p); err != nil {
		return nil, err
	}
	if v := binary.BigEndian.Uint32(p); v != 3 {
		return nil, fmt.Errorf("server speaks SFTP version %d, want 3", v)
	}
	exts := make(map[string]bool)
	for p = p[4:]; len(p) > 0; {
		name, rest, ok := takeString(p)
		if !ok {
			return nil, errors.New("malformed version packet")
		}
		if _, rest, ok = takeString(rest); !ok {
			return nil, errors.New("malformed version packet")
		}
		exts[string(name)] = true
		p = rest
	}
	return exts, nil
}

// limits asks an OpenSSH server for its read size limit.
func (s *readSession) limits(ctx context.Context) error {
	c, err := s.send(nil, false, func(b []byte, id uint32) []byte {
		b = appendHeader(b, fxpExtended, id)
		return appendString(b, "limits@openssh.com")
	})
	if err != nil {
		return err
	}
	if err := s.wait(ctx, c); err != nil {
		return err
	}
	if c.typ != fxpExtendedReply || len(c.small) < 32 {
		return fmt.Errorf("unexpected answer to limits@openssh.com (type %d)", c.typ)
	}
	if n := binary.BigEndian.Uint64(c.small[8:16]); n >= 4<<10 {
		s.maxRead = int(min(n, maxPacketOpenSSH))
	}
	return nil
}

func takeString(p []byte) (s, rest []byte, ok bool) {
	if len(p) < 4 {
		return nil, nil, false
	}
	n := binary.BigEndian.Uint32(p)
	if uint64(n) > uint64(len(p)-4) {
		return nil, nil, false
	}
	return p[4 : 4+n], p[4+n:], true
}

// appendHeader starts a packet: its length (patched by finishPacket),
// type and request id.
func appendHeader(b []byte, typ byte, id uint32) []byte {
	b = append(b, 0, 0, 0, 0, typ)
	return binary.BigEndian.AppendUint32(b, id)
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// sendMany registers a call per request and writes the packets that build
// appends (one per call, given its id) in one write. dsts gives each
// request its destination buffer; with dsts nil there is one request.
func (s *readSession) sendMany(dsts [][]byte, noWait bool, build func(b []byte, i int, id uint32) []byte) ([]*readCall, error) {
	n := max(len(dsts), 1)
	calls := make([]*readCall, n)
	s.mu.Lock()
	if s.err != nil {
		err := s.err
		s.mu.Unlock()
		return nil, err
	}
	for i := range calls {
		c := &readCall{id: s.nextID, noWait: noWait}
		if !noWait {
			c.done = make(chan struct{})
		}
		if dsts != nil {
			c.dst = dsts[i]
		}
		s.nextID++
		s.pending[c.id] = c
		calls[i] = c
	}
	s.mu.Unlock()
	s.wmu.Lock()
	b := s.wbuf[:0]
	for i, c := range calls {
		start := len(b)
		b = build(b, i, c.id)
		binary.BigEndian.PutUint32(b[start:], uint32(len(b)-start-4))
	}
	_, err := s.w.Write(b)
	s.wbuf = b
	s.wmu.Unlock()
	if err != nil {
		s.fail(fmt.Errorf("sftp read session: send: %w", err))
		return nil, s.failure()
	}
	return calls, nil
}

func (s *readSession) send(dst []byte, noWait bool, build func(b []byte, id uint32) []byte) (*readCall, error) {
	var dsts [][]byte
	if dst != nil {
		dsts = [][]byte{dst}
	}
	calls, err := s.sendMany(dsts, noWait, func(b []byte, _ int, id uint32) []byte { return build(b, id) })
	if err != nil {
		return nil, err
	}
	return calls[0], nil
}

func (s *readSession) failure() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// wait waits for c's reply. When ctx ends first, c is detached: its data,
// should any still come, is discarded, and an open's handle is closed.
func (s *readSession) wait(ctx context.Context, c *readCall) error {
	select {
	case <-c.done:
		return c.err
	case <-ctx.Done():
	}
	s.mu.Lock()
	if _, ok := s.pending[c.id]; ok {
		c.dst = nil
		c.noWait = true
		c.closeHandle = true
		s.mu.Unlock()
		return ctx.Err()
	}
	s.mu.Unlock()
	<-c.done // the reader is filling it
	return ctx.Err()
}

// fail ends the session with err: every pending call gets it, and onFail
// closes the connection so that it is replaced.
func (s *readSession) fail(err error) {
	if s.end(err) && s.onFail != nil {
		s.onFail()
	}
}

// close ends the session alone.
func (s *readSession) close() {
	s.end(errors.New("sftp read session closed"))
}

// end ends the session with err unless it has ended already, and reports
// whether it did.
func (s *readSession) end(err error) bool {
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return false
	}
	s.err = err
	pending := s.pending
	s.pending = make(map[uint32]*readCall)
	s.mu.Unlock()
	for _, c := range pending {
		c.err = err
		if !c.noWait {
			close(c.done)
		}
	}
	s.stream.Close()
	return true
}

// readLoop reads replies until the session fails.
func (s *readSession) readLoop() {
	for {
		if err := s.readReply(); err != nil {
			s.fail(err)
			return
		}
	}
}

func (s *readSession) readReply() error {
	var hdr [9]byte
	if _, err := io.ReadFull(s.r, hdr[:]); err != nil {
		return fmt.Errorf("sftp read session: %w", noEOF(err))
	}
	length := binary.BigEndian.Uint32(hdr[:4])
	typ := hdr[4]
	id := binary.BigEndian.Uint32(hdr[5:])
	if length < 5 {
		return protocolError("reply of %d bytes", length)
	}
	s.mu.Lock()
	c := s.pending[id]
	delete(s.pending, id)
	var dst []byte
	var detached bool
	if c != nil {
		dst, detached = c.dst, c.noWait
	}
	s.mu.Unlock()
	if c == nil {
		return protocolError("reply for unknown request %d", id)
	}
	// From here c is the reader's alone until it is finished.
	err := s.readPayload(c, typ, int64(length)-5, dst, detached)
	if detached {
		if err == nil && c.closeHandle && typ == fxpHandle {
			if h, _, ok := takeString(c.small); ok {
				// Not from this goroutine: a write that waits for
				// the server's window must never stop the reading
				// that lets the server go on.
				go s.closeHandle(string(h))
			}
		}
		return err
	}
	c.err = err
	close(c.done)
	return err
}

// readPayload reads the payload of a reply of type typ to c: a read's
// data into dst (discarded when c was detached), anything else into c.
func (s *readSession) readPayload(c *readCall, typ byte, payload int64, dst []byte, detached bool) error {
	c.typ = typ
	if typ == fxpData {
		var l [4]byte
		if payload < 4 {
			return protocolError("data reply of %d bytes", payload)
		}
		if _, err := io.ReadFull(s.r, l[:]); err != nil {
			return fmt.Errorf("sftp read session: %w", noEOF(err))
		}
		n := int64(binary.BigEndian.Uint32(l[:]))
		switch {
		case n != payload-4:
			return protocolError("data reply of %d bytes carrying %d", payload, n)
		case detached:
			if _, err := io.CopyN(io.Discard, s.r, n); err != nil {
				return fmt.Errorf("sftp read session: %w", noEOF(err))
			}
		case n > int64(len(dst)):
			return protocolError("data reply of %d bytes to a read of %d", n, len(dst))
		default:
			if _, err := io.ReadFull(s.r, dst[:n]); err != nil {
				return fmt.Errorf("sftp read session: %w", noEOF(err))
			}
		}
		c.n = int(n)
		return nil
	}
	if payload > maxSmallReply {
		return protocolError("reply of type %d with %d bytes", typ, payload)
	}
	p := make([]byte, payload)
	if _, err := io.ReadFull(s.r, p); err != nil {
		return fmt.Errorf("sftp read session: %w", noEOF(err))
	}
	if typ != fxpStatus {
		c.small = p
		return nil
	}
	if len(p) < 4 {
		return protocolError("short status reply")
	}
	c.status = binary.BigEndian.Uint32(p)
	if msg, _, ok := takeString(p[4:]); ok {
		c.msg = string(msg)
	}
	return nil
}

func noEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// protocolError is a reply that breaks the protocol; it ends the session
// and its connection (and is retried on a fresh one).
func protocolError(format string, args ...any) error {
	return fmt.Errorf("sftp read session: protocol error: "+format+": %w", append(args, io.ErrUnexpectedEOF)...)
}

// statusError is an SFTP status other than OK, as an error that
// errors.Is matches against fs.ErrNotExist and fs.ErrPermission.
type statusError struct {
	code uint32
	msg  string
}

func (e *statusError) Error() string {
	if e.msg != "" {
		return fmt.Sprintf("sftp status %d: %s", e.code, e.msg)
	}
	return fmt.Sprintf("sftp status %d", e.code)
}

func (e *statusError) Is(target error) bool {
	switch target {
	case fs.ErrNotExist:
		return e.code == fxNoSuchFile
	case fs.ErrPermission:
		return e.code == fxPermissionDenied
	}
	return false
}

// result turns a finished call into an error, expecting a reply of type
// want.
func (c *readCall) result(want byte) error {
	if c.typ == fxpStatus {
		return &statusError{code: c.status, msg: c.msg}
	}
	if c.typ != want {
		return protocolError("reply of type %d, expected %d", c.typ, want)
	}
	return nil
}

// open opens path for reading and returns its handle.
func (s *readSession) open(ctx context.Context, path string) (string, error) {
	c, err := s.send(nil, false, func(b []byte, id uint32) []byte {
		b = appendHeader(b, fxpOpen, id)
		b = appendString(b, path)
		b = binary.BigEndian.AppendUint32(b, fxfRead)
		return binary.BigEndian.AppendUint32(b, 0) // no attributes
	})
	if err != nil {
		return "", err
	}
	if err := s.wait(ctx, c); err != nil {
		return "", err
	}
	if err := c.result(fxpHandle); err != nil {
		return "", err
	}
	h, _, ok := takeString(c.small)
	if !ok {
		return "", protocolError("malformed handle")
	}
	return string(h), nil
}

// closeHandle closes h without waiting for the answer: a read-only
// handle has nothing to flush, and the round trip would only delay the
// next object.
func (s *readSession) closeHandle(h string) {
	s.send(nil, true, func(b []byte, id uint32) []byte {
		b = appendHeader(b, fxpClose, id)
		return appendString(b, h)
	})
}

// size returns the size of the open file h.
func (s *readSession) size(ctx context.Context, h string) (int64, error) {
	c, err := s.send(nil, false, func(b []byte, id uint32) []byte {
		b = appendHeader(b, fxpFstat, id)
		return appendString(b, h)
	})
	if err != nil {
		return 0, err
	}
	if err := s.wait(ctx, c); err != nil {
		return 0, err
	}
	if err := c.result(fxpAttrs); err != nil {
		return 0, err
	}
	if len(c.small) < 12 || binary.BigEndian.Uint32(c.small)&attrSize == 0 {
		return 0, protocolError("attributes without a size")
	}
	size := binary.BigEndian.Uint64(c.small[4:])
	if size > 1<<62 {
		return 0, protocolError("size %d", size)
	}
	return int64(size), nil
}

// readRoundMax bounds the bytes one round of readAt asks for.
const readRoundMax = 8 << 20

// readAt reads the open file h from offset off into buf until the file
// ends or buf is full, and returns how many bytes it read. Each round
// sends the reads for up to readRoundMax bytes at once, in pieces the
// server answers in full; a piece answered short (or with EOF) marks the
// file's end, unless a later piece of the same round brought data, in
// which case the server merely cut a read short and the rest is asked
// for again.
func (s *readSession) readAt(ctx context.Context, h string, off int64, buf []byte) (int, error) {
	n := 0
	var dsts [][]byte
	for n < len(buf) {
		end := min(len(buf), n+readRoundMax)
		dsts = dsts[:0]
		for i := n; i < end; i += s.maxRead {
			dsts = append(dsts, buf[i:min(end, i+s.maxRead)])
		}
		start := n
		calls, err := s.sendMany(dsts, false, func(b []byte, i int, id uint32) []byte {
			b = appendHeader(b, fxpRead, id)
			b = appendString(b, h)
			b = binary.BigEndian.AppendUint64(b, uint64(off)+uint64(start+i*s.maxRead))
			return binary.BigEndian.AppendUint32(b, uint32(len(dsts[i])))
		})
		if err != nil {
			return 0, err
		}
		// Every call is waited for, even after an error: their buffers
		// are the caller's.
		var firstErr error
		for _, c := range calls {
			if err := s.wait(ctx, c); err != nil && firstErr == nil {
				firstErr = err
			}
		}
		if firstErr != nil {
			return 0, firstErr
		}
		short, resume := -1, false
		for i, c := range calls {
			got := 0
			switch {
			case c.typ == fxpStatus && c.status == fxEOF:
			case c.typ == fxpData:
				got = c.n
			default:
				return 0, c.result(fxpData)
			}
			if short < 0 {
				n += got
				if got < len(dsts[i]) {
					short = i
				}
			} else if got > 0 {
				resume = true // data after a short piece: ask again from n
			}
		}
		if short >= 0 && !resume {
			return n, nil // the file ends at n
		}
		if n == start {
			return 0, protocolError("empty read answered before data at offset %d", off+int64(n))
		}
	}
	return n, nil
}
