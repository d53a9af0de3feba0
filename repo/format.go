package repo

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"

	"vmvault/crypto"
)

// FormatVersion is the repository format this code reads and writes.
const FormatVersion = 1

// Config is the repository's parameters, stored encrypted as "config".
type Config struct {
	Version           int       `json:"version"`
	ID                string    `json:"id"`
	ChunkerPolynomial uint64    `json:"chunker_polynomial"`
	SegmentSize       int64     `json:"segment_size"`
	Created           time.Time `json:"created"`
}

// Segment sizes allowed in a config. Segments are held in memory while
// they are chunked and restored, so the upper bound is also a memory bound.
const (
	MinSegmentSize     = 1 << 20
	MaxSegmentSize     = 64 << 20
	DefaultSegmentSize = 8 << 20
)

func (c *Config) validate() error {
	if c.Version != FormatVersion {
		return fmt.Errorf("repository format version %d is not supported (this vmvault reads version %d)", c.Version, FormatVersion)
	}
	if len(c.ID) != 64 {
		return fmt.Errorf("config: bad repository id")
	}
	if c.SegmentSize < MinSegmentSize || c.SegmentSize > MaxSegmentSize || c.SegmentSize%(64<<10) != 0 {
		return fmt.Errorf("config: segment size %d out of range", c.SegmentSize)
	}
	return nil
}

// SegmentEntry is one piece of a segment: a chunk (ID set) or a zero run.
type SegmentEntry struct {
	Zero   bool
	Length uint32
	ID     crypto.ID // chunk ID; zero for zero runs
}

const segmentListVersion = 1

// encodeSegmentList serialises a segment's pieces:
// version byte, uvarint count, then per entry a kind byte (0 chunk, 1 zero),
// uvarint length, and for chunks the 32-byte ID.
func encodeSegmentList(entries []SegmentEntry) []byte {
	b := make([]byte, 0, 1+binary.MaxVarintLen64+len(entries)*(1+5+32))
	b = append(b, segmentListVersion)
	b = binary.AppendUvarint(b, uint64(len(entries)))
	for _, e := range entries {
		if e.Zero {
			b = append(b, 1)
			b = binary.AppendUvarint(b, uint64(e.Length))
			continue
		}
		b = append(b, 0)
		b = binary.AppendUvarint(b, uint64(e.Length))
		b = append(b, e.ID[:]...)
	}
	return b
}

// decodeSegmentList parses untrusted bytes (after authentication, but a
// defence in depth against bugs and forged keys).
func decodeSegmentList(b []byte) ([]SegmentEntry, error) {
	if len(b) < 2 || b[0] != segmentListVersion {
		return nil, fmt.Errorf("segment list: bad version: %w", ErrCorrupt)
	}
	b = b[1:]
	n, k := uvarint(b)
	if k <= 0 || n > uint64(len(b)) {
		return nil, fmt.Errorf("segment list: bad count: %w", ErrCorrupt)
	}
	b = b[k:]
	entries := make([]SegmentEntry, 0, n)
	var total uint64
	for i := uint64(0); i < n; i++ {
		if len(b) < 2 {
			return nil, fmt.Errorf("segment list: truncated: %w", ErrCorrupt)
		}
		kind := b[0]
		l, k := uvarint(b[1:])
		if k <= 0 || l == 0 || l > MaxSegmentSize {
			return nil, fmt.Errorf("segment list: bad length: %w", ErrCorrupt)
		}
		total += l
		if total > MaxSegmentSize {
			return nil, fmt.Errorf("segment list: longer than a segment: %w", ErrCorrupt)
		}
		b = b[1+k:]
		e := SegmentEntry{Length: uint32(l)}
		switch kind {
		case 1:
			e.Zero = true
		case 0:
			if len(b) < 32 {
				return nil, fmt.Errorf("segment list: truncated ID: %w", ErrCorrupt)
			}
			copy(e.ID[:], b[:32])
			b = b[32:]
		default:
			return nil, fmt.Errorf("segment list: bad entry kind %d: %w", kind, ErrCorrupt)
		}
		entries = append(entries, e)
	}
	if len(b) != 0 {
		return nil, fmt.Errorf("segment list: %d trailing bytes: %w", len(b), ErrCorrupt)
	}
	return entries, nil
}

// IndexEntry records one data object: its ID, type and stored size.
type IndexEntry struct {
	ID   crypto.ID
	Type ObjectType
	Size uint32 // stored (sealed) size in bytes
}

const indexVersion = 1

// encodeIndex: version byte, uvarint count, then per entry type byte,
// 32-byte ID, uvarint stored size.
func encodeIndex(entries []IndexEntry) []byte {
	b := make([]byte, 0, 1+binary.MaxVarintLen64+len(entries)*(1+32+5))
	b = append(b, indexVersion)
	b = binary.AppendUvarint(b, uint64(len(entries)))
	for _, e := range entries {
		b = append(b, byte(e.Type))
		b = append(b, e.ID[:]...)
		b = binary.AppendUvarint(b, uint64(e.Size))
	}
	return b
}

func decodeIndex(b []byte) ([]IndexEntry, error) {
	if len(b) < 2 || b[0] != indexVersion {
		return nil, fmt.Errorf("index: bad version: %w", ErrCorrupt)
	}
	b = b[1:]
	n, k := uvarint(b)
	if k <= 0 || n > uint64(len(b))/34 {
		return nil, fmt.Errorf("index: bad count: %w", ErrCorrupt)
	}
	b = b[k:]
	entries := make([]IndexEntry, 0, n)
	for i := uint64(0); i < n; i++ {
		if len(b) < 34 {
			return nil, fmt.Errorf("index: truncated: %w", ErrCorrupt)
		}
		t := ObjectType(b[0])
		if t != TypeChunk && t != TypeSegment && t != TypeTable {
			return nil, fmt.Errorf("index: bad type %d: %w", b[0], ErrCorrupt)
		}
		var e IndexEntry
		e.Type = t
		copy(e.ID[:], b[1:33])
		s, k := uvarint(b[33:])
		if k <= 0 || s > 1<<32-1 {
			return nil, fmt.Errorf("index: bad size: %w", ErrCorrupt)
		}
		e.Size = uint32(s)
		b = b[33+k:]
		entries = append(entries, e)
	}
	if len(b) != 0 {
		return nil, fmt.Errorf("index: %d trailing bytes: %w", len(b), ErrCorrupt)
	}
	return entries, nil
}

// TableSegments is the most segment IDs one segment table holds (64 KiB);
// writers fill every table but the last.
const TableSegments = 2048

const tableVersion = 1

// encodeTable: version byte, then the 32-byte segment IDs.
func encodeTable(segs []byte) []byte {
	return append([]byte{tableVersion}, segs...)
}

func decodeTable(b []byte) ([]byte, error) {
	if len(b) < 1 || b[0] != tableVersion || (len(b)-1)%32 != 0 || len(b)-1 > 32*TableSegments || len(b) == 1 {
		return nil, fmt.Errorf("segment table: malformed: %w", ErrCorrupt)
	}
	return b[1:], nil
}

// HexID is a crypto.ID that marshals as hexadecimal text.
type HexID crypto.ID

// MarshalText implements encoding.TextMarshaler.
func (h HexID) MarshalText() ([]byte, error) { return []byte(hex.EncodeToString(h[:])), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (h *HexID) UnmarshalText(b []byte) error {
	id, err := parseID(string(b))
	*h = HexID(id)
	return err
}

// Manifest is one generation: a complete, immutable backup of a VM's disks.
// Its presence in the repository is the commit of that backup.
type Manifest struct {
	ID       string          `json:"-"` // object name's hex ID, set on load
	Version  int             `json:"version"`
	VM       string          `json:"vm"`
	Time     time.Time       `json:"time"`
	Started  time.Time       `json:"started"`
	Finished time.Time       `json:"finished"`
	Host     string          `json:"host"`
	Tags     []string        `json:"tags,omitempty"`
	Disks    []Disk          `json:"disks"`
	Quiesce  json.RawMessage `json:"quiesce,omitempty"` // what the consistency step did
	Stats    BackupStats     `json:"stats"`
}

// Disk is one disk image of a generation.
type Disk struct {
	Name        string `json:"name"`
	Source      string `json:"source,omitempty"`
	Size        int64  `json:"size"`
	SegmentSize int64  `json:"segment_size"`
	// Tables names the segment tables that hold the disk's segment IDs in
	// order, TableSegments per table (the last may hold fewer). Tables
	// are deduplicated like data, so an incremental generation stores
	// only the tables whose segments changed, and a manifest stays small
	// (a 1 TiB disk with 8 MiB segments: 64 table IDs).
	Tables []HexID `json:"segment_tables"`
	// Segments holds one 32-byte segment ID per segment, concatenated; an
	// all-zero ID marks an all-zero segment (nothing stored). It is not
	// stored in the manifest: resolveSegments fills it from Tables.
	Segments []byte `json:"-"`
	// Digest is the keyed image digest: see imageDigest.
	Digest HexID `json:"digest"`
	// SHA256 is a plain SHA-256 of the image, recorded on request.
	SHA256 string `json:"sha256,omitempty"`
}

// segmentCount returns how many segments a disk of this size has.
func (d *Disk) segmentCount() int {
	if d.SegmentSize <= 0 {
		return 0
	}
	return int((d.Size + d.SegmentSize - 1) / d.SegmentSize)
}

// SegmentID returns segment i's ID and whether it is an all-zero segment.
func (d *Disk) SegmentID(i int) (id crypto.ID, zero bool) {
	copy(id[:], d.Segments[i*32:(i+1)*32])
	return id, id == crypto.ID{}
}

// segmentLen returns the length of segment i (the last may be short).
func (d *Disk) segmentLen(i int) int64 {
	return min(d.SegmentSize, d.Size-int64(i)*d.SegmentSize)
}

func (m *Manifest) validate() error {
	if m.Version != FormatVersion {
		return fmt.Errorf("manifest version %d not supported: %w", m.Version, ErrCorrupt)
	}
	if m.VM == "" {
		return fmt.Errorf("manifest without VM name: %w", ErrCorrupt)
	}
	for i := range m.Disks {
		d := &m.Disks[i]
		if d.Size < 0 || d.SegmentSize < MinSegmentSize || d.SegmentSize > MaxSegmentSize {
			return fmt.Errorf("manifest disk %q: bad sizes: %w", d.Name, ErrCorrupt)
		}
		if n := d.segmentCount(); len(d.Tables) > n || (n > 0) != (len(d.Tables) > 0) || len(d.Tables)*TableSegments < n {
			return fmt.Errorf("manifest disk %q: %d segment tables for %d segments: %w", d.Name, len(d.Tables), n, ErrCorrupt)
		}
	}
	return nil
}

// Disk returns the named disk, or the only disk when name is empty.
func (m *Manifest) Disk(name string) (*Disk, error) {
	if name == "" {
		if len(m.Disks) == 1 {
			return &m.Disks[0], nil
		}
		names := make([]string, len(m.Disks))
		for i, d := range m.Disks {
			names[i] = d.Name
		}
		return nil, fmt.Errorf("generation %s of %s has %d disks %v: choose one with --disk", m.ShortID(), m.VM, len(m.Disks), names)
	}
	for i := range m.Disks {
		if m.Disks[i].Name == name {
			return &m.Disks[i], nil
		}
	}
	return nil, fmt.Errorf("generation %s of %s has no disk %q", m.ShortID(), m.VM, name)
}

// ShortID is the first 8 hex digits of the ID, as shown to users.
func (m *Manifest) ShortID() string {
	if len(m.ID) < 8 {
		return m.ID
	}
	return m.ID[:8]
}

// BackupStats counts what one backup read and stored.
type BackupStats struct {
	BytesRead    int64 `json:"bytes_read"`    // bytes really read from the sources (holes skipped unread are not counted)
	BytesZero    int64 `json:"bytes_zero"`    // of which zero runs
	BytesNew     int64 `json:"bytes_new"`     // image bytes in chunks new to the repository
	BytesStored  int64 `json:"bytes_stored"`  // sealed bytes uploaded (chunks, segment lists, index, manifest)
	ChunksNew    int64 `json:"chunks_new"`    // chunks uploaded
	SegmentsSeen int64 `json:"segments"`      // segments processed
	SegmentsNew  int64 `json:"segments_new"`  // segments chunked (not reused whole)
	ObjectsFound int64 `json:"objects_found"` // uploads that found the object already stored
}

// imageDigest is the keyed digest of a whole disk image: a keyed BLAKE3
// over the image size and, per segment, its length and segment ID (a keyed
// hash of the segment's content; all zeros for an all-zero segment). Each
// segment's ID is verified as the segment is restored, in parallel, so the
// digest itself costs nothing per byte.
func imageDigest(h *crypto.Hasher, size, segSize int64, segments []byte) crypto.ID {
	d := h.New()
	var buf [8]byte
	binary.LittleEndian.PutUint64(buf[:], uint64(size))
	d.Write(buf[:])
	binary.LittleEndian.PutUint64(buf[:], uint64(segSize))
	d.Write(buf[:])
	d.Write(segments)
	var id crypto.ID
	d.Sum(id[:0])
	return id
}

// uvarint reads a canonical (shortest-form) unsigned varint; a padded
// encoding is rejected (k <= 0) so every object has exactly one encoding.
func uvarint(b []byte) (uint64, int) {
	v, k := binary.Uvarint(b)
	if k > 0 && k != len(binary.AppendUvarint(nil, v)) {
		return 0, -1
	}
	return v, k
}
