# vmvault: the two set-up commands of the README, and a few conveniences.
.PHONY: demo test build bench

build:
	go build -o bin/vmvault ./cmd/vmvault

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

bench:
	bash bench/compare.sh
