"""onnx: a model the user brings as one `.onnx` file (exported from PyTorch, Keras, scikit-learn …).

Served by `POST /api/models/{model}/predict` through onnxruntime on the CPU, one call at a
time. A version folder holds exactly one `*.onnx` file and, optionally, a manifest
`atelier.json` saying how to read it:

    {"task": "classification" | "regression" | "inference",
     "inputs": ["X"], "outputs": ["output_label", "output_probability"],   # names in the graph
     "labels": ["setosa", "versicolor", "virginica"],   # class names, in output column order
     "features": ["sepal_length", "sepal_width", "petal_length"],   # a row's columns, in matrix order
     "baseline": {"sepal_length": 5.8, …},   # per feature: training mean (or mode), for explain
     "image": {"input": "image", "size": [28, 28], "channels": 1, "layout": "NCHW",   # images in
               "scale": 0.00392156862745098, "mean": [0.1307], "std": [0.3081]},
     "description": "…", "license": "…"}

Other keys (family, display_name, …) are the importer's and are ignored here.

A request gives either
  inputs  {"<graph input>": nested list} → the session runs on exactly those tensors, or
  rows    [{column: value}] (a table), turned into inputs:
            a. one input of shape [N, F]: the rows stacked into an (N, F) matrix, columns in
               `features` order (or, without `features`, in the rows' own key order);
            b. one input per column, each [N, 1] or [N] (skl2onnx pipelines over named columns), or
  images  decoded pictures (the route decodes the uploads), when the manifest says how the model
          takes them (`image`): resized to `size`, grey or RGB by `channels`, pixel × scale,
          then (x − mean) / std per channel, stacked as NCHW (or NHWC) into the `input` tensor.
and gets back `outputs` (every graph output, as nested lists; a ZipMap's dicts with string
keys), plus, by task:
  classification  predictions (labels) and probabilities ([{label: p}]): from a label output
                  and a probability output (skl2onnx), else from the first output's (N, C)
                  scores: argmax, and softmax unless the rows already sum to 1
  regression      predictions (floats): the first output, one value per row
Explanations (rows only): for each feature, prediction(row) − prediction(row with that
feature set to its baseline value), when the manifest gives `features` and `baseline`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from atelier.families.base import MANIFEST, Family, manifest as base_manifest

TASKS = ("classification", "regression", "inference")
ALLOWED_BESIDE = {"atelier.json", "config.json"}
# ONNX tensor element types → numpy dtypes a request's nested lists are converted to
DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
          "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
          "tensor(string)": np.object_}


def onnx_file(folder: Path) -> Path:
    """The folder's one `*.onnx` file; ValueError if it holds none or several."""
    found = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix == ".onnx")
    if len(found) != 1:
        raise ValueError(f"{folder} must hold exactly one .onnx file, found {len(found)}: "
                         f"{', '.join(p.name for p in found) or 'none'}")
    return found[0]


def read_manifest(folder: Path) -> dict:
    """atelier.json (or {}), with what this family reads from it checked."""
    manifest = base_manifest(folder)
    if manifest.get("task") is not None and manifest["task"] not in TASKS:
        raise ValueError(f"{MANIFEST}: task {manifest['task']!r} is not one of {', '.join(TASKS)}")
    for key in ("inputs", "outputs", "labels", "features"):
        if key in manifest and not isinstance(manifest[key], list):
            raise ValueError(f"{MANIFEST}: {key} must be a list")
    if "baseline" in manifest and not isinstance(manifest["baseline"], dict):
        raise ValueError(f"{MANIFEST}: baseline must be an object {{feature: value}}")
    if "image" in manifest:
        check_image_spec(manifest["image"])
    return manifest


IMAGE_KEYS = ("input", "size", "channels", "layout", "scale", "mean", "std")


def check_image_spec(spec) -> None:
    """The manifest's `image` entry: how pictures become the model's input tensor."""
    if not isinstance(spec, dict):
        raise ValueError(f"{MANIFEST}: image must be an object with {', '.join(IMAGE_KEYS)}")
    unknown = sorted(set(spec) - set(IMAGE_KEYS))
    if unknown:
        raise ValueError(f"{MANIFEST}: image has unknown fields {', '.join(unknown)}; accepted: {', '.join(IMAGE_KEYS)}")
    size = spec.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and 1 <= v <= 4096 for v in size)):
        raise ValueError(f"{MANIFEST}: image.size must be [height, width] in pixels, e.g. [224, 224]")
    if spec.get("channels", 3) not in (1, 3):
        raise ValueError(f"{MANIFEST}: image.channels must be 1 (grey) or 3 (RGB)")
    if spec.get("layout", "NCHW") not in ("NCHW", "NHWC"):
        raise ValueError(f"{MANIFEST}: image.layout must be NCHW or NHWC")
    channels = spec.get("channels", 3)
    for key in ("mean", "std"):
        v = spec.get(key)
        if v is not None and not (isinstance(v, list) and len(v) in (1, channels)
                                  and all(isinstance(x, (int, float)) for x in v)):
            raise ValueError(f"{MANIFEST}: image.{key} must be a list of 1 or {channels} numbers")
    if any(x == 0 for x in spec.get("std") or []):
        raise ValueError(f"{MANIFEST}: image.std must not hold 0")


def _shape_text(shape) -> str:
    """[None, 3] / ['batch', 1, 8, 8] → "[N, 3]" / "[batch, 1, 8, 8]"."""
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def _is_label(name: str) -> bool:
    return "label" in name.lower()


def _is_probability(name: str) -> bool:
    return "prob" in name.lower()


def _jsonable(value):
    """An onnxruntime output → JSON: arrays to nested lists (non-finite floats → null), ZipMap dicts keyed by str."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            value = np.where(np.isfinite(value), value, None).astype(object)
            return _jsonable(value.tolist())
        if value.dtype.kind in "OSU":
            return _jsonable(value.tolist())
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class OnnxModel:
    """One inference session with what the manifest says about it; see the module docstring."""

    def __init__(self, path: Path, manifest: dict):
        import onnxruntime as ort
        import torch

        self.path, self.manifest = Path(path), manifest
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 (onnxruntime's InvalidProtobuf, Fail, … subclass only Exception)
            raise ValueError(f"{self.path.name} is not a valid ONNX model: {e}") from None
        self.inputs = self.session.get_inputs()  # NodeArg: name, type ("tensor(float)"), shape ([None, 3])
        self.outputs = self.session.get_outputs()
        names = {"inputs": [i.name for i in self.inputs], "outputs": [o.name for o in self.outputs]}
        for key, known in names.items():
            unknown = [n for n in manifest.get(key, []) if n not in known]
            if unknown:
                raise ValueError(f"{MANIFEST} names {key} {', '.join(map(repr, unknown))} that "
                                 f"{self.path.name} lacks; its {key}: {', '.join(known)}")
        self.output_names = manifest.get("outputs") or names["outputs"]
        self.labels = [str(x) for x in manifest.get("labels") or []]
        self.features = [str(x) for x in manifest.get("features") or []]
        self.baseline = manifest.get("baseline")
        self.image = manifest.get("image")
        if self.image is not None:
            name = self.image.get("input", self.inputs[0].name)
            if name not in names["inputs"]:
                raise ValueError(f"{MANIFEST}: image.input {name!r} is not an input of {self.path.name}; its inputs: "
                                 f"{', '.join(names['inputs'])}")
            self.image = {"input": name} | {k: v for k, v in self.image.items() if k != "input"}
        self.task = manifest.get("task") or self.graph_task()

    def graph_task(self) -> str:
        """Without a manifest task: classification if an output looks like labels or probabilities."""
        if any(_is_label(o.name) or _is_probability(o.name) for o in self.outputs):
            return "classification"
        return "inference"

    def signature(self) -> dict:
        """The graph's inputs and outputs, for error messages and /api/ps-like listings."""
        def arg(a):
            return {"name": a.name, "type": a.type, "shape": [d if isinstance(d, int) else None for d in a.shape]}
        return {"inputs": [arg(a) for a in self.inputs], "outputs": [arg(a) for a in self.outputs]}

    # -- 1. request → tensors ---------------------------------------------------------------
    def tensors(self, inputs: dict) -> dict[str, np.ndarray]:
        """{"name": nested list} → {"name": array}, checked against the graph's names, types and shapes."""
        if not isinstance(inputs, dict) or not inputs:
            raise ValueError("inputs must be an object {input name: nested list}; this model takes "
                             + self._inputs_text())
        known = {a.name: a for a in self.inputs}
        unknown = [n for n in inputs if n not in known]
        if unknown:
            raise ValueError(f"inputs has no input {unknown[0]!r}; this model takes {self._inputs_text()}")
        missing = [n for n in known if n not in inputs]
        if missing:
            raise ValueError(f"inputs lacks {', '.join(map(repr, missing))}; this model takes {self._inputs_text()}")
        return {name: self._tensor(known[name], value) for name, value in inputs.items()}

    def _inputs_text(self) -> str:
        return ", ".join(f"{a.name!r} ({a.type} {_shape_text(a.shape)})" for a in self.inputs)

    def _tensor(self, arg, value) -> np.ndarray:
        expected = f"{arg.type} of shape {_shape_text(arg.shape)}"
        dtype = DTYPES.get(arg.type)
        if dtype is None:
            raise ValueError(f"input {arg.name!r} is a {arg.type}, which requests cannot give")
        try:
            if dtype is np.object_:
                x = np.array(value, dtype=object)
                if not all(isinstance(v, str) for v in x.flat):
                    raise ValueError("every value must be a string")
            else:
                if any(isinstance(v, (str, bool)) and dtype is not np.bool_ for v in _leaves(value)):
                    raise ValueError("every value must be a number")
                x = np.array(value, dtype=dtype)
                if dtype.__name__.startswith(("int", "uint")) and not _all_integers(value):
                    raise ValueError("every value must be an integer")
        except (ValueError, TypeError, OverflowError) as e:
            msg = str(e)
            if "inhomogeneous" in msg or "sequence" in msg:
                msg = "the nested lists are ragged (rows of different lengths)"
            raise ValueError(f"input {arg.name!r}: {msg}; expected {expected}") from None
        rank_ok = x.ndim == len(arg.shape)
        if not rank_ok or any(isinstance(d, int) and d != n for d, n in zip(arg.shape, x.shape)):
            raise ValueError(f"input {arg.name!r} has shape {list(x.shape)}; expected {expected}")
        return x

    def rows_to_inputs(self, rows: list[dict]) -> dict[str, np.ndarray]:
        """A table's rows → the graph's inputs (a. one [N, F] matrix, or b. one input per column)."""
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            raise ValueError("rows must be a non-empty list of objects")
        if len(self.inputs) == 1 and len(self.inputs[0].shape) == 2:
            arg = self.inputs[0]  # a. one matrix
            width = arg.shape[1] if isinstance(arg.shape[1], int) else None
            columns = self.features or list(rows[0])
            if not self.features:
                for i, row in enumerate(rows):
                    if list(row) != columns:
                        raise ValueError(f"row {i} has columns {list(row)}, row 0 has {columns}: without `features` "
                                         f"in {MANIFEST}, every row must list the same columns in matrix order")
            if width is not None and len(columns) != width:
                raise ValueError(f"the model's input {arg.name!r} takes {width} columns "
                                 f"({_shape_text(arg.shape)}); the rows give {len(columns)}: {', '.join(columns)}")
            matrix = [[self._cell(row, i, c, arg.type) for c in columns] for i, row in enumerate(rows)]
            return {arg.name: self._tensor(arg, matrix)}
        if all(len(a.shape) == 1 or (len(a.shape) == 2 and a.shape[1] == 1) for a in self.inputs):
            tensors = {}  # b. one input per column, named like the column
            for a in self.inputs:
                column = [self._cell(row, i, a.name, a.type) for i, row in enumerate(rows)]
                tensors[a.name] = self._tensor(a, [[v] for v in column] if len(a.shape) == 2 else column)
            return tensors
        raise ValueError(f"rows cannot fill this model's inputs ({self._inputs_text()}); send `inputs` instead")

    def _cell(self, row: dict, i: int, column: str, type_: str):
        from atelier.models.tabular import numeric_value

        if column not in row:
            wanted = self.features or [a.name for a in self.inputs]
            raise ValueError(f"row {i} is missing column {column!r}; the model reads {', '.join(wanted)}")
        v = row[column]
        try:
            if type_ == "tensor(string)":
                if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                    raise ValueError(f"{v!r} is not a string")
                return str(v)
            x = numeric_value(v)
            if type_.startswith(("tensor(int", "tensor(uint")):
                if not x.is_integer():
                    raise ValueError(f"{v!r} is not an integer")
                return int(x)
            return x
        except ValueError as e:
            raise ValueError(f"row {i}, column {column!r} ({type_}): {e}") from None

    # -- 2. run ---------------------------------------------------------------------------
    def session_run(self, tensors: dict[str, np.ndarray]) -> dict:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        refused = tuple(getattr(ort_errors, n) for n in ("InvalidArgument", "Fail", "RuntimeException",
                                                          "NotImplemented") if hasattr(ort_errors, n))
        try:
            values = self.session.run(self.output_names, tensors)
        except refused as e:  # e.g. a dynamic dimension the graph's reshape cannot take
            raise ValueError(f"the model refused the inputs: {e}; it takes {self._inputs_text()}") from None
        return dict(zip(self.output_names, values))

    def images_to_inputs(self, images: list) -> dict[str, np.ndarray]:
        """Pictures (PIL images) → the `image` input, as the manifest says; the model's other inputs
        cannot be given this way."""
        if self.image is None:
            raise ValueError(f"this model takes no images: its {MANIFEST} has no `image` entry saying how "
                             "(input, size, channels, layout, scale, mean, std)")
        spec = self.image
        height, width = spec["size"]
        channels = spec.get("channels", 3)
        arrays = [np.asarray(im.convert("L" if channels == 1 else "RGB").resize((width, height)), dtype=np.float32)
                  for im in images]
        x = np.stack(arrays).reshape(len(images), height, width, channels) * float(spec.get("scale", 1 / 255))
        x = (x - np.asarray(spec.get("mean") or [0.0], np.float32)) / np.asarray(spec.get("std") or [1.0], np.float32)
        if spec.get("layout", "NCHW") == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        arg = next(a for a in self.inputs if a.name == spec["input"])
        others = [a.name for a in self.inputs if a.name != spec["input"]]
        if others:
            raise ValueError(f"this model also needs {', '.join(others)}: send inputs instead of images")
        return {arg.name: self._tensor(arg, np.ascontiguousarray(x).tolist())}

    # -- 3. results → response ------------------------------------------------------------
    def run(self, *, rows: list[dict] | None = None, inputs: dict | None = None, images: list | None = None) -> dict:
        """rows, inputs or images → {"outputs": {name: nested lists}, "predictions"?, "probabilities"?}."""
        if images is not None:
            tensors = self.images_to_inputs(images)
        else:
            tensors = self.rows_to_inputs(rows) if rows is not None else self.tensors(inputs)
        raw = self.session_run(tensors)
        out = {"outputs": {name: _jsonable(v) for name, v in raw.items()}}
        if self.task == "classification":
            predictions, P, classes = self._classify(raw)
            out["predictions"] = predictions
            out["probabilities"] = [{c: float(p) for c, p in zip(classes, row)} for row in P]
        elif self.task == "regression":
            out["predictions"] = self._regress(raw).tolist()
        return out

    def _classify(self, raw: dict) -> tuple[list, np.ndarray, list[str]]:
        """(predicted labels, (N, C) probabilities, C class names) from a label/probability pair or from scores."""
        label = next((n for n in raw if _is_label(n)), None)
        prob = next((n for n in raw if _is_probability(n)), None)
        if prob is not None and isinstance(raw[prob], list):  # skl2onnx ZipMap: [{class: p}] per row
            keys = list(raw[prob][0]) if raw[prob] else []
            P = np.array([[d[k] for k in keys] for d in raw[prob]], dtype=np.float64).reshape(len(raw[prob]), -1)
            classes = self._class_names(keys)
        else:
            name = prob or next((n for n in raw if n != label), None)
            if name is None:
                raise ValueError("the model has no output of scores to classify from")
            scores = np.asarray(raw[name], dtype=np.float64)
            if scores.ndim != 2:
                raise ValueError(f"classification reads output {name!r} as (N, classes) scores; it has shape "
                                 f"{list(scores.shape)} (set task to inference in {MANIFEST})")
            sums = scores.sum(axis=1)
            if (scores >= 0).all() and np.allclose(sums, 1, atol=1e-4):
                P = scores
            else:  # logits → softmax
                z = np.exp(scores - scores.max(axis=1, keepdims=True))
                P = z / z.sum(axis=1, keepdims=True)
            keys = list(range(P.shape[1]))
            classes = self._class_names(keys)
        if label is not None:
            predictions = _jsonable(raw[label])
            if keys == list(range(len(keys))) and len(self.labels) == len(keys):  # class ids 0..C-1 → names
                predictions = [self.labels[int(v)] if isinstance(v, int) and 0 <= v < len(keys) else v
                               for v in predictions]
        else:
            predictions = [classes[j] for j in P.argmax(axis=1)]
        return predictions, P, classes

    def _class_names(self, keys: list) -> list[str]:
        """Class ids 0..C-1 are named by the manifest's labels when it has C of them; other keys name themselves."""
        if keys == list(range(len(keys))) and len(self.labels) == len(keys):
            return list(self.labels)
        return [str(k) for k in keys]

    def _regress(self, raw: dict) -> np.ndarray:
        name = self.output_names[0]
        y = np.asarray(raw[name], dtype=np.float64)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise ValueError(f"regression reads output {name!r} as one value per row; it has shape {list(y.shape)}")
        return y

    # -- explanations ---------------------------------------------------------------------
    @property
    def cannot_explain(self) -> str | None:
        """Why `explain` would fail (None: it works)."""
        if self.task not in ("classification", "regression"):
            return f"explain needs a classification or regression model; this one does {self.task}"
        if not self.features or not isinstance(self.baseline, dict):
            return f"explain needs `features` and `baseline` in {MANIFEST} (baseline: each feature's training mean)"
        missing = [f for f in self.features if f not in self.baseline]
        if missing:
            return f"{MANIFEST}'s baseline lacks {', '.join(map(repr, missing))}"
        return None

    def explain(self, rows: list[dict]) -> dict:
        """Per row: base = the prediction for the baseline row, contributions = pred(row) − pred(row, f → baseline)."""
        from atelier.models.tabular import replace_one_contributions

        def score(batch: list[dict]) -> tuple[np.ndarray, list[str] | None]:
            raw = self.session_run(self.rows_to_inputs(batch))
            if self.task == "regression":
                return self._regress(raw)[:, None], None
            _, P, classes = self._classify(raw)
            return P, classes

        return {"method": "baseline-replacement",
                "explanations": replace_one_contributions(rows, self.features, self.baseline, score)}


def _leaves(value):
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        else:
            yield v


def _all_integers(value) -> bool:
    return all(isinstance(v, int) or (isinstance(v, float) and v.is_integer()) for v in _leaves(value))


class Onnx(Family):
    name = "onnx"
    task = "inference"  # or classification / regression: see task_of
    engine = "call"

    def task_of(self, config: dict) -> str:
        """The manifest's task; a manifest without one (or none at all) serves as plain inference."""
        task = config.get("task") if isinstance(config, dict) else None
        return task if task in TASKS else "inference"

    def describe(self, config: dict, files: dict) -> dict:
        """From the manifest only: input and output shapes are known once a session is built."""
        keys = ("features", "labels", "inputs", "outputs", "image", "description", "license")
        return {k: config[k] for k in keys if isinstance(config, dict) and k in config}

    def recognises(self, folder: Path) -> bool:
        entries = [p for p in Path(folder).iterdir() if not p.name.startswith(".")]
        onnx = [p for p in entries if p.is_file() and p.suffix == ".onnx"]
        return len(onnx) == 1 and all(p.is_file() and (p.suffix == ".onnx" or p.name in ALLOWED_BESIDE)
                                      for p in entries)

    def load(self, folder: Path) -> OnnxModel:
        """The folder's .onnx file in an onnxruntime CPU session; ValueError if it is not a valid ONNX model."""
        return OnnxModel(onnx_file(folder), read_manifest(folder))


family = Onnx()
