"""Decode every image once before training: fail early on unreadable files,
and hash each image for the near-duplicate check."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from uplink_server.errors import Refusal
from uplink_server.imaging import decode

from .datasets import Record
from .splits import dhash

CACHE = Path(os.environ.get("CXR_CACHE", Path.home() / ".cache" / "cxr-screening")) / "dhash-v1.json"


class UnreadableImages(ValueError):
    def __init__(self, bad: list[tuple[str, str]]):
        self.bad = bad
        lines = "\n".join(f"  {p}: {why}" for p, why in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        super().__init__(f"{len(bad)} image(s) cannot be read:\n{lines}{more}\n(use --skip-unreadable to leave them out)")


def _key(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()


def _hash_one(path: str):
    try:
        return path, "".join("1" if b else "0" for b in dhash(decode(path).gray)), None
    except Refusal as r:
        return path, None, r.message
    except FileNotFoundError:
        return path, None, "file not found"


def hash_images(records: list[Record], workers: int = 2, progress: bool = True) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """(N, bits) bool hashes, plus (path, reason) for images that failed to decode."""
    cache = {}
    if CACHE.is_file():
        try:
            cache = json.loads(CACHE.read_text())
        except (OSError, ValueError):
            cache = {}
    keys = {}
    todo = []
    for r in records:
        try:
            keys[r.path] = _key(r.path)
        except OSError:
            keys[r.path] = None
        if keys[r.path] not in cache:
            todo.append(r.path)
    bad = []
    if todo:
        with ProcessPoolExecutor(max_workers=max(1, workers)) as ex:
            it = ex.map(_hash_one, todo, chunksize=32)
            for path, bits, err in tqdm(it, total=len(todo), desc="checking images", disable=not progress, leave=False):
                if err:
                    bad.append((path, err))
                elif keys[path]:
                    cache[keys[path]] = bits
        try:
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            CACHE.write_text(json.dumps(cache))
        except OSError:
            pass
    bad_paths = {p for p, _ in bad}
    hashes = np.array(
        [[c == "1" for c in cache[keys[r.path]]] if r.path not in bad_paths else [False] * 256 for r in records],
        dtype=bool,
    )
    return hashes, bad
