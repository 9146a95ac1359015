#!/usr/bin/env bash
# vagrant/provision-client.sh — the lab's client (run as root by `vagrant up`).
# Sets the machine up with the README's own command (scripts/run setup: Debian packages,
# .venv, pip install), installs the lab key, and mounts the server's share on
# ~vagrant/share with `cachefs mount`.
set -euo pipefail

SERVER_IP="${SERVER_IP:-192.168.56.10}"
REPO=/vagrant
HOME_DIR=/home/vagrant
MNT="$HOME_DIR/share"
KEY="$HOME_DIR/.ssh/cachefs_lab"

as_vagrant() { sudo -u vagrant -H "$@"; }

# 1. The README's set-up, as the user who will mount (scripts/run uses sudo for apt).
as_vagrant bash "$REPO/scripts/run" setup
ln -sf "$REPO/.venv/bin/cachefs" /usr/local/bin/cachefs

# 2. The lab key (made by the Vagrantfile on the host, synced to /lab).
install -d -m 0700 -o vagrant -g vagrant "$HOME_DIR/.ssh"
install -m 0600 -o vagrant -g vagrant /lab/id_rsa "$KEY"
install -m 0644 -o vagrant -g vagrant /lab/id_rsa.pub "$KEY.pub"
grep -q '[[:space:]]server$' /etc/hosts || echo "$SERVER_IP server" >> /etc/hosts

# 3. Mount the share. The first connection records the server's host key
#    (--accept-new-host-key: trust on first use, acceptable on this private lab network;
#    on a real network check the fingerprint first, see docs/troubleshooting.md).
as_vagrant mkdir -p "$MNT"
if mountpoint -q "$MNT"; then
    echo "already mounted: $MNT"
else
    as_vagrant cachefs mount "vagrant@$SERVER_IP:share" "$MNT" --identity "$KEY" \
        --accept-new-host-key --timeout 3 --heartbeat 2 --attr-timeout 1
fi
as_vagrant cachefs status "$MNT"
echo "client ready. Next: vagrant ssh client -c 'bash /vagrant/vagrant/tour.sh'"
