"""Profiles: the mock's measured profile is its timing model; files validate with named fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dyn.config.loader import load_recipe
from dyn.engine.profile import EngineProfile, ProfileError, load_profile, mock_profile, profile_path, save_profile
from dyn.engine.profiling import profile_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_measured_mock_profile_recovers_its_timing_model(tmp_path):
    recipe = load_recipe(ROOT / "recipes/mock-local.yaml")
    measured = profile_recipe(recipe)
    model = recipe.model.mock
    for role in ("prefill", "decode"):
        t = measured.roles[role].timing
        assert t.prefill_base_s == pytest.approx(model.prefill_base_s, rel=0.05)
        assert t.prefill_s_per_token == pytest.approx(model.prefill_s_per_token, rel=0.02)
        assert t.decode_s_per_seq == pytest.approx(model.decode_s_per_seq, rel=0.05)
        assert t.decode_base_s == pytest.approx(model.decode_base_s, rel=0.05)
        assert t.num_kv_blocks == model.num_kv_blocks
        assert len(measured.roles[role].prefill_samples) >= 4 and measured.roles[role].decode_samples
    path = save_profile(measured, tmp_path / "p.json")
    again = load_profile(path, recipe)
    assert again.roles["decode"].timing == measured.roles["decode"].timing
    assert again.method == "measured" and again.created_at


@pytest.mark.parametrize("name", ["llama-3.1-70b-nvl72", "llama-3.1-8b-hgx"])
def test_shipped_profiles_match_their_recipes(name):
    recipe_file = ROOT / "recipes" / f"{name}.yaml"
    profile = load_profile(profile_path(recipe_file), load_recipe(recipe_file))
    assert profile.method == "public-figures" and profile.sources and profile.kv_bytes_per_token > 0
    decode = profile.role("decode")
    # A realistic decode step: a few ms to tens of ms at a batch of 64 with 4k context each.
    assert 0.004 < decode.decode_step_s(64, 64 * 4096) < 0.05


def test_role_math():
    profile = mock_profile(load_recipe(ROOT / "recipes/mock-local.yaml"))
    role = profile.role("decode")
    t = role.timing
    assert role.prefill_step_s(1000) == pytest.approx(t.prefill_base_s + 1000 * t.prefill_s_per_token)
    budget = role.max_num_batched_tokens
    assert role.prompt_prefill_s(2 * budget + 10) == pytest.approx(2 * role.prefill_step_s(budget)
                                                                    + role.prefill_step_s(10))
    batch = role.max_decode_batch(0.010, 1000, 16)
    assert role.decode_step_s(batch, batch * 1000) <= 0.010 < role.decode_step_s(batch + 1, (batch + 1) * 1000)
    assert role.max_decode_batch(0.001, 1000, 16) == 0


def _doc() -> dict:
    return json.loads((ROOT / "recipes/llama-3.1-8b-hgx.profile.json").read_text())


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(version=99), "version"),
    (lambda d: d["roles"]["decode"]["timing"].update(decode_base_s=-1), "roles.decode.timing.decode_base_s"),
    (lambda d: d["roles"]["decode"]["timing"].pop("num_kv_blocks"), "roles.decode.timing.num_kv_blocks"),
    (lambda d: d["roles"].update(mixer=d["roles"]["decode"]), "roles"),
    (lambda d: d.update(block_size=0), "block_size"),
    (lambda d: d["roles"]["prefill"].update(max_batch_size="x"), "roles.prefill.max_batch_size"),
])
def test_bad_profile_names_the_field(tmp_path, mutate, field):
    doc = _doc()
    mutate(doc)
    path = tmp_path / "bad.profile.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert err.value.field == field and str(path) in str(err.value)


def test_profile_must_match_recipe(tmp_path):
    recipe = load_recipe(ROOT / "recipes/llama-3.1-70b-nvl72.yaml")
    doc = _doc()  # the 8B profile: block size 16, tp 1
    with pytest.raises(ProfileError, match="block_size"):
        load_profile(_write(tmp_path, doc), recipe)
    doc["block_size"] = 32
    with pytest.raises(ProfileError, match="tp=2"):
        load_profile(_write(tmp_path, doc), recipe)
    with pytest.raises(ProfileError, match="not JSON"):
        load_profile(_write(tmp_path, "{"), recipe)


def _write(tmp_path: Path, doc) -> Path:
    path = tmp_path / "p.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_profile_dict_round_trip():
    profile = mock_profile(load_recipe(ROOT / "recipes/mock-local.yaml"))
    assert EngineProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
