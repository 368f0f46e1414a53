"""Predictor factories for the worker process (`JobOptions.predictor_factory`): a model with the real one's
phases and timing shape but no network, and models that fail in the ways a worker can fail.

Standard library, numpy and VLDUNLib.results only, so a worker using them starts in well under a second.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from VLDUNLib.results import Detection, Prediction, SegmentClass

LOAD_S = float(os.environ.get("VLDUN_TEST_LOAD_S", "0.6"))
PRIOR_S = 0.3
BATCH_S = 0.15
CLASSES = (("ACDC/RV", "right ventricle cavity"), ("ACDC/MYO", "myocardium"), ("ACDC/LV", "left ventricle cavity"))


class SlowPredictor:
    """Sleeps where the real model loads, computes its prior and runs each batch; then three intensity classes."""

    mirror = False

    def __init__(self, fail_after_batch: Callable[[], None] | None = None) -> None:
        time.sleep(LOAD_S)
        self.fail_after_batch = fail_after_batch

    def predict(self, volume: np.ndarray, *, batch_size: int = 8, progress: Any = None, should_cancel: Any = None,
                degradation_override: str | None = None, task: str = "auto") -> Prediction:
        time.sleep(PRIOR_S)
        restored = np.empty(volume.shape, np.float32)
        labels = np.zeros(volume.shape, np.uint8)
        edges = np.quantile(volume, [0.25, 0.5, 0.75])
        for start in range(0, len(volume), batch_size):
            time.sleep(BATCH_S)
            stop = min(start + batch_size, len(volume))
            restored[start:stop] = np.asarray(volume[start:stop], np.float32) * 0.5
            labels[start:stop] = np.digitize(volume[start:stop], edges)
            if progress is not None:
                progress(stop, len(volume))
            if self.fail_after_batch is not None:
                self.fail_after_batch()
        segments = [SegmentClass(i + 1, name, key) for i, (key, name) in enumerate(CLASSES)]
        detection = Detection("ACDC/MRI", 0.9, {"ACDC/MRI": 0.9}, "noise", 0.8, {"noise": 0.8}, False, segments,
                              task="heart" if task == "auto" else task)
        return Prediction(restored, labels, detection)


def slow(weights: str | None, device: str) -> SlowPredictor:
    return SlowPredictor()


def _crash() -> None:
    print("simulated native crash in the model", file=sys.stderr, flush=True)
    os._exit(9)


def crashing(weights: str | None, device: str) -> SlowPredictor:
    """Dies after the first batch without a word on the protocol, as a segfault or the OOM killer would."""
    return SlowPredictor(_crash)


def _raise() -> None:
    raise RuntimeError("tensor shapes do not match")


def raising(weights: str | None, device: str) -> SlowPredictor:
    return SlowPredictor(_raise)


def _gpu_full() -> None:
    from VLDUNLib.inference import DeviceOutOfMemory

    raise DeviceOutOfMemory("even one slice at a time")


def out_of_memory(weights: str | None, device: str) -> SlowPredictor:
    return SlowPredictor(_gpu_full)
