"""The `dyn top` view model and renderer on synthetic payloads (no daemon, no terminal)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from dyn.dashboard.app import TopState, apply_key
from dyn.dashboard.history import Buckets, CounterWindow, HistogramWindow, bucket_quantile
from dyn.dashboard.keys import parse_keys
from dyn.dashboard.render import Screen, render_frame
from dyn.dashboard.source import parse_frontend_metrics
from dyn.dashboard.synthetic import step, synthetic_payload
from dyn.dashboard.view import FrontendSample, Tracker, bar, build_view, visible_window

INF = float("inf")


def _text(renderable, width: int = 140) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_rows_grouped_by_role_in_natural_order_with_bars_and_util():
    payload = synthetic_payload(72)
    view = build_view(payload, Tracker())
    assert [r.role for r in view.rows[:24]] == ["prefill"] * 24
    assert [r.id for r in view.rows[:12]][9:12] == ["prefill-9", "prefill-10", "prefill-11"]
    assert view.rows[-1].role == "frontend" and view.roles() == {"prefill": 24, "decode": 48, "frontend": 1}
    w = payload["workers"][1]
    row = view.rows[0]
    assert row.id == w["id"] and row.util_source == "gpu"
    assert row.util == pytest.approx(w["metrics"]["gpu.0.util_percent"] / 100)
    assert row.kv_usage == w["metrics"]["kv_usage"] and len(row.kv_bar) == 8
    assert view.rows[-1].util_source == "cpu" and view.rows[-1].util == pytest.approx(0.35)
    assert [d.name for d in view.domains] == ["nvl72-0"] and view.domains[0].num_workers == 72
    prefill_nvlink = sum(x["metrics"]["shuttle_gbps.nvlink"] for x in payload["workers"][1:25])
    assert view.domains[0].intra_gbps == pytest.approx(prefill_nvlink)


def test_header_rates_and_latency_percentiles_against_targets():
    payload = synthetic_payload(9)
    tracker = Tracker()
    bounds = (0.1, 0.25, 0.5, INF)
    tracker.observe(payload, FrontendSample(ttft=Buckets(bounds, (0, 0, 0, 0))), 0.0)
    step(payload, 2.0)
    tracker.observe(payload, FrontendSample(ttft=Buckets(bounds, (50, 90, 100, 100))), 2.0)
    h = build_view(payload, tracker).header
    assert h.requests_per_s == pytest.approx(20.0)
    expected_tok = sum(w["metrics"]["tokens_per_s"] for w in payload["workers"] if w["role"] != "frontend")
    assert h.tokens_per_s == pytest.approx(expected_tok)
    assert h.ttft_p50_s == pytest.approx(0.1)
    assert h.ttft_p99_s == pytest.approx(0.25 + 0.25 * 9 / 10)
    assert h.ttft_target_s == 0.3 and h.itl_p50_s is None
    assert 0 < h.hit_rate < 1
    frame = _text(render_frame(build_view(payload, tracker)))
    assert "p99 475ms / 300ms" in frame and "req/s 20.0" in frame


def test_windows_forget_old_samples_and_counter_resets():
    w = CounterWindow(60.0)
    for t in range(0, 121, 10):
        w.add(float(t), 100.0 * t if t < 100 else 10000 + t)
    assert w.rate() == pytest.approx((10120 - 6000) / 60)  # from the sample at the window start
    w.add(130.0, 5.0)  # restarted process
    assert w.rate() is None
    h = HistogramWindow(60.0)
    h.add(0.0, Buckets((1.0, INF), (10, 10)))
    h.add(70.0, Buckets((1.0, INF), (10, 20)))
    h.add(80.0, Buckets((1.0, INF), (10, 30)))
    assert h.count() == 20 and h.quantile(0.5) == 1.0  # +inf bucket: largest finite bound
    assert bucket_quantile(0.5, Buckets((1.0, INF), (0, 0))) is None
    with pytest.raises(ValueError, match="within"):
        bucket_quantile(1.5, Buckets((1.0,), (1,)))


def test_small_helpers():
    assert bar(0.0) == " " * 8 and bar(1.0) == "█" * 8 and bar(0.55, 10).startswith("█████▌")
    payload = synthetic_payload(8)
    payload["workers"][1]["gpus"] = [6, 0, 1, 2, 3]
    rows = {r.id: r for r in build_view(payload, Tracker()).rows}
    assert rows[payload["workers"][1]["id"]].gpus == "0-3,6" and rows["frontend"].gpus == "-"
    assert visible_window(576, 0, 40) == range(0, 40)
    assert visible_window(576, 575, 40) == range(536, 576)
    assert 300 in visible_window(576, 300, 40) and len(visible_window(576, 300, 40)) == 40
    assert visible_window(5, 3, 40) == range(5)
    assert parse_keys("q") == ["q"] and parse_keys("\x1b[A\x1b[B\t\r") == ["up", "down", "tab", "enter"]
    s = TopState()
    s = apply_key(s, "down", 5)
    s = apply_key(apply_key(s, "down", 5), "up", 5)
    assert s.selected == 1
    assert apply_key(TopState(selected=4), "tab", 5).selected == 0
    assert apply_key(TopState(), "up", 5).selected == 0
    assert apply_key(TopState(), "end", 5).selected == 4
    assert apply_key(TopState(detail_id="x"), "esc", 5).detail_id is None
    assert apply_key(s, "q", 5).quit


def test_frontend_metrics_text_parses_to_buckets():
    text = ("# TYPE dyn_frontend_ttft_seconds histogram\n"
            'dyn_frontend_ttft_seconds_bucket{le="0.1"} 3.0\n'
            'dyn_frontend_ttft_seconds_bucket{le="+Inf"} 4.0\n'
            "dyn_frontend_ttft_seconds_count 4.0\ndyn_frontend_ttft_seconds_sum 0.9\n")
    sample = parse_frontend_metrics(text)
    assert sample.ttft == Buckets((0.1, INF), (3.0, 4.0)) and sample.itl is None
    assert parse_frontend_metrics("garbage{{{") == FrontendSample()


@pytest.mark.parametrize("num_workers", [72, 576])
def test_renders_only_the_visible_rows(num_workers):
    """(How fast a frame of a big rack renders is measured by scripts/bench_top.py, not here.)"""
    payload = synthetic_payload(num_workers)
    tracker = Tracker()
    tracker.observe(payload, None, 0.0)
    step(payload, 1.0)
    tracker.observe(payload, None, 1.0)
    view = build_view(payload, tracker)
    frame = _text(render_frame(view, Screen(selected=num_workers // 2, height=50)))
    lines = frame.splitlines()
    assert len(lines) <= 50, len(lines)
    selected_id = view.rows[num_workers // 2].id
    assert any(line.startswith(selected_id + " ") for line in lines)
    assert f"of {num_workers + 1}" in frame


def test_detail_view_shows_metrics_and_log_lines():
    payload = synthetic_payload(6)
    entry = payload["workers"][3]
    view = build_view(payload, Tracker())
    frame = _text(render_frame(view, Screen(selected=2, height=40, detail=entry, detail_log="a\nlast line")))
    assert entry["id"] in frame and "kv_usage=" in frame and "last line" in frame
    assert "NVLink domains" not in frame


def test_errors_and_decisions_are_listed():
    payload = synthetic_payload(6)
    payload["workers"][2].update(state="failed", error="missed heartbeats for 7.0 s")
    payload["decisions"] = [{"action": "flip", "role": "decode", "num_workers": 1, "reason": "ITL over target"}]
    view = build_view(payload, Tracker())
    assert view.errors == ("prefill-1 on tray-0: missed heartbeats for 7.0 s",)
    assert view.decisions == ("flip decode x1: ITL over target",)
    frame = _text(render_frame(view))
    assert "missed heartbeats" in frame and "ITL over target" in frame


def test_trace_lines_filtered_and_merged_across_logs():
    import json as _json

    from dyn.dashboard.trace import merge, request_lines

    def log(process, *entries):
        return "\n".join([_json.dumps({"ts": ts, "level": "info", "process": process, "msg": msg,
                                       **({"request_id": rid} if rid else {})}) for ts, msg, rid in entries]
                         + ["Traceback (not json) abc-1"])

    frontend = log("frontend", (1.0, "accepted", "abc-1"), (1.5, "other", "abc-12"), (4.0, "done", "abc-1"))
    prefill = log("prefill-0", (2.0, "request finished: length", "abc-1"), (2.1, "idle", None))
    decode = log("decode-3", (3.0, "request finished: abort", "abc-1"), (3.5, "request finished: stop", "abc-1#1"),
                 (3.6, "other", "abc-12#1"))
    lines = merge([request_lines(t, "chatcmpl-abc-1", p)
                   for t, p in ((frontend, "frontend"), (prefill, "prefill-0"), (decode, "decode-3"))])
    assert [(ln.process, ln.msg) for ln in lines] == [
        ("frontend", "accepted"), ("prefill-0", "request finished: length"),
        ("decode-3", "request finished: abort"), ("decode-3", "request finished: stop (attempt #1 there)"),
        ("frontend", "done")]
    assert "prefill-0" in lines[1].render()
