#!/usr/bin/env bash
# What the test suite needs beyond Python packages: OpenSSH's server and client, for the SSH
# cluster's tests (tests/sshd_hosts.py starts real sshd hosts on 127.0.0.2-4); git, for envs from
# git repositories (served over file://, ssh:// and https:// by `git http-backend`); openssl, for
# that HTTPS server's certificate. Installed with apt-get when missing; the tests create their own
# users and need root.
set -euo pipefail
if [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null && command -v git >/dev/null &&
    [ -x "$(git --exec-path 2>/dev/null)/git-http-backend" ] && command -v openssl >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "the tests need OpenSSH's server and client (sshd, ssh), git and openssl: install them with your package manager" >&2
    exit 1
fi
if ! log=$( { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        openssh-server openssh-client git openssl; } 2>&1 ); then
    printf '%s\n' "$log" >&2
    echo "could not install openssh-server, openssh-client, git and openssl" >&2
    exit 1
fi
