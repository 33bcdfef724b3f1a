#!/usr/bin/env python3
"""Decode FUSE requests from `strace -f -p DAEMON -e trace=read,readv -e read=FDS -o OUT` (FDS: the
daemon's /dev/fuse descriptors). One line per request: node, caller uid, opcode and, for SETATTR,
WRITE, OPEN, GETXATTR and REMOVEXATTR, the fields that say whether set-ID bits are to be killed
(docs/benchmarks.md, "FUSE_HANDLE_KILLPRIV_V2 with fuser 0.18"). Usage: fuse-requests.py OUT;
`fuse-requests.py --count OUT` prints instead how many requests of each opcode OUT holds, all of
them (the SQLite profile in docs/benchmarks.md)."""
import re, sys, struct
OPS={1:'LOOKUP',2:'FORGET',3:'GETATTR',4:'SETATTR',14:'OPEN',15:'READ',16:'WRITE',18:'RELEASE',22:'GETXATTR',24:'REMOVEXATTR',25:'FLUSH',35:'CREATE',43:'FALLOCATE',47:'COPY_FILE_RANGE',20:'FSYNC',44:'READDIRPLUS',28:'READDIR',27:'OPENDIR',29:'RELEASEDIR',12:'MKNOD',42:'BATCH_FORGET',26:'INIT', 46:'LSEEK', 10:'UNLINK', 17:'STATFS', 36:'INTERRUPT', 21:'SETXATTR', 9:'MKDIR', 11:'RMDIR', 12:'MKNOD', 45:'RENAME2', 39:'DESTROY', 33:'ACCESS', 32:'FLOCK?', 31:'SETLK', 30:'FSYNCDIR'}
count='--count' in sys.argv[1:]
path=[a for a in sys.argv[1:] if a!='--count'][0]
bufs=[]; cur=None
for line in open(path):
    m=re.match(r'\s*\| ([0-9a-f]{5})  (.{48})', line)
    if m:
        off=int(m.group(1),16)
        if off==0:
            cur=bytearray(); bufs.append(cur)
        cur.extend(bytes.fromhex(m.group(2).replace(' ','')))
if count:
    n={}
    for b in bufs:
        if len(b)<40: continue
        op,=struct.unpack_from('<I',b,4)
        n[OPS.get(op,str(op))]=n.get(OPS.get(op,str(op)),0)+1
    for name,c in sorted(n.items(),key=lambda x:-x[1]): print('%6d %s'%(c,name))
    sys.exit(0)
FATTR={1:'MODE',2:'UID',4:'GID',8:'SIZE',16:'ATIME',32:'MTIME',64:'FH',128:'ATIME_NOW',256:'MTIME_NOW',512:'LOCKOWNER',1024:'CTIME',2048:'KILL_SUIDGID'}
for b in bufs:
    if len(b)<40: continue
    ln,op,uniq,node,uid,gid,pid=struct.unpack_from('<IIQQIII',b,0)
    name=OPS.get(op,str(op))
    if name in ('LOOKUP','FORGET','BATCH_FORGET','READ','RELEASE','FLUSH','GETATTR','LSEEK'): continue
    x=''
    if name=='SETATTR':
        valid,=struct.unpack_from('<I',b,40)
        x='valid=%s' % ('|'.join(v for k,v in FATTR.items() if valid&k) or '0')
        if valid&1: x+=' mode=%o'%struct.unpack_from('<I',b,40+4+4+8+8+8+8+8+8+4+4+4)[0]
    elif name=='WRITE':
        wf,=struct.unpack_from('<I',b,40+20); x='write_flags=%#x'%wf
    elif name=='OPEN':
        fl,of=struct.unpack_from('<II',b,40); x='flags=%#o open_flags=%#x'%(fl,of)
    elif name in('GETXATTR','REMOVEXATTR'):
        x=bytes(b[40+ (8 if name=='GETXATTR' else 0):]).split(b'\0')[0].decode()
    print('node=%d uid=%d %s %s'%(node,uid,name,x))
