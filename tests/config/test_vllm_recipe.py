"""`engine: vllm` recipes: the free-form engine_args are checked with file:line, without importing vLLM."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from dyn.config.engine_args import check_engine_args, vllm_engine_arg_fields
from dyn.config.loader import parse_recipe
from dyn.errors import ConfigError

HAS_VLLM = importlib.util.find_spec("vllm") is not None
FIELDS = {"enforce_eager": "bool", "kv_cache_dtype": "CacheDType", "max_num_seqs": "int | None",
          "swap_space": "float", "enable_expert_parallel": "bool"}


def _recipe(engine_args: str, engine: str = "vllm") -> str:
    return (f"name: m\nmodel:\n  path: /m\n  engine: {engine}\n  engine_args:\n{engine_args}"
            "workers: {both: {}}\n")


def test_known_engine_args_pass_through_in_order() -> None:
    assert list(check_engine_args({"enforce_eager": True, "swap_space": 4}, FIELDS)) == []


def test_unknown_engine_arg_suggests_the_closest_vllm_field() -> None:
    [(key, message, hint)] = check_engine_args({"enforce_eagr": True}, FIELDS)
    assert key == "enforce_eagr" and "EngineArgs" in message and hint == "did you mean 'enforce_eager'?"


def test_wrong_type_names_the_expected_annotation() -> None:
    [(key, message, _)] = check_engine_args({"enable_expert_parallel": "yes"}, FIELDS)
    assert key == "enable_expert_parallel" and "expected bool, got str 'yes'" in message
    assert list(check_engine_args({"swap_space": 2}, FIELDS)) == []  # an int is a fine float


def test_fields_dyn_derives_from_the_recipe_are_refused_with_the_recipe_field() -> None:
    [(key, message, hint)] = check_engine_args({"tensor_parallel_size": 8}, FIELDS)
    assert key == "tensor_parallel_size" and "set by dyn" in message and "workers.<role>.tp" in hint


def test_engine_args_belong_to_engine_vllm_only() -> None:
    with pytest.raises(ConfigError, match="only apply to engine vllm") as info:
        parse_recipe(_recipe("    enforce_eager: true\n", engine="torch"), "r.yaml")
    assert info.value.line == 5


@pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed: names are checked at worker start")
def test_recipe_error_has_file_line_and_key_path_and_vllm_stays_unimported() -> None:
    assert "enable_chunked_prefill" in vllm_engine_arg_fields()
    with pytest.raises(ConfigError) as info:
        parse_recipe(_recipe("    enforce_eager: true\n    max_num_seq: 4\n"), "r.yaml")
    err = info.value
    assert (err.path, err.line, err.field) == ("r.yaml", 7, "model.engine_args.max_num_seq")
    assert "did you mean 'max_num_seqs'?" in str(err)
    recipe = parse_recipe(_recipe("    enforce_eager: true\n    kv_cache_dtype: fp8\n"), "r.yaml")
    assert recipe.model.engine_args == (("enforce_eager", True), ("kv_cache_dtype", "fp8"))
    # Checking the names never imports vLLM (seconds, and torch): in a fresh interpreter.
    code = ("import sys; from dyn.config.loader import parse_recipe; "
            f"parse_recipe({_recipe('    enforce_eager: true' + chr(10))!r}, 'r.yaml'); "
            "assert 'vllm' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_gpu_memory_utilization_is_a_fraction() -> None:
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\]") as info:
        parse_recipe("name: m\nmodel:\n  path: /m\n  engine: vllm\n  gpu_memory_utilization: 1.5\n"
                     "workers: {both: {}}\n", "r.yaml")
    assert info.value.line == 5


def test_lora_adapters_are_named_directories_for_engine_vllm_and_enable_lora_in_vllm(tmp_path) -> None:
    """model.lora_adapters: name -> adapter directory; vLLM gets enable_lora and a max_loras; a
    bad entry is refused with file:line; the worker checks each adapter's rank against max_lora_rank."""
    import json

    from dyn.config.recipe import WorkerGroup
    from dyn.engine.vllm_args import engine_kwargs, lora_flags
    from dyn.engine.vllm_engine import _check_lora_ranks
    from dyn.errors import EngineError

    text = "name: m\nmodel:\n  path: /m\n  engine: vllm\n  lora_adapters:\n    sql: ~/lora/sql\n    chat/v2: /l/c\n" \
           "workers: {both: {}}\n"
    recipe = parse_recipe(text, "r.yaml")
    (sql, sql_dir), chat = recipe.model.lora_adapters
    assert sql == "sql" and sql_dir.endswith("/lora/sql") and not sql_dir.startswith("~") and chat == ("chat/v2", "/l/c")
    kwargs = engine_kwargs(recipe.model, WorkerGroup("both"), device="cpu")
    assert kwargs["enable_lora"] is True and kwargs["max_loras"] == 2
    assert lora_flags(recipe.model)[::2] == ["--lora-modules", "chat/v2=/l/c"]  # (as `dyn plan` shows the worker)
    for bad, line, why in [(text.replace("engine: vllm", "engine: torch"), 5, "only apply to engine vllm"),
                           (text.replace("sql: ~/lora/sql", "sql: ''"), 6, "expected the adapter's directory"),
                           (text.replace("chat/v2:", "'bad name!':"), 5, "must be 1-128"),
                           (text.replace("sql:", "m:"), 6, "cannot take the served model's name")]:
        with pytest.raises(ConfigError, match=why) as info:
            parse_recipe(bad, "r.yaml")
        assert info.value.line == line, (why, info.value)
    with pytest.raises(ConfigError, match="set by dyn"):
        parse_recipe(_recipe("    enable_lora: true\n"), "r.yaml")
    for rank in (8, 24):
        (tmp_path / str(rank)).mkdir()
        (tmp_path / str(rank) / "adapter_config.json").write_text(json.dumps({"r": rank}))
    _check_lora_ranks({"a": str(tmp_path / "8")}, 16)
    with pytest.raises(EngineError, match="'b' has rank 24, above vLLM's max_lora_rank 16; set model.engine_args"):
        _check_lora_ranks({"a": str(tmp_path / "8"), "b": str(tmp_path / "24")}, 16)
    with pytest.raises(EngineError, match="'gone'.*adapter_config.json"):
        _check_lora_ranks({"gone": str(tmp_path / "nowhere")}, 16)
