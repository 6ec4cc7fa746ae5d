#!/usr/bin/env python3
"""The manifest of a golden run (scripts/golden_run.sh writes OUT/MANIFEST with it): one line per output file, its
path under OUT and a SHA-256 of its content. Tensor files are hashed tensor by tensor; JSON, JSON-lines and CSV
files (and the metadata inside tensor files) without the keys that hold wall times or dates, which differ from run
to run whatever the code; in text, the run's own folder is written <OUT>.

    scripts/golden_manifest.py OUT                                     # OUT/MANIFEST
    scripts/golden_manifest.py OUT --ignore-keys DEPLOY,DEPLOYMENT --manifest OUT/MANIFEST.common

``--ignore-keys`` also leaves out keys a change *added* (a new setting recorded in every results file): run it on
the before and after folders with the same list to show that everything else is bit-identical.
"""
import csv
import hashlib
import json
import os
import re
import sys

import torch

args = sys.argv[1:]
if not args or args[0].startswith("-"):
    sys.exit("usage: scripts/golden_manifest.py OUT_DIR [--ignore-keys KEY,KEY...] [--manifest FILE]")
out = args[0]
IGNORED = set(args[args.index("--ignore-keys") + 1].split(",")) if "--ignore-keys" in args else set()
MANIFEST = args[args.index("--manifest") + 1] if "--manifest" in args else os.path.join(out, "MANIFEST")
VOLATILE_NAMES = re.compile(r"(seconds|_s|time|created|elapsed)$")


class Volatile:
    """Keys left out of every hash: wall times and dates, and the ``--ignore-keys`` named."""
    def search(self, key):
        return key in IGNORED or VOLATILE_NAMES.search(key)


VOLATILE = Volatile()

OUT_NAMES = sorted({out, os.path.abspath(out), os.path.basename(os.path.abspath(out))}, key=len, reverse=True)

def unplaced(text):
    """The text with this run's folder named <OUT>: runs in two folders record their own paths."""
    for name in OUT_NAMES:
        text = text.replace(name, "<OUT>")
    return text

def stable(value):
    """The value without the keys that hold wall times or dates, and with this run's folder named <OUT>."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not VOLATILE.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [stable(v) for v in value]
    return unplaced(value) if isinstance(value, str) else value

def digest(value, h):
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            if not VOLATILE.search(str(k)):
                h.update(f"key {k!r}".encode()); digest(value[k], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"list {len(value)}".encode())
        for v in value:
            digest(v, h)
    else:
        h.update(repr(stable(value)).encode())

lines = []
for folder, _, files in os.walk(out):
    for name in files:
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, out)
        if rel.startswith(("logs", "data")) or name.endswith((".pdf", ".lock")) or rel.startswith("MANIFEST"):
            continue
        h = hashlib.sha256()
        if name.endswith(".pt"):
            digest(torch.load(path, map_location="cpu", weights_only=True), h)
        elif name.endswith(".json"):
            h.update(json.dumps(stable(json.load(open(path))), sort_keys=True).encode())
        elif name.endswith(".jsonl"):
            for line in open(path):
                h.update(json.dumps(stable(json.loads(line)), sort_keys=True).encode())
        elif name.endswith(".csv"):
            rows = list(csv.reader(open(path)))
            keep = [i for i, column in enumerate(rows[0] if rows else []) if not VOLATILE.search(column)]
            for row in rows:
                h.update(repr([unplaced(row[i]) for i in keep if i < len(row)]).encode())
        elif name.endswith((".md", ".txt")):
            h.update(unplaced(open(path).read()).encode())
        else:
            h.update(open(path, "rb").read())
        lines.append(f"{h.hexdigest()}  {rel}")
open(MANIFEST, "w").write("\n".join(sorted(lines, key=lambda l: l.split("  ", 1)[1])) + "\n")
print(f"golden run: {len(lines)} outputs -> {MANIFEST}")
