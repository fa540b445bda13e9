#!/usr/bin/env bash
# The whole test suite, including the tests that drive a real Postfix. Installs Postfix (and its
# lmdb: tables, for the end-to-end benchmark's smoke run) from Debian's packages when missing
# (needs root), then runs every test target.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v postfix >/dev/null 2>&1 || ! dpkg -s postfix-lmdb >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "tests/run.sh: Postfix is not installed and this is not root;" >&2
        echo "  install it: apt-get install postfix postfix-lmdb (debconf: main_mailer_type = No configuration)" >&2
        exit 2
    fi
    apt-get update -qq
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postfix postfix-lmdb >/dev/null
fi
cargo test --all-targets --features postfix-tests
