"""ctypes types from bcc's JSON descriptions of a map's key and value types.

bcc's front end describes each map's key and value C type as JSON (``bpf_table_key_desc``):
a scalar is its C name (``"unsigned int"``); a struct or union is ``[name, fields, kind]``
with kind ``struct``, ``struct_packed`` or ``union`` and each field ``[name, type]``,
``[name, type, [n]]`` (an array of n), ``[name, type, bits]`` (a bit-field) or a nested
description (``kind`` third). The probe cache (:mod:`kvmtrace.bpf.objcache`) keeps these
strings so that a cached start can build the same ctypes types without importing bcc.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

__all__ = ["SCALARS", "ctype_of"]

#: C scalar name -> ctypes type
SCALARS: dict[str, Any] = {
    "_Bool": ctypes.c_bool, "char": ctypes.c_char, "signed char": ctypes.c_byte,
    "unsigned char": ctypes.c_ubyte, "short": ctypes.c_short,
    "unsigned short": ctypes.c_ushort, "int": ctypes.c_int, "unsigned int": ctypes.c_uint,
    "long": ctypes.c_long, "unsigned long": ctypes.c_ulong, "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong, "float": ctypes.c_float,
    "double": ctypes.c_double, "long double": ctypes.c_longdouble,
    "__int128": ctypes.c_int64 * 2, "unsigned __int128": ctypes.c_uint64 * 2,
}
_KINDS = ("struct", "struct_packed", "union")


def ctype_of(desc: str | list[Any]) -> Any:
    """The ctypes type of a description (JSON text or already parsed)."""
    if isinstance(desc, str):
        if desc in SCALARS:
            return SCALARS[desc]
        desc = json.loads(desc)
    if isinstance(desc, str):
        return SCALARS[desc]
    name, items = str(desc[0]), desc[1]
    kind = desc[2] if len(desc) > 2 else "struct"
    fields: list[tuple[Any, ...]] = []
    anon: list[str] = []
    for item in items:
        if len(item) == 2:
            fields.append((item[0], ctype_of(item[1])))
        elif isinstance(item[2], list):
            fields.append((item[0], ctype_of(item[1]) * item[2][0]))
        elif isinstance(item[2], int):
            fields.append((item[0], ctype_of(item[1]), item[2]))
        elif item[2] in _KINDS:
            field = item[0] or f"__anon{len(anon)}"
            if not item[0]:
                anon.append(field)
            fields.append((field, ctype_of(item)))
        else:
            raise ValueError(f"unknown type description {item!r}")
    base = ctypes.Union if kind == "union" else ctypes.Structure
    body: dict[str, Any] = {"_anonymous_": anon, "_fields_": fields}
    if kind == "struct_packed":
        body["_pack_"] = 1
    return type(name or "anon", (base,), body)
