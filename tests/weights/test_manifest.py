"""The arena layout and the weight manifest: deterministic, written once, validated."""

from __future__ import annotations

import json

import pytest
import torch

from dyn.engine.torch_runner import TorchModelRunner
from dyn.engine.weight_arena import ALIGN_BYTES, ArenaLayout
from dyn.weights.manifest import (ManifestError, WeightManifest, bad_tensors, build_manifest, manifest_path,
                                  read_manifest, weights_key, write_once)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    runner = TorchModelRunner.from_pretrained(tiny_dir, dtype="float32", num_blocks=2)
    key = weights_key(tiny_dir, engine="torch", dtype="float32")
    return runner, build_manifest(runner.model.arena, key=key, engine="torch")


def test_layout_aligns_every_tensor_and_cuts_whole_blocks():
    layout = ArenaLayout.plan([("a", (3, 5)), ("b", (7,)), ("c", (1000, 100))], dtype="float32", element_bytes=4)
    assert [s.offset for s in layout.slots] == [0, 256, 512]
    assert all(s.offset % ALIGN_BYTES == 0 for s in layout.slots)
    assert layout.arena_bytes % layout.block_bytes == 0 and layout.arena_bytes >= 512 + 400_000
    assert list(layout.blocks_of(layout.slots[2])) == list(range(0, (512 + 400_000 - 1) // layout.block_bytes + 1))


def test_manifest_lists_every_weight_with_its_hash_and_the_model_computes_on_the_arena(loaded):
    runner, manifest = loaded
    model = runner.model
    names = [t.name for t in manifest.tensors]
    assert names[:3] == ["embed", "norm", "lm_head"] and "layers.1.gate_up" in names
    assert manifest.num_blocks == model.arena.layout.num_blocks
    embed = next(t for t in manifest.tensors if t.name == "embed")
    assert embed.shape == tuple(model.embed.shape) and embed.nbytes == model.embed.numel() * 4
    assert model.embed.data_ptr() == model.arena.data.data_ptr() + embed.offset  # a view, not a copy
    assert bad_tensors(model.arena, manifest) == []
    model.layers[0].down[0, 0] += 1.0
    try:
        assert bad_tensors(model.arena, manifest) == ["layers.0.down"]
    finally:
        model.layers[0].down[0, 0] -= 1.0


def test_key_names_the_weights_not_just_their_shapes(tmp_path, tiny_dir):
    from dyn.engine.tiny import write_tiny_checkpoint

    same = weights_key(tiny_dir, engine="torch", dtype="float32")
    assert same == weights_key(tiny_dir, engine="torch", dtype="float32")
    assert same != weights_key(tiny_dir, engine="torch", dtype="bfloat16")
    assert same != weights_key(tiny_dir, engine="torch", dtype="float32", tp_size=2)
    other = write_tiny_checkpoint(tmp_path / "o", seed=8)  # same shapes and header, other values
    (other / "config.json").write_text((tiny_dir / "config.json").read_text())
    assert weights_key(other, engine="torch", dtype="float32") != same


def test_written_once_and_read_back_equal(tmp_path, loaded):
    _, manifest = loaded
    path = manifest_path(tmp_path, manifest.key)
    assert read_manifest(path) is None
    assert write_once(manifest, path) is True
    assert write_once(manifest, path) is False
    assert read_manifest(path) == manifest
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(version=9), "manifest version 9"),
    (lambda d: d.pop("block_hashes"), "malformed manifest"),
    (lambda d: d.update(arena_bytes=d["arena_bytes"] + 1), "do not make an arena"),
    (lambda d: d["tensors"][0].update(offset=1 << 40), "lies outside the arena"),
])
def test_malformed_manifests_are_refused_with_the_reason(tmp_path, loaded, mutate, message):
    _, manifest = loaded
    data = json.loads(json.dumps(manifest.to_dict()))
    mutate(data)
    with pytest.raises(ManifestError, match=message):
        WeightManifest.from_dict(data)
    path = tmp_path / "m.json"
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(path)


def test_tied_embeddings_share_one_arena_slot(tmp_path):
    from dyn.engine.tiny import write_tiny_checkpoint

    tied = write_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    model = TorchModelRunner.from_pretrained(tied, dtype="float32", num_blocks=2).model
    assert model.lm_head is model.embed
    assert "lm_head" not in [name for name, _ in model.named_weights()]
    assert torch.count_nonzero(model.embed) > 0


def test_a_gguf_file_is_keyed_by_its_header_and_sampled_pages(tmp_path):
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    first.write_bytes(b"GGUF" + bytes(range(256)) * 4096)
    second.write_bytes(b"GGUF" + bytes(range(256)) * 2048 + bytes(255 - i for i in range(256)) * 2048)
    key = weights_key(first, engine="torch", dtype="float32")
    assert key == weights_key(first, engine="torch", dtype="float32")
    assert key != weights_key(second, engine="torch", dtype="float32")
