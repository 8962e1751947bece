#!/bin/sh
# /init of a NetKernel guest (adapters/kvm, docs/kvm.md): busybox sh, PID 1.
#
# The guest has no network device. It runs one command with the GuestLib: nk-agent maps
# the NK device (PCI 1af4:1110, BAR 2, NETKERNEL_DEVICE=pci) and libnkpreload.so is
# preloaded into the command, as `netkernel run` does on a host. The run's own archive
# holds /nk/cmd.sh (the command as `set -- ARGS`, NK_NAME, and NK_NIC). With NK_NIC=user
# (`netkernel vm --nic user`, the benchmark's baseline) the guest instead has a virtio-net
# NIC on QEMU's user-mode network: its modules are loaded, eth0 gets 10.0.2.15/24 (the
# host is 10.0.2.2), and the command runs on the guest's own kernel stack, without the
# GuestLib. This script reports on the console (ttyS0), one marker a line, the host
# reading them (adapters/kvm/qemu.py):
#   @@NK-INIT@@            init has started (the host's boot time ends here)
#   @@NK-AGENT ok@@        nk-agent has mapped the device and listens
#   @@NK-AGENT failed@@    it has not (its message is on the console before it); the
#                          command still runs, its sockets failing with ENETDOWN
#   @@NK-NIC ok|failed@@   (NK_NIC=user) eth0 is configured, or not
#   @@NK-EXIT <status>@@   the command's exit status (128+N for signal N)
# The command's stdout is ttyS1, its stderr ttyS2, both raw. Then the guest powers off.
export PATH=/usr/bin HOME=/root LANG=C.UTF-8 TERM=dumb PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo "@@NK-INIT@@"

. /nk/cmd.sh
stty -F /dev/ttyS1 raw -echo
stty -F /dev/ttyS2 raw -echo

# Kernel modules: /usr/lib/netkernel/modules/GROUP.order (adapters/kvm/image.py).
load() {
    for m in $(cat /usr/lib/netkernel/modules/$1.order); do
        insmod /usr/lib/netkernel/modules/$m.ko || echo "insmod $m failed"
    done
}

if [ "$NK_NIC" = user ]; then
    nic=failed
    load nic
    i=0
    while [ $i -lt 50 ] && [ ! -e /sys/class/net/eth0 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    ip link set lo up && ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 &&
        ip route add default via 10.0.2.2 && nic=ok
    echo "@@NK-NIC $nic@@"
    cd /root
    "$@" </dev/null >/dev/ttyS1 2>/dev/ttyS2
    echo "@@NK-EXIT $?@@"
    poweroff -f
fi

# unix_diag: how the agent tells an app end still open from a closed one (PRE-6).
load agent
# The agent: ready byte on fd 3, the hold on fd 4 (EOF once the command is done, PRE-1).
mkfifo /run/nk-ready /run/nk-hold
exec 5<>/run/nk-hold
NETKERNEL_DEVICE=pci nk-agent --socket /run/nk-agent.sock --ready-fd 3 --hold-fd 4 \
    --idle-ms 100 --name "$NK_NAME" 3>/run/nk-ready 4</run/nk-hold 5>&- </dev/null &
agent=$!
if [ "$(head -c 1 /run/nk-ready | wc -c)" = 1 ]; then
    echo "@@NK-AGENT ok@@"
else
    echo "@@NK-AGENT failed@@"
fi

export LD_PRELOAD=/usr/lib/netkernel/libnkpreload.so NETKERNEL_AGENT=/run/nk-agent.sock
export NETKERNEL_PRELOAD=/usr/lib/netkernel/libnkpreload.so
export NETKERNEL_AGENT_BIN=/usr/bin/nk-agent NETKERNEL_DEVICE=pci
cd /root
"$@" </dev/null >/dev/ttyS1 2>/dev/ttyS2 5>&-
status=$?
unset LD_PRELOAD

# Let the agent deliver what the command sent before it ended (GL-10), 10 s at most.
exec 5>&-
i=0
while [ $i -lt 100 ] && [ -e /proc/$agent ] && ! grep -qs '^[0-9]* ([^)]*) Z' /proc/$agent/stat; do
    sleep 0.1
    i=$((i + 1))
done
echo "@@NK-EXIT $status@@"
poweroff -f
