#!/bin/bash
# The whole test suite: installs what the tests need (Debian packages),
# checks formatting, vet and staticcheck, then runs every test against real
# services (each test package starts its own sshd / MariaDB / qemu guest on
# 127.0.0.1 in a temp dir and stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
# MinIO and mc for the S3 tests build in the background (minutes of CPU)
# while the rest runs; internal/testminio waits for them. Never left
# running: the build's process group is ended when this script exits.
tools_log=${XDG_CACHE_HOME:-$HOME/.cache}/vmvault-tools/build.log
mkdir -p "$(dirname "$tools_log")"
setsid bash scripts/tools.sh >"$tools_log" 2>&1 </dev/null &
tools_pid=$!
trap 'kill -- -$tools_pid 2>/dev/null || true' EXIT
VMVAULT_SKIP_TOOLS=1 bash scripts/deps.sh

echo "== gofmt"
bad=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$bad" ]; then echo "gofmt needed: $bad" >&2; exit 1; fi
echo "== go vet"
go vet ./...
echo "== staticcheck"
go run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...
echo "== go test"
go test -count=1 -timeout 40m "$@" ./...
# The servers and stores run many goroutines over shared caches: their
# packages once more under the race detector (about a minute; the rest
# of the suite under it takes far longer, mostly repo's 5 minutes).
echo "== go test -race (servers and stores)"
go test -race -count=1 -timeout 10m ./fusefs/ ./nbd/ ./backend/local/ ./backend/limit/ ./backend/retry/ ./crypto/
