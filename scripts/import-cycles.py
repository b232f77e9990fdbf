#!/usr/bin/env python3
"""Finds import circles between the files of each crate of the workspace.

A file depends on another when its code names a path into the other's module (`crate::a::b`,
`super::x`, `self::x`, or a child module by name); a re-export (`pub use`) is the module's
facade, not a dependency. Test modules (`#[cfg(test)] mod x { .. }`)
and comments are left out. Every strongly connected group of two or more files is a circle;
a circle listed in docs/architecture.md under "Allowed import circles" (as `crate: a.rs, b.rs`)
is reported but does not fail. Exit status 1 when any other circle exists.

    scripts/import-cycles.py           # every crate
    scripts/import-cycles.py -v        # also each circle's evidence (file:line of each edge)
    scripts/import-cycles.py --self-test   # the finder on small crates with known answers
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_comments(text):
    """Blanks line comments and block comments, keeping line numbers; strings are kept."""
    out = []
    i, n = 0, len(text)
    in_str = False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_str = False
            i += 1
            continue
        if c == '"':
            in_str = True
            out.append(c)
            i += 1
            continue
        if c == "'" and i + 2 < n and text[i + 2] == "'":
            out.append(text[i : i + 3])
            i += 3
            continue
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            i = j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("\n" * text.count("\n", i, j))
            i = j
            continue
        out.append(c)
        i += 1
    return "".join(out)


def blank_strings(text):
    return re.sub(r'"(\\.|[^"\\])*"', lambda m: '"' + "\n" * m.group(0).count("\n") + '"', text)


def strip_test_modules(text):
    """Blanks `#[cfg(test)] mod x { .. }` bodies (line numbers kept)."""
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+" + IDENT + r"\s*\{", text)
        if not m:
            return text
        depth, j = 0, m.end() - 1
        while j < len(text):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        body = text[m.start() : j + 1]
        text = text[: m.start()] + "\n" * body.count("\n") + text[j + 1 :]


def expand_use(tree):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]."""
    tree = re.sub(r"\s+", "", tree)
    if "{" not in tree:
        return [tree]
    k = tree.index("{")
    prefix, inner = tree[:k], tree[k + 1 : tree.rindex("}")]
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    out = []
    for p in parts:
        if p:
            out += expand_use(prefix + p)
    return out


class Crate:
    def __init__(self, name, root_files):
        self.name = name
        self.modules = {}  # module path tuple -> file
        self.children = {}  # file -> {child name: module path}
        self.mod_of = {}  # file -> module path
        for root in root_files:
            self.walk(root, ())

    def walk(self, path, modpath):
        self.modules[modpath] = path
        self.mod_of[path] = modpath
        self.children[path] = {}
        text = strip_test_modules(blank_strings(strip_comments(open(path).read())))
        base = os.path.basename(path)
        d = os.path.dirname(path)
        subdir = d if base in ("lib.rs", "main.rs", "mod.rs") else os.path.join(d, base[:-3])
        for m in re.finditer(r"^\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", text, re.M):
            name = m.group(1)
            for cand in (os.path.join(subdir, name + ".rs"), os.path.join(subdir, name, "mod.rs")):
                if os.path.exists(cand):
                    self.children[path][name] = modpath + (name,)
                    self.walk(cand, modpath + (name,))
                    break

    def resolve(self, segs):
        """Longest module prefix of `segs` that is a file of this crate."""
        for k in range(len(segs), -1, -1):
            if tuple(segs[:k]) in self.modules:
                return self.modules[tuple(segs[:k])]
        return None

    def edges(self):
        """(from file, to file, line) for every reference between two files."""
        out = []
        for path, modpath in self.mod_of.items():
            raw = open(path).read()
            text = strip_test_modules(blank_strings(strip_comments(raw)))
            refs = []  # (segments, offset)
            for m in re.finditer(r"(?<!pub )(?<!\) )\buse\s+([^;]*);", text):
                for p in expand_use(m.group(1)):
                    p = re.sub(r"\bas\b.*", "", p.replace("::as", " as "))
                    refs.append((p.split("::"), m.start()))
            # Re-exports (`pub use`) are the module's facade, not a dependency of its code.
            facade = re.sub(r"\bpub(\([^)]*\))?\s+use\s+[^;]*;", lambda m: "\n" * m.group(0).count("\n"), text)
            for m in re.finditer(r"\b((?:crate|super|self)(?:::" + IDENT + r")+)", facade):
                refs.append((m.group(1).split("::"), m.start()))
            for name in self.children[path]:
                for m in re.finditer(r"(?<![:\w])" + name + r"::", facade):
                    refs.append(([name, "x"], m.start()))
            for segs, off in refs:
                segs = [s for s in segs if s and s != "*"]
                if not segs:
                    continue
                if segs[0] == "crate":
                    target = list(segs[1:])
                elif segs[0] in ("super", "self"):
                    base = list(modpath)
                    while segs and segs[0] in ("super", "self"):
                        if segs[0] == "super":
                            base = base[:-1]
                        segs = segs[1:]
                    target = base + list(segs)
                elif segs[0] in self.children[path]:
                    target = list(modpath) + list(segs)
                else:
                    continue
                dest = self.resolve(target)
                if dest and dest != path:
                    out.append((path, dest, text.count("\n", 0, off) + 1))
        return out


def crates():
    found = []
    for group in ("crates", "."):
        base = os.path.join(ROOT, group)
        for name in sorted(os.listdir(base)):
            d = os.path.join(base, name)
            if group == "." and name != "tests":
                continue
            roots = []
            src = os.path.join(d, "src") if group == "crates" else d
            for r in ("lib.rs", "main.rs"):
                if os.path.exists(os.path.join(src, r)):
                    roots.append(os.path.join(src, r))
            bindir = os.path.join(src, "bin")
            if os.path.isdir(bindir):
                roots += [os.path.join(bindir, f) for f in sorted(os.listdir(bindir)) if f.endswith(".rs")]
            for r in roots:
                label = name if r.endswith("lib.rs") or len(roots) == 1 else f"{name} ({os.path.basename(r)})"
                found.append(Crate(label, [r]))
    return found


def sccs(nodes, adj):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def allowed():
    doc = os.path.join(ROOT, "docs", "architecture.md")
    text = open(doc).read() if os.path.exists(doc) else ""
    m = re.search(r"## Allowed import circles\n(.*?)(\n## |\Z)", text, re.S)
    out = set()
    if m:
        for line in m.group(1).splitlines():
            mm = re.match(r"- `([^`]+)`: `([^`]+)`", line.strip())
            if mm:
                out.add((mm.group(1), frozenset(f.strip() for f in mm.group(2).split(","))))
    return out


def circles_of(root_file):
    """The circles of the crate rooted at `root_file`, as sets of file names."""
    crate = Crate("t", [root_file])
    adj = {}
    for a, b, _ in crate.edges():
        adj.setdefault(a, set()).add(b)
    return [frozenset(os.path.basename(f) for f in c) for c in sccs(list(crate.mod_of), adj)]


def self_test():
    import tempfile

    cases = [
        # a and b name each other: one circle.
        ({"lib.rs": "mod a;\nmod b;\n", "a.rs": "use crate::b::B;\npub struct A;\n",
          "b.rs": "pub struct B;\nfn f() { let _ = super::a::A; }\n"}, [{"a.rs", "b.rs"}]),
        # Around a loop of three, through a `use` group and a child module named in code.
        ({"lib.rs": "mod a;\nmod b;\nmod c;\n", "a.rs": "use crate::{b::B, c};\npub struct A;\n",
          "b.rs": "pub struct B;\nfn f() { crate::c::g(); }\n", "c.rs": "pub fn g() { let _ = crate::a::A; }\n"},
         [{"a.rs", "b.rs", "c.rs"}]),
        # A parent's re-export, a comment, a string and a test module are not dependencies.
        ({"lib.rs": "mod a;\nmod b;\npub use a::A;\n", "a.rs": "// crate::b::B\npub struct A;\nconst S: &str = \"crate::b\";\n#[cfg(test)]\nmod tests {\n    use crate::b::B;\n}\n",
          "b.rs": "use crate::A;\npub struct B;\n"}, []),
    ]
    for files, want in cases:
        with tempfile.TemporaryDirectory() as d:
            for name, text in files.items():
                with open(os.path.join(d, name), "w") as f:
                    f.write(text)
            got = circles_of(os.path.join(d, "lib.rs"))
            if sorted(map(sorted, got)) != sorted(map(sorted, want)):
                print(f"self-test failed: {sorted(files)}: want {want}, got {got}")
                return 1
    print(f"self-test: {len(cases)} cases pass")
    return 0


def main():
    if "--self-test" in sys.argv:
        return self_test()
    verbose = "-v" in sys.argv
    ok_list = allowed()
    failed = 0
    total = 0
    for crate in crates():
        edges = crate.edges()
        adj = {}
        where = {}
        for a, b, line in edges:
            adj.setdefault(a, set()).add(b)
            where.setdefault((a, b), line)
        for comp in sccs(list(crate.mod_of), adj):
            total += 1
            short = frozenset(os.path.relpath(f, os.path.dirname(crate.modules[()])) for f in comp)
            is_ok = (crate.name, short) in ok_list
            failed += not is_ok
            print(f"{'allowed ' if is_ok else ''}circle in {crate.name}: {', '.join(sorted(short))}")
            if verbose:
                for a in sorted(comp):
                    for b in sorted(adj.get(a, ())):
                        if b in comp:
                            print(f"    {os.path.relpath(a, ROOT)}:{where[(a, b)]} -> {os.path.relpath(b, ROOT)}")
    print(f"{total} import circle(s), {failed} not allowed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
