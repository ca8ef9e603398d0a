"""The live demo page: ``GET /demo`` (static HTML/JS/CSS, no CDN, no build step) and its sample data.

The page talks to the public API only (``GET /v1/models``, ``WS /v1/stream``); this router adds the
page's files and ``GET /demo/samples/{model}``: the test samples shipped in a model folder's
``reference.json`` (inputs at their true length, label, the stored prediction), so a visitor can
play a real sequence. Wire it with ``app.include_router(demo.router)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

STATIC = Path(__file__).parent / "static" / "demo"
FILES = {"demo.js": "text/javascript", "demo.css": "text/css"}  # everything the page loads besides itself
REFERENCE = "reference.json"

router = APIRouter(tags=["demo"])


@router.get("/demo", include_in_schema=False)
@router.get("/demo/", include_in_schema=False)  # the app redirects no slashes (app.py): a typed /demo/ works too
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/demo/static/{name}", include_in_schema=False)
async def static_file(name: str) -> Response:
    if name not in FILES:  # a fixed list: no path from the URL ever reaches the file system
        return _not_found("file_not_found", f"no demo file {name!r}", "name")
    return FileResponse(STATIC / name, media_type=FILES[name], headers={"cache-control": "no-cache"})


@router.get("/demo/samples/{model}", summary="Test samples shipped with a model (for the demo page)")
async def samples(model: str, request: Request) -> JSONResponse:
    """``{"model", "samples": [{"steps", "label", "label_name", "predicted", "scores"}]}`` from the model
    folder's reference.json; each sample's steps without padding. 404 if the folder ships none."""
    root = Path(request.app.state.settings.model_dir)
    folders = {p.name: p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}
    folder = folders.get(model)  # only names of folders that exist: "../x" is never joined onto a path
    if folder is None or not (folder / "config.json").is_file():
        return _not_found("model_not_found", f"no model folder {model!r} under the model directory", "model")
    if not (folder / REFERENCE).is_file():
        return _not_found("samples_not_found", f"model {model!r} ships no {REFERENCE}", "model")
    ref = json.loads((folder / REFERENCE).read_text())
    names = json.loads((folder / "config.json").read_text()).get("class_names") or []
    x = ref["x"]  # (T, n, *input_shape), time-major
    n = len(ref["y"])
    lengths = ref.get("lengths") or [len(x)] * n
    out = []
    for i in range(n):
        y = int(ref["y"][i])
        out.append({"steps": [x[t][i] for t in range(lengths[i])], "label": y,
                    "label_name": names[y] if y < len(names) else str(y),
                    "predicted": int(ref["predictions"][i]), "scores": ref["scores"][i]})
    return JSONResponse({"model": model, "samples": out})


def _not_found(code: str, message: str, field: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status_code=404)
