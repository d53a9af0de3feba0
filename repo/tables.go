package repo

import (
	"context"
	"fmt"
	"sync"

	"golang.org/x/sync/errgroup"

	"vmvault/crypto"
)

// storeTables cuts a disk's segment IDs into segment tables and queues the
// ones the repository lacks for upload. It returns their IDs in order.
func (st *backupState) storeTables(ctx context.Context, segs []byte, lens []int64) ([]HexID, error) {
	var ids []HexID
	per := st.r.tableSegments
	for i := 0; i < len(lens); i += per {
		end := min(len(lens), i+per)
		payload := encodeTable(segs[32*i:32*end], lens[i:end])
		id := st.r.tableH.Sum(payload)
		ids = append(ids, HexID(id))
		p, mine := st.claim(id)
		if !mine {
			continue
		}
		if err := st.upload(ctx, TypeTable, id, payload, p); err != nil {
			return nil, err
		}
	}
	return ids, nil
}

// resolveSegments fills d.Segments and the segment offsets from its
// segment tables, verifying each table against its ID and the whole list
// against the image digest.
func (r *Repository) resolveSegments(ctx context.Context, d *Disk) error {
	if d.Segments != nil || d.segmentCount() == 0 {
		return nil
	}
	// A table repeated in a disk (long runs of identical segments, such
	// as an empty disk's) is fetched once.
	type table struct {
		segs []byte
		lens []int64
	}
	distinct := map[HexID]table{}
	var fetch []HexID // the keys, so goroutines never write a map being iterated
	for _, tid := range d.Tables {
		if _, dup := distinct[tid]; !dup {
			distinct[tid] = table{}
			fetch = append(fetch, tid)
		}
	}
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for _, tid := range fetch {
		g.Go(func() error {
			raw, err := r.getData(gctx, TypeTable, crypto.ID(tid))
			if err != nil {
				return err
			}
			if r.tableH.Sum(raw) != crypto.ID(tid) {
				return fmt.Errorf("segment table %s: content does not match its ID: %w", dataName(crypto.ID(tid)), ErrCorrupt)
			}
			segs, lens, err := decodeTable(raw)
			if err != nil {
				return fmt.Errorf("%s: %w", dataName(crypto.ID(tid)), err)
			}
			mu.Lock()
			distinct[tid] = table{segs, lens}
			mu.Unlock()
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return fmt.Errorf("disk %s: %w", d.Name, err)
	}
	// The tables must hold exactly the disk's segment count; the sum is
	// checked before the list (bounded by MaxDiskSegments) is allocated.
	total := 0
	for _, tid := range d.Tables {
		total += len(distinct[tid].lens)
	}
	if total != d.segmentCount() {
		return fmt.Errorf("disk %s: tables hold %d segment IDs for %d segments: %w", d.Name, total, d.segmentCount(), ErrCorrupt)
	}
	segs := make([]byte, 0, 32*total)
	lens := make([]int64, 0, total)
	for _, tid := range d.Tables {
		segs = append(segs, distinct[tid].segs...)
		lens = append(lens, distinct[tid].lens...)
	}
	if HexID(imageDigest(r.imageH, d.Size, d.SegmentSize, segs, lens)) != d.Digest {
		return fmt.Errorf("disk %s: segment tables do not match the image digest: %w", d.Name, ErrCorrupt)
	}
	return d.setSegments(segs, lens)
}

// resolveManifest fills every disk's segment IDs.
func (r *Repository) resolveManifest(ctx context.Context, m *Manifest) error {
	for i := range m.Disks {
		if err := r.resolveSegments(ctx, &m.Disks[i]); err != nil {
			return fmt.Errorf("generation %s/%s: %w", m.VM, m.ShortID(), err)
		}
	}
	return nil
}
