# vmvault: the two set-up commands of the README, and a few conveniences.
.PHONY: demo test build bench fuzz faults

build:
	go build -o bin/vmvault ./cmd/vmvault

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

bench:
	bash bench/compare.sh

# Every fuzzer for FUZZTIME each (default 2m); not part of CI.
FUZZTIME ?= 2m
fuzz:
	bash scripts/fuzz.sh $(FUZZTIME)

# The fault campaign of issue 9 (root; several minutes); not part of CI.
faults:
	bash scripts/faults.sh
