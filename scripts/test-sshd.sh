#!/usr/bin/env bash
# Starts a private OpenSSH server for the SSH tests and benchmark:
#   scripts/test-sshd.sh DIR PORT
# DIR receives its own host keys, client keys (ed25519, ecdsa, rsa, and an ed25519 key with the
# passphrase in DIR/passphrase), authorized_keys, sshd_config and log. sshd listens on
# 127.0.0.1:PORT as a child of this script. The login user is `aiops-test` (created when
# missing) with the password in DIR/password. Prints `ready` once sshd accepts connections, then
# waits for standard input to close and stops sshd: the caller keeps the pipe open as long as
# it needs the server, so sshd never outlives the test process.
set -euo pipefail
dir="$1"
port="$2"
user=aiops-test
here="$(cd "$(dirname "$0")" && pwd)"
"$here/ensure-sshd.sh" >&2

mkdir -p "$dir" /run/sshd
chmod 755 "$dir"
password="aiops-test-password-1"
# One password for every run, so that parallel test binaries do not fight over it.
(
    flock 9
    if ! id "$user" >/dev/null 2>&1; then
        useradd --create-home --shell /bin/sh "$user"
    fi
    echo "$user:$password" | chpasswd
) 9>/tmp/aiops-test-sshd-user.lock
printf '%s' "$password" > "$dir/password"

keygen() { ssh-keygen -q -t "$1" ${2:+-b "$2"} -N "${3:-}" -C "aiops-test-$1" -f "$4" </dev/null; }
for t in ed25519 ecdsa rsa; do
    [ -f "$dir/host_$t" ] || keygen "$t" "" "" "$dir/host_$t"
done
[ -f "$dir/other_host_ed25519" ] || keygen ed25519 "" "" "$dir/other_host_ed25519"
[ -f "$dir/id_ed25519" ] || keygen ed25519 "" "" "$dir/id_ed25519"
[ -f "$dir/id_ecdsa" ] || keygen ecdsa 256 "" "$dir/id_ecdsa"
[ -f "$dir/id_rsa" ] || keygen rsa 3072 "" "$dir/id_rsa"
printf '%s' "correct horse passphrase" > "$dir/passphrase"
[ -f "$dir/id_ed25519_pass" ] || keygen ed25519 "" "$(cat "$dir/passphrase")" "$dir/id_ed25519_pass"
cat "$dir"/id_*.pub > "$dir/authorized_keys"
chmod 644 "$dir/authorized_keys"

cat > "$dir/sshd_config" <<CONF
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_ed25519
HostKey $dir/host_ecdsa
HostKey $dir/host_rsa
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
UsePAM no
AllowUsers $user
MaxSessions 100
MaxStartups 200:30:400
MaxAuthTries 10
LoginGraceTime 30
PrintMotd no
Subsystem sftp internal-sftp
CONF

/usr/sbin/sshd -D -e -f "$dir/sshd_config" 2>>"$dir/sshd.log" &
sshd_pid=$!
trap 'kill "$sshd_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo ready
        # Block until the caller closes our standard input (it exited or is done).
        cat >/dev/null || true
        exit 0
    fi
    kill -0 "$sshd_pid" 2>/dev/null || { echo "sshd exited; see $dir/sshd.log" >&2; exit 1; }
    sleep 0.05
done
echo "sshd did not start listening on 127.0.0.1:$port; see $dir/sshd.log" >&2
exit 1
