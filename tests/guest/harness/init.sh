#!/bin/sh
# PID 1 of the oomguard test guest (runs from the initramfs, busybox ash).
#
# Builds a root for the test command out of the host's / (9p, read-only) with
# tmpfs-backed overlays where things must be writable, then chroots into it to
# run /results/.guest/cmd.sh (written by vm.py), stores the exit status in
# /results/rc and powers off.  Lines starting with "OOMGUARD-GUEST" are read by
# the host side (vm.py); keep their wording in sync.  In the systemd flavour
# (harness/systemd.py) it hands over to systemd instead of chrooting.

/bin/busybox --install -s /bin
export PATH=/bin HOME=/ TERM=dumb

H=/host        # host root, 9p read-only
R=/newroot     # root of the test command (tmpfs + binds + overlays)
W="tmp var etc root home srv opt mnt media"   # writable top-level dirs

die() {
    echo "OOMGUARD-GUEST-ERROR: $*"
    echo o >/proc/sysrq-trigger
    sleep 5
    poweroff -f
}

mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs devtmpfs /dev \
    || die "cannot mount proc/sys/dev"
grep -qw oomguard.debug /proc/cmdline && set -x

for m in $(cat /etc/modules); do
    insmod "/lib/modules/$m.ko" || die "insmod $m failed"
done

OPTS=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "ro,$OPTS,cache=loose" hostroot $H || die "cannot mount the host root over 9p"
mount -t tmpfs -o mode=0755 newroot $R && mount -t tmpfs -o mode=0755 overlays /ovl \
    || die "cannot mount tmpfs"

# overlay DIR: writable tmpfs-backed overlay over the host's DIR at $R/DIR
overlay() {
    key=$(echo "$1" | tr / _)
    mkdir -p "/ovl/$key/upper" "/ovl/$key/work" "$R$1"
    if [ -d "$H$1" ]; then
        mount -t overlay -o "lowerdir=$H$1,upperdir=/ovl/$key/upper,workdir=/ovl/$key/work" overlay "$R$1"
    else
        mount -t tmpfs -o mode=0755 tmpfs "$R$1"
    fi || die "cannot make $1 writable"
}

# The host's top-level entries: symlinks copied, dirs/files bound read-only.
for p in $H/* $H/.[!.]*; do
    n=${p#$H/}
    case " proc sys dev run results lost+found $W " in *" $n "*) continue ;; esac
    if [ -L "$p" ]; then
        ln -s "$(readlink "$p")" "$R/$n"
    elif [ -d "$p" ]; then
        mkdir "$R/$n" && mount --bind "$p" "$R/$n" || die "cannot bind $n"
    elif [ -f "$p" ]; then
        touch "$R/$n" && mount --bind "$p" "$R/$n" || die "cannot bind $n"
    fi
done
for d in $W; do overlay "/$d"; done
chmod 1777 $R/tmp
chmod 0755 $R/root   # host /root is 0700: let users run /root/.pyenv python and read repos there

mkdir -p $R/proc $R/sys $R/dev $R/run $R/results
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t cgroup2 -o nsdelegate cgroup2 $R/sys/fs/cgroup || die "cannot mount cgroup2"
for c in memory pids; do
    echo "+$c" >$R/sys/fs/cgroup/cgroup.subtree_control || die "cannot enable the $c controller"
done
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts $R/dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm $R/dev/shm
ln -sf /proc/self/fd $R/dev/fd
ln -sf /proc/self/fd/0 $R/dev/stdin
ln -sf /proc/self/fd/1 $R/dev/stdout
ln -sf /proc/self/fd/2 $R/dev/stderr
mount -t tmpfs -o mode=0755,nosuid,nodev run $R/run
mkdir -p -m 1777 $R/run/lock

mount -t 9p -o "$OPTS" results $R/results || die "cannot mount the results share"
C=$R/results/.guest
[ -f $C/cmd.sh ] || die "no $C/cmd.sh"
# read-only binds first (the repo stays read-only even under /root, /home or /tmp),
# then the extra writable overlays (which win if a path is in both lists)
for d in $(cat $C/readonly 2>/dev/null); do
    [ -d "$H$d" ] && { mount --bind "$H$d" "$R$d" || die "cannot bind $d read-only"; }
done
for d in $(cat $C/writable 2>/dev/null); do overlay "$d"; done

ip link set lo up || die "cannot bring up lo"
NAME=$(cat $C/hostname 2>/dev/null || echo oomguard-guest)
hostname "$NAME"
echo "$NAME" >$R/etc/hostname
printf '127.0.1.1\t%s\n' "$NAME" >>$R/etc/hosts

# systemd flavour (harness/systemd.py): systemd becomes PID 1 and runs the
# command as a unit, which reports and powers off like the code below.
S=$C/systemd
if [ -f $S/init ]; then
    cp -R $S/system/. $R/etc/systemd/system/ || die "cannot install the test units"
    for m in $(cat $S/masked); do
        mkdir -p "$(dirname "$R/etc/systemd/$m")" && ln -sf /dev/null "$R/etc/systemd/$m"
    done
    echo "OOMGUARD-GUEST: handing over to systemd after $(cut -d' ' -f1 /proc/uptime) s of guest uptime"
    exec switch_root $R $(cat $S/init)
    die "switch_root to systemd failed"
fi

echo "OOMGUARD-GUEST: ready after $(cut -d' ' -f1 /proc/uptime) s of guest uptime, running the command"
chroot $R /bin/sh /results/.guest/cmd.sh </dev/null
rc=$?
echo $rc >$R/results/rc
echo "OOMGUARD-GUEST: command exited with status $rc after $(cut -d' ' -f1 /proc/uptime) s of guest uptime"
umount $R/results
sync
echo o >/proc/sysrq-trigger
sleep 5
poweroff -f
