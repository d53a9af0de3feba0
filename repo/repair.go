package repo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"vmvault/backend"
	"vmvault/crypto"
)

// Damaged data objects, and how the repository recovers from them.
//
// An object's name is its keyed ID: it is written once and never
// overwritten (backend.Put refuses). So a damaged object (bit rot, a
// truncated file, or garbage someone with add access planted under the
// name of a chunk a future backup will store) can only be replaced after
// it is moved out of the way. Two rules keep a damaged object from
// spreading into new generations:
//
//   - A backup that finds its object already stored reads and
//     authenticates it (confirmStored) before counting it as stored; a bad one fails the
//     backup with ErrStoredDamaged, naming the object, and nothing is
//     committed.
//   - Repair moves damaged objects to quarantine/ (a copy first, then the
//     delete: nothing is lost that cannot be put back) and removes them,
//     and every indexed segment list naming a damaged chunk, from the
//     index. The next backup of the same data then stores the content
//     again under the same name, which also heals the older generations
//     that referenced it. Repair lists the generations that stay damaged
//     until then.

// ErrStoredDamaged means a backup found the object it was about to store
// already present under its name, but damaged: the backup stops rather
// than reference it.
var ErrStoredDamaged = errors.New("already stored, but the stored object is damaged")

// confirmStored checks the object a Put found present (ErrExist) under
// name before the backup counts it as stored: it is read, authenticated
// and its content compared with what would have been stored (a chunk or
// table by its keyed ID, a segment list by its bytes: list, which the
// caller must not reuse). Size and header alone are not enough: anyone
// who saw an object before prune removed it knows both, and can plant a
// fake of the same size and header under its name for when the content
// comes back. Put finds an object present only after an interrupted run
// whose journal was lost or a concurrent backup of the same data, so the
// read is rare.
func (r *Repository) confirmStored(ctx context.Context, t ObjectType, id crypto.ID, list []byte) error {
	name := dataName(id)
	problem, err := r.verifyData(ctx, id, t, list)
	if err != nil {
		return fmt.Errorf("confirm %s %s: %w", t, name, err)
	}
	if problem != "" {
		return storedDamaged(name, errors.New(problem))
	}
	return nil
}

func storedDamaged(name string, why error) error {
	return fmt.Errorf("%s: %w (%v): run `vmvault repair %s` where the repository allows deletes (on the server for an append-only account), then back up again", name, ErrStoredDamaged, why, name)
}

// verifyData reads data object id in full and returns what is wrong
// with it, or "" if it is sound. want is its type (0: whatever its header
// says); list, if not nil, is the segment list it must hold. An error is
// returned only when the object could not be judged (I/O, cancellation).
func (r *Repository) verifyData(ctx context.Context, id crypto.ID, want ObjectType, list []byte) (string, error) {
	name := dataName(id)
	sealed, err := getBounded(ctx, r.be, name, maxDataObject)
	switch {
	case errors.Is(err, backend.ErrNotExist):
		return "missing", nil
	case errors.Is(err, ErrCorrupt):
		return err.Error(), nil
	case err != nil:
		return "", err
	}
	h, err := parseHeader(sealed)
	if err != nil {
		return err.Error(), nil
	}
	t := h.Type
	if want != 0 && t != want {
		return fmt.Sprintf("is a %s object, expected a %s", t, want), nil
	}
	plain, err := r.codec.open(t, name, sealed)
	if err != nil {
		return err.Error(), nil
	}
	switch t {
	case TypeChunk:
		if r.chunkH.Sum(plain) != id {
			return "content does not match its ID", nil
		}
	case TypeTable:
		if r.tableH.Sum(plain) != id {
			return "content does not match its ID", nil
		}
	case TypeSegment:
		if _, err := decodeSegmentList(plain); err != nil {
			return err.Error(), nil
		}
		if list != nil && !bytes.Equal(plain, list) {
			return "segment list differs from the one to store", nil
		}
	default:
		return fmt.Sprintf("a %s object among data objects", t), nil
	}
	return "", nil
}

// RepairOptions select what Repair works on.
type RepairOptions struct {
	// Objects names the data objects to repair ("data/ab/ab12…" or the
	// 64-digit ID). Each is read and verified first; a sound one is left
	// alone. Empty means every damaged data object Check finds.
	Objects []string
	// ReadData makes the Check (when Objects is empty) decrypt and verify
	// every chunk, as check --read-data; else only structure and headers.
	ReadData bool
	// DryRun reports what would be done and changes nothing.
	DryRun bool
}

// Quarantined is one damaged data object Repair moved (or would move).
type Quarantined struct {
	Object  string `json:"object"`
	Problem string `json:"problem"`
	// To is where the object's bytes are kept; empty for a missing object
	// (only removed from the index).
	To string `json:"to,omitempty"`
}

// RepairReport is the outcome of Repair.
type RepairReport struct {
	Quarantined []Quarantined `json:"quarantined"`
	// Sound lists named objects that verified and were left alone.
	Sound []string `json:"sound,omitempty"`
	// Deindexed counts the index entries removed: the damaged objects and
	// the segment lists that name a damaged chunk.
	Deindexed      int `json:"deindexed"`
	IndexWritten   int `json:"index_written"`
	IndexRemoved   int `json:"index_removed"`
	SegmentsListed int `json:"segments_listed"` // indexed segment lists read
	// Damaged lists the generations ("vm/shortid") that reference a
	// quarantined or missing object: damaged until a backup stores the
	// same content again (or forget removes them).
	Damaged []string `json:"damaged_generations"`
	// Unhandled is damage Repair does not move (index objects, manifests
	// that could not be fetched), from the Check it ran. Manifests that
	// fail authentication are quarantined like data objects.
	Unhandled []Damage `json:"unhandled,omitempty"`
	DryRun    bool     `json:"dry_run,omitempty"`
}

// Repair quarantines damaged data objects and takes them out of the
// index, so the next backup stores their content again. The caller holds
// an exclusive lock, and the backend must allow deletes.
func (r *Repository) Repair(ctx context.Context, opts RepairOptions) (*RepairReport, error) {
	rep := &RepairReport{Quarantined: []Quarantined{}, Damaged: []string{}, DryRun: opts.DryRun}
	damaged := map[crypto.ID]string{}
	var manifests []Damage // under a manifest name, failing authentication
	if len(opts.Objects) == 0 {
		crep, err := r.Check(ctx, CheckOptions{ReadData: opts.ReadData})
		if err != nil {
			return nil, err
		}
		if opts.DryRun {
			rep.Damaged = generationsOf(crep.Damage)
		}
		for _, d := range crep.Damage {
			if r.foreignManifest(ctx, d.Object) {
				manifests = append(manifests, d)
				continue
			}
			id, ok := dataObjectID(d.Object)
			if !ok {
				rep.Unhandled = append(rep.Unhandled, d)
				continue
			}
			damaged[id] = d.Problem
		}
	} else {
		for _, o := range opts.Objects {
			id, ok := dataObjectID(o)
			if !ok {
				return nil, fmt.Errorf("repair %q: not a data object name (data/xx/<64 hex digits>) or ID", o)
			}
			problem, err := r.verifyData(ctx, id, 0, nil)
			if err != nil {
				return nil, fmt.Errorf("repair %s: %w", dataName(id), err)
			}
			if problem == "" {
				rep.Sound = append(rep.Sound, dataName(id))
				continue
			}
			damaged[id] = problem
		}
	}
	if len(damaged) == 0 && len(manifests) == 0 {
		return rep, r.damagedGenerations(ctx, rep)
	}
	if !opts.DryRun {
		if err := r.CheckDeletable(ctx); err != nil {
			return nil, err
		}
	}
	stamp := strconv.FormatInt(time.Now().Unix(), 10)
	for _, d := range manifests {
		q := Quarantined{Object: d.Object, Problem: d.Problem, To: "quarantine/" + d.Object + "." + stamp}
		if !opts.DryRun {
			if err := r.quarantine(ctx, q.Object, q.To); err != nil {
				return rep, err
			}
		}
		rep.Quarantined = append(rep.Quarantined, q)
	}
	if len(damaged) == 0 {
		return rep, r.damagedGenerations(ctx, rep)
	}
	remove, err := r.planDeindex(ctx, damaged, rep)
	if err != nil {
		return nil, err
	}
	ids := make([]crypto.ID, 0, len(damaged))
	for id := range damaged {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return bytes.Compare(ids[i][:], ids[j][:]) < 0 })
	for _, id := range ids {
		q := Quarantined{Object: dataName(id), Problem: damaged[id]}
		_, err := r.be.Stat(ctx, q.Object)
		switch {
		case errors.Is(err, backend.ErrNotExist):
			// Missing: only taken out of the index.
		case err != nil:
			return rep, fmt.Errorf("repair %s: %w", q.Object, err)
		default:
			q.To = "quarantine/" + q.Object + "." + stamp
			if !opts.DryRun {
				if err := r.quarantine(ctx, q.Object, q.To); err != nil {
					return rep, err
				}
			}
		}
		rep.Quarantined = append(rep.Quarantined, q)
	}
	if !opts.DryRun {
		if err := r.rewriteIndex(ctx, remove, rep); err != nil {
			return rep, err
		}
	} else {
		rep.Deindexed = 0
		for _, ents := range remove {
			rep.Deindexed += len(ents)
		}
	}
	return rep, r.damagedGenerations(ctx, rep)
}

// foreignManifest reports whether object is a manifest that fails
// authentication or does not parse (ErrCorrupt, read again now): planted
// by someone with add-only access, or damaged. No restore can use it, and
// it stops prune, which cannot know what it references; repair moves it
// to quarantine/. A manifest that cannot be fetched (a network error, or
// too large to read) is not one: it stays for the admin.
func (r *Repository) foreignManifest(ctx context.Context, object string) bool {
	hex, ok := strings.CutPrefix(object, "manifests/")
	if !ok {
		return false
	}
	_, err := r.LoadManifest(ctx, hex)
	return errors.Is(err, ErrCorrupt)
}

// dataObjectID parses "data/xx/<hex>" or a bare 64-digit hex ID.
func dataObjectID(s string) (crypto.ID, bool) {
	h := s
	if strings.HasPrefix(s, "data/") {
		h = shortName(s)
	}
	id, err := parseID(h)
	if err != nil || (h != s && dataName(id) != s) {
		return crypto.ID{}, false
	}
	return id, true
}

// planDeindex returns, per index object, the entries to remove: the
// damaged objects, and every indexed segment list that names a damaged
// chunk (a backup reuses an indexed segment whole, trusting its chunks).
// A segment list that cannot be read is itself damaged.
func (r *Repository) planDeindex(ctx context.Context, damaged map[crypto.ID]string, rep *RepairReport) (map[string][]crypto.ID, error) {
	names, err := r.listIndexNames(ctx)
	if err != nil {
		return nil, err
	}
	byObject := map[string][]IndexEntry{}
	segs := map[crypto.ID]bool{}
	for n := range names {
		entries, err := r.loadIndexObject(ctx, n)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			r.log.Warn("skipping unreadable index object", "name", n, "err", err)
			continue
		}
		byObject[n] = entries
		for _, e := range entries {
			if e.Type == TypeSegment {
				segs[e.ID] = true
			}
		}
	}
	var mu sync.Mutex
	dependent := map[crypto.ID]bool{}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for sid := range segs {
		if _, bad := damaged[sid]; bad {
			continue
		}
		g.Go(func() error {
			raw, err := r.getData(gctx, TypeSegment, sid)
			var entries []SegmentEntry
			if err == nil {
				entries, err = decodeSegmentList(raw)
			}
			mu.Lock()
			defer mu.Unlock()
			rep.SegmentsListed++
			if err != nil {
				if gctx.Err() != nil {
					return gctx.Err()
				}
				dependent[sid] = true
				return nil
			}
			for _, e := range entries {
				if _, bad := damaged[e.ID]; bad && !e.Zero {
					dependent[sid] = true
					break
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	remove := map[string][]crypto.ID{}
	for n, entries := range byObject {
		for _, e := range entries {
			if _, bad := damaged[e.ID]; bad || dependent[e.ID] {
				remove[n] = append(remove[n], e.ID)
			}
		}
	}
	return remove, nil
}

// quarantine copies object name to to and then deletes it. An object too
// large to copy is left in place: the admin moves it by hand.
func (r *Repository) quarantine(ctx context.Context, name, to string) error {
	data, err := getBounded(ctx, r.be, name, maxDataObject)
	if errors.Is(err, ErrTooLarge) {
		return fmt.Errorf("quarantine %s: %w: move it out of the repository by hand, then run repair again", name, err)
	}
	if err != nil {
		return fmt.Errorf("quarantine %s: %w", name, err)
	}
	if err := r.be.Put(ctx, to, data); err != nil {
		return fmt.Errorf("quarantine %s: copy to %s: %w", name, to, err)
	}
	if err := r.be.Delete(ctx, name); err != nil && !errors.Is(err, backend.ErrNotExist) {
		return fmt.Errorf("quarantine %s (copied to %s): %w", name, to, err)
	}
	return nil
}

// rewriteIndex replaces every index object that lists a removed entry
// by one without it. The new index object is written before the old one
// is deleted, so a crash leaves the entry listed (repair again), never an
// object unindexed that a manifest needs.
func (r *Repository) rewriteIndex(ctx context.Context, remove map[string][]crypto.ID, rep *RepairReport) error {
	names := make([]string, 0, len(remove))
	for n := range remove {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		entries, err := r.loadIndexObject(ctx, n)
		if err != nil {
			return fmt.Errorf("rewrite %s: %w", n, err)
		}
		drop := map[crypto.ID]bool{}
		for _, id := range remove[n] {
			drop[id] = true
		}
		kept := entries[:0]
		for _, e := range entries {
			if drop[e.ID] {
				rep.Deindexed++
				continue
			}
			kept = append(kept, e)
		}
		if len(kept) > 0 {
			name := indexName(randomID())
			if err := r.be.Put(ctx, name, r.codec.seal(TypeIndex, name, encodeIndex(kept))); err != nil {
				return fmt.Errorf("rewrite %s: %w", n, err)
			}
			rep.IndexWritten++
		}
		if err := r.be.Delete(ctx, n); err != nil && !errors.Is(err, backend.ErrNotExist) {
			return fmt.Errorf("rewrite %s: remove the old index object: %w", n, err)
		}
		rep.IndexRemoved++
	}
	if r.idx != nil {
		r.idx.Close()
		r.idx = nil
	}
	return nil
}

// damagedGenerations fills rep.Damaged from a structure check: the
// generations that still reference a missing (quarantined) or damaged
// object. A dry run keeps what the first check found.
func (r *Repository) damagedGenerations(ctx context.Context, rep *RepairReport) error {
	if rep.DryRun {
		return nil
	}
	crep, err := r.Check(ctx, CheckOptions{})
	if err != nil {
		return err
	}
	rep.Damaged = generationsOf(crep.Damage)
	return nil
}

// generationsOf returns the generations the damage affects, sorted.
func generationsOf(damage []Damage) []string {
	out := []string{}
	seen := map[string]bool{}
	for _, d := range damage {
		for _, g := range d.Generations {
			if !seen[g] {
				seen[g] = true
				out = append(out, g)
			}
		}
	}
	sort.Strings(out)
	return out
}
