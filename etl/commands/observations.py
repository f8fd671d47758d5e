"""Lab observations across both vendors: `labsync results --flagged` (listed here, registered by
etl.commands.lifecycle's `results`) and `labsync export fhir`.

Thin on purpose: the work is in etl.results (the DAG tasks call the same functions). Values are
never printed: a flagged observation is listed by its ids, test, code and interpretation.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer


def _engine():
    from etl import warehouse
    from etl.settings import Settings

    return warehouse.connect(Settings.from_env().warehouse_url)


def list_flagged(level: str | None, as_json: bool) -> None:
    from etl import audit
    from etl.commands import jsonout
    from etl.results.observations import flagged, levels_for

    levels = levels_for(level)
    engine = _engine()
    rows = flagged(engine, levels)
    if rows:  # who saw which orders' flags (ids only)
        audit.record(engine, audit.AuditAction.RESULTS_SHOWN, "order", [r["order_id"] for r in rows],
                     count=len(rows), detail="labsync results --flagged")
    if as_json:
        typer.echo(jsonout.dumps({"levels": list(levels), "flagged": rows}))
        raise typer.Exit(0)
    if not rows:
        typer.echo(f"results: no current observation flagged {' or '.join(levels)}")
        raise typer.Exit(0)
    typer.echo(f"results: {len(rows)} observations flagged {' or '.join(levels)} (newest first; values not shown)")
    for r in rows:
        when = r["observed_at"].isoformat() if r["observed_at"] else "-"
        typer.echo(f"  {r['vendor']} order {r['order_id']} item {r['item_id']} test {r['ordered_test'] or '-'}: "
                   f"{r['code'] or '-'} {r['interpretation']} (flags {r['abnormal_flags'] or '-'}, "
                   f"status {r['status'] or '-'}, observed {when}) #{r['id']}")
    raise typer.Exit(0)


def reread_documents(as_json: bool) -> None:
    from etl.commands import jsonout
    from etl.results.observations import counts, record_all

    engine = _engine()
    changed = record_all(engine)
    now = counts(engine)
    if as_json:
        typer.echo(jsonout.dumps({"changed": changed, "current": now}))
    else:
        per = ", ".join(f"{v} {n}" for v, n in sorted(now.items())) or "none"
        typer.echo(f"results: {changed} observations added or changed; current observations: {per}")
    raise typer.Exit(0)


def register(app: typer.Typer) -> None:
    export = typer.Typer(help="Export the warehouse's lab results in standard formats.", no_args_is_help=True)

    @export.command("fhir")
    def fhir(
        out: Path | None = typer.Option(None, "--out", metavar="DIR", help="Write NDJSON files (one per resource type) and a "
                                        "manifest.json into this folder."),
        url: str | None = typer.Option(None, "--url", metavar="FHIR_BASE", help="POST one transaction Bundle per ordered item to this "
                                       "FHIR server base URL (bearer token from LABSYNC_FHIR_TOKEN, if set)."),
        since: datetime | None = typer.Option(None, "--since", formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"], metavar="DATE",
                                              help="Export the items with observations recorded since this "
                                              "UTC date or time again (the watermark is left as it is)."),
        patients: bool = typer.Option(False, "--patients", help="Also write Patient resources (the vendor's "
                                      "patient id as an identifier, nothing else); by default observations "
                                      "reference their patient by identifier only."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    ) -> None:
        """Export lab observations of both vendors as FHIR R4 (4.0.1): ServiceRequest per ordered
        item, DiagnosticReport per result, Observation per value, DocumentReference per result PDF.

        Incremental: only items with observations recorded since the last export to the same
        target (a watermark kept in the warehouse). Exactly one of --out or --url."""
        from datetime import UTC

        from etl import audit
        from etl.commands import jsonout
        from etl.results.fhir import export_fhir

        engine = _engine()
        when = since.replace(tzinfo=UTC) if since is not None and since.tzinfo is None else since
        summary = export_fhir(engine, out_dir=out, url=url, since=when, with_patients=patients)
        if summary.items:
            audit.record(engine, audit.AuditAction.EXPORT_WRITTEN, "results", [summary.target],
                         count=sum(summary.resources.values()), detail="labsync export fhir")
        if as_json:
            typer.echo(jsonout.dumps(summary.as_dict()))
        else:
            typer.echo(summary.line() + (f" -> {out}" if out is not None and summary.files else ""))
        raise typer.Exit(0)

    app.add_typer(export, name="export")
