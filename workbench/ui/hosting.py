"""How the app is hosted: public mode (who may change the shared model), the allowed model and LoRA folders, and the
resource limits that go with it.

Public mode is on by default whenever the app is reachable by others: it listens beyond localhost, runs on a Hugging
Face Space (``SPACE_ID`` set) or makes a ``--share`` link. ``--public`` / ``--no-public`` (or ``WORKBENCH_PUBLIC=1``
/ ``0``) choose it explicitly. In public mode the Model tab only shows the model; ``--allow-model-changes`` (or
``WORKBENCH_ALLOW_MODEL_CHANGES=1``) opts back in. Whenever the app is reachable by others, models and LoRAs are
chosen by name from the allowed folders (:class:`Catalog`), never typed as paths; only an app on localhost in private
mode takes free paths. ControlNets (``--controlnet``, ``--controlnet-dir``, the shipped
``models/shapesworld-controlnet*`` folders) are always the operator's: visitors choose among them by name, in public
mode too (it changes no model).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from workbench.limits import Limits
from workbench.loading import EMBEDDED_MODEL

LOCAL_HOSTS = frozenset({"", "127.0.0.1", "localhost", "::1"})
EMBEDDED_NAME = "embedded (ShapesWorld)"
MODEL_SUFFIXES = (".safetensors", ".gguf")
SHIPPED_CONTROLNETS = "shapesworld-controlnet*"
"""ControlNet folders shipped in ``models/`` (made for the embedded model), offered whenever they exist."""
SHARED_MODEL_NOTE = (
    "The model and its LoRAs are **shared by every visitor** of this app: a change here changes them for everyone. "
    "Settings, seeds, images and history are per browser session."
)
PUBLIC_MODEL_NOTE = (
    "This is a public app: the model is shared by every visitor and cannot be changed here. Settings, seeds, images "
    "and history are per browser session."
)


class NotAllowedError(ValueError):
    """A model or LoRA name outside the allowed folders, or a model change in public mode."""


def env_flag(env: Mapping[str, str], name: str) -> bool | None:
    """``1/true/yes/on`` → True, ``0/false/no/off`` → False, unset or empty → None."""
    text = (env.get(name) or "").strip().lower()
    if not text:
        return None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0, got {text!r}")


def env_paths(env: Mapping[str, str], name: str) -> list[Path]:
    """The folders of an ``os.pathsep``-separated environment variable."""
    return [Path(p).expanduser() for p in (env.get(name) or "").split(os.pathsep) if p.strip()]


@dataclass(frozen=True)
class Catalog:
    """Models, LoRAs and ControlNets that may be loaded, by name: the embedded model, each diffusers folder (with
    ``model_index.json``) and each ``.safetensors`` / ``.gguf`` file directly in a model folder; each
    ``.safetensors`` file directly in a LoRA folder; each ControlNet given as a path and each ControlNet folder (with
    ``config.json``) or ``.safetensors`` file directly in a ControlNet folder (named as ``pipe.controlnets.load``
    names them: the folder's name, the file's stem). Listed once, when the app starts."""

    models: dict[str, Path | None] = field(default_factory=dict)
    loras: dict[str, Path] = field(default_factory=dict)
    controlnets: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def scan(
        cls,
        model_dirs: Iterable[Path],
        lora_dirs: Iterable[Path],
        controlnet_dirs: Iterable[Path] = (),
        controlnet_paths: Iterable[Path] = (),
    ) -> Catalog:
        models: dict[str, Path | None] = {EMBEDDED_NAME: None}
        for folder in model_dirs:
            for entry in _entries(folder):
                is_model = (entry / "model_index.json").is_file() or (
                    entry.is_file() and entry.suffix.lower() in MODEL_SUFFIXES
                )
                if is_model and entry.resolve() != EMBEDDED_MODEL.resolve():
                    models.setdefault(entry.name, entry)
        loras: dict[str, Path] = {}
        for folder in lora_dirs:
            for entry in _entries(folder):
                if entry.is_file() and entry.suffix.lower() == ".safetensors":
                    loras.setdefault(entry.name, entry)
        controlnets: dict[str, Path] = {}
        for path in controlnet_paths:
            path = Path(path)
            controlnets.setdefault(path.name if path.is_dir() else path.stem, path)
        for folder in controlnet_dirs:
            for entry in _entries(folder):
                if (entry / "config.json").is_file():
                    controlnets.setdefault(entry.name, entry)
                elif entry.is_file() and entry.suffix.lower() == ".safetensors":
                    controlnets.setdefault(entry.stem, entry)
        return cls(models, loras, controlnets)

    def model(self, name: str | None) -> Path | None:
        """The path of an allowed model name (None: the embedded model); NotAllowedError for any other text."""
        name = (name or "").strip() or EMBEDDED_NAME
        if name not in self.models:
            raise NotAllowedError(f"{_shown(name)} is not an allowed model; choose one from the list")
        return self.models[name]

    @property
    def model_folders(self) -> list[str]:
        """Names of the allowed models that are diffusers folders (the embedded model first): the companions that
        can give a GGUF transformer or a single file its text encoders and VAE."""
        return [name for name, path in self.models.items() if path is None or path.is_dir()]

    def model_folder(self, name: str) -> Path:
        """The folder of an allowed model folder's name (:attr:`model_folders`); NotAllowedError otherwise."""
        name = (name or "").strip()
        if name not in self.model_folders:
            shown = _shown(name) if name else "nothing"
            raise NotAllowedError(f"{shown} is not an allowed model folder; choose one from the list")
        return self.models[name] or EMBEDDED_MODEL

    def lora(self, name: str | None) -> Path:
        """The path of an allowed LoRA name; NotAllowedError for any other text."""
        name = (name or "").strip()
        if name not in self.loras:
            shown = _shown(name) if name else "nothing"
            raise NotAllowedError(f"{shown} is not an allowed LoRA; choose one from the list")
        return self.loras[name]


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _shown(name: str) -> str:
    """A user-typed name, quoted and shortened, for a message."""
    return repr(name if len(name) <= 60 else name[:57] + "…")


@dataclass(frozen=True)
class HostingPolicy:
    """``public``: reachable by anonymous visitors; ``model_changes``: the Model tab may load, quantize and attach
    LoRAs; ``free_paths``: models and LoRAs may be typed as paths (only on localhost in private mode); ``catalog``
    (default :func:`shipped_catalog`): what may be chosen by name."""

    public: bool = False
    model_changes: bool = True
    free_paths: bool = True
    catalog: Catalog = field(default_factory=lambda: shipped_catalog())
    limits: Limits = field(default_factory=Limits.local)

    @property
    def model_note(self) -> str:
        return PUBLIC_MODEL_NOTE if not self.model_changes else SHARED_MODEL_NOTE


def default_model_dirs() -> list[Path]:
    """``models/`` next to the workbench package (holds the embedded model)."""
    return [Path(__file__).resolve().parents[2] / "models"]


def shipped_controlnets() -> list[Path]:
    """The ControlNet folders shipped in ``models/`` (:data:`SHIPPED_CONTROLNETS`, with ``config.json``)."""
    return sorted(p for p in default_model_dirs()[0].glob(SHIPPED_CONTROLNETS) if (p / "config.json").is_file())


def shipped_catalog() -> Catalog:
    """The catalog of an app built without a policy (``build_app(…)`` in a notebook or a test): no model folders,
    the shipped ControlNets."""
    return Catalog(controlnets={path.name: path for path in shipped_controlnets()})


def resolve_policy(
    host: str | None = None,
    share: bool = False,
    public: bool | None = None,
    allow_model_changes: bool = False,
    model_dirs: Iterable[str | Path] = (),
    lora_dirs: Iterable[str | Path] = (),
    env: Mapping[str, str] | None = None,
    controlnets: Iterable[str | Path] = (),
    controlnet_dirs: Iterable[str | Path] = (),
) -> HostingPolicy:
    """The policy of an app launched with these options in the environment ``env`` (default ``os.environ``).
    ``controlnets`` (paths) and ``controlnet_dirs`` (with ``WORKBENCH_CONTROLNET_DIRS``) are the operator's
    ControlNets; the shipped ones (:func:`shipped_controlnets`) are added to them."""
    env = os.environ if env is None else env
    host = host if host is not None else env.get("GRADIO_SERVER_NAME", "")
    reachable = bool(share) or bool(env.get("SPACE_ID")) or host.strip().lower() not in LOCAL_HOSTS
    if public is None:
        public = env_flag(env, "WORKBENCH_PUBLIC")
    public = reachable if public is None else public
    changes = allow_model_changes or bool(env_flag(env, "WORKBENCH_ALLOW_MODEL_CHANGES")) or not public
    folders = [*map(Path, model_dirs), *env_paths(env, "WORKBENCH_MODEL_DIRS")] or default_model_dirs()
    loras = [*map(Path, lora_dirs), *env_paths(env, "WORKBENCH_LORA_DIRS")]
    cn_dirs = [*map(Path, controlnet_dirs), *env_paths(env, "WORKBENCH_CONTROLNET_DIRS")]
    cn_paths = [*map(Path, controlnets), *shipped_controlnets()]
    return HostingPolicy(
        public=public,
        model_changes=changes,
        free_paths=not (public or reachable),
        catalog=Catalog.scan(folders, loras, cn_dirs, cn_paths),
        limits=Limits.public(env) if public else Limits.local(env),
    )


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    """``user:pass`` (several separated by commas) → Gradio's ``auth`` list; None when empty."""
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError("--auth must be user:password (several separated by commas)")
        pairs.append((user, password))
    return pairs
