"""Request and response models of the HTTP and WebSocket API (they are also the OpenAPI schema)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt

MAX_START = 2**63 - 1  # a step index is a signed 64-bit integer everywhere (binary frames, the engine core)


def plain_json(value: Any) -> Any:
    """A value the service echoes back (a message ``id``) must be one a JSON parser reads back: NaN and
    Infinity (1e400 too), which Python's and pydantic's parsers accept, are not JSON numbers."""
    if value is None or type(value) in (int, str, bool):
        return value
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError):
        raise ValueError("expected plain JSON, with no NaN or Infinity (not JSON numbers)") from None
    return value


class RequestModel(BaseModel):
    """A request body or client message. A field it does not know is refused (422 naming it), not ignored:
    a retry whose ``start`` is misspelt (``"Start"``, ``"strat"``) would otherwise append its steps a
    second time, and a setting sent in the wrong request would look accepted."""

    model_config = ConfigDict(extra="forbid")


def unknown_field(field: str, model: type[BaseModel] | None) -> str:
    """The message for a field ``model`` does not have (``extra_forbidden``), listing the ones it has."""
    known = ", ".join(repr(name) for name in model.model_fields) if model is not None else ""
    return f"{field}: unknown field" + (f"; expected only {known}" if known else "")


STEP_EXAMPLE = {"index": 0, "spikes": [0, 1, 1, 0], "scores": [0.12, -0.3, 0.05], "predicted": 0, "label": "0"}


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. invalid_input, session_expired, queue_full")
    message: str = Field(description="what was wrong, naming the field and the expected shape")
    field: str | None = Field(None, description="the request field at fault, if one is")
    retry_after: int | None = Field(None, description="WebSocket only: seconds to wait before retrying, where "
                                    "waiting helps (over HTTP: the Retry-After header)")


class ErrorResponse(BaseModel):
    error: ErrorDetail
    model_config = ConfigDict(json_schema_extra={"example": {"error": {
        "code": "invalid_input", "message": "steps: expected shape (L, 28), got (2, 27)", "field": "steps"}}})


class ModelInfo(BaseModel):
    name: str
    neuron: str = Field(description="masked | sliding | lif | psn")
    streams: bool = Field(description="false for plain PSN models: /v1/classify only")
    k: int | None = Field(description="order of the masked / sliding PSN")
    horizon: int | None = Field(description="T: steps a session may take (masked PSN); null = unbounded")
    input_shape: list[int] = Field(description="shape of one step")
    output_shape: list[int] = Field(description="shape of the spikes of one step (last spiking layer)")
    num_classes: int
    class_names: list[str]
    dataset: str
    metrics: dict[str, Any]
    config: dict[str, Any] = Field(description="the model folder's network config")
    max_input: float = Field(description="the largest input magnitude the model takes (a value past it is refused "
                             "422): its first layer's current and membrane stay finite up to it")


class ModelList(BaseModel):
    models: list[ModelInfo]


class SessionCreate(RequestModel):
    model: str = Field(description="a name from GET /v1/models", examples=["mnist1d-sliding"])


class SessionInfo(BaseModel):
    session_id: str = Field(description="unguessable id")
    model: str
    input_shape: list[int]
    horizon: int | None = Field(description="T for masked models (steps past it are refused); null for sliding/LIF")
    steps_seen: int = Field(description="steps applied so far = the index the next new step gets")
    idle_timeout_s: float
    expires_in_s: float = Field(description="seconds until idle expiry if no request arrives")
    model_config = ConfigDict(json_schema_extra={"example": {
        "session_id": "kY3v0f9yQm2c8pX1b7ZtNw", "model": "mnist1d-sliding", "input_shape": [1], "horizon": None,
        "steps_seen": 0, "idle_timeout_s": 300.0, "expires_in_s": 300.0}})


class StepsRequest(RequestModel):
    steps: list[Any] = Field(description="L steps, each of the model's input_shape: shape (L, *input_shape)",
                             examples=[[[0.5], [-1.2], [0.3]]])
    start: StrictInt | None = Field(None, ge=0, le=MAX_START, description=(
        "index of the first step; omit to append. A retry with an index already applied is answered from "
        "the session's recent outputs (not applied twice); an index past steps_seen is refused (step_gap)."))


class StepOutput(BaseModel):
    index: int = Field(description="0-based step index within the session")
    spikes: list[Any] = Field(description="0/1 spikes of the last spiking layer, shape output_shape")
    scores: list[float] = Field(description="class scores: mean readout over steps 0..index")
    predicted: int = Field(description="argmax of scores: the class predicted so far")
    label: str = Field(description="class_names[predicted]")
    model_config = ConfigDict(json_schema_extra={"example": STEP_EXAMPLE})


class StepsResponse(BaseModel):
    session_id: str
    start: int = Field(description="index of the first output")
    replayed: int = Field(description="how many of the outputs were already applied (answered from the retry window)")
    steps_seen: int
    outputs: list[StepOutput]


class ClassifyRequest(RequestModel):
    model: str = Field(examples=["mnist1d-sliding"])
    steps: list[Any] = Field(description="the whole sequence, shape (T, *input_shape)",
                             examples=[[[0.5], [-1.2], [0.3]]])


class ClassifyResponse(BaseModel):
    model: str
    predicted: int = Field(description="class after the last step")
    label: str
    scores: list[float] = Field(description="scores after the last step")
    outputs: list[StepOutput] = Field(description="per step, the same as streaming the sequence")


class Health(BaseModel):
    status: Literal["ok", "ready", "not_ready"]
    models: list[str] = []
    worker: int | None = Field(None, description="index of the front-end process that answered")
    pid: int | None = Field(None, description="/healthz: its process id")
    engine_pid: int | None = Field(None, description="/healthz: the engine core's process id (null: not connected)")
    replica: str | None = Field(None, description="/healthz: this replica's id (PSN_REPLICA_ID) when replicas share "
                                "sessions (PSN_CLUSTER), else null")
    session_store: Literal["ok", "failing"] | None = Field(
        None, description="/readyz: the session store (PSN_STATE_DIR, PSN_STATE_URL): failing while writes to it fail "
        "(the service answers on, but steps answered then may not survive a restart); null without one")


# ----- WebSocket messages (JSON text frames on /v1/stream) ----------------------------------
FRAMES = Field(None, description="json or binary: how steps and answers travel on this connection from now on "
                                  "(default: binary if the psn.binary.v1 subprotocol was chosen, else json)")


class WsOpen(RequestModel):
    type: Literal["open"]
    model: str
    frames: Literal["json", "binary"] | None = FRAMES


class WsAttach(RequestModel):
    type: Literal["attach"]
    session_id: str
    frames: Literal["json", "binary"] | None = FRAMES


class WsSteps(RequestModel):
    type: Literal["steps"]
    steps: list[Any]
    start: StrictInt | None = Field(None, ge=0, le=MAX_START)
    id: Annotated[Any, AfterValidator(plain_json)] = Field(None, description="echoed back in the answer")


class WsClose(RequestModel):
    type: Literal["close"]


class WsStepsAnswer(BaseModel):
    type: Literal["steps"] = "steps"
    session_id: str
    id: Any = None
    start: int
    replayed: int
    outputs: list[StepOutput]


class WsEvent(BaseModel):
    """Server messages: opened / attached (with the session), closed, expired, error."""

    type: Literal["opened", "attached", "closed", "expired", "error"]
    session: SessionInfo | None = None
    session_id: str | None = None
    error: ErrorDetail | None = None
    id: Any = None
