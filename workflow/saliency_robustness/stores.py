"""Zarr stores written through xarray: atomically, with provenance, opened with clear errors.

Every store is written to a sibling temporary directory and renamed into place only once
complete, so an interrupted job never leaves a store that opens as valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import xarray as xr
from zarr.codecs import ZstdCodec

from saliency_robustness.errors import StoreError, one_line

ZARR_FORMAT = 3
CONSOLIDATED = True


def package_version() -> str:
    from saliency_robustness import __version__

    return __version__


@cache
def git_commit() -> str:
    """The commit of the checkout this package runs from, or ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def provenance(config: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, str]:
    """Attributes that say what produced a store (config subset as JSON)."""
    attrs = {
        "package": "saliency-robustness",
        "package_version": package_version(),
        "git_commit": git_commit(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if config is not None:
        attrs["config"] = json.dumps(config, sort_keys=True, default=str)
    attrs.update({k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in extra.items()})
    return attrs


@contextlib.contextmanager
def atomic_directory(path: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only on success."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # what a killed attempt at the same output left behind (Snakemake's lock keeps two runs
    # from writing one output at once)
    for leftover in final.parent.glob(f".{final.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


DEFAULT_CHUNKS = {"sample": 256, "model": 1}


def chunk_encoding(ds: xr.Dataset, chunks: Mapping[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Explicit Zarr chunks per variable (``chunks[dim]`` along the named dims, whole
    elsewhere), each chunk Zstd-compressed with the frame checksum on: a flipped byte fails
    the read itself, also through a plain ``xarray.open_zarr`` that skips the manifest."""
    chunks = {**DEFAULT_CHUNKS, **(chunks or {})}
    encoding: dict[str, dict[str, Any]] = {}
    for name, var in ds.variables.items():
        encoding[name] = {"compressors": [ZstdCodec(level=0, checksum=True)]}
        if var.ndim:
            encoding[name]["chunks"] = tuple(min(chunks.get(d, n), n) or 1 for d, n in zip(var.dims, var.shape))
    return encoding


def _variable_length_strings(ds: xr.Dataset) -> xr.Dataset:
    """Fixed-width unicode has no Zarr v3 data type yet; variable-length strings do."""
    fixed = [name for name, var in ds.variables.items() if var.dtype.kind == "U"]
    return ds.assign({n: ds[n].astype(object) for n in fixed if n in ds.data_vars}).assign_coords(
        {n: ds[n].astype(object) for n in fixed if n in ds.coords}
    )


MANIFEST = "manifest.json"


def file_digest(path: Path) -> str:
    """BLAKE2b hash of a file (fast enough to check every store on every open)."""
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, extra: Mapping[str, Any] | None = None) -> None:
    """Record what ``directory`` must contain: every file's size and hash (and ``extra``)."""
    files = {
        str(f.relative_to(directory)): {"bytes": f.stat().st_size, "blake2b": file_digest(f)}
        for f in sorted(directory.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps({**(extra or {}), "files": files}, indent=1, sort_keys=True))


def check_manifest(directory: Path, what: str, fix: str) -> None:
    """Raise :class:`StoreError` in one line when a file of ``directory`` is missing, has
    another size or another hash than when it was written; ``fix`` says what to do."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise StoreError(f"{what} {directory} has no readable {MANIFEST} (damaged, or written by an older version); {fix}") from None
    for name, expected in files.items():
        path = directory / name
        part = f"variable {name.split('/')[0]!r}, file {name}" if "/" in name else f"file {name}"
        if not path.is_file():
            raise StoreError(f"{what} {directory} is damaged: {part} is missing; {fix}")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise StoreError(f"{what} {directory} is damaged: {part} is {size} bytes, expected {expected['bytes']}; {fix}")
        if file_digest(path) != expected["blake2b"]:
            raise StoreError(f"{what} {directory} is damaged: {part} differs from what was written; {fix}")


def write_store(ds: xr.Dataset, path: Path | str, chunks: Mapping[str, int] | None = None) -> Path:
    """Write ``ds`` as a Zarr store at ``path``, atomically, with explicit chunks.

    Every chunk is written, also one that holds only the fill value, so that a missing chunk
    file always means damage; ``manifest.json`` records every file's size and hash, and
    :func:`open_store` checks them.
    """
    final = Path(path)
    ds = _variable_length_strings(ds)
    with atomic_directory(final) as tmp:
        store = tmp / "store.zarr"
        with warnings.catch_warnings():
            # zarr-python warns that consolidated metadata is not (yet) in the v3 spec
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            ds.to_zarr(
                store,
                mode="w",
                zarr_format=ZARR_FORMAT,
                consolidated=CONSOLIDATED,
                encoding=chunk_encoding(ds, chunks),
                write_empty_chunks=True,
            )
        # the rename below is what makes the store visible: move its content up one level
        for child in store.iterdir():
            os.replace(child, tmp / child.name)
        store.rmdir()
        write_manifest(tmp, {"variables": {str(n): list(v.shape) for n, v in ds.variables.items()}})
    return final


def content_digest(directory: Path | str) -> str:
    """A digest of a store's or model directory's whole content: the hash of its manifest, which
    lists every file's size and hash."""
    path = Path(directory) / MANIFEST
    try:
        return file_digest(path)
    except OSError:
        raise StoreError(f"{directory} has no readable {MANIFEST}; delete it and rerun snakemake") from None


def computed_from(*, model_dir: Path | str, eval_store: Path | str, **more: str) -> dict[str, str]:
    """What a per-model store was computed from: the model (name and content digest), the
    evaluation store's digest, and ``more`` (e.g. the attack's name). Goes into the store's
    ``computed_from`` attribute; :func:`open_store` checks it against ``expect``."""
    return {
        "model": Path(model_dir).name,
        "model_digest": content_digest(model_dir),
        "eval_digest": content_digest(eval_store),
        **more,
    }


def _check_source(ds: xr.Dataset, path: Path, expect: Mapping[str, str], fix: str) -> None:
    try:
        found = json.loads(ds.attrs["computed_from"])
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"store {path} does not say what it was computed from (written by an older version?); {fix}") from None
    for key, value in expect.items():
        if found.get(key) != value:
            raise StoreError(f"store {path} was computed from {key} {found.get(key)!r}, not {value!r}; {fix}")


def open_store(path: Path | str, variables: Iterable[str] = (), expect: Mapping[str, str] | None = None) -> xr.Dataset:
    """Open a store lazily; raise :class:`StoreError` naming it if missing, damaged, incomplete,
    or computed from something else than ``expect`` says (see :func:`computed_from`).

    A store is damaged when a file its manifest lists is missing, truncated or altered: one
    line names the store, the variable and the fix (delete the store; the next run rewrites it).
    """
    p = Path(path)
    if not p.exists():
        raise StoreError(f"store {p} does not exist (run the stage that writes it)")
    fix = f"delete {p} and rerun snakemake (it rewrites the store)"
    check_manifest(p, "store", fix)
    try:
        ds = xr.open_zarr(p, consolidated=CONSOLIDATED, zarr_format=ZARR_FORMAT)
    except Exception as exc:  # zarr raises many types for a damaged store
        raise StoreError(f"store {p} is corrupt or not a Zarr store ({one_line(exc)}); {fix}") from None
    missing = [v for v in variables if v not in ds.variables]
    if missing:
        raise StoreError(f"store {p} lacks variable(s) {', '.join(missing)}; {fix}")
    if expect:
        _check_source(ds, p, expect, fix)
    return ds
