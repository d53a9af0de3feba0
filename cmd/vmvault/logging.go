package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"log/syslog"
	"sync"
)

// syslogFacility is where vmvault's messages land: a backup job is a
// system service, not a user session.
const syslogFacility = syslog.LOG_DAEMON

// logSetup is what decides where log records go.
type logSetup struct {
	format      string     // text or json, on stderr
	stderrLevel slog.Level // minimum level on stderr
	syslog      bool       // also send to the local syslog
	syslogLevel slog.Level // minimum level in syslog
	socket      string     // syslog socket; empty means the system's (/dev/log)
}

// newLogger builds the logger and, when syslog is on, a second logger
// that only writes to syslog (for summaries already printed on stderr).
// When the syslog socket cannot be reached, it warns once on stderr and
// returns a stderr-only logger. The returned closer releases the syslog
// connection.
func newLogger(stderr io.Writer, s logSetup) (log, sys *slog.Logger, closer func(), err error) {
	opts := &slog.HandlerOptions{Level: s.stderrLevel}
	var h slog.Handler
	switch s.format {
	case "text", "":
		h = slog.NewTextHandler(stderr, opts)
	case "json":
		h = slog.NewJSONHandler(stderr, opts)
	default:
		return nil, nil, nil, withCode(exitUsage, fmt.Errorf("--log-format must be text or json, not %q", s.format))
	}
	closer = func() {}
	if !s.syslog {
		return slog.New(h), nil, closer, nil
	}
	w, err := dialSyslog(s.socket)
	if err != nil {
		// No syslog (a container, a minimal system, journald stopped) must
		// not stop a backup: say so once and log to stderr only.
		log = slog.New(h)
		log.Warn("syslog is unavailable: logging to stderr only", "err", err)
		return log, nil, closer, nil
	}
	sh := newSyslogHandler(w, s.syslogLevel)
	return slog.New(fanout{h, sh}), slog.New(sh), func() { w.Close() }, nil
}

func dialSyslog(socket string) (*syslog.Writer, error) {
	if socket == "" {
		// The standard socket paths (/dev/log and the BSD ones).
		return syslog.New(syslogFacility|syslog.LOG_INFO, "vmvault")
	}
	return syslog.Dial("unixgram", socket, syslogFacility|syslog.LOG_INFO, "vmvault")
}

// syslogHandler formats records as key=value text without time and
// level (syslog adds both) and sends each with its severity.
type syslogHandler struct {
	w     *syslog.Writer
	level slog.Leveler
	mu    *sync.Mutex
	buf   *bytes.Buffer
	text  slog.Handler // writes into buf
}

func newSyslogHandler(w *syslog.Writer, level slog.Leveler) *syslogHandler {
	buf := new(bytes.Buffer)
	text := slog.NewTextHandler(buf, &slog.HandlerOptions{
		Level: slog.LevelDebug - 8, // the outer handler filters
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && (a.Key == slog.TimeKey || a.Key == slog.LevelKey) {
				return slog.Attr{}
			}
			return a
		},
	})
	return &syslogHandler{w: w, level: level, mu: new(sync.Mutex), buf: buf, text: text}
}

func (h *syslogHandler) Enabled(_ context.Context, l slog.Level) bool {
	return l >= h.level.Level()
}

func (h *syslogHandler) Handle(ctx context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.buf.Reset()
	if err := h.text.Handle(ctx, r); err != nil {
		return err
	}
	msg := string(bytes.TrimRight(h.buf.Bytes(), "\n"))
	switch {
	case r.Level >= slog.LevelError:
		return h.w.Err(msg)
	case r.Level >= slog.LevelWarn:
		return h.w.Warning(msg)
	case r.Level >= slog.LevelInfo:
		return h.w.Info(msg)
	default:
		return h.w.Debug(msg)
	}
}

func (h *syslogHandler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.text = h.text.WithAttrs(as)
	return &c
}

func (h *syslogHandler) WithGroup(name string) slog.Handler {
	c := *h
	c.text = h.text.WithGroup(name)
	return &c
}

// fanout sends every record to each handler that wants it.
type fanout []slog.Handler

func (f fanout) Enabled(ctx context.Context, l slog.Level) bool {
	for _, h := range f {
		if h.Enabled(ctx, l) {
			return true
		}
	}
	return false
}

func (f fanout) Handle(ctx context.Context, r slog.Record) error {
	var errs []error
	for _, h := range f {
		if h.Enabled(ctx, r.Level) {
			errs = append(errs, h.Handle(ctx, r.Clone()))
		}
	}
	return errors.Join(errs...)
}

func (f fanout) WithAttrs(as []slog.Attr) slog.Handler {
	out := make(fanout, len(f))
	for i, h := range f {
		out[i] = h.WithAttrs(as)
	}
	return out
}

func (f fanout) WithGroup(name string) slog.Handler {
	out := make(fanout, len(f))
	for i, h := range f {
		out[i] = h.WithGroup(name)
	}
	return out
}
