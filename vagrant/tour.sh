#!/usr/bin/env bash
# vagrant/tour.sh — a guided tour of cachefs, run on the client as the vagrant user:
#
#   vagrant ssh client -c 'bash /vagrant/vagrant/tour.sh'
#
# Reads the share, cuts the client's lab network (ip link set IFACE down), reads and edits
# offline while someone edits the same file on the server, brings the link back, syncs,
# and shows the replay and the conflict copy.
set -euo pipefail

SERVER_IP="${SERVER_IP:-192.168.56.10}"
CLIENT_IP="${CLIENT_IP:-192.168.56.11}"
MNT="$HOME/share"
KEY="$HOME/.ssh/cachefs_lab"
SSH=(ssh -i "$KEY" -o StrictHostKeyChecking=accept-new -o ConnectTimeout=5 "vagrant@$SERVER_IP")

IFACE="$(ip -o -4 addr show | awk -v ip="$CLIENT_IP" '$4 ~ "^"ip"/" {print $2; exit}')"
[[ -n $IFACE ]] || { echo "tour: no interface has $CLIENT_IP" >&2; exit 1; }

step=0
say() { step=$((step + 1)); printf '\n\033[1m%d. %s\033[0m\n' "$step" "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

wait_state() {  # wait_state online|offline SECONDS
    local want=$1 deadline=$((SECONDS + $2))
    until cachefs status --json "$MNT" | grep -q "\"state\": \"$want\""; do
        (( SECONDS < deadline )) || { echo "tour: mount not $want after $2 s" >&2; return 1; }
        sleep 0.5
    done
}

link_up() { sudo ip link set "$IFACE" up; }
trap link_up EXIT  # whatever happens, give the client its network back

say "Mount the server's share (if provisioning has not already)"
if ! mountpoint -q "$MNT"; then
    run cachefs mount "vagrant@$SERVER_IP:share" "$MNT" --identity "$KEY" \
        --accept-new-host-key --timeout 3 --heartbeat 2 --attr-timeout 1
fi
run cachefs status "$MNT"

say "Read some files online: they are now in the cache"
run ls -R "$MNT"
run cat "$MNT/README.txt" "$MNT/docs/notes.txt"
run cachefs pin "$MNT/photos"
run getfattr -n user.cachefs.state "$MNT/README.txt" "$MNT/never-read.txt" "$MNT/photos/holiday.raw"

say "Someone will edit docs/notes.txt on the server in 15 s (while we are offline)"
"${SSH[@]}" 'nohup sh -c "sleep 15; printf \"- call Carol (written on the server while the client was offline)\n\" >> share/docs/notes.txt" >/dev/null 2>&1 &'
echo "(scheduled on the server)"

say "Cut the client's network: ip link set $IFACE down"
run sudo ip link set "$IFACE" down
wait_state offline 30
run cachefs status "$MNT"

say "Offline: cached files still read; a file never read fails at once with EHOSTDOWN"
run cat "$MNT/docs/notes.txt"
run sha256sum "$MNT/photos/holiday.raw"
run cat "$MNT/never-read.txt" || echo "(failed as expected: Host is down)"

say "Edit offline: the changes go to the journal"
run sh -c "printf -- '- call Bob (written offline on the client)\n' >> '$MNT/docs/notes.txt'"
run sh -c "printf 'todo written offline\n' > '$MNT/docs/todo.txt'"
run mkdir -p "$MNT/offline-folder"
run cachefs status "$MNT"
run getfattr -n user.cachefs.state "$MNT/docs/notes.txt"

say "Wait for the server-side edit to happen"
sleep 12
echo "(the server's notes.txt has changed by now)"

say "Restore the network: ip link set $IFACE up, then cachefs sync"
run sudo ip link set "$IFACE" up
for attempt in 1 2 3 4 5 6 7 8 9 10; do
    if run cachefs sync "$MNT"; then
        break
    fi
    (( attempt < 10 )) || { echo "tour: sync did not succeed" >&2; exit 1; }
    sleep 2
done
run cachefs status "$MNT"

say "The replay, as the server sees it"
run "${SSH[@]}" 'ls -la share share/docs && cat share/docs/todo.txt'

say "notes.txt changed on both sides: the server's version keeps the name, ours is beside it"
run ls "$MNT/docs"
run cachefs conflicts "$MNT"
run getfattr -n user.cachefs.state "$MNT/docs/notes.txt"
for f in "$MNT"/docs/notes*; do
    printf -- '--- %s\n' "$f"
    cat "$f"
done

say "Settle it: keep both files (or --keep local / --keep remote)"
run cachefs resolve --keep both "$MNT/docs/notes.txt"
run cachefs conflicts "$MNT"

echo
echo "Tour done. Unmount with: cachefs unmount $MNT"
