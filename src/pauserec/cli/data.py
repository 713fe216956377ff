"""`pauserec data`: inspect datasets and their SID indexes."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pauserec.cli.common import console, handle_errors

app = typer.Typer(
    help="Inspect datasets (LC-Rec/LETTER json, MiniOneRec csv, OneRec-Think json + sequences) and their SID indexes.", no_args_is_help=True
)


@app.callback()
def _group() -> None:
    """Inspect datasets (LC-Rec/LETTER json, MiniOneRec csv, OneRec-Think json + sequences) and their SID indexes."""


@app.command("info")
@handle_errors
def info(
    data: Path = typer.Argument(..., help="Dataset folder (LC-Rec/LETTER, MiniOneRec or OneRec-Think layout)."),
    index: str | None = typer.Option(None, "--index", help="SID index NAME (indexes/<NAME>/) when there are several."),
    fmt: str = typer.Option("auto", "--format", help="auto, lcrec, minionerec or onerec-think."),
    max_history: int = typer.Option(20, "--max-history", help="History length the splits are cut to."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Print users, items, interactions, split sizes, SID levels, codebooks and collisions."""
    from pauserec.data import load_dataset

    stats = load_dataset(data, index=index, fmt=fmt).info(max_history)
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    _print_table(stats)


def _print_table(s: dict) -> None:
    from rich.table import Table

    sp = s["splits"]
    title = s["name"] + (f" / {s['index']}" if s["index"] else "") + f"  ({s['format']}, history <= {s['max_history']})"
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("quantity", style="bold")
    t.add_column("value", justify="right")
    rows = [
        ("users", f"{s['users']:,}"),
        ("items", f"{s['items']:,}"),
        ("interactions", f"{s['interactions']:,}"),
        ("train / valid / test samples", f"{sp['train']:,} / {sp['valid']:,} / {sp['test']:,}"),
        ("SID levels", f"{s['levels']}  (tokens {' '.join(f'<{p}_N>' for p in s['token_prefixes'])})"),
        ("codebook sizes (max code + 1)", ", ".join(map(str, s["codebook_sizes"]))),
        ("used codes per level", ", ".join(map(str, s["used_codes_per_level"]))),
        ("unique SIDs", f"{s['unique_sids']:,}"),
        ("items in collisions", f"{s['collision_items']:,}"),
        ("collision groups", f"{s['collision_groups']:,}"),
        ("largest group", f"{s['largest_group']:,}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
