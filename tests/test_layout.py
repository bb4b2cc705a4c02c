"""kvmtrace/bpf/probes/kvmtrace.h and its numpy twins agree byte for byte (sizes, offsets,
field sizes).

A tiny C program, built with the host's C compiler against the header, prints sizeof and
offsetof of every field the numpy dtypes name; any drift on either side fails here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import require

from kvmtrace.bpf.layout import (
    CPU_HEAD_DTYPE,
    LOST_EVENTS,
    LOST_SLOTS,
    PUSH_SLOT_DTYPE,
    RING_KEY_DTYPE,
    RING_VAL_DTYPE,
    VM_KEY_DTYPE,
    VM_VAL_DTYPE,
)
from kvmtrace.bpf.loader import probes_dir
from kvmtrace.core.counters import HIST_BUCKETS
from kvmtrace.core.events import EVENT_DTYPE, Kind
from kvmtrace.core.kvm_abi import VM_GEN_SHIFT

STRUCTS = {
    "kt_event": EVENT_DTYPE,
    "kt_ring_key": RING_KEY_DTYPE,
    "kt_ring_val": RING_VAL_DTYPE,
    "kt_vm_key": VM_KEY_DTYPE,
    "kt_vm_val": VM_VAL_DTYPE,
    "kt_push_slot": PUSH_SLOT_DTYPE,
    "kt_cpu_head": CPU_HEAD_DTYPE,
}
CONSTANTS = {
    "KT_HIST_BUCKETS": HIST_BUCKETS,
    "KT_LOST_SLOTS": LOST_SLOTS,
    "KT_LOST_EVENTS": LOST_EVENTS,
    "KT_VM_GEN_SHIFT": VM_GEN_SHIFT,
    **{f"KT_{k.name}": int(k) for k in Kind},
}


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """name -> value printed by the compiled program: sizeof:S, S.f (offset), S.f:size."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    require(cc is not None, "no C compiler (cc) to build the layout checker")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/types.h>",
             '#include "kvmtrace.h"', "int main(void) {"]
    for name, dtype in STRUCTS.items():
        lines.append(f'printf("sizeof:{name} %zu\\n", sizeof(struct {name}));')
        for field in dtype.names:
            lines.append(f'printf("{name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
            lines.append(
                f'printf("{name}.{field}:size %zu\\n", sizeof(((struct {name} *)0)->{field}));'
            )
    for const in CONSTANTS:
        lines.append(f'printf("{const} %d\\n", (int)({const}));')
    lines += ["return 0;", "}"]
    tmp: Path = tmp_path_factory.mktemp("layout")
    src, exe = tmp / "layout.c", tmp / "layout"
    src.write_text("\n".join(lines) + "\n")
    with probes_dir() as inc:  # the header as the package ships it
        subprocess.run([cc, "-Wall", "-Werror", "-I", str(inc), "-o", str(exe), str(src)],
                       check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("name", list(STRUCTS))
def test_struct_matches_dtype(c_layout: dict[str, int], name: str) -> None:
    dtype = STRUCTS[name]
    assert c_layout[f"sizeof:{name}"] == dtype.itemsize
    for field in dtype.names:
        ftype, offset = dtype.fields[field][:2]
        assert c_layout[f"{name}.{field}"] == offset, field
        assert c_layout[f"{name}.{field}:size"] == ftype.itemsize, field


def test_constants_match(c_layout: dict[str, int]) -> None:
    for const, value in CONSTANTS.items():
        assert c_layout[const] == value, const


def test_vm_packing_round_trips() -> None:
    from kvmtrace.core.kvm_abi import vm_fd, vm_gen, vm_id, vm_label

    for fd, gen in ((0, 0), (5, 1), ((1 << VM_GEN_SHIFT) - 1, 2047)):
        vm = vm_id(fd, gen)
        assert 0 <= vm < 2**31 and (vm_fd(vm), vm_gen(vm)) == (fd, gen)
    assert vm_id(5, 0) == 5 and vm_id(-1, 3) == -1 and (vm_fd(-1), vm_gen(-1)) == (-1, 0)
    assert (vm_label(5), vm_label(vm_id(5, 1)), vm_label(-1)) == ("5", "5#1", "-1")
    with pytest.raises(ValueError):
        vm_id(1 << VM_GEN_SHIFT, 0)
    with pytest.raises(ValueError):
        vm_id(3, 2048)


def test_event_is_48_bytes_and_histograms_are_hist_buckets() -> None:
    assert EVENT_DTYPE.itemsize == 48
    assert RING_VAL_DTYPE["stall_hist"].shape == (HIST_BUCKETS,)
    assert VM_VAL_DTYPE["reset_lat_hist"].shape == (HIST_BUCKETS,)
    # A zeroed record decodes to zeros: no hidden padding fields with meaning.
    assert np.zeros(1, RING_VAL_DTYPE)["pushes"][0] == 0


# The BTF reader against the C compiler: uapi structs the kernel's BTF also describes
# (struct kvm_run has anonymous unions, so the flattening and dotted paths are exercised).
BTF_MEMBERS = [
    ("kvm_enable_cap", "args"),
    ("kvm_dirty_gfn", "offset"),
    ("kvm_run", "exit_reason"),
    ("kvm_run", "io"),
    ("kvm_run", "io.port"),
    ("kvm_run", "mmio.len"),
    ("kvm_run", "kvm_dirty_regs"),
]


def test_btf_offsets_match_the_compiler(tmp_path: Path) -> None:
    from kvmtrace.host.btf import VMLINUX, load_vmlinux

    require(VMLINUX.is_file(), f"no kernel BTF at {VMLINUX}")
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    require(cc is not None, "no C compiler (cc)")
    body = "\n".join(f'printf("%zu\\n", offsetof(struct {s}, {m}));' for s, m in BTF_MEMBERS)
    src, exe = tmp_path / "btf.c", tmp_path / "btf"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n"
                   f"int main(void) {{\n{body}\nreturn 0;\n}}\n")
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True)
    want = [int(x) for x in subprocess.run([str(exe)], check=True, capture_output=True,
                                           text=True).stdout.split()]
    btf = load_vmlinux()
    assert [btf.offsetof(s, m) for s, m in BTF_MEMBERS] == want
    with pytest.raises(KeyError):
        btf.offsetof("kvm_run", "no_such_member")
    assert btf.tracepoint_proto("kvm_userspace_exit") == [("__u32", ""), ("int", "")]
