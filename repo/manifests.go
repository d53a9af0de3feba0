package repo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"

	"vmvault/backend"
	"vmvault/crypto"
	"vmvault/retention"
)

// ErrNoSnapshot means no generation matches a VM and reference.
var ErrNoSnapshot = errors.New("no such generation")

// LoadManifest reads and authenticates one manifest by full hex ID.
func (r *Repository) LoadManifest(ctx context.Context, hexID string) (*Manifest, error) {
	id, err := parseID(hexID)
	if err != nil {
		return nil, err
	}
	name := manifestName(id)
	sealed, err := getBounded(ctx, r.be, name, maxManifestObject)
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", hexID[:8], err)
	}
	raw, err := r.codec.open(TypeManifest, name, sealed)
	if err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("manifest %s: %w: %w", hexID[:8], ErrCorrupt, err)
	}
	if err := m.validate(); err != nil {
		return nil, fmt.Errorf("manifest %s: %w", hexID[:8], err)
	}
	m.ID = hexID
	return &m, nil
}

// ManifestIDs lists the hex IDs of all manifests, sorted. A name that is
// not a manifest ID (junk anyone with add-only access can create) is
// warned about once and skipped.
func (r *Repository) ManifestIDs(ctx context.Context) ([]string, error) {
	objs, err := r.manifestObjects(ctx)
	ids := make([]string, len(objs))
	for i, o := range objs {
		ids[i] = strings.TrimPrefix(o.Name, "manifests/")
	}
	return ids, err
}

// manifestObjects lists manifests/ by name, skipping junk names.
func (r *Repository) manifestObjects(ctx context.Context) ([]backend.ObjectInfo, error) {
	var objs []backend.ObjectInfo
	err := r.be.List(ctx, "manifests/", func(o backend.ObjectInfo) error {
		if _, err := parseID(strings.TrimPrefix(o.Name, "manifests/")); err != nil {
			r.warnJunk(o.Name, err)
			return nil
		}
		objs = append(objs, o)
		return nil
	})
	sort.Slice(objs, func(i, j int) bool { return objs[i].Name < objs[j].Name })
	return objs, err
}

// Manifests loads every manifest (of vm, if not empty), oldest first. A
// manifest that does not open or parse (damaged, or junk planted by
// someone with add-only access) is warned about once and skipped; check
// reports it as damage. A manifest that cannot be fetched is an error.
func (r *Repository) Manifests(ctx context.Context, vm string) ([]*Manifest, error) {
	objs, err := r.manifestObjects(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]*Manifest, len(objs))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for i, o := range objs {
		id := strings.TrimPrefix(o.Name, "manifests/")
		g.Go(func() error {
			m, err := r.LoadManifest(gctx, id)
			if err != nil {
				if gctx.Err() != nil || !errors.Is(err, ErrCorrupt) && !errors.Is(err, crypto.ErrAuth) && !errors.Is(err, ErrTooLarge) {
					return err
				}
				// A manifest that does not open is no generation to
				// list or choose; check reports it as damage.
				r.warnJunk("manifests/"+id, err)
				return nil
			}
			m.Arrived = o.ModTime
			out[i] = m
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	var res []*Manifest
	for _, m := range out {
		if m != nil && (vm == "" || m.VM == vm) {
			res = append(res, m)
		}
	}
	sortManifests(res)
	return res, nil
}

func sortManifests(ms []*Manifest) {
	sort.SliceStable(ms, func(i, j int) bool {
		if !ms[i].Time.Equal(ms[j].Time) {
			return ms[i].Time.Before(ms[j].Time)
		}
		return ms[i].ID < ms[j].ID
	})
}

// FindManifest resolves "latest" or an ID prefix for a VM. "latest" is
// the newest generation whose recorded time agrees with its arrival
// (retention.Unverified) and is not in the future, so a generation a
// client dated ahead or back cannot become latest; when every
// generation is unverified, the one that arrived last.
func (r *Repository) FindManifest(ctx context.Context, vm, ref string) (*Manifest, error) {
	if ref == "" || ref == "latest" {
		ms, err := r.Manifests(ctx, vm)
		if err != nil {
			return nil, err
		}
		for i := len(ms) - 1; i >= 0; i-- {
			if !retention.Unverified(ms[i].Time, ms[i].Arrived, 0) && !ms[i].Time.After(time.Now().Add(retention.ArrivalSkew)) {
				return ms[i], nil
			}
		}
		if len(ms) == 0 {
			return nil, fmt.Errorf("VM %q has no generations: %w", vm, ErrNoSnapshot)
		}
		// Only unverified generations: the one that arrived last.
		last := ms[0]
		for _, m := range ms {
			if m.Arrived.After(last.Arrived) {
				last = m
			}
		}
		return last, nil
	}
	ref = strings.ToLower(ref)
	ids, err := r.ManifestIDs(ctx)
	if err != nil {
		return nil, err
	}
	var match []string
	for _, id := range ids {
		if strings.HasPrefix(id, ref) {
			match = append(match, id)
		}
	}
	switch len(match) {
	case 0:
		return nil, fmt.Errorf("generation %q: %w", ref, ErrNoSnapshot)
	case 1:
	default:
		return nil, fmt.Errorf("generation prefix %q is ambiguous (%d matches): give more digits", ref, len(match))
	}
	m, err := r.LoadManifest(ctx, match[0])
	if err != nil {
		return nil, err
	}
	if vm != "" && m.VM != vm {
		return nil, fmt.Errorf("generation %s belongs to VM %q, not %q: %w", m.ShortID(), m.VM, vm, ErrNoSnapshot)
	}
	return m, nil
}
