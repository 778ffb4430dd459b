"""An issue model of one SM sub-partition (an H100's: sm_90) running loops of machine code: how many cycles an iteration
takes when 1, 2 or 4 warps of it share the sub-partition. benchmarks/sass_scan.py --cycles runs it on the scan kernels'
loops, to compare variants of a kernel without a GPU; BENCHMARKS.md checks it against measured times.
"""

from __future__ import annotations

import re

# The issue model. Since Volta each instruction carries scheduling controls set by the compiler (the top 23 bits of its
# 128-bit word): cycles to wait before the next instruction issues, the scoreboard its variable-latency result will
# release (and the one its register reads release), and the scoreboards it waits on. The model issues in order, at most
# one instruction a cycle, honours these, and adds what they leave out: when each variable-latency result is ready
# (LATENCY, estimates), and how long a warp instruction keeps a pipe busy (pipe_of). Several warps take turns (loose
# round robin). Forward branches fall through (a loop's rare side paths count as taken every iteration), and the memory
# system never stalls.
LATENCY = {"MUFU": 20, "LDS": 30, "SHFL": 26, "S2R": 20}  # other variable-latency instructions: 20
READ_RELEASE = 6  # cycles until a memory instruction has read its registers
FP32 = ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FSET", "FCHK")
MEMORY = ("LDS", "LDSM", "STS", "LDG", "STG", "LDGSTS", "SHFL", "LD", "ST", "LDC", "RED", "ATOMS", "ATOMG")


def pipe_of(name: str) -> tuple[str, int]:
    """The pipe an instruction (by its name without modifiers) issues to, and the cycles a warp instruction keeps it
    busy on an H100 SM sub-partition (MUFU: 4 lanes a cycle; integer ALU and IMAD: 16)."""
    if name in ("MUFU", "F2F", "I2F", "F2I"):
        return "xu", 8
    if name in ("IMAD", "IMUL"):
        return "fma-heavy", 2
    if name in FP32:
        return "fma", 1
    return ("lsu", 1) if name in MEMORY else ("alu", 2)


def controls(high: int) -> tuple[int, int, int, int]:
    """(stall cycles, write scoreboard, read scoreboard, wait mask) from an instruction's upper 64 bits (7: none)."""
    bits = high >> 41
    return bits & 15, bits >> 5 & 7, bits >> 8 & 7, bits >> 11 & 63


def issue_cycles(body: list[tuple[str, int]], warps: int = 1, iterations: int = 6) -> float:
    """Cycles one iteration of a loop body ((instruction, upper word) in issue order) takes each warp when ``warps``
    copies of it share an SM sub-partition, in the issue model above (steady state: the first iteration is left out)."""
    ops = []
    for text, high in body:
        name = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
        ops.append((*controls(high), LATENCY.get(name, 20), *pipe_of(name)))
    pc, done, ready = [0] * warps, [[] for _ in range(warps)], [0] * warps
    boards = [[0] * 6 for _ in range(warps)]
    pipe_free: dict[str, int] = {}
    cycle, last = 0, 0
    while min(len(d) for d in done) < iterations:
        for k in range(warps):
            w = (last + 1 + k) % warps
            stall, write, read, wait, latency, pipe, busy = ops[pc[w]]
            if ready[w] > cycle or pipe_free.get(pipe, 0) > cycle:
                continue
            if any(wait >> b & 1 and boards[w][b] > cycle for b in range(6)):
                continue
            pipe_free[pipe] = cycle + busy
            if write != 7:
                boards[w][write] = max(boards[w][write], cycle + latency)
            if read != 7:
                boards[w][read] = max(boards[w][read], cycle + READ_RELEASE)
            ready[w] = cycle + max(stall, 1)
            pc[w] = (pc[w] + 1) % len(ops)
            if pc[w] == 0:
                done[w].append(cycle)
            last = w
            break
        cycle += 1
    return sum((d[-1] - d[0]) / (len(d) - 1) for d in done) / warps
