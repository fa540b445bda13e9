#!/usr/bin/env bash
# The whole test suite, including the tests that drive a real Postfix and real LDAP servers.
# Installs Postfix (with lmdb: tables, for the end-to-end benchmark's smoke run), OpenLDAP's
# slapd, a Samba AD domain controller, the LDAP tools, NSD and BIND's signing tools (the DNSSEC
# testbed of the DANE tests) and Python (for an SMTP client) from
# Debian's packages when missing (needs root), then runs every test target (examples too).
set -euo pipefail
cd "$(dirname "$0")/.."
need=""
for p in postfix postfix-lmdb slapd ldap-utils openssl samba samba-ad-dc samba-ad-provision samba-dsdb-modules miltertest nsd bind9-utils; do
    dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
done
# tests/examples.rs drives the SMTP receiver example with Python's smtplib.
command -v python3 >/dev/null 2>&1 || need="$need python3"
if [ -n "$need" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "tests/run.sh: missing packages:$need, and this is not root;" >&2
        echo "  install them: apt-get install$need (debconf: postfix main_mailer_type = No configuration)" >&2
        exit 2
    fi
    apt-get update -qq
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi
# tests/examples.rs runs the examples' binaries (`cargo test --all-targets` builds them only as
# test harnesses).
cargo build --examples --features postfix-tests,ldap-tests,fault-tests,dane-tests
cargo test --all-targets --features postfix-tests,ldap-tests,fault-tests,dane-tests
