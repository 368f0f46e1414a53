"""`python -m VLDUNLib.worker FOLDER`: the model side of a `job.VLDUNJob`, in its own process.

Reads `request.json` and `input.npy` from FOLDER, writes `restored.npy` and `labels.npy` there, and
reports on stdout, one JSON object a line: {"phase": ...}, {"progress": [done, total]}, then either
{"result": detection} or {"error": one-line message, "kind": "invalid" | "out_of_memory" | "failed"}.
Anything else the libraries print goes to stderr (the job's log), so it cannot break that protocol.

It exits as soon as its stdin reaches end of file: the job closes it to cancel, and the operating system
closes it when the Slicer process dies, so a worker never outlives its parent. It imports neither slicer
nor the job, so PythonSlicer (or any Python with torch) can run it.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, TextIO

import numpy as np

INPUT_FILE = "input.npy"
RESTORED_FILE = "restored.npy"
LABELS_FILE = "labels.npy"
REQUEST_FILE = "request.json"

EXIT_PARENT_GONE = 3


def _exit_when_stdin_closes() -> None:
    """Watch stdin in a daemon thread; its end means the parent cancelled or died."""

    def watch() -> None:
        sys.stdin.buffer.read()
        os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, daemon=True).start()


def _message_channel() -> TextIO:
    """The real stdout for messages; file descriptor 1 and sys.stdout go to stderr from now on."""
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


def _load_predictor(request: dict[str, Any]) -> Any:
    if request["predictor_factory"]:
        module, _, name = request["predictor_factory"].partition(":")
        return getattr(importlib.import_module(module), name)(request["weights"], request["device"])
    from .inference import VolumePredictor

    return VolumePredictor(request["weights"], request["device"])


def _error_kind(error: BaseException) -> str:
    """inference is only imported by the real model, so its error type is looked up, not imported."""
    inference = sys.modules.get(f"{__package__}.inference")
    if inference is not None and isinstance(error, inference.DeviceOutOfMemory):
        return "out_of_memory"
    return "invalid" if isinstance(error, ValueError) else "failed"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


def run(folder: Path, send: Any) -> None:
    request = json.loads((folder / REQUEST_FILE).read_text(encoding="utf-8"))
    send(phase="loading the model")
    predictor = _load_predictor(request)
    predictor.mirror = request["mirror"]
    volume = np.load(folder / INPUT_FILE, mmap_mode="r")
    send(phase="segmenting")
    prediction = predictor.predict(
        volume,
        batch_size=request["batch_size"],
        progress=lambda done, total: send(progress=[done, total]),
        degradation_override=request["degradation_override"],
        task=request["task"],
    )
    np.save(folder / RESTORED_FILE, prediction.restored)
    np.save(folder / LABELS_FILE, prediction.labels)
    send(result=prediction.detection.to_json())


def _exit(code: int) -> None:
    """Leave without interpreter shutdown, which waits a second for the stdin watcher's lock and then aborts."""
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run one request and exit the process (never returns)."""
    argv = sys.argv[1:] if argv is None else argv
    channel = _message_channel()
    _exit_when_stdin_closes()

    def send(**message: Any) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    try:
        run(Path(argv[0]), send)
    except Exception as error:  # noqa: BLE001 (every failure becomes a message to the job)
        traceback.print_exc()
        kind = _error_kind(error)
        text = _one_line(error)
        if kind != "invalid":
            text = text.rstrip(".") + ". Nothing was changed; the Python console shows the details."
        send(error=text, kind=kind)
        _exit(1)
    _exit(0)


if __name__ == "__main__":
    main()
