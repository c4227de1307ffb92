#!/usr/bin/env python3
"""Extract the Go struct facts of the Kubernetes API types from a kubectl binary.

The protobuf schema alone cannot say how Go turns a decoded message into JSON:
gogo-protobuf always writes non-pointer scalar fields (so `namespace: ""` or
`stdin: false` arrive even when the client never set them), while Go's JSON
encoder drops them again when the field is `omitempty`. Only the Go struct knows
whether a field is a pointer, `omitempty`, or an embedded (`json:",inline"`)
struct. kubectl carries that knowledge in its reflection metadata, so this
script reads it from there: for every struct reachable from kinds.txt it prints
one line per protobuf field.

Usage: extract_go_fields.py /usr/lib/google-cloud-sdk/bin/kubectl.1.33 > go_fields.tsv

Works for Go 1.21+ binaries (the abi.Type layout below); x86-64/arm64 ELF.
"""

import os
import struct
import sys

KIND_MASK = 0x1F
KIND_MAP, KIND_PTR, KIND_SLICE, KIND_STRUCT = 21, 22, 23, 25
TFLAG_UNCOMMON, TFLAG_EXTRA_STAR = 0x1, 0x2
TYPE_SIZE = 48  # abi.Type
STRUCT_TYPE_SIZE = TYPE_SIZE + 8 + 24  # + PkgPath Name + Fields slice

HERE = os.path.dirname(os.path.abspath(__file__))


class Binary:
    """Read access to a Go ELF binary's read-only data by virtual address."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.data = f.read()
        self.sections = self._sections()
        self.rodata_addr, self.rodata_off, self.rodata_size = self.sections[".rodata"]
        # The linker puts the type data (runtime.types) at the start of .rodata;
        # name and type offsets are relative to it.
        self.types_base = self.rodata_addr

    def _sections(self):
        d = self.data
        if d[:4] != b"\x7fELF" or d[4] != 2:
            sys.exit("not a 64-bit ELF file")
        shoff = struct.unpack_from("<Q", d, 0x28)[0]
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", d, 0x3A)
        raw = []
        for i in range(shnum):
            name, _typ, _flags, addr, off, size = struct.unpack_from("<IIQQQQ", d, shoff + i * shentsize)
            raw.append((name, addr, off, size))
        strtab = raw[shstrndx][2]
        out = {}
        for name, addr, off, size in raw:
            end = d.index(b"\0", strtab + name)
            out[d[strtab + name : end].decode()] = (addr, off, size)
        return out

    def read(self, addr, n):
        for a, off, size in self.sections.values():
            if off and a <= addr and addr + n <= a + size:
                return self.data[off + addr - a : off + addr - a + n]
        raise ValueError(f"address {addr:#x} not in a file-backed section")

    def u64(self, addr):
        return struct.unpack("<Q", self.read(addr, 8))[0]

    def varint(self, addr):
        value, shift = 0, 0
        while True:
            b = self.read(addr, 1)[0]
            addr += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value, addr

    def name(self, addr):
        """abi.Name: flags byte, varint length, bytes, then optionally a tag."""
        flags = self.read(addr, 1)[0]
        n, p = self.varint(addr + 1)
        text = self.read(p, n).decode("utf-8")
        tag = ""
        if flags & 2:
            tn, p = self.varint(p + n)
            tag = self.read(p, tn).decode("utf-8")
        return flags, text, tag


class GoType:
    def __init__(self, binary, addr):
        self.b = binary
        self.addr = addr
        hdr = binary.read(addr, TYPE_SIZE)
        self.tflag = hdr[20]
        self.kind = hdr[23] & KIND_MASK
        self.str_off = struct.unpack_from("<i", hdr, 40)[0]

    def string(self):
        _, s, _ = self.b.name(self.b.types_base + self.str_off)
        return s[1:] if self.tflag & TFLAG_EXTRA_STAR else s

    def elem(self):
        return GoType(self.b, self.b.u64(self.addr + TYPE_SIZE))

    def map_value(self):
        return GoType(self.b, self.b.u64(self.addr + TYPE_SIZE + 8))

    def pkg_path(self):
        """Package path of a named struct, from its abi.UncommonType."""
        if self.kind != KIND_STRUCT or not self.tflag & TFLAG_UNCOMMON:
            return ""
        off = struct.unpack("<i", self.b.read(self.addr + STRUCT_TYPE_SIZE, 4))[0]
        return self.b.name(self.b.types_base + off)[1]

    def qualified(self):
        return f"{self.pkg_path()}.{self.string().rsplit('.', 1)[-1]}"

    def fields(self):
        ptr, n, cap = struct.unpack("<QQQ", self.b.read(self.addr + TYPE_SIZE + 8, 24))
        out = []
        for i in range(n):
            name_ptr, typ, _offset = struct.unpack("<QQQ", self.b.read(ptr + 24 * i, 24))
            flags, name, tag = self.b.name(name_ptr)
            out.append((name, tag, flags & 8 != 0, GoType(self.b, typ)))
        return out


def index_structs(binary):
    """Every named struct type in .rodata, by package path and name."""
    ro = binary.data[binary.rodata_off : binary.rodata_off + binary.rodata_size]
    found = {}
    for i in range(0, len(ro) - STRUCT_TYPE_SIZE - 16, 8):
        if ro[i + 23] & KIND_MASK != KIND_STRUCT or not ro[i + 20] & TFLAG_UNCOMMON:
            continue
        ptr, n, cap = struct.unpack_from("<QQQ", ro, i + TYPE_SIZE + 8)
        if n == 0 or n != cap or n > 400:
            continue
        if not binary.rodata_addr <= ptr < binary.rodata_addr + binary.rodata_size:
            continue
        try:
            t = GoType(binary, binary.rodata_addr + i)
            key = t.qualified()
            t.fields()
        except (ValueError, UnicodeDecodeError, IndexError, struct.error):
            continue
        found.setdefault(key, t)
    return found


def go_package(api_version):
    """`apps/v1` -> k8s.io/api/apps/v1; core `v1` and meta.k8s.io handled apart."""
    if "/" not in api_version:
        return f"k8s.io/api/core/{api_version}"
    group, version = api_version.split("/")
    if group == "meta.k8s.io":
        return f"k8s.io/apimachinery/pkg/apis/meta/{version}"
    return f"k8s.io/api/{group.split('.')[0]}/{version}"


def read_kinds():
    roots = []
    with open(os.path.join(HERE, "kinds.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                api_version, kind = line.split()
                roots.append(f"{go_package(api_version)}.{kind}")
    return roots


def tag_value(tag, key):
    """The value of `key:"..."` in a Go struct tag, or None."""
    marker = key + ':"'
    start = tag.find(marker)
    if start < 0:
        return None
    start += len(marker)
    return tag[start : tag.index('"', start)]


def describe(field_type):
    """(shape flags, element struct type or None) of a field's Go type."""
    flags = []
    t = field_type
    if t.kind == KIND_PTR:
        flags.append("ptr")
        t = t.elem()
    if t.kind == KIND_SLICE:
        t = t.elem()
    elif t.kind == KIND_MAP:
        t = t.map_value()
    if t.kind == KIND_PTR:
        t = t.elem()
    return flags, (t if t.kind == KIND_STRUCT else None)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    binary = Binary(sys.argv[1])
    structs = index_structs(binary)
    queue = read_kinds()
    seen = set()
    print("# Generated by tools/protobuf-schema/extract_go_fields.py from a kubectl binary; do not edit.")
    print("# go package\tstruct\tproto field\tjson name\tflags\tgo type\treferenced struct")
    while queue:
        key = queue.pop(0)
        if key in seen:
            continue
        seen.add(key)
        if key not in structs:
            sys.exit(f"struct {key} not found in the binary")
        pkg, name = key.rsplit(".", 1)
        for fname, tag, embedded, ftype in structs[key].fields():
            pb = tag_value(tag, "protobuf")
            if pb is None or pb == "-":
                continue
            number = pb.split(",")[1]
            json_tag = tag_value(tag, "json")
            json_parts = (json_tag or fname).split(",")
            flags, elem = describe(ftype)
            flags += [p for p in json_parts[1:] if p in ("omitempty", "omitzero", "inline")]
            if embedded and json_tag is None:
                flags.append("inline")
            ref = "-"
            if elem is not None:
                ref = elem.qualified()
                queue.append(ref)
            json_name = json_parts[0] or "-"
            print(f"{pkg}\t{name}\t{number}\t{json_name}\t{','.join(flags) or '-'}\t{ftype.string()}\t{ref}")


if __name__ == "__main__":
    main()
