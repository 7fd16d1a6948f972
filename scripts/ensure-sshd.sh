#!/usr/bin/env bash
# Makes sure the OpenSSH server binary (sshd) and client tools are installed, for the SSH
# executor tests and benchmark. Idempotent: does nothing when they are already there. The tests
# start their own sshd on a loopback port with their own host keys and configuration; this
# script never touches the system's sshd service.
set -euo pipefail

have_all() {
    [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null && command -v ssh-keygen >/dev/null \
        && command -v setsid >/dev/null
}

have_all && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "ensure-sshd: openssh-server is missing and this is not root; install it with" >&2
    echo "  apt-get install openssh-server openssh-client" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when the package is not installable from the current ones.
if ! apt-get install -y --no-install-recommends openssh-server openssh-client >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y --no-install-recommends openssh-server openssh-client >/dev/null
fi
have_all || { echo "ensure-sshd: sshd still missing after install" >&2; exit 1; }
