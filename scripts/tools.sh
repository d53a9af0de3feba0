#!/bin/bash
# Builds the MinIO server and client that the S3 tests run (they are not
# Debian packages) with `go install`, into a cache directory outside the
# checkout, only when missing:
#   ${VMVAULT_TOOLS_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/vmvault-tools/bin}
# The minio build takes about 7 CPU-minutes, so scripts/test.sh runs this
# in the background; while a build runs, <bin>/../NAME.building holds this
# script's PID, and internal/testminio waits for the binary.
set -euo pipefail
BIN=${VMVAULT_TOOLS_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/vmvault-tools/bin}
MINIO=github.com/minio/minio@v0.0.0-20260212201848-7aac2a2c5b7c
MC=github.com/minio/mc@v0.0.0-20250313080218-cf909e1063a9
mkdir -p "$BIN"
STATE=$(dirname "$BIN")
todo=()
for name in minio mc; do
	[ -x "$BIN/$name" ] || { todo+=("$name"); echo $$ >"$STATE/$name.building"; }
done
trap 'for n in minio mc; do [ "$(cat "$STATE/$n.building" 2>/dev/null)" = $$ ] && rm -f "$STATE/$n.building"; done' EXIT
for name in "${todo[@]}"; do
	mod=$MINIO
	[ "$name" = mc ] && mod=$MC
	tmp=$(mktemp -d "$STATE/build-$name.XXXXXX")
	echo "tools: go install $mod" >&2
	# The binary appears under its name only once complete.
	GOBIN=$tmp CGO_ENABLED=0 go install "$mod"
	mv "$tmp/$name" "$BIN/$name"
	rmdir "$tmp"
	rm -f "$STATE/$name.building"
done
