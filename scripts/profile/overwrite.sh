#!/bin/bash
# usage: scripts/profile/overwrite.sh MIRRORFS_BIN: the daemon's syscalls (strace -c -f) for 5000 random 4 KiB overwrites of a dense 64 MiB file through a fresh mount with one local mirror (issue 9, lever 3)
BIN=$1; D=$(mktemp -d /var/tmp/speed2ow.XXXX); mkdir -p $D/b $D/m $D/mnt
$BIN mount $D/b $D/mnt --mirror $D/m > $D/log 2>&1 &
for i in $(seq 50); do mountpoint -q $D/mnt && break; sleep 0.1; done
python3 -c "
import os; f=os.open('$D/mnt/big', os.O_WRONLY|os.O_CREAT|os.O_TRUNC,0o644)
z=bytes(1<<20)
for _ in range(64): os.write(f,z)
os.close(f)"
sync
PID=$(pgrep -f "$D/mnt" | head -1)
strace -c -f -p $PID -o $D/strace.txt & SP=$!
sleep 1
python3 -c "
import os, random, time; r=random.Random(42); buf=os.urandom(4096)
fd=os.open('$D/mnt/big', os.O_WRONLY); t=time.monotonic()
for _ in range(5000): os.pwrite(fd, buf, r.randrange(64*(1<<20)//4096)*4096)
os.close(fd); print('5000 overwrites: %.3f s' % (time.monotonic()-t))"
sleep 1; kill -INT $SP; wait $SP 2>/dev/null
grep -E "fallocate|pwrite64|newfstatat|lseek|pwritev|total" $D/strace.txt
umount $D/mnt; sleep 1; rm -rf $D
