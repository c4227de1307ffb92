#!/usr/bin/env python3
"""Generate controlplane/src/apiserver/protobuf/schema.rs, the table the protobuf decoder runs on.

Three sources, each for what it is authoritative on, checked against each other:

- k8s-pb (prost code generated from upstream generated.proto): field numbers,
  protobuf types, repeated/map, and which message a field holds.
- go_fields.tsv (extract_go_fields.py, from kubectl 1.33): which fields exist in
  Kubernetes 1.33, their JSON names, and what Go's JSON encoder does with them
  (pointer, omitempty, embedded inline).
- k8s-openapi (v1_33): the JSON property names of every definition, as a cross-check.

Usage: python3 tools/protobuf-schema/gen.py [--k8s-pb DIR] [--k8s-openapi DIR]
The crate directories default to the newest matching ones in ~/.cargo/registry/src.
The output is run through rustfmt.
"""

import argparse
import glob
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUTPUT = os.path.join(REPO, "controlplane/src/apiserver/protobuf/schema.rs")

K8S_PB_VERSION = "0.9.0"
K8S_OPENAPI_VERSION = "0.29.0"
OPENAPI_MODULE = "v1_33"

META = "k8s.io/apimachinery/pkg/apis/meta/v1"
# Go types whose JSON form is not the plain object of their protobuf fields.
SPECIALS = {
    f"{META}.Time": "Time",
    f"{META}.MicroTime": "MicroTime",
    f"{META}.Duration": "Duration",
    f"{META}.FieldsV1": "FieldsV1",
    "k8s.io/apimachinery/pkg/util/intstr.IntOrString": "IntOrString",
    "k8s.io/apimachinery/pkg/api/resource.Quantity": "Quantity",
    "k8s.io/apimachinery/pkg/runtime.RawExtension": "RawExtension",
}
SCALARS = {"string": "String", "bool": "Bool", "int32": "Int32", "int64": "Int64", "double": "Double", "bytes": "Bytes"}
# Go basic types and the protobuf type each must be written as.
GO_SCALARS = {"string": "string", "bool": "bool", "int32": "int32", "int64": "int64", "float64": "double", "[]uint8": "bytes"}


def fail(msg):
    sys.exit(f"gen.py: {msg}")


def crate_dir(name, version, override):
    if override:
        return override
    hits = sorted(glob.glob(os.path.expanduser(f"~/.cargo/registry/src/*/{name}-{version}")))
    if not hits:
        fail(f"{name} {version} not found in ~/.cargo/registry/src; run `cargo fetch` with it as a dependency")
    return hits[-1]


# ---------------------------------------------------------------- inputs


def read_kinds():
    kinds = []
    with open(os.path.join(HERE, "kinds.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                kinds.append(tuple(line.split()))
    return kinds


def go_package(api_version):
    if "/" not in api_version:
        return f"k8s.io/api/core/{api_version}"
    group, version = api_version.split("/")
    if group == "meta.k8s.io":
        return f"k8s.io/apimachinery/pkg/apis/meta/{version}"
    return f"k8s.io/api/{group.split('.')[0]}/{version}"


def read_go_fields():
    """{qualified Go struct: [field dict, ...]} in the order the file lists them."""
    structs = {}
    with open(os.path.join(HERE, "go_fields.tsv")) as f:
        for line in f:
            if line.startswith("#"):
                continue
            pkg, name, number, json_name, flags, go_type, ref = line.rstrip("\n").split("\t")
            structs.setdefault(f"{pkg}.{name}", []).append(
                {
                    "number": int(number),
                    "json": json_name,
                    "flags": set() if flags == "-" else set(flags.split(",")),
                    "go_type": go_type,
                    "ref": None if ref == "-" else ref,
                }
            )
    return structs


PROST_ATTR = re.compile(r"#\[prost\((.*)\)\]")
FIELD_DECL = re.compile(r"pub (?:r#)?(\w+):\s*(.+?),?$")


def read_k8s_pb(root):
    """{(module path, lower-cased message name): {tag: field}} from k8s-pb's prost code."""
    messages = {}
    for path in glob.glob(os.path.join(root, "src/**/mod.rs"), recursive=True):
        module = os.path.relpath(os.path.dirname(path), os.path.join(root, "src")).split(os.sep)
        with open(path) as f:
            lines = [l.strip() for l in f]
        current, attr, decl = None, None, None
        for line in lines:
            m = re.match(r"pub struct (\w+) \{", line)
            if m:
                current = {}
                messages[("/".join(module), m.group(1).lower())] = current
                continue
            if current is None:
                continue
            if line == "}":
                current = None
                continue
            m = PROST_ATTR.match(line)
            if m:
                attr, decl = m.group(1), ""
                continue
            if attr is not None and not line.startswith("///"):
                decl += line
                if decl.endswith(",") and decl.count("<") == decl.count(">"):
                    field = parse_prost_field(attr, decl, module)
                    current[field["tag"]] = field
                    attr = None
    return messages


def parse_prost_field(attr, decl, module):
    m = FIELD_DECL.match(decl)
    if not m:
        fail(f"cannot parse prost field declaration {decl!r}")
    tag = int(re.search(r'tag = "(\d+)"', attr).group(1))
    field = {"tag": tag, "rust": m.group(1), "repeated": "repeated" in attr, "map": None, "type": None}
    rust_type = m.group(2)
    bmap = re.search(r'btree_map = "(\w+), (\w+)"', attr)
    if bmap:
        field["map"] = bmap.group(1)
        field["type"] = bmap.group(2)
    else:
        field["type"] = attr.split(",")[0].split(" ")[0]
    if field["type"] == "message":
        field["ref"] = resolve_rust_path(innermost_type(rust_type), module)
    return field


def innermost_type(rust_type):
    """The message path inside Option<..>, Vec<..>, Box<..> or the value of BTreeMap<K, V>."""
    t = rust_type
    if "BTreeMap<" in t:
        t = t.split("BTreeMap<", 1)[1].rsplit(">", 1)[0]
        t = t.split(",", 1)[1].strip().rstrip(",").strip()
    while True:
        m = re.match(r"(?:::\w+)*::(?:Option|Vec|Box)<(.*)>$", t)
        if not m:
            return t
        # rustfmt leaves a trailing comma inside a type split over lines.
        t = m.group(1).strip().rstrip(",").strip()


def resolve_rust_path(path, module):
    parts = path.split("::")
    base = list(module)
    while parts and parts[0] == "super":
        parts.pop(0)
        base.pop()
    return ("/".join(base + parts[:-1]), parts[-1].lower())


def read_openapi(root):
    """{definition name: set of JSON property names} from k8s-openapi's Deserialize impls."""
    props = {}
    for path in glob.glob(os.path.join(root, "src", OPENAPI_MODULE, "**/*.rs"), recursive=True):
        with open(path) as f:
            text = f.read()
        m = re.match(r"// Generated from definition (\S+)", text)
        if m:
            props[m.group(1)] = set(re.findall(r'"([^"]+)" => Field::Key_', text))
    return props


# ---------------------------------------------------------------- join


def pb_module(go_pkg):
    """k8s.io/api/core/v1 -> api/core/v1 (k8s-pb's module path)."""
    return go_pkg.removeprefix("k8s.io/")


def openapi_definition(go_struct):
    pkg, name = go_struct.rsplit(".", 1)
    return "io.k8s." + pkg.removeprefix("k8s.io/").replace("/", ".") + "." + name


def build(kinds, go_structs, pb, openapi):
    """Walk from the served kinds; return (ordered messages, kinds table)."""
    roots = [f"{go_package(av)}.{kind}" for av, kind in kinds]
    order, queue = [], list(roots)
    while queue:
        key = queue.pop(0)
        if key in order or key in SPECIALS:
            continue
        if key not in go_structs:
            fail(f"{key} is reachable but not in go_fields.tsv; re-run extract_go_fields.py")
        order.append(key)
        queue.extend(f["ref"] for f in go_structs[key] if f["ref"])

    messages = {}
    for key in order:
        pkg, name = key.rsplit(".", 1)
        pb_fields = pb.get((pb_module(pkg), name.lower()))
        if pb_fields is None:
            fail(f"{key} has no message in k8s-pb")
        fields = [join_field(key, g, pb_fields) for g in go_structs[key]]
        messages[key] = sorted(fields, key=lambda f: f["number"])
    check_json_names(messages, go_structs, openapi)
    return messages, [(av, kind, f"{go_package(av)}.{kind}") for av, kind in kinds]


def join_field(struct, g, pb_fields):
    where = f"{struct} field {g['number']} ({g['json']})"
    p = pb_fields.get(g["number"])
    if p is None:
        fail(f"{where} is not in k8s-pb")
    field = {"number": g["number"], "json": g["json"], "repeated": False, "omit_zero": False, "inline": False}
    if p["map"] is not None:
        if p["map"] != "string":
            fail(f"{where}: map keys of type {p['map']} are not supported")
        field["kind"] = ("map", value_kind(where, p, g))
    elif p["type"] == "message":
        field["kind"] = value_kind(where, p, g)
        field["repeated"] = p["repeated"]
    else:
        field["kind"] = value_kind(where, p, g)
        field["repeated"] = p["repeated"]
    if "inline" in g["flags"]:
        if field["kind"][0] != "message" or field["repeated"]:
            fail(f"{where}: only single messages can be inline")
        field["inline"] = True
        field["json"] = "-"
    # Go's JSON encoder drops these when zero; gogo-protobuf writes them anyway.
    scalar = field["kind"][0] == "scalar"
    if scalar and not field["repeated"] and "omitempty" in g["flags"] and "ptr" not in g["flags"]:
        field["omit_zero"] = True
    return field


def value_kind(where, p, g):
    if p["type"] == "message":
        ref = g["ref"]
        if ref is None:
            fail(f"{where}: k8s-pb says message, Go says {g['go_type']}")
        pkg, name = ref.rsplit(".", 1)
        if p["ref"] != (pb_module(pkg), name.lower()):
            fail(f"{where}: k8s-pb refers to {p['ref']}, Go to {ref}")
        if ref in SPECIALS:
            return ("special", SPECIALS[ref])
        return ("message", ref)
    if p["type"] not in SCALARS:
        fail(f"{where}: protobuf type {p['type']} is not supported")
    # Cross-check plain Go types (named ones like v1.DNSPolicy hide their base type).
    go_type = g["go_type"].lstrip("*")
    if p["repeated"]:
        go_type = go_type.removeprefix("[]")
    expected = None if p["map"] else GO_SCALARS.get(go_type)
    if expected is not None and expected != p["type"]:
        fail(f"{where}: Go type {g['go_type']} but protobuf type {p['type']}")
    return ("scalar", SCALARS[p["type"]])


def check_json_names(messages, go_structs, openapi):
    """Every JSON name must be a property of the k8s-openapi definition it lands in."""

    def check(struct, props, definition):
        for g in go_structs[struct]:
            if "inline" in g["flags"]:
                check(g["ref"], props, definition)
            elif g["json"] not in props:
                fail(f"{struct}: JSON name {g['json']!r} is not a property of {definition}")

    inline_only = {g["ref"] for fields in go_structs.values() for g in fields if "inline" in g["flags"]}
    for struct in messages:
        definition = openapi_definition(struct)
        if definition in openapi:
            check(struct, openapi[definition], definition)
        elif struct not in inline_only:
            fail(f"{struct} has no k8s-openapi {OPENAPI_MODULE} definition")


# ---------------------------------------------------------------- output


def const_name(struct):
    """k8s.io/api/core/v1.PodSpec -> CORE_V1_POD_SPEC."""
    pkg, name = struct.rsplit(".", 1)
    group = pkg.split("/")[-2]
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).upper()
    return f"{group}_{pkg.split('/')[-1]}_{snake}".upper()


def rust_kind(kind):
    tag, arg = kind
    if tag == "scalar":
        return f"Kind::{arg}"
    if tag == "special":
        return f"Kind::Special(Special::{arg})"
    if tag == "message":
        return f"Kind::Message({const_name(arg)})"
    return f"Kind::Map(&{rust_kind(arg)})"


def render(messages, kinds, sources):
    ids = {struct: i for i, struct in enumerate(messages)}
    out = [
        "// @generated by tools/protobuf-schema/gen.py; do not edit.",
        f"// Sources: {sources}.",
        "//! The protobuf schema of every message the API server decodes.",
        "",
        "use super::model::{Field, Kind, Message, MsgId, Special};",
        "",
    ]
    for struct, i in ids.items():
        out.append(f"pub(super) const {const_name(struct)}: MsgId = MsgId({i});")
    out += ["", "/// Served kinds: (apiVersion, kind, message).", "pub(super) static KINDS: &[(&str, &str, MsgId)] = &["]
    for av, kind, struct in kinds:
        out.append(f'    ("{av}", "{kind}", {const_name(struct)}),')
    out += ["];", "", "/// Indexed by `MsgId`; fields sorted by number.", "pub(super) static MESSAGES: &[Message] = &["]
    for struct, fields in messages.items():
        out.append(f'    // {struct}')
        out.append(f'    Message {{ name: "{struct.rsplit(".", 1)[1]}", fields: &[')
        for f in fields:
            flags = "".join(f".{flag}()" for flag in ("repeated", "omit_zero", "inline") if f[flag])
            out.append(f'        Field::new({f["number"]}, "{f["json"]}", {rust_kind(f["kind"])}){flags},')
        out.append("    ] },")
    out += ["];", ""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k8s-pb")
    ap.add_argument("--k8s-openapi")
    args = ap.parse_args()
    pb_dir = crate_dir("k8s-pb", K8S_PB_VERSION, args.k8s_pb)
    openapi_dir = crate_dir("k8s-openapi", K8S_OPENAPI_VERSION, args.k8s_openapi)
    messages, kinds = build(read_kinds(), read_go_fields(), read_k8s_pb(pb_dir), read_openapi(openapi_dir))
    sources = (
        f"k8s-pb {K8S_PB_VERSION}, tools/protobuf-schema/go_fields.tsv (kubectl 1.33), "
        f"k8s-openapi {K8S_OPENAPI_VERSION} ({OPENAPI_MODULE})"
    )
    with open(OUTPUT, "w") as f:
        f.write(render(messages, kinds, sources))
    subprocess.run(["rustfmt", "--edition", "2024", OUTPUT], check=True)
    print(f"wrote {OUTPUT}: {len(messages)} messages, {sum(map(len, messages.values()))} fields")


if __name__ == "__main__":
    main()
