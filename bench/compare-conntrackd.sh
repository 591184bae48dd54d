#!/usr/bin/env bash
# nicsync beside netfilter's conntrackd, on one machine and one workload:
# live replication, single new connection, full resync with and without
# loss. See docs/conntrack.md, "Comparison with conntrackd".
#
#   sudo bench/compare-conntrackd.sh                 # the defaults: 100k live, 1M resync, 5 % loss
#   sudo bench/compare-conntrackd.sh --json          # one JSON object
#   sudo bench/compare-conntrackd.sh --entries 10000 --resync-entries 100000
#
# Every argument goes to `nicsync bench conntrack` (--help lists them).
# Needs root: it creates two network namespaces and a veth pair, loads
# nftables rules in them and raises net.netfilter.nf_conntrack_max (restored
# at the end). Installs conntrackd, conntrack, nftables and iproute2 with
# apt-get when they are missing.
set -euo pipefail

cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "compare-conntrackd.sh: needs root (network namespaces, nftables, sysctls); run it with sudo" >&2
    exit 1
fi

missing=()
command -v conntrackd >/dev/null 2>&1 || missing+=(conntrackd)
command -v conntrack >/dev/null 2>&1 || missing+=(conntrack)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ "${#missing[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "compare-conntrackd.sh: missing ${missing[*]}, and no apt-get to install them with" >&2
        exit 1
    fi
    echo "compare-conntrackd.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y "${missing[@]}"; then
        apt-get update
        apt-get install -y "${missing[@]}"
    fi
fi

cargo build --release -p nicsync
exec "${CARGO_TARGET_DIR:-target}/release/nicsync" bench conntrack "$@"
