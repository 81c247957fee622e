"""Compare two runs' ``results/<experiment>/`` folders, store by store and variable by variable:
the check that a refactor changed no number.

    python tests/benchmarks/compare_results.py BEFORE/results/mnist AFTER/results/mnist

For every Zarr store present in either run: the same variables, each with the same dims,
dtype, attrs and bit-identical values (NaN equal to NaN, compared as raw bytes); the store
attrs, except those that name when and from which commit it was written (``created``,
``git_commit``), how long it took (``attack_seconds``) and what it was computed from
(``computed_from``: content digests, which move when a model directory's ``spec.json`` changes
format), are equal, and a difference there is listed. Model directories: ``model.pt`` tensors bit-identical, ``training_log.csv`` equal, and
``test_accuracy.json`` equal but for ``train_seconds``. CSV tables: byte-identical.

Prints one line per difference and a count; exits 1 when a value differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import xarray as xr

#: store attrs that name the writing, not the result (its time, commit, inputs' digests, duration)
WRITING_ATTRS = {"created", "git_commit", "computed_from", "attack_seconds"}


def stores(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*.zarr") if p.is_dir())


def same_values(a: xr.Variable, b: xr.Variable) -> bool:
    if a.dtype != b.dtype or a.dims != b.dims or a.shape != b.shape:
        return False
    x, y = np.asarray(a.values), np.asarray(b.values)
    if x.dtype.kind in "OTU":  # strings: compared as text (a variable-length array's bytes hold pointers)
        return x.tolist() == y.tolist()
    return np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes()


def compare_store(before: Path, after: Path, name: str) -> tuple[list[str], list[str], int]:
    """(value differences, attr-only differences, variables compared)."""
    a, b = xr.open_zarr(before), xr.open_zarr(after)
    values, attrs = [], []
    names = sorted(set(a.variables) | set(b.variables))
    for var in names:
        if var not in a.variables or var not in b.variables:
            values.append(f"{name}: variable {var} only in {'after' if var in b.variables else 'before'}")
            continue
        if not same_values(a[var].variable, b[var].variable):
            values.append(f"{name}: {var} differs")
        if a[var].attrs != b[var].attrs:
            values.append(f"{name}: {var} attrs differ")
    for key in sorted(set(a.attrs) | set(b.attrs)):
        if a.attrs.get(key) != b.attrs.get(key):
            (attrs if key in WRITING_ATTRS else values).append(f"{name}: store attr {key} differs")
    return values, attrs, len(names)


def compare_model_dir(before: Path, after: Path) -> list[str]:
    found = []
    sa = torch.load(before / "model.pt", map_location="cpu", weights_only=True)
    sb = torch.load(after / "model.pt", map_location="cpu", weights_only=True)
    if sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k]) or sa[k].dtype != sb[k].dtype for k in sa):
        found.append(f"models/{before.name}: model.pt weights differ")
    if (before / "training_log.csv").read_bytes() != (after / "training_log.csv").read_bytes():
        found.append(f"models/{before.name}: training_log.csv differs")
    pa, pb = (json.loads((d / "test_accuracy.json").read_text()) for d in (before, after))
    if {k: v for k, v in pa.items() if k != "train_seconds"} != {k: v for k, v in pb.items() if k != "train_seconds"}:
        found.append(f"models/{before.name}: test_accuracy.json differs")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    values: list[str] = []
    attrs: list[str] = []
    counted = 0
    names = sorted(set(stores(args.before)) | set(stores(args.after)))
    for name in names:
        if not (args.before / name).is_dir() or not (args.after / name).is_dir():
            values.append(f"{name}: only in one run")
            continue
        v, a, n = compare_store(args.before / name, args.after / name, str(name))
        values += v
        attrs += a
        counted += n
    models = sorted(p.name for p in (args.before / "models").iterdir() if (p / "model.pt").is_file())
    for model in models:
        if not (args.after / "models" / model / "model.pt").is_file():
            values.append(f"models/{model}: only in the first run")
            continue
        values += compare_model_dir(args.before / "models" / model, args.after / "models" / model)
    for csv in sorted(p.relative_to(args.before) for p in args.before.glob("*.csv")):
        if (args.before / csv).read_bytes() != (args.after / csv).read_bytes():
            values.append(f"{csv} differs")
    for line in values + attrs:
        print(line)
    print(
        f"{len(names)} stores, {counted} variables, {len(models)} model directories, "
        f"{len(list(args.before.glob('*.csv')))} tables: {len(values)} differences in values, "
        f"{len(attrs)} in writing attrs ({', '.join(sorted(WRITING_ATTRS))})"
    )
    return 1 if values else 0


if __name__ == "__main__":
    sys.exit(main())
