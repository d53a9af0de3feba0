package repo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"

	"golang.org/x/sync/errgroup"

	"vmvault/backend"
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

// ManifestIDs lists the hex IDs of all manifests.
func (r *Repository) ManifestIDs(ctx context.Context) ([]string, error) {
	var ids []string
	err := r.be.List(ctx, "manifests/", func(o backend.ObjectInfo) error {
		ids = append(ids, strings.TrimPrefix(o.Name, "manifests/"))
		return nil
	})
	sort.Strings(ids)
	return ids, err
}

// Manifests loads every manifest (of vm, if not empty), oldest first. A
// manifest that cannot be read is an error: it is a damaged generation.
func (r *Repository) Manifests(ctx context.Context, vm string) ([]*Manifest, error) {
	ids, err := r.ManifestIDs(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]*Manifest, len(ids))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for i, id := range ids {
		g.Go(func() error {
			m, err := r.LoadManifest(gctx, id)
			if err != nil {
				return err
			}
			out[i] = m
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	var res []*Manifest
	for _, m := range out {
		if vm == "" || m.VM == vm {
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

// FindManifest resolves "latest" or an ID prefix for a VM.
func (r *Repository) FindManifest(ctx context.Context, vm, ref string) (*Manifest, error) {
	if ref == "" || ref == "latest" {
		ms, err := r.Manifests(ctx, vm)
		if err != nil {
			return nil, err
		}
		if len(ms) == 0 {
			return nil, fmt.Errorf("VM %q has no generations: %w", vm, ErrNoSnapshot)
		}
		return ms[len(ms)-1], nil
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
