package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Protocol constants, from the NBD protocol specification (proto.md).
const (
	magicInit     = 0x4e42444d41474943 // "NBDMAGIC"
	magicOption   = 0x49484156454f5054 // "IHAVEOPT"
	magicReply    = 0x0003e889045565a9 // option reply
	magicRequest  = 0x25609513
	magicSimple   = 0x67446698
	magicStructed = 0x668e33ef

	flagFixedNewstyle = 1 << 0 // handshake flags
	flagNoZeroes      = 1 << 1

	clientFixedNewstyle = 1 << 0 // client flags
	clientNoZeroes      = 1 << 1

	optExportName     = 1
	optAbort          = 2
	optList           = 3
	optInfo           = 6
	optGo             = 7
	optStructuredRepl = 8
	optListMetaCtx    = 9
	optSetMetaCtx     = 10

	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repErrUnsup    = 1<<31 + 1
	repErrInvalid  = 1<<31 + 3
	repErrUnknown  = 1<<31 + 6
	repErrTooBig   = 1<<31 + 9

	infoExport    = 0
	infoBlockSize = 3

	tflagHasFlags    = 1 << 0 // transmission flags
	tflagReadOnly    = 1 << 1
	tflagSendFlush   = 1 << 2
	tflagSendTrim    = 1 << 5
	tflagWriteZeroes = 1 << 6
	tflagSendDF      = 1 << 7
	tflagMultiConn   = 1 << 8

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	cmdFlagDF     = 1 << 2
	cmdFlagReqOne = 1 << 3

	replyFlagDone = 1 << 0

	chunkNone        = 0
	chunkOffsetData  = 1
	chunkOffsetHole  = 2
	chunkBlockStatus = 5
	chunkError       = 1<<15 + 1
	chunkErrorOffset = 1<<15 + 2

	stateHole = 1 << 0 // base:allocation
	stateZero = 1 << 1

	errPerm     = 1
	errIO       = 5
	errInval    = 22
	errNoSpc    = 28
	errShutdown = 108
)

// metaAllocation is the one metadata context served, and its ID.
const (
	metaAllocation   = "base:allocation"
	metaAllocationID = 1
)

// Limits that keep a hostile or broken client from making the server
// allocate much: option payloads and request lengths are checked before
// anything is allocated for them.
const (
	maxOptionLen  = 64 << 10
	maxNameLen    = 4096
	maxRequestLen = 32 << 20 // also advertised as the maximum block size
	requestSize   = 28
)

var errMalformed = errors.New("malformed")

// request is one transmission-phase request header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64
	length uint32
}

// parseRequest decodes a request header; b must hold requestSize bytes.
func parseRequest(b []byte) (request, error) {
	if len(b) != requestSize {
		return request{}, fmt.Errorf("request header of %d bytes: %w", len(b), errMalformed)
	}
	if m := binary.BigEndian.Uint32(b); m != magicRequest {
		return request{}, fmt.Errorf("request magic %#x: %w", m, errMalformed)
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:]),
		typ:    binary.BigEndian.Uint16(b[6:]),
		cookie: binary.BigEndian.Uint64(b[8:]),
		offset: binary.BigEndian.Uint64(b[16:]),
		length: binary.BigEndian.Uint32(b[24:]),
	}, nil
}

// optionHeader is the part of a client option before its payload.
type optionHeader struct {
	option uint32
	length uint32
}

// parseOptionHeader decodes the 16 bytes that open every client option.
func parseOptionHeader(b []byte) (optionHeader, error) {
	if len(b) != 16 {
		return optionHeader{}, fmt.Errorf("option header of %d bytes: %w", len(b), errMalformed)
	}
	if m := binary.BigEndian.Uint64(b); m != magicOption {
		return optionHeader{}, fmt.Errorf("option magic %#x: %w", m, errMalformed)
	}
	return optionHeader{option: binary.BigEndian.Uint32(b[8:]), length: binary.BigEndian.Uint32(b[12:])}, nil
}

// cursor reads big-endian fields from an option payload, remembering the
// first short read so parsers check once at the end.
type cursor struct {
	b   []byte
	bad bool
}

func (c *cursor) take(n int) []byte {
	if c.bad || n < 0 || n > len(c.b) {
		c.bad = true
		return nil
	}
	v := c.b[:n]
	c.b = c.b[n:]
	return v
}

func (c *cursor) u16() uint16 {
	if v := c.take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (c *cursor) u32() uint32 {
	if v := c.take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

// name reads a 32-bit length and that many bytes of a name.
func (c *cursor) name() string {
	n := c.u32()
	if n > maxNameLen {
		c.bad = true
		return ""
	}
	return string(c.take(int(n)))
}

// parseExportRequest decodes the payload of NBD_OPT_INFO and NBD_OPT_GO:
// an export name and the information types the client asks for.
func parseExportRequest(data []byte) (name string, infos []uint16, err error) {
	c := cursor{b: data}
	name = c.name()
	n := int(c.u16())
	for i := 0; i < n && !c.bad; i++ {
		infos = append(infos, c.u16())
	}
	if c.bad || len(c.b) != 0 {
		return "", nil, fmt.Errorf("export request: %w", errMalformed)
	}
	return name, infos, nil
}

// parseMetaContextRequest decodes the payload of NBD_OPT_LIST_META_CONTEXT
// and NBD_OPT_SET_META_CONTEXT: an export name and the context queries.
func parseMetaContextRequest(data []byte) (name string, queries []string, err error) {
	c := cursor{b: data}
	name = c.name()
	n := c.u32()
	// Each query takes at least 4 bytes, which bounds n before allocating.
	if uint64(n)*4 > uint64(len(c.b)) {
		return "", nil, fmt.Errorf("meta context request: %d queries: %w", n, errMalformed)
	}
	for i := uint32(0); i < n && !c.bad; i++ {
		queries = append(queries, c.name())
	}
	if c.bad || len(c.b) != 0 {
		return "", nil, fmt.Errorf("meta context request: %w", errMalformed)
	}
	return name, queries, nil
}

// appendU16, appendU32 and appendU64 build replies.
func appendU16(b []byte, v uint16) []byte { return binary.BigEndian.AppendUint16(b, v) }
func appendU32(b []byte, v uint32) []byte { return binary.BigEndian.AppendUint32(b, v) }
func appendU64(b []byte, v uint64) []byte { return binary.BigEndian.AppendUint64(b, v) }

// optionReply encodes one server reply to an option.
func optionReply(option, typ uint32, data []byte) []byte {
	b := make([]byte, 0, 20+len(data))
	b = appendU64(b, magicReply)
	b = appendU32(b, option)
	b = appendU32(b, typ)
	b = appendU32(b, uint32(len(data)))
	return append(b, data...)
}

// simpleReply encodes the header of a simple reply.
func simpleReply(cookie uint64, errno uint32) []byte {
	b := make([]byte, 0, 16)
	b = appendU32(b, magicSimple)
	b = appendU32(b, errno)
	return appendU64(b, cookie)
}

// chunkHeader encodes the header of one structured reply chunk whose
// payload is length bytes.
func chunkHeader(cookie uint64, flags, typ uint16, length uint32) []byte {
	b := make([]byte, 0, 20)
	b = appendU32(b, magicStructed)
	b = appendU16(b, flags)
	b = appendU16(b, typ)
	b = appendU64(b, cookie)
	return appendU32(b, length)
}
