"""The `dyn top` loop: poll about once a second, redraw, react to keys at once.

Three modes: a full-screen live view when stdin and stdout are terminals;
a plain table printed every interval when they are not (logs, `watch`,
pipes); and `once`, one frame then return.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

from rich.console import Console
from rich.live import Live

from dyn.dashboard.keys import KeyReader
from dyn.dashboard.render import Screen, print_whole, render_frame
from dyn.dashboard.source import TopSource
from dyn.dashboard.view import DashboardView, Tracker, build_view


@dataclass(frozen=True, slots=True)
class TopState:
    selected: int = 0
    detail_id: str | None = None
    quit: bool = False


def apply_key(state: TopState, key: str, num_rows: int, page: int = 10) -> TopState:
    """One key press -> the next state (pure; q quits, arrows/tab move, enter/esc open/close details)."""
    last = max(num_rows - 1, 0)
    moves = {"up": -1, "k": -1, "backtab": -1, "down": 1, "j": 1, "tab": 1, "pgup": -page, "pgdn": page}
    if key in ("q", "Q"):
        return replace(state, quit=True)
    if key in moves:
        step = moves[key]
        selected = (state.selected + step) % (last + 1) if key in ("tab", "backtab") else state.selected + step
        return replace(state, selected=min(max(selected, 0), last))
    if key == "home":
        return replace(state, selected=0)
    if key == "end":
        return replace(state, selected=last)
    if key == "esc":
        return replace(state, detail_id=None)
    return state


async def run_top(name: str, console: Console, *, interval_s: float = 1.0, once: bool = False,
                  max_frames: int | None = None) -> None:
    """Show deployment `name` until q (interactive), Ctrl-C, or max_frames frames."""
    tracker = Tracker()
    async with TopSource(name) as source:
        if once:
            payload, frontend = await source.poll()
            tracker.observe(payload, frontend, time.monotonic())
            print_whole(console, render_frame(build_view(payload, tracker)))
            return
        async with KeyReader() as keys:
            if keys.is_active and console.is_terminal:
                await _live(source, tracker, keys, console, interval_s, max_frames)
            else:
                await _plain(source, tracker, console, interval_s, max_frames)


async def _plain(source: TopSource, tracker: Tracker, console: Console, interval_s: float,
                 max_frames: int | None) -> None:
    frames = 0
    while max_frames is None or frames < max_frames:
        started = time.monotonic()
        payload, frontend = await source.poll()
        tracker.observe(payload, frontend, started)
        console.rule(time.strftime("%H:%M:%S"))
        print_whole(console, render_frame(build_view(payload, tracker)))
        frames += 1
        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))


async def _live(source: TopSource, tracker: Tracker, keys: KeyReader, console: Console,
                interval_s: float, max_frames: int | None) -> None:
    state, view, payload = TopState(), None, {}
    detail_log, detail_for = "", None
    poll: asyncio.Task | None = None
    next_poll, frames = 0.0, 0
    key_task: asyncio.Task = asyncio.ensure_future(keys.queue.get())
    with Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False) as live:
        try:
            while not state.quit and (max_frames is None or frames < max_frames):
                if poll is None and time.monotonic() >= next_poll:
                    poll = asyncio.ensure_future(source.poll())
                timeout = max(0.05, next_poll - time.monotonic()) if poll is None else None
                done, _ = await asyncio.wait({t for t in (poll, key_task) if t is not None}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if poll is not None and poll in done:
                    payload, frontend = poll.result()
                    tracker.observe(payload, frontend, time.monotonic())
                    view, poll = build_view(payload, tracker), None
                    next_poll = time.monotonic() + interval_s
                    frames += 1
                if key_task in done:
                    key = key_task.result()
                    key_task = asyncio.ensure_future(keys.queue.get())
                    num_rows = len(view.rows) if view else 0
                    state = apply_key(state, key, num_rows)
                    if key == "enter" and view is not None and view.rows:
                        state = replace(state, detail_id=view.rows[min(state.selected, num_rows - 1)].id)
                if state.detail_id != detail_for:
                    detail_for = state.detail_id
                    detail_log = await source.log_tail(detail_for) if detail_for else ""
                if view is not None and not state.quit:
                    live.update(_frame(view, payload, state, detail_log, console.size.height), refresh=True)
        finally:
            for task in (poll, key_task):
                if task is not None:
                    task.cancel()


def _frame(view: DashboardView, payload: dict, state: TopState, detail_log: str, height: int):
    detail = None
    if state.detail_id is not None:
        detail = next((w for w in payload.get("workers") or [] if w.get("id") == state.detail_id), None)
    selected = min(state.selected, max(len(view.rows) - 1, 0))
    return render_frame(view, Screen(selected=selected, height=height, detail=detail, detail_log=detail_log))
