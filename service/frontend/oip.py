"""Open Inference Protocol v2 (KServe v2 / Triton) tensors: request and response models, and the
binary tensor extension (``Inference-Header-Content-Length``: a JSON header, then raw tensor bytes).

The tensors are fixed so clients can rely on them: input ``steps`` FP32 ``[B, L, *input_shape]``;
outputs ``spikes`` UINT8 ``[B, L, n_out]``, ``scores`` FP32 ``[B, L, num_classes]``, ``predicted``
INT64 ``[B, L]``. With Triton's sequence parameters B is 1 and L is the request's steps.
"""

from __future__ import annotations

import difflib
import json
import math
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, StrictBool, StrictInt

from service.errors import InvalidInput, TooManySteps
from service.frontend.codec import MAX_FINITE, ModelCodec, numbers

HEADER = "inference-header-content-length"
FP32_MAX = MAX_FINITE["float32"]
DTYPES = {"spikes": ("UINT8", np.uint8), "scores": ("FP32", np.float32), "predicted": ("INT64", np.int64)}


class TensorParams(BaseModel):
    binary_data_size: StrictInt | None = Field(None, ge=0)
    binary_data: StrictBool | None = None


class InferInput(BaseModel):
    name: str
    shape: list[StrictInt]  # strict: true, "2" and 2.0 are not sizes
    datatype: str
    parameters: TensorParams | None = None
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: TensorParams | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = None


class TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]


class OutputTensor(TensorMeta):
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[OutputTensor]


def metadata(codec: ModelCodec) -> ModelMetadata:
    return ModelMetadata(name=codec.name, versions=["1"], platform="psn-stream", inputs=[
        TensorMeta(name="steps", datatype="FP32", shape=[-1, -1, *codec.input_shape])], outputs=[
        TensorMeta(name="spikes", datatype="UINT8", shape=[-1, -1, codec.n_out]),
        TensorMeta(name="scores", datatype="FP32", shape=[-1, -1, codec.classes]),
        TensorMeta(name="predicted", datatype="INT64", shape=[-1, -1])])


FLAGS = ("sequence_start", "sequence_end", "binary_data_output")  # request parameters that are booleans
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


def check_request(req: InferRequest) -> None:
    """What can be refused about a request before it is run, so that a refused request leaves its sequence
    as it was: the requested outputs' names and the boolean parameters (strict: "false" is not false)."""
    params = req.parameters or {}
    for name in params:  # other parameters are free-form (the protocol's), but a misspelt sequence flag
        # silently ignored would run the steps on the wrong state (a start that does not start over)
        if name not in SEQUENCE_PARAMETERS and (name.lower().startswith("seq") or difflib.get_close_matches(
                name.lower(), SEQUENCE_PARAMETERS, n=1, cutoff=0.75)):
            raise InvalidInput(f"parameters.{name}: not a parameter of this server; did you mean one of "
                               f"{', '.join(SEQUENCE_PARAMETERS)}?", field=f"parameters.{name}")
    for name in FLAGS:
        if name in params and not isinstance(params[name], bool):
            raise InvalidInput(f"parameters.{name}: expected true or false, got {params[name]!r}",
                               field=f"parameters.{name}")
    asked: set[str] = set()
    for out in req.outputs or ():
        if out.name not in DTYPES:
            raise InvalidInput(f"outputs: no output named {out.name!r}; there are {list(DTYPES)}", field="outputs")
        if out.name in asked:
            raise InvalidInput(f"outputs: {out.name!r} is asked for twice", field="outputs")
        asked.add(out.name)


MAX_SEQUENCE_ID = 2**64 - 1  # Triton's integer correlation ids are unsigned 64-bit
MAX_SEQUENCE_ID_CHARS = 256


def sequence_id(params: dict[str, Any] | None) -> int | str | None:
    """The sequence an infer request's ``parameters`` name (Triton's ``sequence_id``): None when they name
    none (absent, 0 or "": a batch of whole sequences). The one rule for the front end that serves the
    request and the Ray replica that routes it by sequence (``service.ray``). The integer 7 and the string
    "7" are two sequences, as in Triton (``sequence_session``)."""
    seq = (params or {}).get("sequence_id")
    if seq is None:
        return None
    if isinstance(seq, bool) or not isinstance(seq, int | str):  # strict: true is not sequence 1
        raise InvalidInput(f"sequence_id: expected an integer or a string, got {seq!r}", field="sequence_id")
    if isinstance(seq, int) and not 0 <= seq <= MAX_SEQUENCE_ID:
        raise InvalidInput(f"sequence_id: an integer id is unsigned 64-bit (0 for none, up to 2**64-1), got {seq}",
                           field="sequence_id")
    if isinstance(seq, str) and len(seq) > MAX_SEQUENCE_ID_CHARS:
        raise InvalidInput(f"sequence_id: a string id has at most {MAX_SEQUENCE_ID_CHARS} characters, got "
                           f"{len(seq)}", field="sequence_id")
    return None if seq in (0, "") else seq


def sequence_session(owner: str, model: str, seq: int | str) -> str:
    """The session id of sequence ``seq``: ``oip:{owner}:{model}:{seq as JSON}``, so that 7 and "7" differ."""
    return f"oip:{owner}:{model}:{json.dumps(seq)}"


def split_body(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """The JSON part (all of ``body`` without the binary extension) and the binary part."""
    n = len(body)
    if header_length is not None:
        digits = header_length.lstrip("0") or "0"  # int() refuses more than 4300 digits: compare lengths first
        if not (header_length.isascii() and header_length.isdigit()) or len(digits) > len(str(len(body))) or \
                int(digits) > len(body):
            raise InvalidInput(f"Inference-Header-Content-Length: {header_length[:40]!r} is not a length within the "
                               f"{len(body)}-byte body", field="Inference-Header-Content-Length")
        n = int(digits)
    try:
        return InferRequest.model_validate_json(body[:n]), body[n:]
    except ValueError as e:
        first = getattr(e, "errors", lambda: [{}])()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise InvalidInput(f"{where}: {first.get('msg', 'invalid inference request')}", field=where) from None


def input_steps(req: InferRequest, binary: bytes, codec: ModelCodec, max_steps: int) -> np.ndarray:
    """The ``steps`` input as float64 (B, L, *input_shape), checked like every other input."""
    if len(req.inputs) != 1 or req.inputs[0].name != "steps":
        raise InvalidInput(f"inputs: expected exactly one input named 'steps', got {[i.name for i in req.inputs]}",
                           field="inputs")
    inp = req.inputs[0]
    want = f"[B, L, {', '.join(map(str, codec.input_shape))}]"
    if inp.datatype != "FP32":
        raise InvalidInput(f"steps: datatype must be FP32, got {inp.datatype}", field="steps")
    if len(inp.shape) != 2 + len(codec.input_shape) or tuple(inp.shape[2:]) != codec.input_shape or \
            min(inp.shape[:2]) < 1:
        raise InvalidInput(f"steps: shape must be {want}, got {inp.shape}", field="steps")
    B, L = inp.shape[:2]
    if B * L > max_steps:  # a batch of B sequences of L steps is B * L steps of work
        raise TooManySteps(f"steps: {B} x {L} steps in one request, at most {max_steps} allowed "
                           "(PSN_MAX_STEPS_PER_REQUEST)", field="steps")
    count = math.prod(inp.shape)
    size = inp.parameters.binary_data_size if inp.parameters else None
    if size is not None:
        if inp.data is not None:
            raise InvalidInput("steps: both data and binary_data_size; send the tensor one way", field="steps")
        if size != 4 * count or len(binary) != size:
            raise InvalidInput(f"steps: binary_data_size {size} with {len(binary)} bytes after the header; shape "
                               f"{inp.shape} FP32 needs {4 * count}", field="steps")
        a = np.frombuffer(binary, "<f4").astype(np.float64)
    else:
        if binary:
            raise InvalidInput(f"Inference-Header-Content-Length: {len(binary)} bytes of binary data after the "
                               "JSON header, and no input with binary_data_size to read them",
                               field="Inference-Header-Content-Length")
        a = numbers(inp.data if inp.data is not None else [], "steps", f"{want} (data: a flat list)").ravel()
        if a.size != count:
            raise InvalidInput(f"steps: {a.size} values for shape {inp.shape}", field="steps")
        if np.isfinite(a).all() and a.size and float(np.abs(a).max()) > FP32_MAX:
            raise InvalidInput("steps: a value's magnitude exceeds the largest finite FP32, the input's datatype",
                               field="steps")
    codec.check_values(a, "steps")
    return a.reshape(inp.shape)


def respond(req: InferRequest, codec: ModelCodec, spikes: np.ndarray, scores: np.ndarray
            ) -> tuple[bytes, dict[str, str]]:
    """Outputs (B, L, ...) as the client asked: JSON ``data`` or binary blobs after the JSON header."""
    predicted = scores.argmax(-1).astype(np.int64)
    arrays = {"spikes": spikes.astype(np.uint8), "scores": scores.astype(np.float32), "predicted": predicted}
    default_binary = bool((req.parameters or {}).get("binary_data_output", False))
    wanted = req.outputs or [RequestedOutput(name=n) for n in DTYPES]
    tensors, blobs = [], []
    for out in wanted:  # names checked before the request ran (check_request)
        a = arrays[out.name]
        binary = out.parameters.binary_data if out.parameters and out.parameters.binary_data is not None \
            else default_binary
        t = OutputTensor(name=out.name, datatype=DTYPES[out.name][0], shape=list(a.shape))
        if binary:
            blob = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
            t.parameters = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t.data = a.ravel().tolist()
        tensors.append(t)
    head = InferResponse(model_name=codec.name, model_version="1", id=req.id, outputs=tensors)
    text = json.dumps(head.model_dump(exclude_none=True), separators=(",", ":")).encode()
    if not blobs:
        return text, {"content-type": "application/json"}
    return text + b"".join(blobs), {"content-type": "application/octet-stream", HEADER: str(len(text))}
