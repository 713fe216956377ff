"""`pauserec catalog`: manage the catalog an engine serves (see pauserec.runtime.catalog_update)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pauserec.cli.common import console, handle_errors

app = typer.Typer(help="Manage the item catalog of an engine directory without re-exporting it.",
                  no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Manage the item catalog of an engine directory without re-exporting it."""


@app.command("update")
@handle_errors
def update(
    engine: Path = typer.Argument(..., help="Engine directory made by pauserec-export."),
    index: Path = typer.Option(..., "--index", help="New catalog: a SID index NAME.index.json (item id -> SID "
                                                    "tokens) or a catalog .npz."),
    out: Path = typer.Option(None, "--out", help="Write the updated engine to this new directory instead of "
                                                 "updating ENGINE in place."),
    items: Path = typer.Option(None, "--items", help="Item fields (titles) of new items, for engines whose prompt "
                                                     "renders them: LC-Rec .item.json or MiniOneRec info .txt."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip checking the engine's file checksums first."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Replace the engine's catalog (items come and go, the SID codebooks stay); refuses other SID indexes."""
    from pauserec.runtime.catalog_update import update_catalog

    report = update_catalog(engine, index, out=out, verify=not no_verify, items=items)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    console.print(f"{report.engine}: catalog updated, {report.items_before:,} -> {report.items_after:,} items "
                  f"(+{report.added:,} new, -{report.removed:,} removed), {report.unique_sids:,} SIDs; "
                  f"catalog.npz sha256 {report.catalog_sha256[:12]}…", highlight=False)
