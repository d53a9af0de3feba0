package config

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/BurntSushi/toml"
)

// Options change how a configuration is loaded.
type Options struct {
	// SkipFileChecks skips the checks that referenced files exist and that
	// secrets are private: for `vmvault config check --no-files`, and for
	// checking a file meant for another machine.
	SkipFileChecks bool
}

// Load reads and validates the configuration file at path.
func Load(path string) (*Config, error) {
	return LoadWith(path, Options{})
}

// LoadWith is Load with options.
func LoadWith(path string, opts Options) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read configuration: %w", err)
	}
	return Parse(path, data, opts)
}

// Parse validates configuration data; name is the file name used in errors
// and as Config.Path. Referenced files are checked unless
// opts.SkipFileChecks is set.
func Parse(name string, data []byte, opts Options) (*Config, error) {
	var top map[string]toml.Primitive
	md, err := toml.Decode(string(data), &top)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, &Error{File: name, Line: pe.Position.Line, Msg: "syntax error: " + pe.Message}
		}
		return nil, &Error{File: name, Msg: err.Error()}
	}
	d := &doc{file: name, md: md, opts: opts}
	root := &table{d: d, fields: make(map[string]node, len(top))}
	for k, p := range top {
		root.fields[k] = node{key: toml.Key{k}, prim: p}
	}
	cfg := d.config(root)
	if len(d.errs) > 0 {
		// Report in file order, whatever order the checks ran in.
		slices.SortStableFunc(d.errs, func(a, b *Error) int { return a.Line - b.Line })
		errs := make([]error, len(d.errs))
		for i, e := range d.errs {
			errs[i] = e
		}
		return nil, errors.Join(errs...)
	}
	return cfg, nil
}

// doc walks a decoded TOML document, collecting errors as it goes.
//
// BurntSushi/toml records the position of every key but exports it only
// inside the ParseError of a failing Unmarshaler, so doc decodes values
// one at a time as toml.Primitive and asks a probe that always fails for
// the line of a key.
type doc struct {
	file string
	md   toml.MetaData
	opts Options
	errs []*Error
}

// node is one key of the document with its undecoded value.
type node struct {
	key  toml.Key
	prim toml.Primitive
}

func (n node) name() string { return n.key[len(n.key)-1] }

// lineProbe fails on purpose: the ParseError it causes carries the position.
type lineProbe struct{}

func (lineProbe) UnmarshalTOML(any) error { return errors.New("position probe") }

// line returns the line of n, or for an implicit table (the "vm" of
// [vm.vm01], which has no position) the first line of its contents.
func (d *doc) line(n node) int {
	var pe toml.ParseError
	if err := d.md.PrimitiveDecode(n.prim, &lineProbe{}); errors.As(err, &pe) && pe.Position.Line > 0 {
		return pe.Position.Line
	}
	var sub map[string]toml.Primitive
	if d.md.PrimitiveDecode(n.prim, &sub) != nil {
		return 0
	}
	first := 0
	for k, p := range sub {
		l := d.line(node{key: append(slices.Clip(n.key), k), prim: p})
		if l > 0 && (first == 0 || l < first) {
			first = l
		}
	}
	return first
}

func (d *doc) errorf(n node, format string, args ...any) {
	d.errs = append(d.errs, &Error{File: d.file, Line: d.line(n), Key: n.key.String(), Msg: fmt.Sprintf(format, args...)})
}

// typeName is the TOML type of n for error messages.
func (d *doc) typeName(n node) string {
	switch t := d.md.Type(n.key...); t {
	case "", "Hash", "Inline Table":
		return "a table"
	case "Array", "ArrayHash":
		return "an array"
	case "Integer":
		return "an integer"
	case "Bool":
		return "a boolean"
	default:
		return "a " + strings.ToLower(t)
	}
}

// table is a TOML table whose keys are consumed by typed getters; done
// reports the keys nobody asked for.
type table struct {
	d      *doc
	self   node
	fields map[string]node
	used   map[string]bool
}

// table decodes n as a table; nil (after an error) if it is not one.
func (d *doc) table(n node) *table {
	var sub map[string]toml.Primitive
	// Decoding a non-table into a map succeeds with an empty map, so the
	// type is checked first. Implicit tables ("vm" in [vm.a]) have no type.
	if typ := d.md.Type(n.key...); typ != "" && typ != "Hash" && typ != "Inline Table" {
		d.errorf(n, "want a table, got %s", d.typeName(n))
		return nil
	}
	if err := d.md.PrimitiveDecode(n.prim, &sub); err != nil {
		d.errorf(n, "want a table, got %s", d.typeName(n))
		return nil
	}
	t := &table{d: d, self: n, fields: make(map[string]node, len(sub))}
	for k, p := range sub {
		t.fields[k] = node{key: append(slices.Clip(n.key), k), prim: p}
	}
	return t
}

// get marks key used and returns its node.
func (t *table) get(key string) (node, bool) {
	if t.used == nil {
		t.used = make(map[string]bool)
	}
	t.used[key] = true
	n, ok := t.fields[key]
	return n, ok
}

// has reports whether key is set, without using it.
func (t *table) has(key string) bool {
	_, ok := t.fields[key]
	return ok
}

// keys returns the table's keys sorted, for deterministic iteration.
func (t *table) keys() []string {
	ks := make([]string, 0, len(t.fields))
	for k := range t.fields {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

// done reports every key of t that no getter asked for.
func (t *table) done() {
	for _, k := range t.keys() {
		if !t.used[k] {
			t.d.errorf(t.fields[k], "unknown key")
		}
	}
}

// missing reports a required key that is absent, at the table's line.
func (t *table) missing(key string) {
	n := t.self
	t.d.errs = append(t.d.errs, &Error{File: t.d.file, Line: t.d.line(n), Key: n.key.String(),
		Msg: fmt.Sprintf("missing required key %q", key)})
}

// decode decodes key into v, reporting a type error with want.
func (t *table) decode(key string, v any, want string) (node, bool) {
	n, ok := t.get(key)
	if !ok {
		return n, false
	}
	if err := t.d.md.PrimitiveDecode(n.prim, v); err != nil {
		t.d.errorf(n, "want %s, got %s", want, t.d.typeName(n))
		return n, false
	}
	return n, true
}

func (t *table) str(key string) (string, node, bool) {
	var s string
	n, ok := t.decode(key, &s, "a string")
	return s, n, ok
}

// requiredStr is str that reports an absent or empty key.
func (t *table) requiredStr(key string) (string, node, bool) {
	if !t.has(key) {
		t.get(key)
		t.missing(key)
		return "", node{}, false
	}
	s, n, ok := t.str(key)
	if ok && s == "" {
		t.d.errorf(n, "must not be empty")
		return "", n, false
	}
	return s, n, ok
}

func (t *table) boolean(key string) bool {
	var b bool
	t.decode(key, &b, "a boolean (true or false)")
	return b
}

func (t *table) integer(key string) (int, node, bool) {
	var i int
	n, ok := t.decode(key, &i, "an integer")
	return i, n, ok
}

func (t *table) strings(key string) ([]string, node, bool) {
	var ss []string
	n, ok := t.decode(key, &ss, "an array of strings")
	return ss, n, ok
}

func (t *table) sub(key string) *table {
	n, ok := t.get(key)
	if !ok {
		return nil
	}
	return t.d.table(n)
}
