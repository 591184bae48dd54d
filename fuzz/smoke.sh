#!/usr/bin/env bash
# Fuzz smoke run: builds every fuzz target once, then runs each for a few
# seconds on a scratch copy of its seed corpus (fuzz/corpus/ is never
# modified), with memory limits, and fails if any target crashes, leaks,
# runs out of memory or times out. See docs/fuzzing.md.
#
#   fuzz/smoke.sh [SECONDS_PER_TARGET]      (default 20)
#
# Environment:
#   SMOKE_JOBS      targets fuzzed at once (default: 2, or 1 on one CPU)
#   SMOKE_TARGETS   space-separated subset of targets (default: all)
#   SMOKE_KEEP      1: keep the scratch directory even when all passed
#   FUZZ_SANITIZER  cargo fuzz -s value (default: address)
#
# Needs rustup's stable toolchain and a C++ compiler (libFuzzer is C++);
# installs cargo-fuzz (pinned) if it is missing. RUSTC_BOOTSTRAP=1 lets the
# stable compiler take the -Z flags cargo-fuzz passes.
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
SECS=${1:-20}
RSS_LIMIT_MB=2048
MALLOC_LIMIT_MB=512
TIMEOUT_S=10

# (0 would mean "no limit" to libFuzzer.)
case "$SECS" in
    '' | *[!0-9]* | 0) echo "usage: $0 [SECONDS_PER_TARGET (1 or more)]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")"
FUZZ_DIR=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1
# Our own target directory (fuzz/target), never the workspace's.
unset CARGO_TARGET_DIR

t0=$(date +%s)

if ! command -v cargo >/dev/null 2>&1; then
    echo "smoke: cargo not found; install rustup's stable toolchain" >&2
    exit 1
fi
if ! command -v c++ >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing g++ (libFuzzer is C++)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
    else
        echo "smoke: no C++ compiler (c++); install g++" >&2
        exit 1
    fi
fi
if [ "$(cargo fuzz --version 2>/dev/null | awk '{print $2}')" != "$CARGO_FUZZ_VERSION" ]; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

SANITIZER=${FUZZ_SANITIZER:-address}
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
BIN_DIR="$FUZZ_DIR/target/$TRIPLE/release"

echo "== build (cargo fuzz build -s $SANITIZER)"
cargo fuzz build -s "$SANITIZER"
# The corpus generator and the replayer too: they use the project's APIs
# and would otherwise break unnoticed.
echo "== check (examples: gen_corpus, replay)"
cargo check --examples
t1=$(date +%s)
build_s=$((t1 - t0))

TARGETS=${SMOKE_TARGETS:-$(cargo fuzz list)}
JOBS=${SMOKE_JOBS:-$(($(nproc) >= 2 ? 2 : 1))}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/nicsync-fuzz-smoke.XXXXXX")

# One target: fuzz a copy of its corpus, then write a one-line verdict.
run_target() {
    local t=$1 dir="$SCRATCH/$1"
    mkdir -p "$dir/corpus" "$dir/artifacts"
    if [ -d "$FUZZ_DIR/corpus/$t" ]; then
        cp -r "$FUZZ_DIR/corpus/$t/." "$dir/corpus/"
    fi
    local rc=0
    # libFuzzer flags go before the corpus directory.
    "$BIN_DIR/$t" \
        -max_total_time="$SECS" -timeout="$TIMEOUT_S" \
        -rss_limit_mb="$RSS_LIMIT_MB" -malloc_limit_mb="$MALLOC_LIMIT_MB" \
        -print_final_stats=1 -artifact_prefix="$dir/artifacts/" \
        "$dir/corpus" >"$dir/log" 2>&1 || rc=$?
    local execs
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -1)
    local found
    found=$(find "$dir/artifacts" -type f | head -1)
    if [ "$rc" = 0 ] && [ -z "$found" ]; then
        printf '%-18s ok      %10s execs in %ss\n' "$t" "${execs:-?}" "$SECS" >"$dir/verdict"
    else
        local why
        why=$(grep -m1 -E '^SUMMARY|ERROR: libFuzzer|panicked at|ERROR: LeakSanitizer|out-of-memory|malloc\(' "$dir/log" || true)
        {
            printf '%-18s FAILED  %10s execs (exit %s): %s\n' "$t" "${execs:-?}" "$rc" "${why:-see log}"
            printf '%-18s         log: %s\n' "" "$dir/log"
            for a in "$dir"/artifacts/*; do
                [ -f "$a" ] && printf '%-18s         input: %s\n' "" "$a"
            done
        } >"$dir/verdict"
    fi
}

echo "== fuzz: $SECS s per target, $JOBS at a time (scratch: $SCRATCH)"
running=0
for t in $TARGETS; do
    if [ ! -x "$BIN_DIR/$t" ]; then
        echo "smoke: $BIN_DIR/$t was not built" >&2
        exit 1
    fi
    run_target "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait || true
t2=$(date +%s)

failed=0
for t in $TARGETS; do
    cat "$SCRATCH/$t/verdict" 2>/dev/null || { echo "$t: no verdict"; failed=1; }
    grep -q ' FAILED ' "$SCRATCH/$t/verdict" 2>/dev/null && failed=1
done
echo "== build ${build_s}s, fuzzing $((t2 - t1))s, total $((t2 - t0))s"
if [ "$failed" != 0 ]; then
    echo "smoke: FAILED; crash inputs and logs are under $SCRATCH" >&2
    echo "       reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET INPUT (docs/fuzzing.md)" >&2
    exit 1
fi
if [ "${SMOKE_KEEP:-0}" = 1 ]; then
    echo "scratch kept: $SCRATCH"
else
    rm -rf "$SCRATCH"
fi
echo "smoke: all targets passed"
