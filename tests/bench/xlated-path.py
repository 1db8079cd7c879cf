#!/usr/bin/env python3
"""Counts the BPF instructions mim-lb executes on its main paths, from the verifier-translated
program (`bpftool prog dump xlated id N linum`, which `cargo xtask bench -- --dump-xlated DIR`
saves as DIR/mim_lb.xlated.txt).

    python3 tests/bench/xlated-path.py DIR/mim_lb.xlated.txt

It walks the listing like a tiny interpreter: packet bytes are known (the frame of each path
is built here), values read from maps are not. A branch on an unknown value is decided by
the path's rules, matched against the source line the listing shows for the branch (so the
rules survive recompilation as long as the source lines do); a branch no rule covers stops
the walk and is shown. Calls into the kernel (hash-map lookup, clock) count as one
instruction: their own cost is not in the listing. Counts by source file are approximate
(inlined code carries its caller's line in places)."""
import re, sys, json
from collections import Counter, OrderedDict

M64 = (1 << 64) - 1

def parse(path):
    insns = OrderedDict()
    src = None
    func_starts = {}
    for line in open(path):
        line = line.rstrip('\n')
        if line.startswith(';'):
            m = re.search(r'\[file:(\S+) line_num:(\d+)', line)
            src = (m.group(1).split('/src/')[-1] if m else '?', line[2:].split(' [file')[0].strip())
            if m:
                f = m.group(1)
                if '/mim-lb-ebpf/' in f or '/mim-lb-common/' in f:
                    src = (f.split('/work/wt-bench/')[-1], src[1])
                elif 'aya-ebpf' in f:
                    src = ('aya-ebpf:' + f.split('/src/')[-1], src[1])
                else:
                    src = ('core:' + f.split('/src/')[-1], src[1])
            continue
        m = re.match(r'\s*(\d+): \(([0-9a-f]{2})\) (.*)$', line)
        if m:
            insns[int(m.group(1))] = (m.group(3), src)
        elif line and not line.startswith(' '):
            pass
    return insns

class Unknown:
    def __init__(self, why=''):
        self.why = why
    def __repr__(self):
        return f'?{self.why}'

def is_known(v):
    return isinstance(v, int)

def run(insns, frame, decisions, max_steps=5000, stop_on_unknown=True):
    regs = {f'r{i}': Unknown() for i in range(11)}
    regs['r1'] = ('ctx', 0)
    regs['r10'] = ('stack', 0)
    stack = {}
    idxs = list(insns.keys())
    pc = idxs[0]
    count = Counter()
    path = []
    calls = []
    steps = 0
    last_own = '?'
    plen = len(frame)

    def val(tok):
        tok = tok.strip()
        if re.fullmatch(r'r\d+', tok):
            return regs[tok]
        if re.fullmatch(r'-?0x[0-9a-f]+|-?\d+', tok):
            return int(tok, 0)
        raise ValueError(tok)

    def load(ptr, off, size):
        if isinstance(ptr, tuple):
            kind = ptr[0]
            if kind == 'ctx':
                o = ptr[1] + off
                return {0: ('pkt', 0), 8: ('pkt', plen)}.get(o, Unknown('ctx'))
            if kind == 'pkt' and is_known(ptr[1]):
                o = ptr[1] + off
                if 0 <= o and o + size <= plen:
                    return int.from_bytes(frame[o:o + size], 'little')
                return Unknown('pkt-oob')
            if kind == 'stack':
                o = ptr[1] + off
                v = stack.get(o)
                if v is None:
                    return Unknown('stack')
                if is_known(v[0]) and v[1] != size:
                    return v[0] & ((1 << (8 * size)) - 1)
                return v[0]
            if kind == 'map':
                if size == 8:
                    return ('mapword', ptr[1])  # pointer-like or counter; non-null
                return Unknown(f'map{ptr[1]}')
            if kind == 'mapword':
                return Unknown('mapword')
        return Unknown('load')

    def store(ptr, off, size, v):
        if isinstance(ptr, tuple) and ptr[0] == 'stack':
            stack[ptr[1] + off] = (v, size)

    def alu(op, a, b):
        if isinstance(a, tuple) and op in ('+=', '-=') and is_known(b):
            if a[0] in ('pkt', 'stack', 'ctx') and is_known(a[1]):
                return (a[0], a[1] + (b if op == '+=' else -b))
            if a[0] == 'map':
                return a
            return a
        if isinstance(a, tuple) and isinstance(b, tuple) and op == '-=' and a[0] == b[0] == 'pkt':
            return a[1] - b[1]
        if op == '+=' and is_known(a) and isinstance(b, tuple):
            if b[0] in ('pkt', 'stack', 'ctx') and is_known(b[1]):
                return (b[0], b[1] + a)
            return b if b[0] == 'map' else Unknown()
        if op == '+=' and isinstance(a, Unknown) and isinstance(b, tuple) and b[0] == 'map':
            return b
        if not (is_known(a) and is_known(b)):
            return Unknown('alu')
        if op == '+=': r = a + b
        elif op == '-=': r = a - b
        elif op == '*=': r = a * b
        elif op == '/=': r = a // b if b else 0
        elif op == '%=': r = a % b if b else a
        elif op == '&=': r = a & b
        elif op == '|=': r = a | b
        elif op == '^=': r = a ^ b
        elif op == '<<=': r = a << (b & 63)
        elif op == '>>=': r = (a & M64) >> (b & 63)
        elif op == 's>>=':
            s = a - (1 << 64) if a & (1 << 63) else a
            r = s >> (b & 63)
        else:
            raise ValueError(op)
        return r & M64

    def cond(op, a, b):
        if isinstance(a, tuple) and is_known(b) and b == 0 and op in ('==', '!='):
            # pointers (packet, map values, per-CPU pointers) are never null here
            return op == '!='
        if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == 'pkt':
            a, b = a[1], b[1]
        if not (is_known(a) and is_known(b)):
            return None
        sa = a - (1 << 64) if a & (1 << 63) else a
        sb = b - (1 << 64) if b & (1 << 63) else b
        return {'==': a == b, '!=': a != b, '>': a > b, '>=': a >= b, '<': a < b, '<=': a <= b,
                's>': sa > sb, 's>=': sa >= sb, 's<': sa < sb, 's<=': sa <= sb, '&': (a & b) != 0}[op]

    def nxt(i):
        j = idxs.index(i)
        return idxs[j + 1] if j + 1 < len(idxs) else None

    while True:
        steps += 1
        if steps > max_steps:
            raise SystemExit('too many steps')
        text, src = insns[pc]
        f = src[0] if src else '?'
        if f.startswith('core:') and 'bitfield' not in f:
            f = last_own
        elif 'bitfield' in f:
            f = 'parse.rs (network-types bitfield)'
        else:
            last_own = f
        count[f] += 1
        path.append(pc)
        n = nxt(pc)
        m = re.fullmatch(r'(r\d+) = \*\(u(\d+) \*\)\((r\d+) ([+-]\d+)\)', text)
        if m:
            regs[m.group(1)] = load(regs[m.group(3)], int(m.group(4)), int(m.group(2)) // 8); pc = n; continue
        m = re.fullmatch(r'\*\(u(\d+) \*\)\((r\d+) ([+-]\d+)\) = (\S+)', text)
        if m:
            store(regs[m.group(2)], int(m.group(3)), int(m.group(1)) // 8, val(m.group(4))); pc = n; continue
        m = re.fullmatch(r'(r\d+) = map\[id:(\d+)\].*', text)
        if m:
            regs[m.group(1)] = ('map', int(m.group(2)), 0); pc = n; continue
        m = re.fullmatch(r'(r\d+) = (r\d+)', text)
        if m:
            regs[m.group(1)] = regs[m.group(2)]; pc = n; continue
        m = re.fullmatch(r'(r\d+) = (-?0x[0-9a-f]+|-?\d+)', text)
        if m:
            regs[m.group(1)] = int(m.group(2), 0) & M64; pc = n; continue
        m = re.fullmatch(r'(r\d+) = be(\d+) (r\d+)', text)
        if m:
            v = regs[m.group(3)]; bits = int(m.group(2))
            regs[m.group(1)] = int.from_bytes((v & ((1 << bits) - 1)).to_bytes(bits // 8, 'little'), 'big') if is_known(v) else Unknown('be')
            pc = n; continue
        m = re.fullmatch(r'(r\d+) (\+=|-=|\*=|/=|%=|&=|\|=|\^=|<<=|>>=|s>>=) (\S+)', text)
        if m:
            regs[m.group(1)] = alu(m.group(2), regs[m.group(1)], val(m.group(3))); pc = n; continue
        m = re.fullmatch(r'if (r\d+) (==|!=|>|>=|<|<=|s>|s>=|s<|s<=|&) (\S+) goto pc([+-]\d+)', text)
        if m:
            c = cond(m.group(2), regs[m.group(1)], val(m.group(3)))
            if c is None:
                if pc in decisions:
                    c = decisions[pc]
                else:
                    return dict(stop=pc, text=text, src=src, count=count, path=path, regs=regs)
            pc = pc + 1 + int(m.group(4)) if c else n
            continue
        m = re.fullmatch(r'goto pc([+-]\d+)', text)
        if m:
            pc = pc + 1 + int(m.group(1)); continue
        m = re.fullmatch(r'call pc([+-]\d+)#.*', text)
        if m:
            calls.append(n); pc = pc + 1 + int(m.group(1)); continue
        m = re.fullmatch(r'call (\S+)#.*', text)
        if m:
            name = m.group(1)
            if pc in decisions:
                regs['r0'] = ('map', 'ret', 0) if decisions[pc] else 0
            elif 'lookup' in name:
                regs['r0'] = ('map', 'ret', 0)
            else:
                regs['r0'] = Unknown(name)
            for r in ('r1', 'r2', 'r3', 'r4', 'r5'):
                regs[r] = Unknown('clobber')
            pc = n; continue
        if text == 'exit':
            if calls:
                pc = calls.pop(); continue
            return dict(stop=None, ret=regs['r0'], count=count, path=path)
        raise SystemExit(f'cannot parse {pc}: {text}')

def summary(res):
    total = sum(res['count'].values())
    groups = Counter()
    for f, c in res['count'].items():
        if 'hash.rs' in f: g = 'hashing (mim-lb-common/hash.rs)'
        elif 'parse.rs' in f: g = 'parsing (parse.rs)'
        elif 'stats.rs' in f: g = 'counters (stats.rs)'
        elif 'select.rs' in f: g = 'service/master selection (select.rs)'
        elif 'aya-ebpf:lib.rs' in f: g = 'memmove (aya-ebpf, called for the MAC copies)'
        elif 'aya-ebpf' in f or 'helpers.rs' in f: g = 'map lookups (inlined) and context'
        elif 'main.rs' in f: g = 'main.rs'
        else: g = 'other (' + f + ')'
        groups[g] += c
    return total, groups


import socket, struct

def frame_v4(src, dst, sport, dport, flags, payload=64):
    eth = bytes.fromhex('020000000002' '020000000001' '0800')
    l4 = struct.pack('!HHIIBBHHH', sport, dport, 1, 0, 5 << 4, flags, 64240, 0, 0) + bytes(payload)
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(l4), 0x1234, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return eth + ip + l4

def frame_v6(src, dst, sport, dport, flags, payload=64):
    eth = bytes.fromhex('020000000002' '020000000001' '86dd')
    l4 = struct.pack('!HHIIBBHHH', sport, dport, 1, 0, 5 << 4, flags, 64240, 0, 0) + bytes(payload)
    ip = struct.pack('!IHBB16s16s', 0x60000000, len(l4), 6, 64,
                     socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst))
    return eth + ip + l4

ACK, SYN = 0x10, 0x02

# Rules are tried in order: each path's own come first.
# Decisions shared by every path: the maps are filled and ready, indexes are in range.
READY = [('GLOBALS_F_READY', False), ('let seed = if half', False), ('fun(map, key)', False),
         ('simulating()', False)]
# The packet's service is found in the index.
SERVICE = [('entry.family == packet.family', False), ('entry.proto == packet.proto', False),
           ('entry.port == port', False), ('entry.vip == packet.dst', True),
           ('SERVICE_F_VIP_MARKER', False), ('SERVICE_F_SOURCE_HASH', False),
           ('if table_size == 0', False), ('flow_hash % table_size', False),
           ('if id == 0', False), ('BACKEND_F_IN_USE != 0', False), ('if delta >= n', True)]
# The recorded flow is found, its master keeps flows, no last_seen refresh is due.
RECORDED = [('b.flags & keeps == keeps', False), ('LAST_SEEN_REFRESH_NS', False)]

PATHS = [
    ('not for a service (IPv4 TCP to another address)', frame_v4('10.0.0.1', '10.0.0.2', 40000, 22, ACK),
     [('entry.family == packet.family', True)] + READY),
    ('established IPv4 (ACK, clean slot)', frame_v4('10.0.0.1', '10.0.0.100', 40000, 7000, ACK),
     [('let entry = *MAGLEV.get', True)] + READY + SERVICE),
    ('established IPv6 (ACK, clean slot)', frame_v6('fd00::1', 'fd00::100', 40000, 7000, ACK),
     [('let entry = *MAGLEV.get', True)] + READY + SERVICE),
    ('established IPv4 on a changed slot (table lookup)', frame_v4('10.0.0.1', '10.0.0.100', 40000, 7000, ACK),
     [('entry & MAGLEV_SLOT_CHANGED != 0 &&', False), ('let entry = *MAGLEV.get', False)] + READY + SERVICE + RECORDED),
    ('SYN of a recorded flow (table lookup)', frame_v4('10.0.0.1', '10.0.0.100', 40000, 7000, SYN),
     [('entry & MAGLEV_SLOT_CHANGED != 0 &&', True), ('let entry = *MAGLEV.get', True)] + READY + SERVICE + RECORDED),
]

def walk_path(insns, frame, rules):
    decisions = {}
    while True:
        res = run(insns, frame, decisions)
        if res['stop'] is None:
            return res
        pc = res['stop']
        src = insns[pc][1][1] if insns[pc][1] else ''
        for key, taken in rules:
            if key in src:
                decisions[pc] = taken
                break
        else:
            res['undecided'] = (pc, insns[pc][0], src)
            return res

def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    insns = parse(sys.argv[1])
    print(f'{len(insns)} instructions in the listing')
    for name, frame, rules in PATHS:
        res = walk_path(insns, frame, rules)
        if 'undecided' in res:
            pc, text, src = res['undecided']
            print(f'{name}: no rule for the branch at {pc} ({text}; source: {src})')
            continue
        total, groups = summary(res)
        calls = sum(1 for pc in res['path'] if insns[pc][0].startswith('call ') and '#bpf_prog' not in insns[pc][0])
        verdict = {1: 'XDP_DROP', 2: 'XDP_PASS', 3: 'XDP_TX'}.get(res['ret'], res['ret'])
        print(f'{name}: {total} instructions, {verdict}' + (f', {calls} kernel helper call(s)' if calls else ''))
        for g, c in groups.most_common():
            print(f'    {c:5d}  {g}')

if __name__ == '__main__':
    main()
