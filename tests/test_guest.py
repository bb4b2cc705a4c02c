"""The guest code generator: bytes, behaviour (on a tiny independent x86 interpreter), tables."""

from __future__ import annotations

import shutil
import subprocess
from array import array

import pytest
from conftest import require

from kvmtrace.errors import UsageError
from kvmtrace.host.kvm import PAGE_SIZE
from kvmtrace.vmm.guest import (
    DATA_FIRST_PAGE,
    GUEST_PORT,
    GuestLayout,
    assemble,
    visit_order,
)

M32 = 0xFFFFFFFF


def execute(code: bytes, mem: dict[int, int], regs: dict[str, int], max_steps: int = 100_000):
    """Interpret exactly the instructions the guest may use. Returns (writes, outs, steps)
    where writes lists the byte addresses incremented and outs the `out` ports, in order."""
    writes: list[int] = []
    outs: list[int] = []
    r = dict(regs)
    zf = cf = False
    ip = r["rip"]

    def rd32(addr: int) -> int:
        return int.from_bytes(bytes(mem.get(addr + i, 0) for i in range(4)), "little")

    def rel8(at: int) -> int:
        return int.from_bytes(code[at:at + 1], "little", signed=True)

    for step in range(max_steps):
        op = code[ip]
        if code[ip:ip + 2] == b"\x89\xee":  # mov esi, ebp
            r["rsi"] = r["rbp"]
            ip += 2
        elif code[ip:ip + 2] == b"\x8b\x06":  # mov eax, [esi]
            r["rax"] = rd32(r["rsi"])
            ip += 2
        elif code[ip:ip + 2] == b"\xfe\x00":  # inc byte [eax]
            mem[r["rax"]] = (mem.get(r["rax"], 0) + 1) & 0xFF
            writes.append(r["rax"])
            ip += 2
        elif op == 0x42:  # inc edx
            r["rdx"] = (r["rdx"] + 1) & M32
            ip += 1
        elif code[ip:ip + 3] == b"\x83\xc6\x04":  # add esi, 4
            r["rsi"] = (r["rsi"] + 4) & M32
            ip += 3
        elif op in (0x49, 0x4B):  # dec ecx / dec ebx
            reg = "rcx" if op == 0x49 else "rbx"
            r[reg] = (r[reg] - 1) & M32
            zf = r[reg] == 0
            ip += 1
        elif op == 0xB9:  # mov ecx, imm32
            r["rcx"] = int.from_bytes(code[ip + 1:ip + 5], "little")
            ip += 5
        elif op == 0xE6:  # out imm8, al
            outs.append(code[ip + 1])
            ip += 2
        elif code[ip:ip + 2] == b"\x39\xfe":  # cmp esi, edi
            zf = r["rsi"] == r["rdi"]
            cf = r["rsi"] < r["rdi"]
            ip += 2
        elif op == 0xA8:  # test al, imm8 (the trace-driven guest's mark bit)
            zf = (r["rax"] & code[ip + 1]) == 0
            cf = False
            ip += 2
        elif op in (0x75, 0x72, 0xEB, 0x74):  # jnz / jb / jmp / jz rel8
            taken = {0x75: not zf, 0x72: cf, 0xEB: True, 0x74: zf}[op]
            ip = ip + 2 + (rel8(ip + 1) if taken else 0)
        elif op == 0xF4:  # hlt
            r["rip"] = ip
            return writes, outs, step, r
        else:
            raise AssertionError(f"unexpected opcode {op:#x} at {ip:#x}")
    raise AssertionError("guest did not halt")


def load(layout: GuestLayout, vcpu: int) -> dict[int, int]:
    mem: dict[int, int] = {}
    raw = layout.table(vcpu).tobytes()
    base = layout.table_gpa(vcpu)
    for i, b in enumerate(raw):
        mem[base + i] = b
    return mem


def test_exact_bytes_with_exits():
    code = assemble(1)
    assert code.code.hex() == (
        "89ee" "8b06" "fe00" "42" "83c604" "49" "7507" "b901000000" "e610"
        "39fe" "72ea" "4b" "75e5" "f4" "ebfd")
    assert code.labels == {"outer": 0, "inner": 2, "write": 4, "count": 6, "exit": 18,
                           "skip": 20, "done": 27}


def test_tight_loop_has_no_out():
    code = assemble(0)
    assert b"\xe6" not in code.code
    assert "exit" not in code.labels
    assert code.code.hex() == "89ee8b06fe004283c60439fe72f44b75eff4ebfd"


def test_objdump_agrees(tmp_path):
    require(shutil.which("objdump") is not None,
            "objdump not installed (tools/setup.sh --test installs binutils)")
    code = assemble(7, port=0x10)
    binary = tmp_path / "guest.bin"
    binary.write_bytes(code.code)
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-mi386", str(binary)],
                         capture_output=True, check=True).stdout.decode()
    mnemonics = [line.split("\t")[2].split()[0] for line in out.splitlines()
                 if line.count("\t") >= 2]
    assert mnemonics == ["mov", "mov", "incb", "inc", "add", "dec", "jne", "mov", "out",
                         "cmp", "jb", "dec", "jne", "hlt", "jmp"]
    assert "mov    $0x7,%ecx" in out and "out    %al,$0x10" in out


@pytest.mark.parametrize("exit_every,passes", [(1, 1), (3, 2), (0, 3), (1000, 1)])
def test_guest_behaviour(exit_every: int, passes: int):
    layout = GuestLayout(vcpus=2, pages=10, pattern="random", seed=4)
    code = assemble(exit_every)
    for vcpu in range(2):
        regs = layout.initial_regs(vcpu, passes, exit_every)
        writes, outs, _, final = execute(code.code, load(layout, vcpu), regs)
        expect = [p * PAGE_SIZE for p in layout.visits(vcpu)] * passes
        assert writes == expect
        assert len(outs) == (len(expect) // exit_every if exit_every else 0)
        assert set(outs) <= {GUEST_PORT}
        assert final["rdx"] == len(expect) == code.writes_done(final["rdx"], final["rip"])
        assert final["rip"] == code.labels["done"]


def test_writes_done_counts_a_write_before_the_counter():
    code = assemble(1)
    assert code.writes_done(41, code.labels["count"]) == 42
    assert code.writes_done(41, code.labels["write"]) == 41
    assert code.writes_done(41, code.labels["skip"]) == 41


def test_visit_orders():
    assert visit_order("seq", 5) == [0, 1, 2, 3, 4]
    rnd = visit_order("random", 100, vcpu=1, seed=9)
    assert sorted(rnd) == list(range(100)) and rnd != list(range(100))
    assert rnd == visit_order("random", 100, vcpu=1, seed=9)
    assert rnd != visit_order("random", 100, vcpu=1, seed=10)
    assert rnd != visit_order("random", 100, vcpu=0, seed=9)
    hot = visit_order("hot", 80, seed=3)
    assert len(hot) == 160
    assert hot[0::2] == list(range(80))
    assert set(hot[1::2]) <= set(range(10))  # hot set = ceil(80 / 8) pages
    assert hot == visit_order("hot", 80, seed=3)


def test_layout_matches_shared_samples():
    layout = GuestLayout(vcpus=3, pages=400)
    assert [layout.data_page(i) for i in range(3)] == [0x100, 0x290, 0x420]
    t0 = layout.table(0)
    assert isinstance(t0, array) and t0.itemsize == 4
    assert list(t0) == [(0x100 + i) * PAGE_SIZE for i in range(400)]
    # tables come after every data page, page aligned, and inside guest memory
    assert layout.table_gpa(0) == (DATA_FIRST_PAGE + 1200) * PAGE_SIZE
    assert layout.table_gpa(2) + 400 * 4 <= layout.memory_bytes


def test_load_into_memory():
    layout = GuestLayout(vcpus=2, pages=5, pattern="hot", seed=1)
    code = assemble(2)
    mem = bytearray(layout.memory_bytes)
    layout.load(mem, code)
    assert bytes(mem[:len(code.code)]) == code.code
    start = layout.table_gpa(1)
    got = array("I", bytes(mem[start:start + 4 * layout.table_len]))
    assert list(got) == list(layout.table(1))
    assert layout.table_len == 10


def test_written_pages():
    layout = GuestLayout(vcpus=1, pages=10)
    assert layout.written_pages(0, 3) == {0x100, 0x101, 0x102}
    assert layout.written_pages(0, 25) == set(range(0x100, 0x10A))


@pytest.mark.parametrize("kwargs", [dict(vcpus=0, pages=1), dict(vcpus=1, pages=0),
                                    dict(vcpus=4, pages=100_000),
                                    dict(vcpus=1, pages=1, pattern="zipf")])
def test_bad_layouts(kwargs):
    with pytest.raises(UsageError):
        GuestLayout(**kwargs)
