"""Handler parameters that several tabs share, stated once: a dataclass of widget values that a decorator spreads into
one named parameter per field.

Gradio names an endpoint's API parameters after its handler's signature (and finds ``gr.Request`` and the like by
type hint), so a handler decorated with :func:`spread_fields` shows Gradio exactly the signature, defaults and type
hints of a hand-written handler that lists every widget value, while its body receives them as one object.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

Handler = Callable[..., Any]


def spread_fields(values_type: type, parameter: str) -> Callable[[Handler], Handler]:
    """Decorator: the handler's parameter named ``parameter`` (a ``values_type`` dataclass) becomes one parameter per
    field of ``values_type``, in field order, at that parameter's place and of its kind, annotated as the field. Calls
    gather those arguments into a ``values_type`` for the handler. When the parameter defaults to a ``values_type``
    (as an API endpoint's does), each field's parameter defaults to that value's field; otherwise none has a default.
    A generator handler stays a generator function."""
    fields = dataclasses.fields(values_type)
    names = [field.name for field in fields]

    def decorate(fn: Handler) -> Handler:
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        place = next((i for i, p in enumerate(params) if p.name == parameter), None)
        if place is None:
            raise TypeError(f"{fn.__qualname__} has no parameter {parameter!r} to spread into {names}")
        default = params[place].default
        if default is not inspect.Parameter.empty and not isinstance(default, values_type):
            raise TypeError(
                f"{fn.__qualname__}: {parameter!r} must default to a {values_type.__name__}, got {default!r}"
            )
        spread = [
            inspect.Parameter(
                field.name,
                params[place].kind,
                default=inspect.Parameter.empty if default is inspect.Parameter.empty else getattr(default, field.name),
                annotation=field.type,
            )
            for field in fields
        ]
        outer = signature.replace(parameters=[*params[:place], *spread, *params[place + 1 :]])

        def gather(args: tuple, kwargs: dict) -> tuple[list, dict]:
            bound = outer.bind(*args, **kwargs)
            bound.apply_defaults()
            given = bound.arguments
            given[parameter] = values_type(**{name: given.pop(name) for name in names})
            call_args: list = []
            call_kwargs: dict = {}
            for p in params:
                if p.kind is p.VAR_POSITIONAL:
                    call_args.extend(given[p.name])
                elif p.kind is p.VAR_KEYWORD:
                    call_kwargs.update(given[p.name])
                elif p.kind is p.KEYWORD_ONLY:
                    call_kwargs[p.name] = given[p.name]
                else:
                    call_args.append(given[p.name])
            return call_args, call_kwargs

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def handler(*args: Any, **kwargs: Any) -> Iterator[Any]:
                call_args, call_kwargs = gather(args, kwargs)
                return (yield from fn(*call_args, **call_kwargs))

        else:

            @functools.wraps(fn)
            def handler(*args: Any, **kwargs: Any) -> Any:
                call_args, call_kwargs = gather(args, kwargs)
                return fn(*call_args, **call_kwargs)

        handler.__signature__ = outer
        handler.__annotations__ = {
            p.name: p.annotation for p in outer.parameters.values() if p.annotation is not p.empty
        }
        if outer.return_annotation is not outer.empty:
            handler.__annotations__["return"] = outer.return_annotation
        return handler

    return decorate
