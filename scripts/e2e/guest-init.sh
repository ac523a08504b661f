#!/bin/sh
# PID 1 of the end-to-end test guests (busybox sh, from the initramfs).
#
# Two modes, chosen on the kernel command line (vhostmd_e2e=full|mini):
#   full  mount the read-only Debian root (label vhmdroot), chroot into it and
#         run /opt/vhostmd-py/guest-check.py with Debian's python3: the guest
#         distribution (the wheel unpacked in /opt/vhostmd-py/site, its
#         vm-dump-metrics in /opt/vhostmd-py/bin; vm-dump-metrics -b, -i,
#         libmetrics) against the real devices.
#   mini  no Python: talk to the virtio port with busybox tools only, as a
#         second, independent guest for the isolation check.
# Results go to the serial console (a file on the host) between markers; the
# guest powers itself off at the end, and the host has a hard timeout anyway.
export PATH=/bin:/sbin

/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp

say() { echo "E2E: $*"; }

finish() {
    say "E2E-END"
    sync
    poweroff -f
    # poweroff -f does not return; if it ever does, stop the CPU for good.
    echo o > /proc/sysrq-trigger
    sleep 3600
}

mode=$(sed -n 's/.*vhostmd_e2e=\([a-z]*\).*/\1/p' /proc/cmdline)
say "E2E-BEGIN mode=$mode kernel=$(uname -r)"

# Dependency order was computed on the host from the modules' depends= fields
# (there is no depmod/modprobe database in this initramfs).
while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/modules/$mod.ko" 2>/tmp/insmod.err || say "insmod $mod failed: $(cat /tmp/insmod.err)"
done < /modules.order

# No udev here: make /dev/virtio-ports/<name> from sysfs, as udev's rule would.
PORT=/dev/virtio-ports/org.github.vhostmd.1
mkdir -p /dev/virtio-ports
i=0
while [ $i -lt 100 ]; do
    for d in /sys/class/virtio-ports/*; do
        [ -f "$d/name" ] || continue
        name=$(cat "$d/name")
        [ -n "$name" ] && ln -sf "../$(basename "$d")" "/dev/virtio-ports/$name"
    done
    [ -e "$PORT" ] && break
    i=$((i + 1))
    sleep 0.1
done
say "virtio-ports: $(ls /dev/virtio-ports 2>/dev/null | tr '\n' ' ')"
say "uuid: $(cat /sys/class/dmi/id/product_uuid 2>/dev/null)"

# Read the metrics disk the way a guest must: drop the page cache first, or a
# stale header from an earlier read is served again (see GUEST-E2E.md).
# The content after the 16-byte header; the daemon zero-fills the rest.
read_disk() {
    echo 3 > /proc/sys/vm/drop_caches
    dd if="/dev/$1" bs=65536 count=4 2>/dev/null | tail -c +17 | tr -d '\000'
}

# The per-VM disk is the one with the serial vhostmd-pervm.
find_pervm_disk() {
    for b in /sys/block/vd*; do
        [ "$(cat "$b/serial" 2>/dev/null)" = vhostmd-pervm ] && { basename "$b"; return 0; }
    done
    return 1
}

find_metrics_disk() {
    for b in /sys/block/vd*; do
        [ -e "$b" ] || continue
        [ "$(cat "$b/serial" 2>/dev/null)" = vhostmd-pervm ] && continue
        dev=$(basename "$b")
        sig=$(dd if="/dev/$dev" bs=4 count=1 2>/dev/null)
        if [ "$sig" = "mvbd" ]; then
            echo "$dev"
            return 0
        fi
    done
    return 1
}

if [ "$mode" = "mini" ]; then
    my_uuid=$(tr 'A-Z' 'a-z' < /sys/class/dmi/id/product_uuid)
    mdisk=""
    # Wait until the host daemon publishes metrics for two VMs (this one and
    # the full guest): only then does the isolation check mean something.
    deadline=$(( $(cut -d. -f1 /proc/uptime) + 150 ))
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ]; do
        [ -n "$mdisk" ] || mdisk=$(find_metrics_disk) || mdisk=""
        if [ -n "$mdisk" ]; then
            n=$(read_disk "$mdisk" | grep -o "uuid='[^']*'" | sort -u | wc -l)
            [ "$n" -ge 2 ] && break
        fi
        sleep 1
    done
    say "metrics disk: ${mdisk:-none}"
    # One exchange per attempt, in a child under a hard timeout; exec sed so
    # that no grandchild keeps the port open (a second open gets EBUSY).
    # Bounded (20 x at most 6 s) so that a broken host still gets a report
    # to assert on rather than a silent guest.
    tries=0
    while [ $tries -lt 20 ]; do
        tries=$((tries + 1))
        timeout 5 sh -c "exec 3<>$PORT; printf 'GET /metrics/XML\n\n' >&3; exec sed '/^<\/metrics>\$/q' <&3" > /tmp/reply 2>/tmp/reply.err
        if grep -q "uuid='$my_uuid'" /tmp/reply; then
            break
        fi
        sleep 1
    done
    say "virtio tries: $tries"
    echo "E2E-RESULT mini-virtio $(base64 -w 0 < /tmp/reply)"
    if [ -n "$mdisk" ]; then
        # Two identical reads in a row: not caught in the middle of a publish.
        for _ in 1 2 3 4 5; do
            read_disk "$mdisk" > /tmp/disk
            read_disk "$mdisk" > /tmp/disk2
            cmp -s /tmp/disk /tmp/disk2 && break
        done
        echo "E2E-RESULT mini-disk $(base64 -w 0 < /tmp/disk)"
    fi
    # This VM's own disk, read with dd+sed only: the host's metrics and ours.
    pdisk=$(find_pervm_disk) || pdisk=""
    say "per-VM disk: ${pdisk:-none}"
    if [ -n "$pdisk" ]; then
        for _ in $(seq 30); do
            read_disk "$pdisk" | sed -n '/^<metrics>$/,/^<\/metrics>$/p' > /tmp/pervm
            read_disk "$pdisk" | sed -n '/^<metrics>$/,/^<\/metrics>$/p' > /tmp/pervm2
            cmp -s /tmp/pervm /tmp/pervm2 && grep -q "uuid='$my_uuid'" /tmp/pervm && break
            sleep 1
        done
        echo "E2E-RESULT mini-pervm $(base64 -w 0 < /tmp/pervm)"
    fi
    # Stay up (the host destroys this guest once the full guest is done) so
    # that the full guest's virtio check runs while both VMs are live.
    say "E2E-MINI-DONE"
    sleep 600
    finish
fi

if [ "$mode" = "full" ]; then
    root=""
    i=0
    while [ $i -lt 100 ]; do
        root=$(findfs LABEL=vhmdroot 2>/dev/null) && break
        i=$((i + 1))
        sleep 0.1
    done
    if [ -z "$root" ]; then
        say "FATAL: root disk (label vhmdroot) not found"
        finish
    fi
    mkdir -p /newroot
    mount -t ext4 -o ro "$root" /newroot || { say "FATAL: mount $root"; finish; }
    mount --bind /e2e /newroot/opt/vhostmd-py
    mount --bind /dev /newroot/dev
    mount --bind /proc /newroot/proc
    mount --bind /sys /newroot/sys
    mount -t tmpfs tmpfs /newroot/tmp
    say "running guest-check.py"
    chroot /newroot /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp \
        PYTHONPATH=/opt/vhostmd-py/site PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8 \
        /usr/bin/python3 /opt/vhostmd-py/guest-check.py
    say "guest-check.py exit $?"
    finish
fi

say "FATAL: unknown mode '$mode'"
finish
