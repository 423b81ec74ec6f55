"""`serve`: load a model folder and run the app under uvicorn, one process."""

from __future__ import annotations

from pathlib import Path

import uvicorn

from .app import create_app
from .loading import load_chat_model
from .settings import ServerSettings


def serve(model_dir: str | Path, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
          device: str | None = None, dtype: str | None = None, chat_template: str | Path | None = None,
          on_ready=None) -> None:
    """Blocks until the server is stopped (Ctrl-C). `on_ready(url)` is called once the model is loaded."""
    model, processor = load_chat_model(model_dir, device, dtype, chat_template)
    app = create_app(model, processor, settings)
    if on_ready is not None:
        on_ready(f"http://{host}:{port}")
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


__all__ = ["serve"]
