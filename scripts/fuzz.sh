#!/usr/bin/env bash
# Runs every fuzzer of the module for a given time each (default 2m):
#   scripts/fuzz.sh [DURATION]      e.g. scripts/fuzz.sh 30s
# Not part of CI (too long). A failing input is written by `go test` to
# PKG/testdata/fuzz/FuzzNAME/ and the script exits non-zero: commit that
# file with the fix, so the input stays a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
time=${1:-${FUZZTIME:-2m}}
failed=0
runs=0
while IFS= read -r line; do
	file=${line%%:*}
	name=$(sed -E 's/^.*func (Fuzz[A-Za-z0-9_]+)\(.*/\1/' <<<"$line")
	pkg=./$(dirname "$file")
	echo "== $pkg $name ($time)"
	runs=$((runs + 1))
	if ! go test -run '^$' -fuzz "^${name}\$" -fuzztime "$time" "$pkg"; then
		echo "FAIL: $pkg $name" >&2
		failed=$((failed + 1))
	fi
done < <(grep -rn --include='*_test.go' -E '^func Fuzz[A-Za-z0-9_]+\(f \*testing\.F\)' . | sed 's|^\./||' | sort)
echo "fuzzers run: $runs, failed: $failed"
[ "$failed" -eq 0 ]
