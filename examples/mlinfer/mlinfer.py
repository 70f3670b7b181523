"""The mlinfer example: an OpenCV camera source and inference functions on kuiper_pool.

Symbols (eKuiper runs this file as ``python -u mlinfer.py '{"sendTimeout":1000}'``):

* source ``frames``: synthetic camera frames as base64 JPEG (``{"id", "img"}``), as an edge
  camera plugin emits them; OpenCV encodes them.
* function ``features(img)``: OpenCV decodes the base64 JPEG and returns 16 grey levels
  (a 4x4 thumbnail, 0..1).
* function ``classify(features)``: a scikit-learn logistic regression (fitted at start on
  fixed synthetic data) -> ``{"label", "p"}``.
* function ``infer(features)``: ONNX Runtime runs ``model.onnx`` (built by make_model.py)
  -> the 3 class probabilities.
* function ``score(features)`` and its aggregate twin ``score_batch(features)``: the same
  vectorised numpy model, once per row or once per window
  (``SELECT score_batch(features) FROM s GROUP BY CountWindow(8)``: one call, a list of rows).
* sink ``print``: prints each result.

The libraries are imported here, at the top, as plugins usually do: they start thread pools
at import, so kuiper_pool starts this plugin's workers with exec (start_method auto) and
says so once in its log. ``kuiper_pool.yaml`` next to this file pins ONNX Runtime's symbol
to one OpenMP thread.
"""
import base64
import json
import os
import threading

import cv2
import numpy as np
import onnxruntime
from sklearn.linear_model import LogisticRegression

from kuiper_pool import Function, PluginConfig, Sink, Source, plugin

HERE = os.path.dirname(os.path.abspath(__file__))
SIDE = 4  # features are a SIDE x SIDE grey thumbnail
SCORE_W = np.linspace(-1.0, 1.0, SIDE * SIDE)


def frame(n, width=64, height=48):
    """Frame ``n`` of the synthetic camera: a moving gradient, BGR uint8."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(x * 4 + n * 7) % 256, (y * 5 + n * 3) % 256, (x + y + n) % 256], axis=-1)
    return img.astype(np.uint8)


def encode_jpeg(img):
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise ValueError("OpenCV could not encode the frame")
    return base64.b64encode(buf.tobytes()).decode("ascii")


class Frames(Source):
    """Emits ``count`` frames (0 = until closed), one every ``interval`` seconds."""

    def __init__(self):
        self.stopped = threading.Event()
        self.conf = {}

    def configure(self, datasource, conf):
        self.conf = conf

    def open(self, ctx):
        count, interval = int(self.conf.get("count", 0)), float(self.conf.get("interval", 0.1))
        width, height = int(self.conf.get("width", 64)), int(self.conf.get("height", 48))
        n = 0
        while not self.stopped.is_set() and (not count or n < count):
            ctx.emit({"id": n, "img": encode_jpeg(frame(n, width, height))}, None)
            n += 1
            self.stopped.wait(interval)

    def close(self, ctx):
        self.stopped.set()


class Features(Function):
    def validate(self, args):
        return "" if len(args) == 1 else "features wants 1 argument: a base64 JPEG"

    def exec(self, args, ctx):
        raw = np.frombuffer(base64.b64decode(args[0]), dtype=np.uint8)
        img = cv2.imdecode(raw, cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ValueError("not an image OpenCV can decode")
        thumb = cv2.resize(img, (SIDE, SIDE), interpolation=cv2.INTER_AREA)
        return [round(float(v) / 255.0, 6) for v in thumb.ravel()]

    def is_aggregate(self):
        return False


class Classify(Function):
    def __init__(self):
        rng = np.random.default_rng(0)
        x = rng.random((200, SIDE * SIDE))
        y = (x[:, :8].sum(axis=1) > x[:, 8:].sum(axis=1)).astype(int)
        self.model = LogisticRegression().fit(x, y)

    def validate(self, args):
        return "" if len(args) == 1 else "classify wants 1 argument: the features"

    def exec(self, args, ctx):
        p = self.model.predict_proba(np.asarray([args[0]], dtype=float))[0]
        return {"label": int(p.argmax()), "p": round(float(p.max()), 6)}

    def is_aggregate(self):
        return False


class Infer(Function):
    def __init__(self):
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1  # one worker, one core: eKuiper serialises calls anyway
        opts.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(os.path.join(HERE, "model.onnx"), opts,
                                                    providers=["CPUExecutionProvider"])

    def validate(self, args):
        return "" if len(args) == 1 else "infer wants 1 argument: the features"

    def exec(self, args, ctx):
        [probs] = self.session.run(None, {"x": np.asarray([args[0]], dtype=np.float32)})
        return [round(float(v), 6) for v in probs[0]]

    def is_aggregate(self):
        return False


class Score(Function):
    """One row per call: what eKuiper does for a scalar function."""

    def validate(self, args):
        return "" if len(args) == 1 else "score wants 1 argument: the features"

    def exec(self, args, ctx):
        return round(float(np.asarray(args[0], dtype=float) @ SCORE_W), 9)

    def is_aggregate(self):
        return False


class ScoreBatch(Score):
    """The aggregate twin: eKuiper calls it once per window with each argument as a list of
    the window's values, so the model runs once, vectorised, on all rows."""

    def exec(self, args, ctx):
        return [round(float(v), 9) for v in np.asarray(args[0], dtype=float) @ SCORE_W]

    def is_aggregate(self):
        return True


class Print(Sink):
    def configure(self, conf):
        pass

    def open(self, ctx):
        pass

    def collect(self, ctx, data):
        print(json.loads(data), flush=True)
        ctx.ack_ok()

    def close(self, ctx):
        pass


SOURCES = {"frames": Frames}
SINKS = {"print": Print}
FUNCTIONS = {"features": Features, "classify": Classify, "infer": Infer, "score": Score,
             "score_batch": ScoreBatch}

if __name__ == "__main__":
    plugin.start(PluginConfig("mlinfer", SOURCES, SINKS, FUNCTIONS))
