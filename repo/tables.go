package repo

import (
	"context"
	"fmt"

	"golang.org/x/sync/errgroup"

	"vmvault/crypto"
)

// storeTables cuts a disk's segment IDs into segment tables and queues the
// ones the repository lacks for upload. It returns their IDs in order.
func (st *backupState) storeTables(ctx context.Context, segs []byte) ([]HexID, error) {
	var ids []HexID
	per := 32 * st.r.tableSegments
	for off := 0; off < len(segs); off += per {
		payload := encodeTable(segs[off:min(len(segs), off+per)])
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

// resolveSegments fills d.Segments from its segment tables, verifying
// each table against its ID and the whole list against the image digest.
func (r *Repository) resolveSegments(ctx context.Context, d *Disk) error {
	if d.Segments != nil || d.segmentCount() == 0 {
		return nil
	}
	parts := make([][]byte, len(d.Tables))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for i, tid := range d.Tables {
		g.Go(func() error {
			raw, err := r.getData(gctx, TypeTable, crypto.ID(tid))
			if err != nil {
				return err
			}
			if r.tableH.Sum(raw) != crypto.ID(tid) {
				return fmt.Errorf("segment table %s: content does not match its ID: %w", dataName(crypto.ID(tid)), ErrCorrupt)
			}
			segs, err := decodeTable(raw)
			if err != nil {
				return fmt.Errorf("%s: %w", dataName(crypto.ID(tid)), err)
			}
			parts[i] = segs
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return fmt.Errorf("disk %s: %w", d.Name, err)
	}
	var segs []byte
	for _, p := range parts {
		segs = append(segs, p...)
	}
	if len(segs) != 32*d.segmentCount() {
		return fmt.Errorf("disk %s: tables hold %d segment IDs for %d segments: %w", d.Name, len(segs)/32, d.segmentCount(), ErrCorrupt)
	}
	if HexID(imageDigest(r.imageH, d.Size, d.SegmentSize, segs)) != d.Digest {
		return fmt.Errorf("disk %s: segment tables do not match the image digest: %w", d.Name, ErrCorrupt)
	}
	d.Segments = segs
	return nil
}
