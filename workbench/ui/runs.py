"""A tab's Generate and Stop buttons around its model job: Generate is disabled (and Stop enabled and red) from the
click until the job ends; Stop ends this tab's running job at its next step *and* removes its queued one, and no other
tab's; a failure shows as a message in the tab's status line, never as error badges on the job's output widgets.

Each tab stops through its own key, ``"<browser session>:<tab>"`` (:func:`run_key`), given to
:meth:`workbench.ui.session.Workbench.stream` as its session.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from workbench.ui.live import progress_html
from workbench.ui.session import MODEL_CONCURRENCY, Workbench

QUEUED = "Queued: waiting for the model…"
STOP_WAIT_S = 30.0  # how long Stop waits for the running step to end before it answers


def run_key(request: gr.Request | None, tab: str) -> str:
    """The stop key of ``tab`` in the browser session of ``request``."""
    return f"{getattr(request, 'session_hash', None) or ''}:{tab}"


def message_html(text: str, kind: str = "error") -> str:
    """A readable message for a tab's status line (``kind``: "error", "warning" or "info")."""
    colour = {"error": "var(--error-text-color, #b91c1c)", "warning": "#b45309"}.get(kind, "inherit")
    prefix = {"error": "Error: ", "warning": ""}.get(kind, "")
    return f'<p class="wb-message wb-{kind}" style="color:{colour};font-weight:600">{prefix}{html.escape(text)}</p>'


def with_messages(status: gr.components.Component, updates: Iterator[dict]) -> Iterator[dict]:
    """The updates of a job, with a ``gr.Error`` raised by it turned into a message in ``status``."""
    try:
        yield from updates
    except gr.Error as err:
        yield {status: message_html(str(err.message))}


def wire_run(
    wb: Workbench,
    tab: str,
    generate: gr.Button,
    stop: gr.Button,
    status: gr.components.Component,
    fn: Callable[..., Iterator[dict]],
    inputs: list,
    outputs: list,
    triggers: list | None = None,
) -> Any:
    """Wire ``fn`` (a generator handler whose updates include ``status``) to ``generate`` (and ``triggers``, such as
    a prompt's submit) with the button states above, and ``stop`` to end it; returns the job's event."""

    def busy() -> dict:
        return {
            generate: gr.update(interactive=False),
            stop: gr.update(interactive=True, variant="stop"),
            status: progress_html(0, QUEUED),
        }

    def idle() -> dict:
        return {generate: gr.update(interactive=True), stop: gr.update(interactive=False, variant="secondary")}

    def stopped(request: gr.Request) -> dict:
        # The job's progress updates travel apart from this answer: wait until the run has sent its last one, so
        # that "Stopped." is not overwritten by a step that was under way (a queued job is simply removed).
        key = run_key(request, tab)
        wb.stop(key)
        wb.wait_ended(key, STOP_WAIT_S)
        return {**idle(), status: message_html("Stopped.", "warning")}

    start = gr.on(
        [generate.click, *(triggers or [])],
        busy,
        None,
        [generate, stop, status],
        queue=False,
        show_progress="hidden",
        api_visibility="private",
    )
    job = start.then(
        fn,
        inputs,
        [*outputs, status] if status not in outputs else outputs,
        concurrency_id=MODEL_CONCURRENCY,
        show_progress="hidden",
        api_visibility="private",
    )
    job.then(idle, None, [generate, stop], queue=False, show_progress="hidden", api_visibility="private")
    stop.click(
        stopped,
        None,
        [generate, stop, status],
        cancels=[job],
        queue=False,
        show_progress="hidden",
        api_visibility="private",
    )
    return job


def ctrl_enter_js(textbox_id: str, button_id: str) -> str:
    """Page script for a textbox's focus event: Ctrl+Enter (⌘+Enter) in it clicks the button (once installed)."""
    return f"""() => {{
        const box = document.querySelector('#{textbox_id} textarea');
        if (!box || box.dataset.ctrlEnter) return;
        box.dataset.ctrlEnter = '1';
        box.addEventListener('keydown', (event) => {{
            if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {{
                event.preventDefault();
                document.querySelector('#{button_id}').click();
            }}
        }});
    }}"""


def stop_button(elem_id: str, render: bool = True) -> gr.Button:
    """A Stop button as it is while nothing runs: grey and disabled."""
    return gr.Button("Stop", variant="secondary", interactive=False, elem_id=elem_id, render=render)
