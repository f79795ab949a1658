#!/usr/bin/env python3
"""Strips documentation from botocore's KMS service model; see README.md beside this file."""
import json
import pathlib
import sys

DROP = {"documentation", "documentationUrl", "deprecatedMessage"}


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k not in DROP}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


model = json.load(open(sys.argv[1]))
out = {
    "metadata": model["metadata"],
    "operations": {
        name: {k: op[k] for k in ("name", "input", "output", "errors") if k in op}
        for name, op in model["operations"].items()
    },
    "shapes": strip(model["shapes"]),
}
target = pathlib.Path(__file__).with_name("kms-2014-11-01.min.json")
target.write_text(json.dumps(out, separators=(",", ":"), sort_keys=True))
