"""The generation settings table: validation (finite numbers, ranges, seeds) and one source of names and defaults
for the pipeline, the command line, the app's API, the sweep config and the PNG parameters."""

import argparse
import math

import pytest

from workbench import settings, sweep
from workbench.cli.common import add_sampling_arguments, sampling_kwargs
from workbench.metadata import KEY_ORDER, format_parameters, parse_parameters
from workbench.settings import MAX_SEED, SETTINGS, GenerationDefaults, GenerationSettings

FLOATS = [s.name for s in SETTINGS if s.kind == "float"]


@pytest.fixture(scope="module")
def pipe(embedded_pipeline):
    return embedded_pipeline


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_with_name_value_and_range(name, value):
    spec = settings.setting(name)
    with pytest.raises(ValueError) as info:
        GenerationSettings.resolve(**{name: value})
    message = str(info.value)
    assert message.startswith(f"{name} must be") and repr(value) in message, message
    assert f"{spec.low:g}" in message and f"{spec.high:g}" in message, message


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(shift=math.nan), ["shift", "nan", "(0, 100]"]),
        (dict(router_temperature=math.nan), ["router_temperature", "nan", "(0, 100]"]),
        (dict(expert_weights=[1, math.nan, 1, 1]), ["expert_weights", "nan", "finite"]),
        (dict(expert_weights={1: [1, 1, math.inf, 1]}), ["expert_weights[1]", "inf"]),
        (dict(guidance_interval=(math.nan, 1)), ["guidance_interval", "nan"]),
        (dict(seed="12"), ["seed", "'12'", str(MAX_SEED)]),
        (dict(seed=MAX_SEED + 1), ["seed", str(MAX_SEED + 1)]),
        (dict(seed=[0, "x"]), ["seed", "'x'"]),
        (dict(seed=1.5), ["seed", "1.5"]),
        (dict(num_images=True), ["num_images", "True"]),
    ],
)
def test_pipeline_refuses_bad_settings_before_generating(pipe, kwargs, words):
    with pytest.raises(ValueError) as info:
        pipe("a red circle", num_inference_steps=1, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_seed_accepts_the_whole_documented_range(pipe):
    common = dict(num_inference_steps=1, height=32, width=32)
    assert pipe("a red circle", seed=MAX_SEED, **common).seeds == [MAX_SEED]
    assert pipe("a red circle", seed=0, **common).seeds == [0]
    assert 0 <= pipe("a red circle", seed=-1, **common).seeds[0] <= MAX_SEED  # negative: random
    with pytest.raises(ValueError, match=f"between 0 and {MAX_SEED}"):
        pipe("a red circle", seed=MAX_SEED, num_images=2, **common)


def test_resolve_fills_the_models_defaults_and_only_those():
    model = GenerationDefaults(num_inference_steps=9, guidance_scale=2.0, shift=1.5, height=64, width=32,
                               sampler="heun", guidance_interval=[0.2, 0.9])  # fmt: skip
    resolved = GenerationSettings.resolve(model)
    assert (resolved.num_inference_steps, resolved.guidance_scale, resolved.shift) == (9, 2.0, 1.5)
    assert (resolved.height, resolved.width, resolved.sampler) == (64, 32, "heun")
    assert resolved.guidance_interval == (0.2, 0.9)
    assert resolved.router_temperature == 1.0 and resolved.skip_guidance_layers == ()
    assert GenerationSettings.resolve(model, shift=4).shift == 4.0
    with pytest.raises(ValueError, match="unknown generation settings"):
        GenerationSettings.resolve(model, colour="red")


def _names(where: str) -> set[str]:
    return {s.name for s in SETTINGS if getattr(s, where)}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings} - {"-h", "--help"}


def test_command_line_takes_exactly_its_settings_with_their_defaults(pipe):
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    assert _flags(parser) == {s.cli for s in SETTINGS if s.cli and not s.cli_needs}
    args = parser.parse_args([])
    kwargs = sampling_kwargs(args)
    assert set(kwargs) | {"seed"} == {s.name for s in SETTINGS if s.cli and not s.cli_needs}
    assert args.seed == settings.setting("seed").cli_default == 0
    assert GenerationSettings.resolve(pipe.defaults, **kwargs) == GenerationSettings.resolve(pipe.defaults)


def test_generate_command_takes_every_flag_of_the_settings_with_their_defaults(pipe):
    """``generate`` takes the inputs the input-bound flags need, so it has every setting's flag (--strength and
    --mask-blur included), with the settings' defaults and help texts, and passes them on as keywords."""
    from workbench.cli import generate

    assert {s.cli_needs for s in SETTINGS if s.cli_needs} == {"--init-image", "--mask", "--control"}
    assert {s.name for s in SETTINGS if s.cli_needs} == {
        "strength",
        "mask_blur",
        "controlnet_conditioning_scale",
        "control_guidance_start",
        "control_guidance_end",
    }
    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["generate"]
    assert {s.cli for s in SETTINGS if s.cli} <= _flags(sub)
    args = sub.parse_args(["--prompt", "x"])
    kwargs = sampling_kwargs(args, generate.INPUTS)
    assert set(kwargs) | {"seed"} == _names("cli")
    assert kwargs["strength"] == settings.default_value("strength") == 0.6
    assert kwargs["mask_blur"] is settings.default_value("mask_blur") is None
    assert GenerationSettings.resolve(pipe.defaults, **kwargs) == GenerationSettings.resolve(pipe.defaults)
    helps = {a.dest: a.help for a in sub._actions}
    assert helps["strength"].startswith(settings.setting("strength").help)
    assert helps["mask_blur"].startswith(settings.setting("mask_blur").help)
    given = sampling_kwargs(sub.parse_args(["--prompt", "x", "--strength", "0.3", "--mask-blur", "4"]), generate.INPUTS)
    assert (given["strength"], given["mask_blur"]) == (0.3, 4.0)
    control = ["--prompt", "x", "--controlnet-scale", "0.5", "--control-start", "0.1", "--control-end", "0.6"]
    given = sampling_kwargs(sub.parse_args(control), generate.INPUTS)
    assert [given[k] for k in ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")] == [
        0.5,
        0.1,
        0.6,
    ]


def test_frames_command_keeps_its_own_strength_flag():
    """``frames`` takes no start image: the image→image flags are not its; its ``--strength`` is the loopback's."""
    from workbench.cli import frames

    parser = argparse.ArgumentParser()
    frames.register(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["frames"]
    assert "--mask-blur" not in _flags(sub)
    args = sub.parse_args(["--prompt", "x", "--strength", "0.5"])
    assert "strength" not in sampling_kwargs(args) and "mask_blur" not in sampling_kwargs(args)


def test_app_api_takes_exactly_its_settings_with_their_defaults(pipe):
    pytest.importorskip("gradio")
    from workbench.ui.controls import generation_kwargs, sampling_defaults

    kwargs = generation_kwargs(**vars(sampling_defaults(pipe)))
    assert set(kwargs) == _names("app")
    assert kwargs["seed"] is None  # −1 in the app: random
    assert GenerationSettings.resolve(pipe.defaults, **kwargs) == GenerationSettings.resolve(pipe.defaults)


def test_sweep_takes_exactly_its_settings_with_their_defaults(pipe, tmp_path):
    config = sweep.parse_config({"output_dir": str(tmp_path), "prompts": ["a red circle"]})
    kwargs = sweep.pipeline_kwargs(sweep.expand(config)[0].settings)
    assert set(kwargs) == _names("sweep")
    assert {k for k, s in sweep.SETTINGS.items() if s.kwarg} == {s.sweep for s in SETTINGS if s.sweep}
    assert GenerationSettings.resolve(pipe.defaults, **kwargs) == GenerationSettings.resolve(pipe.defaults)


def test_sweep_checks_are_the_settings_checks(tmp_path):
    for key in ("shift", "router_temperature", "flow_temperature", "guidance"):
        with pytest.raises(ValueError, match=f"{key} must .*nan"):
            sweep.parse_config({"output_dir": str(tmp_path), "prompts": ["x"], key: math.nan})


def test_png_parameters_labels_and_types_come_from_the_settings():
    labels = dict(KEY_ORDER)
    for spec in SETTINGS:
        if spec.png:
            key = "steps" if spec.name == "num_inference_steps" else spec.name
            assert labels[key] == spec.png
    text = format_parameters(
        {"prompt": "p", "steps": 3, "seed": 7, "shift": 1.5, "skip_layer_guidance_start": 0.25, "height": 8, "width": 8}
    )
    parsed = parse_parameters(text)
    assert parsed["steps"] == 3 and isinstance(parsed["steps"], int) and parsed["seed"] == 7
    assert parsed["shift"] == 1.5 and parsed["skip_layer_guidance_start"] == 0.25


def test_settings_object_is_frozen_and_validated():
    value = GenerationSettings()
    with pytest.raises(AttributeError):
        value.shift = 2.0  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer between 1 and 1000, got 0"):
        GenerationSettings(num_inference_steps=0)
    with pytest.raises(ValueError, match="start=0.5"):
        GenerationSettings(skip_guidance_layers=(1,), skip_layer_guidance_start=0.5, skip_layer_guidance_stop=0.2)


def test_pipeline_call_takes_every_setting_with_its_default():
    """``Pipeline.__call__`` keeps its keyword API; its defaults are the table's (None: the model's or the table's)."""
    import inspect

    from workbench import Pipeline

    parameters = inspect.signature(Pipeline.__call__).parameters
    for spec in SETTINGS:
        assert spec.name in parameters, spec.name
        default = parameters[spec.name].default
        expected = None if spec.default is settings.MODEL_DEFAULT else spec.default
        assert default is None or default == expected, (spec.name, default, expected)
