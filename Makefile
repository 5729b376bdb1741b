# oxclip: `make quickstart` (set-up, build, synthetic data, a short CPU training run with
# zero-shot evaluation) and `make test`. Everything fetched comes from the package registries
# into $(OXCLIP_CACHE), outside the repo.

OXCLIP_CACHE ?= $(HOME)/.cache/oxclip
export OXCLIP_CACHE
SHELL := bash

# Paths written by scripts/setup.sh (LIBTORCH, OXCLIP_VOCAB); a LIBTORCH of your own wins.
-include $(OXCLIP_CACHE)/env.mk
export LIBTORCH
export OXCLIP_VOCAB

CARGO ?= cargo
BIN := target/release/oxclip

.PHONY: setup build quickstart test bench clean-quickstart fixtures

setup:
	@bash scripts/setup.sh

# Make re-reads env.mk after setup, so build/test always see the fetched libtorch.
build: setup
	@$(MAKE) --no-print-directory _build

_build:
	$(CARGO) build --release --locked

quickstart: build
	@$(MAKE) --no-print-directory _quickstart

_quickstart:
	@bash scripts/quickstart.sh

test: setup
	@$(MAKE) --no-print-directory _test

# Tests run in the release profile, sharing the build that `make build` makes.
_test:
	$(CARGO) test --release --locked --workspace

bench: build
	@$(MAKE) --no-print-directory _bench

_bench:
	@bash scripts/bench.sh

clean-quickstart:
	rm -rf data/synth runs/quickstart
