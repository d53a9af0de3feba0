package repo

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"vmvault/chunk"
	"vmvault/crypto"
)

// FormatVersion is the repository format this code reads and writes.
// Version 2 cut segments by content (variable lengths, recorded in the
// segment tables); version 1 had fixed-size segments.
const FormatVersion = 2

// Manifest versions: a generation's version says how its segment IDs are
// made (docs/format.md, "Content IDs"), so that check verifies each
// generation by its own rule and an old generation stays readable.
const (
	// manifestVersionContentIDs: a segment ID is the keyed hash
	// ("segment") of the segment's bytes.
	manifestVersionContentIDs = 2
	// ManifestVersion is the version this code writes: a segment ID is
	// the keyed hash ("segment-list") of its segment list's payload.
	ManifestVersion = 3
)

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
		return fmt.Errorf("repository format version %d is not supported (this vmvault reads version %d): %w", c.Version, FormatVersion, errOldFormat(c.Version))
	}
	if len(c.ID) != 64 {
		return fmt.Errorf("config: bad repository id")
	}
	if c.SegmentSize < MinSegmentSize || c.SegmentSize > MaxSegmentSize || c.SegmentSize%(64<<10) != 0 {
		return fmt.Errorf("config: segment size %d out of range", c.SegmentSize)
	}
	return nil
}

// errOldFormat explains what to do with a repository of another version.
func errOldFormat(v int) error {
	if v < FormatVersion {
		return errors.New("it was written by an older vmvault with fixed-size segments; restore from it with that version, and start a new repository for this one")
	}
	return errors.New("it was written by a newer vmvault; upgrade")
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
	if k <= 0 || !segmentCountPlausible(n, len(b)-k) {
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

// minSegmentEntry is the smallest encoding of a segment list entry: a
// kind byte and a one-byte length (a zero run; a chunk adds 32 bytes).
const minSegmentEntry = 2

// maxSegmentEntries bounds the entries of one segment list. A segment is
// cut into pieces only at chunk.ZeroBlock boundaries and by the chunker
// (chunks of at least chunk.MinSize > ZeroBlock), so it has at most one
// piece per ZeroBlock; twice that leaves room without trusting more.
const maxSegmentEntries = 2 * MaxSegmentSize / chunk.ZeroBlock

// segmentCountPlausible reports whether a segment list of rest bytes can
// hold n entries: the count read from the list sizes an allocation, so it
// is bounded by the bytes actually present and by the format limit.
func segmentCountPlausible(n uint64, rest int) bool {
	return rest >= 0 && n <= uint64(rest)/minSegmentEntry && n <= maxSegmentEntries
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

// Format limits on a disk of a manifest. A disk's segment IDs are held in
// memory (32 bytes per segment) while it is restored, checked or pruned,
// so the count is bounded: 2^21 segments (64 MiB of IDs) is a 16 TiB disk
// at the default 8 MiB segments.
const (
	MaxDiskSegments = 1 << 21
	MaxDiskTables   = MaxDiskSegments / TableSegments
)

const tableVersion = 2

// tableEntry is one segment in a table: its 32-byte ID, then its length
// as a little-endian uint32.
const tableEntry = 36

// encodeTable: version byte, then per segment its ID and length.
func encodeTable(segs []byte, lens []int64) []byte {
	b := make([]byte, 0, 1+len(lens)*tableEntry)
	b = append(b, tableVersion)
	for i, l := range lens {
		b = append(b, segs[32*i:32*i+32]...)
		b = binary.LittleEndian.AppendUint32(b, uint32(l))
	}
	return b
}

// decodeTable parses a table into its segment IDs and lengths; lengths are
// checked against the disk by the caller.
func decodeTable(b []byte) ([]byte, []int64, error) {
	if len(b) < 1 || b[0] != tableVersion || (len(b)-1)%tableEntry != 0 || len(b)-1 > tableEntry*TableSegments || len(b) == 1 {
		return nil, nil, fmt.Errorf("segment table: malformed: %w", ErrCorrupt)
	}
	n := (len(b) - 1) / tableEntry
	segs := make([]byte, 0, 32*n)
	lens := make([]int64, n)
	for i := range n {
		e := b[1+i*tableEntry : 1+(i+1)*tableEntry]
		segs = append(segs, e[:32]...)
		lens[i] = int64(binary.LittleEndian.Uint32(e[32:]))
		if lens[i] == 0 {
			return nil, nil, fmt.Errorf("segment table: empty segment: %w", ErrCorrupt)
		}
	}
	return segs, lens, nil
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
	Arrived  time.Time       `json:"-"` // the store's ModTime of the manifest, set by Manifests
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
	Name   string `json:"name"`
	Source string `json:"source,omitempty"`
	Size   int64  `json:"size"`
	// SegmentSize is the average segment size the image was cut with;
	// segments are between half and one and a half times as long (the
	// last may be shorter), their lengths are in the segment tables.
	SegmentSize int64 `json:"segment_size"`
	// SegmentCount is the number of segments.
	SegmentCount int `json:"segment_count"`
	// Tables names the segment tables that hold the disk's segment IDs in
	// order, TableSegments per table (the last may hold fewer). Tables
	// are deduplicated like data, so an incremental generation stores
	// only the tables whose segments changed, and a manifest stays small
	// (a 1 TiB disk with 8 MiB segments on average: about 70 table IDs).
	Tables []HexID `json:"segment_tables"`
	// Segments holds one 32-byte segment ID per segment, concatenated; an
	// all-zero ID marks an all-zero segment (nothing stored). It is not
	// stored in the manifest: resolveSegments fills it from Tables.
	Segments []byte `json:"-"`
	// offsets holds each segment's start and, last, the image size; filled
	// with Segments.
	offsets []int64
	// Digest is the keyed image digest: see imageDigest.
	Digest HexID `json:"digest"`
	// SHA256 is a plain SHA-256 of the image, recorded on request.
	SHA256 string `json:"sha256,omitempty"`
	// CBT is the change tracking used: "none" (the image was read whole),
	// or a DiskSource's Changes.Kind such as "thin". Empty in generations
	// written before change tracking existed (read whole).
	CBT string `json:"cbt,omitempty"`
	// CBTBase is the generation the unchanged segments were taken from.
	CBTBase string `json:"cbt_base,omitempty"`
	// BytesRead is the number of image bytes really read from the source.
	BytesRead int64 `json:"bytes_read"`
	// FullRead is when this disk was last read whole: this generation's
	// time for a full read, the base's FullRead otherwise.
	FullRead time.Time `json:"full_read,omitzero"`
	// Tracker is the change tracker's note for the next backup (see
	// DiskSource.Tracker).
	Tracker string `json:"tracker,omitempty"`
}

// segmentCount returns how many segments the disk has.
func (d *Disk) segmentCount() int { return d.SegmentCount }

// SegmentID returns segment i's ID and whether it is an all-zero segment.
// The disk's segment tables must have been resolved; for a disk that is
// not (or an i out of range) it returns unresolvedSegment, an ID no object
// has, so a caller that forgot to resolve fails on a missing object
// instead of panicking or taking the segment for zeros.
func (d *Disk) SegmentID(i int) (id crypto.ID, zero bool) {
	if i < 0 || (i+1)*32 > len(d.Segments) {
		return unresolvedSegment, false
	}
	copy(id[:], d.Segments[i*32:(i+1)*32])
	return id, id == crypto.ID{}
}

// unresolvedSegment is what SegmentID returns for a segment whose ID is
// not known: all ones, which no keyed hash is expected to produce.
var unresolvedSegment = func() (id crypto.ID) {
	for i := range id {
		id[i] = 0xff
	}
	return id
}()

// segmentStart returns the image offset at which segment i begins.
// segmentStart, segmentLen and segmentAt are the only places that know
// how segments are laid out: everything else locates segments through
// them. They need the disk's segment tables resolved (resolveSegments).
func (d *Disk) segmentStart(i int) int64 { return d.offsets[i] }

// segmentLen returns the length of segment i.
func (d *Disk) segmentLen(i int) int64 { return d.offsets[i+1] - d.offsets[i] }

// segmentAt returns the segment holding image offset off (0 <= off <
// d.Size) and the offset at which that segment begins: a binary search
// over the segments' starts.
func (d *Disk) segmentAt(off int64) (i int, start int64) {
	i = sort.Search(len(d.offsets)-1, func(i int) bool { return d.offsets[i+1] > off })
	return i, d.offsets[i]
}

// maxSegmentLen is the longest segment a disk may have: the size of a
// buffer that holds any of its segments.
func (d *Disk) maxSegmentLen() int64 { return int64(chunk.MaxSegment(int(d.SegmentSize))) }

// setSegments sets the resolved segment IDs and lengths, checking that the
// lengths are in bounds and cover the image exactly.
func (d *Disk) setSegments(segs []byte, lens []int64) error {
	if len(segs) != 32*len(lens) || len(lens) != d.SegmentCount {
		return fmt.Errorf("disk %s: %d segments for %d: %w", d.Name, len(lens), d.SegmentCount, ErrCorrupt)
	}
	offsets := make([]int64, len(lens)+1)
	for i, l := range lens {
		if l <= 0 || l > d.maxSegmentLen() {
			return fmt.Errorf("disk %s: segment %d is %d bytes long: %w", d.Name, i, l, ErrCorrupt)
		}
		offsets[i+1] = offsets[i] + l
	}
	if offsets[len(lens)] != d.Size {
		return fmt.Errorf("disk %s: segments cover %d of %d bytes: %w", d.Name, offsets[len(lens)], d.Size, ErrCorrupt)
	}
	d.Segments, d.offsets = segs, offsets
	return nil
}

// segmentLens returns the resolved segment lengths.
func (d *Disk) segmentLens() []int64 {
	lens := make([]int64, d.SegmentCount)
	for i := range lens {
		lens[i] = d.segmentLen(i)
	}
	return lens
}

func (m *Manifest) validate() error {
	switch {
	case m.Version > ManifestVersion:
		// Not ErrCorrupt: repair must not quarantine a sound
		// generation that only a newer vmvault reads.
		return fmt.Errorf("manifest version %d was written by a newer vmvault (this one reads up to %d): upgrade", m.Version, ManifestVersion)
	case m.Version < manifestVersionContentIDs:
		return fmt.Errorf("manifest version %d not supported: %w", m.Version, ErrCorrupt)
	}
	if m.VM == "" {
		return fmt.Errorf("manifest without VM name: %w", ErrCorrupt)
	}
	for i := range m.Disks {
		d := &m.Disks[i]
		if err := d.validateLimits(); err != nil {
			return err
		}
	}
	return nil
}

// validateLimits checks a disk's sizes and counts against the format
// limits before anything is allocated by them.
func (d *Disk) validateLimits() error {
	if d.Size < 0 || d.SegmentSize < MinSegmentSize || d.SegmentSize > MaxSegmentSize || d.SegmentCount < 0 {
		return fmt.Errorf("manifest disk %q: bad sizes: %w", d.Name, ErrCorrupt)
	}
	if d.SegmentCount > MaxDiskSegments {
		return fmt.Errorf("manifest disk %q: %d segments is more than %d: %w", d.Name, d.SegmentCount, MaxDiskSegments, ErrCorrupt)
	}
	// Every segment holds at least a byte and at most maxSegmentLen.
	// Divide rather than multiply: d.Size is untrusted and may be near
	// the int64 limit.
	if maxLen := d.maxSegmentLen(); int64(d.SegmentCount) > d.Size || d.Size/maxLen+min(1, d.Size%maxLen) > int64(d.SegmentCount) {
		return fmt.Errorf("manifest disk %q: %d segments cannot hold %d bytes: %w", d.Name, d.SegmentCount, d.Size, ErrCorrupt)
	}
	n := d.segmentCount()
	if len(d.Tables) > min(n, MaxDiskTables) || (n > 0) != (len(d.Tables) > 0) || len(d.Tables)*TableSegments < n {
		return fmt.Errorf("manifest disk %q: %d segment tables for %d segments: %w", d.Name, len(d.Tables), n, ErrCorrupt)
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
	// BytesChunked is the data the chunker cut; the rest was taken as
	// the previous generation's chunks (bytes that hashed in place to
	// them).
	BytesChunked int64 `json:"bytes_chunked"`
}

// imageDigest is the keyed digest of a whole disk image: a keyed BLAKE3
// over the image size, the average segment size, the segment count and, per
// segment, its segment ID (a keyed hash of its segment list, or in
// version-2 generations of its content; all zeros for an all-zero
// segment) and length, each as little-endian uint64s. Each chunk is
// verified against its ID as it is restored, in parallel, so the digest
// itself costs nothing per byte.
func imageDigest(h *crypto.Hasher, size, segSize int64, segments []byte, lens []int64) crypto.ID {
	d := h.New()
	var buf [8]byte
	for _, v := range []int64{size, segSize, int64(len(lens))} {
		binary.LittleEndian.PutUint64(buf[:], uint64(v))
		d.Write(buf[:])
	}
	for i, l := range lens {
		d.Write(segments[32*i : 32*i+32])
		binary.LittleEndian.PutUint64(buf[:], uint64(l))
		d.Write(buf[:])
	}
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
