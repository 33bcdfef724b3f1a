#!/usr/bin/env python3
"""Count the records of a mirrorfs journal by kind (docs/journal.md, "Record frame").

    journal-kinds.py JOURNAL_DIR [AFTER_SEQ [PER]]

Counts the records with seq > AFTER_SEQ (0) of every segment in JOURNAL_DIR, and with PER also
divides each count by it (records per removed file, say). Prints `last_seq N` first, so a caller
can take it before a run and pass it as AFTER_SEQ afterwards. Stops a segment at the first frame
whose magic is wrong (the end of what was written)."""
import os, struct, sys

KINDS = {1: 'Create', 2: 'Mkdir', 3: 'Mknod', 4: 'Symlink', 5: 'Link', 6: 'Unlink', 7: 'Rmdir',
         8: 'Rename', 9: 'Write', 10: 'Truncate', 11: 'Fallocate', 12: 'SetMode', 13: 'SetOwner',
         14: 'SetTimes', 15: 'SetXattr', 16: 'RemoveXattr', 17: 'Abort', 18: 'Sync',
         19: 'SyncDone', 20: 'GroupBegin', 21: 'GroupEnd'}
d = sys.argv[1]
after = int(sys.argv[2]) if len(sys.argv) > 2 else 0
per = float(sys.argv[3]) if len(sys.argv) > 3 else None
counts, last, body_bytes = {}, 0, 0
for name in sorted(n for n in os.listdir(d) if n.endswith('.seg')):
    with open(os.path.join(d, name), 'rb') as f:
        data = f.read()
    off = 32  # segment header
    while off + 32 <= len(data):
        magic, blen, _crc, kind = struct.unpack_from('<IIIB', data, off)
        if magic != 0x4A52464D:
            break
        seq, = struct.unpack_from('<Q', data, off + 16)
        last = max(last, seq)
        if seq > after:
            counts[kind] = counts.get(kind, 0) + 1
            body_bytes += 32 + (blen + 7) // 8 * 8
        off += 32 + (blen + 7) // 8 * 8
print(f'last_seq {last}')
total = sum(counts.values())
if per:
    print(f'records {total} ({total / per:.2f} per file), {body_bytes} bytes ({body_bytes / per:.0f} per file)')
    for k, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f'  {KINDS.get(k, k)}: {n} ({n / per:.2f} per file)')
