"""Server-side guards around every event of a built app, whatever the page or an API client sends:

- number fields (``gr.Number``, ``gr.Slider``) refuse text, NaN and ±inf with a message naming the field, before the
  handler runs (Gradio's own bounds check lets NaN through and fails on text with a generic error);
- image fields (``gr.Image``, ``gr.ImageEditor``) turn an unreadable, truncated or oversized upload into a message;
- every handler refuses a request over the work limit (frames × images × steps × pixels) and a malformed seed list;
- model jobs written as plain functions (the API endpoints) run so that cancelling the job stops the model at its
  next call (:data:`workbench.ui.session.CANCEL`), instead of running to the end;
- the queue refuses a new job from a browser session that already has ``jobs_per_session`` queued or running.

User errors are ``gr.Error`` without a traceback in the server log (one log line each).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import threading
from collections.abc import Callable
from typing import Any

import anyio
import gradio as gr

from workbench.limits import Limits, check_work, image_error_message
from workbench.ui.session import CANCEL, LOG, MODEL_CONCURRENCY, user_error

MAX_SEED = 2**32 - 1
SPECIAL_TYPES = (gr.Request, gr.EventData, gr.Progress)


def install(demo: gr.Blocks, limits: Limits) -> None:
    """Guard every input component and event handler of ``demo`` (already queued) with ``limits``."""
    for block in demo.blocks.values():
        if isinstance(block, (gr.Number, gr.Slider)):
            block.preprocess = _numeric_preprocess(block)
        elif isinstance(block, (gr.Image, gr.ImageEditor)):
            block.preprocess = _image_preprocess(block)
        elif isinstance(block, gr.components.Component):
            block.preprocess = _quiet_preprocess(block)
    for block_fn in demo.fns.values():
        if block_fn.fn is not None and not getattr(block_fn.fn, "_workbench_guarded", False):
            block_fn.fn = guard_function(block_fn.fn, limits, block_fn.concurrency_id == MODEL_CONCURRENCY, demo)
    limit_sessions(demo, limits.jobs_per_session)


# ------------------------------------------------------------------------------------------------------- components


def _label(component: gr.components.Component) -> str:
    return str(getattr(component, "label", None) or component.__class__.__name__.lower())


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "…"


def _numeric_preprocess(component: gr.components.Component) -> Callable:
    original, label = component.preprocess, _label(component)

    def preprocess(payload: Any) -> Any:
        if payload is None:
            if isinstance(component, gr.Slider):
                raise user_error(f"{label}: a number is needed")
            return original(payload)
        if isinstance(payload, str):
            try:
                payload = float(payload.strip())
            except ValueError:
                raise user_error(f"{label}: must be a number, got the text {_shown(payload)}") from None
        if isinstance(payload, bool) or not isinstance(payload, (int, float)):
            raise user_error(f"{label}: must be a number, got {type(payload).__name__}")
        if not math.isfinite(payload):
            raise user_error(f"{label}: must be a finite number, got {payload}")
        try:
            return original(payload)
        except gr.Error as err:
            raise user_error(f"{label}: {err.message}") from None

    return preprocess


def _quiet_preprocess(component: gr.components.Component) -> Callable:
    """Gradio's own refusals (a value not among a dropdown's choices, …) as user errors: no traceback."""
    original, label = component.preprocess, _label(component)

    def preprocess(payload: Any) -> Any:
        try:
            return original(payload)
        except gr.Error as err:
            raise user_error(f"{label}: {err.message}") from None

    return preprocess


def _image_preprocess(component: gr.components.Component) -> Callable:
    original, label = component.preprocess, _label(component)

    def preprocess(payload: Any) -> Any:
        try:
            return original(payload)
        except gr.Error:
            raise
        except Exception as err:
            message = image_error_message(err, label)
            if message is None:
                LOG.warning("%s: upload refused: %s", label, type(err).__name__)
                message = f"{label}: the upload could not be read as an image"
            raise user_error(message) from None

    return preprocess


# ----------------------------------------------------------------------------------------------------------- events


def check_arguments(values: dict[str, Any], limits: Limits) -> None:
    """ValueError for a non-finite number, a malformed seed text, or a request over the work limit."""
    for name, value in values.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{name}: must be a finite number, got {item}")
        if name == "seed" and isinstance(value, str):
            check_seed_text(value)
    numbers = {k: values.get(k) for k in ("steps", "width", "height", "batch_count", "num_frames")}
    if all(isinstance(numbers[k], (int, float)) for k in ("steps", "width", "height")):
        check_work(
            limits,
            int(numbers["steps"]),
            int(numbers["width"]),
            int(numbers["height"]),
            images=int(numbers["batch_count"] or 1) if isinstance(numbers["batch_count"], (int, float)) else 1,
            frames=int(numbers["num_frames"] or 1) if isinstance(numbers["num_frames"], (int, float)) else 1,
        )


def check_seed_text(text: str) -> None:
    """A seed text field: integers from 0 to 2³² − 1 (−1: random), separated by commas or spaces."""
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    for part in parts:
        try:
            seed = int(part)
        except ValueError:
            raise ValueError(f"seed: must be whole numbers from 0 to {MAX_SEED}, got {_shown(text)}") from None
        if not -1 <= seed <= MAX_SEED:
            raise ValueError(f"seed: must be from 0 to {MAX_SEED} (−1: random), got {seed}")


def _named_values(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return {}
    return {
        name: value
        for name, value in bound.arguments.items()
        if not isinstance(value, SPECIAL_TYPES) and signature.parameters[name].kind is not inspect.Parameter.VAR_KEYWORD
    }


def guard_function(fn: Callable, limits: Limits, model_job: bool, demo: gr.Blocks | None = None) -> Callable:
    """``fn`` with :func:`check_arguments` first; a plain (non-generator) model job additionally runs in a worker
    thread whose :data:`CANCEL` event is set when the job is cancelled."""
    signature = inspect.signature(fn)

    def check(args: tuple, kwargs: dict) -> None:
        try:
            check_arguments(_named_values(signature, args, kwargs), limits)
        except ValueError as err:
            raise user_error(str(err)) from None

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Any:
            check(args, kwargs)
            yield from fn(*args, **kwargs)

        wrapped: Callable = generator
    elif inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn) or not model_job:

        @functools.wraps(fn)
        def plain(*args: Any, **kwargs: Any) -> Any:
            check(args, kwargs)
            return fn(*args, **kwargs)

        wrapped = fn if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn) else plain
    else:
        limiter = getattr(demo, "limiter", None)

        @functools.wraps(fn)
        async def cancellable(*args: Any, **kwargs: Any) -> Any:
            check(args, kwargs)
            event = threading.Event()
            token = CANCEL.set(event)
            try:
                return await anyio.to_thread.run_sync(
                    functools.partial(fn, *args, **kwargs), abandon_on_cancel=True, limiter=limiter
                )
            except (asyncio.CancelledError, anyio.get_cancelled_exc_class()):
                event.set()
                raise
            finally:
                CANCEL.reset(token)

        wrapped = cancellable
    wrapped._workbench_guarded = True  # type: ignore[attr-defined]
    return wrapped


# ------------------------------------------------------------------------------------------------------------ queue


def session_jobs(queue: Any, session_hash: str) -> int:
    """Events of ``session_hash`` waiting in ``queue`` or running."""
    count = 0
    for event_queue in queue.event_queue_per_concurrency_id.values():
        count += sum(1 for event in event_queue.queue if event.session_hash == session_hash)
    for job_set in queue.active_jobs:
        count += sum(1 for event in job_set or () if event.session_hash == session_hash)
    return count


def limit_sessions(demo: gr.Blocks, jobs_per_session: int | None) -> None:
    """Make ``demo``'s queue refuse a job from a session that already has ``jobs_per_session`` (HTTP 503 with a
    message). One client can still open several sessions; the queue's ``max_size`` bounds them all together."""
    queue = demo._queue
    if jobs_per_session is None or getattr(queue, "_workbench_limited", False):
        return
    push = queue.push

    async def limited_push(body: Any, request: Any, username: str | None) -> Any:
        session = getattr(body, "session_hash", None)
        if session and session_jobs(queue, session) >= jobs_per_session:
            LOG.info("session job limit: refused a job of a session with %d", jobs_per_session)
            return (
                False,
                f"Too many jobs: this session already has {jobs_per_session} queued or running (the limit); "
                "wait for one to finish.",
                "queue_full",
            )
        return await push(body, request, username)

    queue.push = limited_push
    queue._workbench_limited = True
