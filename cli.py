"""The ``actstore`` command line: options -> config -> pipeline call.

User mistakes (a wrong path, a bad option value, a store from a newer actstore) are printed as
one line on stderr with exit code 2; no tracebacks. Secrets (S3 keys) come from the environment
and are never echoed.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

import actstore

app = typer.Typer(
    name="actstore",
    help="Activation caching for sparse-autoencoder research: harvest, store, stream, train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
F = TypeVar("F", bound=Callable[..., Any])
USER_ERROR = 2


def user_errors(fn: F) -> F:
    """Turn actstore's named errors and bad values into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (actstore.ActstoreError, ValueError, KeyError, IndexError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(USER_ERROR) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
@user_errors
def info(
    url: Annotated[str, typer.Argument(help="Store path or URL (s3://bucket/key, memory://...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Describe a store: model, dataset, hooks, tokens, dtype, codec, sizes and per-hook norms."""
    from pipelines.info import describe_store, render_summary

    summary = describe_store(url)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        render_summary(summary, Console())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
