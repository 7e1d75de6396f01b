#!/usr/bin/env python3
"""Import cycles between the top-level modules of a Rust crate.

Usage: scripts/module-cycles.py [CRATE_SRC_DIR ...]   (default: agent/src)

A top-level module is `src/<name>.rs` or `src/<name>/` (with everything below it). Module A
depends on B when a file of A names `crate::B` (in a `use`, including grouped `use crate::{B, ..}`,
or in a path). The script prints every strongly connected component of more than one module
(each is a cycle) and exits 1 if there is any, 0 otherwise. It reads source text only; comments
are stripped first, so a doc link does not count as a dependency.
"""
import os
import re
import sys


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def top_modules(src):
    mods = {}
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if entry.endswith(".rs") and entry not in ("lib.rs", "main.rs"):
            mods.setdefault(entry[:-3], []).append(path)
        elif os.path.isdir(path):
            for root, _, files in os.walk(path):
                mods.setdefault(entry, []).extend(
                    os.path.join(root, f) for f in files if f.endswith(".rs")
                )
    return mods


def deps(mods):
    graph = {m: set() for m in mods}
    for m, files in mods.items():
        for f in files:
            text = strip_comments(open(f, encoding="utf-8").read())
            names = set(re.findall(r"crate::([a-z_][a-z0-9_]*)", text))
            for group in re.findall(r"crate::\{([^}]*)\}", text, flags=re.S):
                names.update(re.findall(r"(?:^|[,{\s])([a-z_][a-z0-9_]*)", group))
            graph[m].update(n for n in names if n in mods and n != m)
    return graph


def sccs(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
            out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def main():
    dirs = sys.argv[1:] or ["agent/src"]
    bad = False
    for src in dirs:
        graph = deps(top_modules(src))
        cycles = sccs(graph)
        if not cycles:
            print(f"{src}: no import cycles among {len(graph)} top-level modules")
        for comp in cycles:
            bad = True
            print(f"{src}: cycle among {len(comp)} modules: {' '.join(comp)}")
            for m in comp:
                inside = sorted(graph[m] & set(comp))
                print(f"  {m} -> {' '.join(inside)}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
