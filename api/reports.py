"""Sweep reports for the API: `sgtm_engine.report.build_report` over the ledger's records, rendered once per state.

The rendering (tables + matplotlib Agg figures) is cached under `<data_root>/reports/<sweep id>/<fingerprint>/`,
where the fingerprint hashes the records (cell statuses and job results): a finished sweep renders once, a running one
again whenever a cell finishes. `sgtm_engine.report` is imported on first use: it is torch-free (an import-linter
contract says so) but pulls in matplotlib, which the API does not need to start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from api.config import Settings
from api.errors import Unavailable

RECORD_KEYS = ("cell_id", "variant", "params", "seed", "status", "stages")


@dataclasses.dataclass(frozen=True)
class Rendered:
    sweep_id: str
    outdir: Path
    report: dict[str, Any]
    markdown: str

    def figures(self) -> list[str]:
        return sorted(p.stem for p in self.outdir.glob("*.png"))

    def figure(self, name: str) -> Path | None:
        path = self.outdir / f"{name}.png"
        return path if path.is_file() and path.parent == self.outdir else None

    def body(self) -> dict[str, Any]:
        base = f"/api/v1/sweeps/{self.sweep_id}/report"
        return {"sweep_id": self.sweep_id, "report": self.report, "markdown": self.markdown,
                "figures": {name: f"{base}/{name}.png" for name in self.figures()}}


def render(settings: Settings, sweep_id: str, records: list[dict[str, Any]]) -> Rendered:
    records = [{k: r.get(k) for k in RECORD_KEYS} for r in records]
    fingerprint = hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = _reports_root(settings) / sweep_id
    outdir = root / fingerprint
    if not (outdir / "report.json").is_file():
        build_report = _engine()
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            build_report(records, tmp)  # its figures are file names in tmp: never a server path
            try:
                os.replace(tmp, outdir)
            except OSError:
                pass  # another request rendered the same state first; theirs is identical
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    report = json.loads((outdir / "report.json").read_text())
    return Rendered(sweep_id=sweep_id, outdir=outdir, report=report, markdown=(outdir / "report.md").read_text())


def _reports_root(settings: Settings) -> Path:
    """`<data_root>/reports`, or a temporary folder where the API cannot write its data root (a read-only image)."""
    root = (settings.data_root / "reports").resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:
        return Path(tempfile.gettempdir()) / "sgtm-reports"


def _engine() -> Any:
    try:
        from sgtm_engine.report import build_report
    except ImportError as e:
        raise Unavailable(f"sweep reports need sgtm_engine.report and matplotlib, which this installation lacks "
                          f"({e}); install the 'engine' extra") from None
    return build_report
