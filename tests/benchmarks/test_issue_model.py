"""benchmarks/issue_model.py: the scheduling controls read from real sm_90 instruction words, and the model's cycles on
loops small enough to count by hand."""

from __future__ import annotations

import pytest

from benchmarks.issue_model import controls, issue_cycles


def word(stall: int = 1, write: int = 7, read: int = 7, wait: int = 0) -> int:
    """An instruction's upper 64 bits holding these controls (yield set, no operand reuse)."""
    return (stall | 1 << 4 | write << 5 | read << 8 | wait << 11) << 41


@pytest.mark.parametrize(("text", "high", "expected"), [
    # upper words that nvdisasm -hex printed for scan.cu's scan_fwd (sm_90, NVRTC 13.5)
    ("LDS.128 R28, [R28]", 0x000E620000000C00, (1, 1, 7, 0)),  # its result releases scoreboard 1
    ("LOP3.LUT R33, R28.reuse, 0xffff0000, RZ, 0xc0, !PT", 0x042FE400078EC0FF, (2, 7, 7, 0b10)),  # waits on it
    ("MUFU.EX2 R43, R43", 0x000EA20000000800, (1, 2, 7, 0)),
])
def test_controls_of_real_instructions(text, high, expected) -> None:
    assert controls(high) == expected


def test_fixed_latency_stalls_add_up() -> None:
    assert issue_cycles([("FFMA R0, R1, R2, R0", word(stall=4)), ("FFMA R3, R1, R2, R3", word(stall=4))]) == 8


def test_mufu_pipe_rate() -> None:
    # two independent MUFU a loop: the pipe takes 8 cycles each, not the 1 the controls ask
    assert issue_cycles([("MUFU.EX2 R0, R1", word()), ("MUFU.EX2 R2, R3", word())]) == 16


def test_scoreboard_wait_and_a_second_warp() -> None:
    body = [("MUFU.EX2 R0, R1", word(write=0)), ("FADD R2, R0, 1", word(wait=0b1))]
    assert issue_cycles(body) == 21  # the FADD waits for the MUFU's 20 cycles, the next MUFU one more
    assert issue_cycles(body, warps=2) == pytest.approx(21, abs=1)  # a second warp fills the wait for free
