"""A web page and a JSON API over a trained model: drop an image, see its tags, why, and the most
similar indexed images (``alt-i2v --serve --model MODEL [--index INDEX]``).

Needs the optional extra ``pip install 'alt-i2v[serve]'`` (FastAPI, uvicorn, python-multipart); without
it the functions here raise an error that says so. The package is ``app`` (routes), ``engine`` (the one
thread that runs the model, batching concurrent requests), ``uploads`` (size cap, multipart, decoding),
``render`` (heat-map overlays, thumbnails), ``server`` (uvicorn) and ``static/`` (the page).
"""

from __future__ import annotations

from typing import Any

from ..errors import AltI2VError

EXTRA = "serve"
_MODULES = ("fastapi", "uvicorn", "python_multipart")


def require_extra() -> None:
    """Raise a clear error naming the extra when the web dependencies are not installed."""
    import importlib.util

    missing = [m for m in _MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise AltI2VError(f"--serve needs the optional web dependencies ({', '.join(missing)} missing): "
                          f"pip install 'alt-i2v[{EXTRA}]'")


def create_app(model: Any, index: Any = None, config: Any = None) -> Any:
    """The FastAPI application over ``model`` and optionally ``index``; see :mod:`alt_i2v.serve.app`."""
    require_extra()
    from .app import create_app as _create_app

    return _create_app(model, index, config)


def run_server(model: Any, index: Any = None, config: Any = None, *, quiet: bool = False) -> None:
    """Serve the page and the API until Ctrl-C; see :mod:`alt_i2v.serve.server`."""
    require_extra()
    from .server import run_server as _run_server

    _run_server(model, index, config, quiet=quiet)


__all__ = ["create_app", "run_server", "require_extra", "EXTRA"]
