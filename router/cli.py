"""``cycleqd-router``: the OpenAI-compatible gateway in front of the served elites.

cycleqd-router serve      [--policy routing.yaml] [--host 127.0.0.1] [--port 8000] [--workers 1]
cycleqd-router classifier [--policy routing.yaml]     the classifier's held-out accuracy

(Held-out skill-world tasks through the router: ``cycleqd-serve route-demo``; router/ imports nothing of evolve.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Route OpenAI-API requests to the best served CycleQD elite.", no_args_is_help=True)
console = Console(width=150)  # the demo table is wide; pipes default to 80 columns
err = Console(stderr=True, soft_wrap=True)

PolicyOpt = Annotated[Path | None, typer.Option("--policy", help="routing policy (YAML); default: every default")]


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input (every ``cycleqd.errors.UserError``: the policy, a manifest, the engine key) ends the command with its
    message and exit code 2; anything else keeps its traceback."""
    from rich.markup import escape

    from cycleqd.errors import UserError

    try:
        yield
    except UserError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


def load_policy(path: Path | None):
    from cycleqd.configfile import load_yaml_model
    from router.policy import RoutingPolicy

    with user_errors():
        return load_yaml_model(path, RoutingPolicy) if path else RoutingPolicy()


@app.command()
def serve(
    policy: PolicyOpt = None,
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "warning",
    manifest: Annotated[
        list[str] | None, typer.Option(help="serving manifest file or URL (repeatable); overrides the policy's")
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="worker processes on the one port (docs/workers.md); 1: this process")
    ] = 1,
) -> None:
    """Run the gateway. SIGHUP or POST /admin/reload (admin key) reloads the policy file.

    The server answers at once; the skill classifier is built in the background (requests that name an elite, an
    alias or the weights header are served meanwhile). The URL is printed once the server answers (with
    ``--workers N``, once every worker does; a reload reaches every worker, see ``router.workers``).
    """
    import os
    import sys

    # prometheus-client picks its value store at import, from this variable: the parent of N workers serves nothing
    # and must not write metric files of its own there (see router.workers.metrics_dir_for)
    metrics_dir = os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None) if workers > 1 else None

    import uvicorn

    from router.app import Router, create_app

    pol = load_policy(policy)
    if manifest:
        pol = pol.model_copy(update={"manifest": manifest})
    with user_errors():
        router = Router(pol, policy_path=policy)
        router.refresh_manifest(force=True)
        router.check_policy()

    def announce() -> None:
        more = f", {workers} workers" if workers > 1 else ""
        console.print(
            f"cycleqd-router on http://{host}:{port}/v1, manifest {', '.join(pol.manifests)}{more}", soft_wrap=True
        )  # one line however long the paths: scripts read it
        sys.stdout.flush()

    if workers > 1:
        from router.workers import serve_workers

        with user_errors():
            ok = serve_workers(
                router, workers=workers, host=host, port=port, log_level=log_level, announce=announce,
                metrics_dir=metrics_dir,
            )  # fmt: skip
        raise typer.Exit(0 if ok else 1)

    class Announcing(uvicorn.Server):
        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # listening: a client may connect now
                announce()

    # keep-alive longer than a load balancer's idle timeout (60 s is common): else the router may close a connection
    # just as the balancer or a client sends the next request on it, which they see as a reset
    config = uvicorn.Config(
        create_app(router), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30,
        timeout_keep_alive=75,
    )  # fmt: skip
    Announcing(config).run()


@app.command()
def classifier(policy: PolicyOpt = None) -> None:
    """Build the skill classifier and print its accuracy on held-out (test-split) prompts."""
    from router.app import Router

    with user_errors():
        router = Router(load_policy(policy))
        router.refresh_manifest(force=True)
    with console.status("embedding exemplars"):
        router.build_classifier()
    for k, v in router.classifier_report.items():
        console.print(f"{k}: {v:.4g}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
