"""State shared by every tab of the app: the one loaded pipeline, the lock that serializes model access, the outputs
folder, per-browser-session Stop events, streaming a run with live previews, and errors turned into page messages.

UI code holds no model logic: it calls :class:`workbench.Pipeline`, :mod:`workbench.frames` and :mod:`workbench.viz`
through this module. Every handler that runs the model takes :attr:`Workbench.lock` (one pipeline, one run at a
time); the queue additionally runs all model events in one concurrency group (:data:`MODEL_CONCURRENCY`). The one
exception is the live preview, drawn by the streaming consumer from a copy of the step's latents (a read-only
decode or a linear map) while the run goes on.

On a Hugging Face ZeroGPU Space, :data:`GPU` is ``spaces.GPU``; it may run a handler in a separate worker process,
which the Stop button (a thread event of the main process) does not reach.

Hosting (:mod:`workbench.ui.hosting`): :attr:`Workbench.policy` decides whether the model may change (public mode
refuses here, on the server, whatever the page shows) and whether models and LoRAs are typed paths or names from
the allowed folders. A cancelled API job sets the :data:`CANCEL` event of its context; a forward pre-hook on the
transformer then ends the run at its next model call (:func:`cancel_hook`).
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from workbench import GenerationCancelled, Pipeline, load_pipeline
from workbench.limits import image_error_message, prune_outputs
from workbench.metadata import save_png
from workbench.shapesworld.layout import attach_caption_layouts
from workbench.ui.hosting import HostingPolicy, NotAllowedError

LOG = logging.getLogger("workbench.ui")
MODEL_CONCURRENCY = "model"
PREVIEW_DECODE_MAX_SIDE = 256
PRUNE_EVERY_S = 30.0
CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("workbench_cancel", default=None)
MODEL_CHANGES_OFF = "this is a public app: the model and its LoRAs cannot be changed here"

try:
    import spaces

    GPU: Callable = spaces.GPU
except ImportError:  # not on a Hugging Face ZeroGPU Space

    def GPU(fn: Callable) -> Callable:
        return fn


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def none_if_text_none(value: str | None) -> str | None:
    """Dropdown choices use the text "None"; the API takes None."""
    return None if value in (None, "", "None") else value


@dataclass
class Step:
    """One finished sampler step of a streamed run: ``index`` (0-based), ``total`` and a ``preview`` image."""

    index: int
    total: int
    preview: Image.Image | None


@dataclass
class Finished:
    """The end of a streamed run, with whatever the work function returned."""

    result: Any


def user_error(message: str, action: str = "request") -> gr.Error:
    """A ``gr.Error`` for a user's mistake: logged as one line, no traceback in the server log."""
    LOG.info("%s refused: %s", action, message.splitlines()[0] if message else "")
    return gr.Error(message, print_exception=False)


def cancel_hook(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of the transformer: GenerationCancelled once the :data:`CANCEL` event of the calling
    context is set (a cancelled API job), so the run stops at its next model call."""
    event = CANCEL.get()
    if event is not None and event.is_set():
        raise GenerationCancelled("cancelled by the client")


@contextmanager
def page_errors(action: str) -> Iterator[None]:
    """Turn exceptions into messages shown in the page (``gr.Error``); the app keeps serving.

    ValueError (bad input, ModelFormatError) and unreadable images show their own message and are logged as one line;
    anything else is a bug: logged with its traceback and shown as ``"<action> failed: <type> …"`` without its text,
    which may name server paths.
    """
    try:
        yield
    except gr.Error:
        raise
    except GenerationCancelled:
        raise
    except ValueError as err:
        raise user_error(str(err), action) from err
    except Exception as err:
        message = image_error_message(err)
        if message is not None:
            raise user_error(message, action) from err
        LOG.exception("%s failed", action)
        raise gr.Error(
            f"{action} failed: {type(err).__name__} (an internal error; the details are in the server log)"
        ) from err


def preview_images(pipe: Pipeline, latents: torch.Tensor) -> Image.Image:
    """Live preview of scaled latents ``(B, 16, h, w)`` as one image row at output size.

    The model's fitted linear latent→RGB map when it has one; otherwise, for small images, a real VAE decode (cheap at
    ShapesWorld sizes); otherwise SD3's published latent→RGB factors.
    """
    from workbench.viz import image_grid

    scale = pipe.vae_scale_factor
    size = (latents.shape[-1] * scale, latents.shape[-2] * scale)
    if pipe.defaults.latent_rgb_factors is None and max(size) <= PREVIEW_DECODE_MAX_SIDE:
        images = pipe.decode_latents(latents)
    else:
        images = [im.resize(size, Image.Resampling.NEAREST) for im in pipe.preview(latents)]
    return images[0] if len(images) == 1 else image_grid(images, (len(images) + 3) // 4, min(len(images), 4))


@dataclass
class Workbench:
    """The app's shared state. ``pipe`` may be replaced by :meth:`load` (under the lock)."""

    pipe: Pipeline
    output_dir: Path
    device: str = "cpu"
    lock: threading.Lock = field(default_factory=threading.Lock)
    policy: HostingPolicy = field(default_factory=HostingPolicy)
    cache_dirs: list[Path] = field(default_factory=list)
    _stops: dict[str, threading.Event] = field(default_factory=dict)
    _streaming: dict[str, int] = field(default_factory=dict)
    _streams_changed: threading.Condition = field(default_factory=threading.Condition)
    _pruned_at: float = 0.0

    def __post_init__(self) -> None:
        self._adopt(self.pipe)

    @classmethod
    def create(
        cls,
        pipe_or_path: Pipeline | str | Path | None = None,
        output_dir: str | Path = "outputs",
        policy: HostingPolicy | None = None,
    ) -> Workbench:
        device = default_device()
        pipe = pipe_or_path if isinstance(pipe_or_path, Pipeline) else load_pipeline(pipe_or_path, device=device)
        return cls(pipe, Path(output_dir).resolve(), str(pipe.device), policy=policy or HostingPolicy())

    @staticmethod
    def _adopt(pipe: Pipeline) -> None:
        """Make a newly loaded pipeline the app's: its transformer stops at a cancelled run's next call, and a
        ShapesWorld model built without :func:`workbench.load_pipeline` gets its caption layouts (layout guidance)."""
        if pipe.layout_source is None:
            attach_caption_layouts(pipe)
        transformer = getattr(pipe, "transformer", None)
        if isinstance(transformer, torch.nn.Module) and not getattr(transformer, "_workbench_cancel_hook", False):
            transformer.register_forward_pre_hook(cancel_hook)
            transformer._workbench_cancel_hook = True

    # ------------------------------------------------------------------------------------------------ model

    def _check_changes(self) -> None:
        if not self.policy.model_changes:
            raise NotAllowedError(MODEL_CHANGES_OFF)

    def load(
        self,
        path: str | None,
        quantization: str | None = None,
        offload: str | None = None,
        text_encoders_from: str | None = None,
    ) -> Pipeline:
        """Replace the pipeline with ``load_pipeline(path or embedded, …)``; the old one stays on any error. Refused
        in public mode; ``path`` (and ``text_encoders_from``, the folder that gives a GGUF transformer or a single
        file its text encoders and VAE) are names from the allowed folders unless the policy takes free paths, and
        then a failed load says only that the name could not be loaded (the reason goes to the server log)."""
        self._check_changes()
        path = (path or "").strip() or None
        companion = (text_encoders_from or "").strip() or None
        options = dict(device=self.device, quantization=quantization, offload=offload)
        if self.policy.free_paths:
            with self.lock:
                pipe = load_pipeline(path, text_encoders_from=companion, **options)
                self._adopt(pipe)
                self.pipe = pipe
            return pipe
        source = self.policy.catalog.model(path)
        folder = self.policy.catalog.model_folder(companion) if companion else None
        from workbench import memory

        memory.check_options(quantization, offload)
        try:
            with self.lock:
                pipe = load_pipeline(source, text_encoders_from=folder, **options)
                self._adopt(pipe)
                self.pipe = pipe
        except Exception as err:
            LOG.warning("model %r could not be loaded: %s: %s", path, type(err).__name__, err)
            raise ValueError(f"{path!r} could not be loaded as a model") from None
        return pipe

    def attach_lora(self, path: str, strength: float = 1.0) -> str:
        """Attach a LoRA file to the pipeline (again with the same file: new strength); returns its name. Refused
        in public mode; ``path`` is a name from the allowed LoRA folders unless the policy takes free paths."""
        self._check_changes()
        path = (path or "").strip()
        if not path:
            raise ValueError("LoRA file: give the path of a .safetensors LoRA")
        if self.policy.free_paths:
            with self.lock:
                return self.pipe.loras.load(path, strength=strength)
        source = self.policy.catalog.lora(path)
        if not isinstance(strength, (int, float)) or strength != strength or abs(strength) == float("inf"):
            raise ValueError(f"LoRA strength must be a finite number, got {strength!r}")
        try:
            with self.lock:
                return self.pipe.loras.load(source, strength=strength)
        except Exception as err:
            LOG.warning("LoRA %r could not be attached: %s: %s", path, type(err).__name__, err)
            raise ValueError(f"{path!r} could not be attached as a LoRA to this model") from None

    def remove_loras(self) -> None:
        """Remove every LoRA (refused in public mode)."""
        self._check_changes()
        with self.lock:
            self.pipe.loras.remove()

    def describe(self) -> str:
        """Markdown summary of the loaded model and its LoRAs."""
        pipe, d = self.pipe, self.pipe.defaults
        config = pipe.transformer.config
        experts = f"{pipe.num_experts} experts in blocks {list(config.moe_layers)}" if pipe.num_experts else "dense"
        text = (
            f"**{pipe.name}** on `{pipe.device}` ({str(pipe.dtype).replace('torch.', '')}): {config.num_layers} joint "
            f"blocks, {experts}; sizes up to {pipe.max_image_side} px in steps of 16. Defaults: {d.width}×{d.height}, "
            f"{d.num_inference_steps} steps, guidance {d.guidance_scale:g}, shift {d.shift:g}, {d.sampler}."
        )
        for row in pipe.loras.describe():
            layers = ", ".join(f"{count} in {component}" for component, count in row["layers"].items())
            text += f"\n\nLoRA **{row['name']}** × {row['strength']:g}: rank {row['rank']}, {layers} layers"
        return text

    # --------------------------------------------------------------------------------------------- running

    def generate(self, prompt: str, **kwargs: Any):
        """One locked pipeline call; returns its :class:`workbench.GenerationOutput`."""
        with self.lock:
            return self.pipe(prompt, **kwargs)

    def stop_event(self, session: str | None) -> threading.Event:
        return self._stops.setdefault(session or "", threading.Event())

    def stop(self, session: str | None) -> None:
        """Ask the running generation of this browser session to stop at its next step."""
        self.stop_event(session).set()

    def wait_ended(self, session: str | None, timeout: float) -> bool:
        """Wait until no :meth:`stream` of ``session`` is running (its generation thread and its consumer both ended,
        so that it sends no further update); returns whether it ended within ``timeout`` seconds."""
        with self._streams_changed:
            return self._streams_changed.wait_for(lambda: not self._streaming.get(session or ""), timeout)

    @contextmanager
    def _streaming_run(self, session: str | None) -> Iterator[None]:
        key = session or ""
        with self._streams_changed:
            self._streaming[key] = self._streaming.get(key, 0) + 1
        try:
            yield
        finally:
            with self._streams_changed:
                self._streaming[key] -= 1
                if not self._streaming[key]:
                    del self._streaming[key]
                self._streams_changed.notify_all()

    def stream(
        self, session: str | None, work: Callable[[Callable], Any], total: int, preview: bool = True
    ) -> Iterator[Step | Finished]:
        """Run ``work(step_callback)`` in a worker thread under the lock, yielding :class:`Step` updates and a
        :class:`Finished` at the end. ``step_callback`` is the pipeline's ``callback(step, sigma, latents)``; it
        returns False once Stop was pressed (→ GenerationCancelled from the pipeline) or the consumer went away.
        A slow consumer skips to the newest step instead of falling behind; previews are drawn only for the steps
        it shows. Exceptions of ``work`` are re-raised in the consumer."""
        stop = self.stop_event(session)
        stop.clear()
        updates: queue.Queue = queue.Queue()
        outcome: dict[str, Any] = {}
        counter = {"step": 0}

        def callback(step: int, sigma: float, latents: torch.Tensor) -> bool:
            updates.put((counter["step"], latents.detach().clone() if preview else None))
            counter["step"] += 1
            return not stop.is_set()

        def worker() -> None:
            try:
                with self.lock:
                    if stop.is_set():
                        raise GenerationCancelled("stopped before the generation started")
                    outcome["result"] = work(callback)
            except BaseException as err:  # handed to the consumer thread
                outcome["error"] = err
            finally:
                updates.put(None)

        with self._streaming_run(session):
            thread = threading.Thread(target=worker, name="workbench-generation", daemon=True)
            thread.start()
            try:
                while (item := updates.get()) is not None:
                    while not updates.empty():
                        newer = updates.get()
                        if newer is None:
                            updates.put(None)
                            break
                        item = newer
                    if stop.is_set():  # Stop was pressed: its "Stopped" must stay the last word
                        continue
                    index, latents = item
                    yield Step(index, total, preview_images(self.pipe, latents) if latents is not None else None)
            finally:
                if thread.is_alive():
                    stop.set()
                thread.join()
        if "error" in outcome:
            raise outcome["error"]
        yield Finished(outcome["result"])

    # ------------------------------------------------------------------------------------------------ files

    def save(self, images: list[Image.Image], kind: str) -> list[str]:
        """Write each image as PNG with its ``parameters`` chunk under the outputs folder; returns the paths."""
        self.prune()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths = []
        for image in images:
            name = f"{kind}-{stamp}-{uuid.uuid4().hex[:8]}.png"
            paths.append(str(save_png(image, self.output_dir / kind / name)))
        return paths

    def prune(self, force: bool = False) -> int:
        """Delete outputs (and files in :attr:`cache_dirs`, such as Gradio's upload cache) past the policy's age and
        size limits, each folder on its own; at most every :data:`PRUNE_EVERY_S` seconds. Returns the files deleted."""
        limits, now = self.policy.limits, time.monotonic()
        if not force and now - self._pruned_at < PRUNE_EVERY_S:
            return 0
        self._pruned_at = now
        folders = [self.output_dir, *self.cache_dirs]
        return sum(prune_outputs(f, limits.output_max_age_s, limits.output_max_bytes) for f in folders)

    def new_folder(self, kind: str) -> Path:
        self.prune()
        folder = self.output_dir / kind / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def stop_handler(wb: Workbench) -> Callable[[gr.Request], None]:
    """The Stop button's handler: stops the running generation of the clicking browser session."""

    def stop(request: gr.Request) -> None:
        wb.stop(request.session_hash)

    return stop
