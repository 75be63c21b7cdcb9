"""The `ntk-scale` command's entry point.

For ``ntk-scale demo`` a local Ray starts while the CLI imports JAX and ntk_scale, instead of
after them: here the imports take 2.4 s and Ray's start 5-7 s (mostly waiting on its own
processes), so together they take the longer of the two. Every other command goes straight to
:func:`ntk_scale.cli.main`, which checks its input before it starts or joins Ray (bad input is
answered with exit 2 and no Ray). This module imports nothing heavy: ``ntk_scale`` imports its
exports on first use.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Sequence

from ntk_scale.cluster import STARTED_S, ensure_ray, joins_cluster


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if starts_ray_early(argv):
        loader = threading.Thread(target=_import_cli, name="ntk-scale-imports", daemon=True)
        loader.start()
        try:
            ensure_ray()
            STARTED_S["launch"] = STARTED_S.get("ray", 0.0)  # the demo reports it
        except Exception:  # noqa: BLE001 - the stage starts Ray again and reports the failure
            pass
        finally:
            loader.join()
    from ntk_scale.cli import main as cli_main

    return cli_main(argv)


def starts_ray_early(argv: Sequence[str]) -> bool:
    """Whether this command line starts its local Ray beside the imports: ``demo`` (which
    always runs on Ray), not asking for help, and not joining a cluster (RAY_ADDRESS)."""
    return bool(argv) and argv[0] == "demo" and not {"-h", "--help"} & set(argv) and (
        not joins_cluster()
    )


def _import_cli() -> None:
    try:
        importlib.import_module("ntk_scale.cli")
    except BaseException:  # noqa: BLE001 - main's own import raises it again, in the main thread
        pass
