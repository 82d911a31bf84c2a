"""The serving manifests the router reads: files, or URLs (a ``cycleqd-serve`` admin API's ``GET /manifest``).

Several sources are merged into one view, so one router (or several replicas) can front engines on several
machines: engine ids get the source's index as a prefix (``1:engine-0``) so they stay distinct, and an elite served
by several sources appears once per source (the router then balances between them). A source that cannot be read
keeps its last good version; sources whose skills differ from the first one's are left out, with a warning.
"""

from __future__ import annotations

import logging
import os

import httpx
from pydantic import ValidationError

from serve.manifest import ManifestError, ServingManifest, load_manifest

log = logging.getLogger("cycleqd.router")


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class ManifestSet:
    def __init__(self, sources: list[str]) -> None:
        self.sources = list(sources)
        self.parts: dict[str, ServingManifest] = {}
        self._mtimes: dict[str, float] = {}
        self.merged: ServingManifest | None = None

    def refresh(self, *, urls: bool) -> None:
        """Re-read changed files (cheap: a stat each) and, with ``urls``, fetch every URL source."""
        changed = False
        for src in self.sources:
            if is_url(src):
                if urls:
                    changed |= self._fetch(src)
                continue
            try:
                mtime = os.stat(src).st_mtime
            except OSError:
                continue
            if mtime != self._mtimes.get(src):
                try:
                    self.parts[src] = load_manifest(src)  # type: ignore[arg-type]
                    self._mtimes[src] = mtime
                    changed = True
                except ManifestError as exc:
                    log.warning("manifest not reloaded, the last good one stays: %s", exc)
        if changed or self.merged is None:
            self.merged = self._merge()

    def _fetch(self, url: str) -> bool:
        try:
            r = httpx.get(url, timeout=2.0, trust_env=False)
            r.raise_for_status()
            m = ServingManifest.model_validate(r.json())
        except (httpx.HTTPError, ValueError, ValidationError) as exc:
            log.warning("manifest %s not fetched, the last good one stays: %s", url, exc)
            return False
        old = self.parts.get(url)
        self.parts[url] = m
        return old is None or old.model_dump() != m.model_dump()

    def _merge(self) -> ServingManifest | None:
        parts = [(i, self.parts[s]) for i, s in enumerate(self.sources) if s in self.parts]
        if not parts:
            return None
        if len(self.sources) == 1:
            return parts[0][1]
        first = parts[0][1]
        out = ServingManifest(
            run=first.run,
            skills=first.skills,
            updated_at=max(p.updated_at for _, p in parts),
            exemplars=first.exemplars,
        )
        for i, p in parts:
            if p.skills != first.skills:
                log.warning("manifest %s left out: skills %s differ from %s", self.sources[i], p.skills, first.skills)
                continue
            out.engines += [e.model_copy(update={"id": f"{i}:{e.id}"}) for e in p.engines]
            out.elites += [e.model_copy(update={"engine_id": f"{i}:{e.engine_id}"}) for e in p.elites]
        return out
