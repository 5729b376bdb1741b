# oxclip: `make quickstart` (set-up, build, synthetic data, a short CPU training run with
# zero-shot evaluation) and `make test`. Everything fetched comes from the package registries
# into $(OXCLIP_CACHE), outside the repo.

OXCLIP_CACHE ?= $(HOME)/.cache/oxclip
export OXCLIP_CACHE
SHELL := bash

# A LIBTORCH of your own (environment or command line) wins over the one setup fetches;
# scripts/setup.sh writes the paths it chose to env.mk (OXCLIP_LIBTORCH, OXCLIP_VOCAB).
USER_LIBTORCH := $(LIBTORCH)
-include $(OXCLIP_CACHE)/env.mk
LIBTORCH := $(or $(USER_LIBTORCH),$(OXCLIP_LIBTORCH))
export LIBTORCH
export OXCLIP_VOCAB

CARGO ?= cargo
BIN := target/release/oxclip

.PHONY: setup build quickstart test lint bench bench-against clean-quickstart fixtures

setup:
	@LIBTORCH="$(USER_LIBTORCH)" bash scripts/setup.sh

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

# One formatting and no clippy warnings (lints the team allows are named, with their reasons,
# in Cargo.toml's [workspace.lints]), then the suite. Tests and clippy run in the release
# profile, sharing the build that `make build` makes.
_test: lint
	$(CARGO) test --release --locked --workspace

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings

bench: build
	@$(MAKE) --no-print-directory _bench

_bench:
	@bash scripts/bench.sh

# Speed against another build, in one run: make bench-against BASE=/path/to/old/oxclip
bench-against: build
	@bash scripts/bench_against.sh "$(BASE)"

clean-quickstart:
	rm -rf data/synth runs/quickstart
