"""Command line: ``saliency-robustness inspect STORE`` summarizes any store of the pipeline."""

from __future__ import annotations

import argparse
import json

import numpy as np

from saliency_robustness.runtime import one_line_errors
from saliency_robustness.stores import open_store


def describe(path: str) -> str:
    """Dims, then one line per variable (dims, long name, units, median when numeric), then provenance."""
    ds = open_store(path)
    lines = [f"{path}", "dims: " + ", ".join(f"{d}={n}" for d, n in ds.sizes.items()), ""]
    width = max((len(str(n)) for n in ds.variables), default=0)
    for name, var in ds.variables.items():
        kind = "coord" if name in ds.coords else "var"
        summary = ""
        if name not in ds.dims and var.dtype.kind == "f" and var.size <= 50_000_000:
            values = np.asarray(var.values, dtype=np.float64)
            finite = values[np.isfinite(values)]
            summary = f"  median {np.median(finite):.4g} ({finite.size}/{values.size} finite)" if finite.size else "  all NaN"
        lines.append(
            f"{kind:5} {name:{width}}  ({', '.join(var.dims)})  {var.attrs.get('long_name', '')}"
            f" [{var.attrs.get('units', '-')}]{summary}"
        )
    lines.append("")
    for key, value in ds.attrs.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        lines.append(f"{key}: {text[:120]}{'...' if len(text) > 120 else ''}")
    return "\n".join(lines)


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="saliency-robustness", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="summarize a Zarr store of the pipeline")
    inspect.add_argument("store")
    args = parser.parse_args(argv)
    if args.command == "inspect":
        print(describe(args.store))


if __name__ == "__main__":
    main()
