"""Process logging: JSON lines from dyn, and a library's own handler still formats its lines."""

import json
import subprocess
import sys

SCRIPT = """
import logging, os, sys
from dyn.logs import setup_process_logging
setup_process_logging("dep", "worker-0")
logging.getLogger("dyn.worker").info("ready")
# as vLLM configures its logger: its own handler and format (pid, file and line), no propagation
lib = logging.getLogger("vllm.engine")
handler = logging.StreamHandler(sys.stdout)
handler.setFormatter(logging.Formatter("(pid=%(process)d) %(levelname)s [%(filename)s:%(lineno)d] %(message)s"))
lib.addHandler(handler)
lib.propagate = False
lib.info("Resolved architecture: %s", "LlamaForCausalLM")
print("pid", os.getpid())
"""


def test_json_lines_and_a_libraries_own_handler_both_format():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Logging error" not in result.stderr, result.stderr
    entry = json.loads(result.stderr.splitlines()[0])
    assert (entry["deployment"], entry["process"], entry["logger"], entry["msg"]) == ("dep", "worker-0",
                                                                                    "dyn.worker", "ready")
    lib_line, pid_line = result.stdout.splitlines()
    assert lib_line.startswith(f"(pid={pid_line.split()[1]}) INFO [") and lib_line.endswith(
        "Resolved architecture: LlamaForCausalLM")
