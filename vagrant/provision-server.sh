#!/usr/bin/env bash
# vagrant/provision-server.sh — the lab's file server (run as root by `vagrant up`).
# OpenSSH server, a share ~vagrant/share with sample files, and the lab key authorized.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
if ! dpkg-query -W -f='${Status}' openssh-server 2>/dev/null | grep -q "install ok installed"; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends openssh-server
fi
systemctl enable --now ssh

# The client's key (made by the Vagrantfile, synced to /lab): may log in as vagrant.
install -d -m 0700 -o vagrant -g vagrant /home/vagrant/.ssh
touch /home/vagrant/.ssh/authorized_keys
if ! grep -qxF "$(cat /lab/id_rsa.pub)" /home/vagrant/.ssh/authorized_keys; then
    cat /lab/id_rsa.pub >> /home/vagrant/.ssh/authorized_keys
fi
chown vagrant:vagrant /home/vagrant/.ssh/authorized_keys
chmod 0600 /home/vagrant/.ssh/authorized_keys

# Sample files (made once, so a re-provision keeps what the tour changed).
share=/home/vagrant/share
if [[ ! -e $share ]]; then
    install -d -o vagrant -g vagrant "$share" "$share/docs" "$share/photos"
    printf 'Welcome to the cachefs lab share.\nEverything read here stays readable offline.\n' > "$share/README.txt"
    printf 'Meeting notes\n- buy milk\n' > "$share/docs/notes.txt"
    printf '# Plan\n1. mount\n2. go offline\n3. come back\n' > "$share/docs/plan.md"
    printf 'Nobody has read this file yet.\n' > "$share/never-read.txt"
    head -c $((8 << 20)) /dev/urandom > "$share/photos/holiday.raw"
    chown -R vagrant:vagrant "$share"
fi
echo "server ready: $share shared over SFTP as vagrant@$(hostname -I | tr ' ' '\n' | grep '^192\.168\.56\.' || true)"
