"""`pauserec`: the umbrella command (data, train, eval, recommend, serve, catalog, demo).

Each group lives in its own module and imports heavy libraries (torch, onnxruntime) only inside
its commands, so `pauserec --help` and `pauserec data info` stay fast.
"""

from __future__ import annotations

import typer

from pauserec import __version__

app = typer.Typer(
    name="pauserec",
    help="PauseRec generative recommenders: data, training, batch recommendation, demo.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pauserec {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """PauseRec generative recommenders: data, training, batch recommendation, demo."""


def _register() -> None:
    from pauserec.cli import data as data_cli

    app.add_typer(data_cli.app, name="data")

    from pauserec.cli import catalog as catalog_cli

    app.add_typer(catalog_cli.app, name="catalog")

    from pauserec.cli import recommend as recommend_cli

    app.command("recommend")(recommend_cli.recommend)

    from pauserec.cli import serve as serve_cli

    app.command("serve")(serve_cli.serve)

    from pauserec.cli import demo as demo_cli

    app.command("demo")(demo_cli.demo)

    from pauserec.cli import train as train_cli

    train_cli.register(app)


_register()
