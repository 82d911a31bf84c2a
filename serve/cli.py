"""``cycleqd-serve``: Put chosen elites on vLLM engines and publish a serving manifest.

Not built yet (see the project's open issues); the entry point exists so that packaging and the command name
are fixed, and it says so instead of pretending.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Put chosen elites on vLLM engines and publish a serving manifest. Not implemented yet.", no_args_is_help=False
)


@app.callback(invoke_without_command=True)
def _root() -> None:
    typer.echo("cycleqd-serve is not implemented yet: this release ships cycleqd-evolve bootstrap.", err=True)
    raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
