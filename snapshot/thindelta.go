package snapshot

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// maxBlockSectors bounds a pool's data block size: LVM allows thin-pool
// chunks of 64 KiB to 1 GiB (2097152 sectors of 512 bytes).
const maxBlockSectors = 2097152

// ParseThinDelta reads the XML thin_delta -m prints for two thin devices
// and returns the byte ranges that differ, sorted and merged: "different"
// and "right_only" blocks changed, "left_only" blocks were discarded (they
// read back as zeros, which is a change too), "same" blocks did not change.
// The parse is strict: an unknown element or attribute, a number that
// does not parse, a diff of other devices than left and right, ranges out
// of order or past size are errors, so that nothing unexpected is ever
// taken for "unchanged". A range's last block may reach past size when the
// volume is not a whole number of blocks; it is cut at size.
func ParseThinDelta(out []byte, left, right, size int64) ([]Range, error) {
	p := deltaParser{dec: xml.NewDecoder(bytes.NewReader(out)), left: left, right: right, size: size}
	if err := p.parse(); err != nil {
		return nil, fmt.Errorf("unexpected thin_delta output: %w", err)
	}
	return p.ranges, nil
}

type deltaParser struct {
	dec               *xml.Decoder
	left, right, size int64
	blockBytes        int64
	next              int64 // the first block the next entry may start at
	ranges            []Range
	sawSuper, sawDiff bool
}

// attrs checks that e has exactly the attributes in want (each once) and
// returns their values.
func attrs(e xml.StartElement, want ...string) (map[string]string, error) {
	got := map[string]string{}
	for _, a := range e.Attr {
		if a.Name.Space != "" || !contains(want, a.Name.Local) {
			return nil, fmt.Errorf("unknown attribute %q of <%s>", a.Name.Local, e.Name.Local)
		}
		if _, dup := got[a.Name.Local]; dup {
			return nil, fmt.Errorf("attribute %q of <%s> given twice", a.Name.Local, e.Name.Local)
		}
		got[a.Name.Local] = a.Value
	}
	return got, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// number parses a non-negative decimal attribute value.
// numbers parses the two attributes a and b of e as numbers.
func numbers(e xml.StartElement, m map[string]string, a, b string) (int64, int64, error) {
	x, err := number(e, m, a)
	if err != nil {
		return 0, 0, err
	}
	y, err := number(e, m, b)
	return x, y, err
}

func number(e xml.StartElement, m map[string]string, key string) (int64, error) {
	s, ok := m[key]
	if !ok {
		return 0, fmt.Errorf("<%s> lacks %q", e.Name.Local, key)
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || strconv.FormatInt(n, 10) != s {
		return 0, fmt.Errorf("<%s %s=%q>: not a number", e.Name.Local, key, s)
	}
	return n, nil
}

// token returns the next start or end element, skipping white space; any
// other content is an error.
func (p *deltaParser) token() (xml.Token, error) {
	for {
		t, err := p.dec.Token()
		if err != nil {
			return nil, err
		}
		switch t := t.(type) {
		case xml.StartElement, xml.EndElement:
			return t, nil
		case xml.CharData:
			if len(bytes.TrimSpace(t)) != 0 {
				return nil, fmt.Errorf("unexpected text %q", t)
			}
		case xml.ProcInst, xml.Comment:
			// <?xml …?> or a comment: nothing that changes the meaning.
		default:
			return nil, fmt.Errorf("unexpected %T", t)
		}
	}
}

func (p *deltaParser) parse() error {
	p.dec.Strict = true
	for {
		t, err := p.token()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		e, ok := t.(xml.StartElement)
		if !ok || e.Name.Local != "superblock" || p.sawSuper {
			return fmt.Errorf("want one <superblock>, got %v", t)
		}
		p.sawSuper = true
		if err := p.superblock(e); err != nil {
			return err
		}
	}
	if !p.sawSuper || !p.sawDiff {
		return errors.New("no <superblock> with a <diff>")
	}
	return nil
}

func (p *deltaParser) superblock(e xml.StartElement) error {
	m, err := attrs(e, "uuid", "time", "transaction", "data_block_size", "nr_data_blocks", "flags", "version")
	if err != nil {
		return err
	}
	for _, k := range []string{"time", "transaction", "nr_data_blocks", "flags", "version"} {
		if _, ok := m[k]; ok {
			if _, err := number(e, m, k); err != nil {
				return err
			}
		}
	}
	bs, err := number(e, m, "data_block_size")
	if err != nil {
		return err
	}
	if bs < 128 || bs > maxBlockSectors {
		return fmt.Errorf("data_block_size %d sectors out of range", bs)
	}
	p.blockBytes = bs * 512
	for {
		t, err := p.token()
		if err != nil {
			return err
		}
		switch t := t.(type) {
		case xml.EndElement:
			return nil // the decoder checked that it closes <superblock>
		case xml.StartElement:
			if t.Name.Local != "diff" || p.sawDiff {
				return fmt.Errorf("unexpected <%s> in <superblock>", t.Name.Local)
			}
			p.sawDiff = true
			if err := p.diff(t); err != nil {
				return err
			}
		}
	}
}

func (p *deltaParser) diff(e xml.StartElement) error {
	m, err := attrs(e, "left", "right")
	if err != nil {
		return err
	}
	l, r, err := numbers(e, m, "left", "right")
	if err != nil {
		return err
	}
	if l != p.left || r != p.right {
		return fmt.Errorf("diff of devices %d and %d, asked for %d and %d", l, r, p.left, p.right)
	}
	for {
		t, err := p.token()
		if err != nil {
			return err
		}
		switch t := t.(type) {
		case xml.EndElement:
			return nil
		case xml.StartElement:
			if err := p.entry(t); err != nil {
				return err
			}
		}
	}
}

func (p *deltaParser) entry(e xml.StartElement) error {
	switch e.Name.Local {
	case "same", "different", "left_only", "right_only":
	default:
		return fmt.Errorf("unknown element <%s> in <diff>", e.Name.Local)
	}
	m, err := attrs(e, "begin", "length")
	if err != nil {
		return err
	}
	begin, length, err := numbers(e, m, "begin", "length")
	if err != nil {
		return err
	}
	if t, err := p.token(); err != nil {
		return err
	} else if _, ok := t.(xml.EndElement); !ok {
		return fmt.Errorf("<%s> is not empty", e.Name.Local)
	}
	maxBlocks := (p.size + p.blockBytes - 1) / p.blockBytes
	if length == 0 || begin < p.next || begin > maxBlocks || length > maxBlocks-begin {
		return fmt.Errorf("<%s begin=%d length=%d> out of order or past the volume's %d blocks", e.Name.Local, begin, length, maxBlocks)
	}
	p.next = begin + length
	if e.Name.Local == "same" {
		return nil
	}
	off := begin * p.blockBytes
	end := min((begin+length)*p.blockBytes, p.size)
	if n := len(p.ranges); n > 0 && p.ranges[n-1].Off+p.ranges[n-1].Len == off {
		p.ranges[n-1].Len = end - p.ranges[n-1].Off
		return nil
	}
	p.ranges = append(p.ranges, Range{Off: off, Len: end - off})
	return nil
}
