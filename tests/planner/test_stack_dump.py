"""hung_stack_report on real faulthandler dumps: the stuck thread's frames, not the waiting ones."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from dyn.planner.stack_dump import hung_stack_report

PROGRAM = textwrap.dedent("""
    import asyncio, faulthandler, logging, signal, sys, threading, time
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    logging.basicConfig(stream=sys.stderr, format="%(message)s", level=logging.INFO)

    def wait_for_the_listener():  # as vLLM's engine waits for a side-channel thread that died
        threading.Event().wait()

    threading.Thread(target=threading.Event().wait, daemon=True).start()  # waits for work
    if "stuck" in sys.argv:
        threading.Thread(target=wait_for_the_listener, daemon=True).start()
    logging.info("loading the engine")

    async def main():
        print("up", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
""")


def _dump(*args: str) -> str:
    """Every thread's stack, written by faulthandler on the signal the daemon sends."""
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
    finally:
        proc.kill()
        _, stderr = proc.communicate(timeout=10)
    return stderr


def test_the_stuck_thread_is_shown_and_the_waiting_ones_counted():
    report = hung_stack_report(_dump("stuck"))
    lines = report.splitlines()
    assert lines[0] == "loading the engine"  # the log line before the dump
    assert sum(1 for line in lines if "(most recent call first)" in line) == 1
    assert any("in wait_for_the_listener" in line for line in lines[2:6])  # its innermost frames
    assert "selectors.py" not in report
    assert lines[-1] == "(2 other thread(s) not shown; 2 of 3 were waiting for work)"


def test_all_threads_waiting_shows_the_thread_that_took_the_signal():
    lines = hung_stack_report(_dump()).splitlines()
    assert lines[1].startswith("Current thread 0x")
    assert any("selectors.py" in line for line in lines)  # the main thread's event loop
    assert lines[-1] == "(1 other thread(s) not shown; 2 of 2 were waiting for work)"


def test_dyn_frames_come_first_a_long_stack_is_cut_and_a_log_without_a_dump_is_its_tail():
    ours = [f'  File "/srv/venv/site-packages/dyn/engine/load{n}.py", line {n} in level{n}' for n in range(30)]
    theirs = ['  File "/srv/venv/site-packages/vllm/publisher.py", line 9 in run_loop']
    log = ["starting", "Thread 0x00007f00bb (most recent call first):", *theirs,
           "", "Thread 0x00007f00aa (most recent call first):", *ours]
    assert hung_stack_report("\n".join(log), frames=5).splitlines() == [
        "starting", "Thread 0x00007f00aa (most recent call first):", *ours[:5], "  ... 25 outer frames",
        "(1 other thread(s) not shown; 0 of 2 were waiting for work)"]
    plain = [f"line {n}" for n in range(50)]
    assert hung_stack_report("\n".join(plain), context_lines=3, frames=2).splitlines() == plain[-5:]
