package main

import (
	"encoding/json"
	"io"
	"strconv"
	"strings"
	"unicode/utf8"
)

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	return enc.Encode(v)
}

// termSafe returns text for a terminal: VM names, tags, hosts and error
// messages can come from a repository that someone else wrote, and an
// escape sequence printed raw can rewrite the screen, the window title or
// worse. Control characters (but newline and tab), other non-printable
// runes (bidi overrides included) and invalid UTF-8 are shown escaped,
// as Go quotes them ("\x1b", "\u202e"). JSON output needs none of this:
// the encoder escapes them itself.
func termSafe(s string) string {
	clean := true
	for _, r := range s {
		if !printable(r) {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n == 1:
			b.WriteString(`\x` + strconv.FormatUint(uint64(s[i])|0x100, 16)[1:])
		case printable(r):
			b.WriteString(s[i : i+n])
		default:
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
		}
		i += n
	}
	return b.String()
}

func printable(r rune) bool {
	return r == '\n' || r == '\t' || (r != utf8.RuneError && strconv.IsPrint(r))
}

// safeWriter passes text through termSafe; see textOut.
type safeWriter struct{ w io.Writer }

func (s safeWriter) Write(p []byte) (int, error) {
	if _, err := io.WriteString(s.w, termSafe(string(p))); err != nil {
		return 0, err
	}
	return len(p), nil
}

// textOut is where a command prints a text table of things read from the
// repository: stdout with escape sequences neutralised. (Never for image
// data: restore writes to a.stdout itself.)
func (a *app) textOut() io.Writer { return safeWriter{a.stdout} }
