"""Recipe format details: defaults, modes, mock models, line lookups."""

from __future__ import annotations

import os

import pytest

from dyn.config.loader import parse_recipe
from dyn.config.recipe import PlannerSpec, RouterSpec
from dyn.errors import ConfigError


def test_minimal_aggregated_recipe_takes_format_defaults() -> None:
    recipe = parse_recipe("name: m\nmodel: {path: ~/ckpt}\nworkers: {both: {replicas: 2}}\n", "m.yaml")
    assert recipe.mode == "aggregated" and recipe.model.path == os.path.expanduser("~/ckpt")
    assert [(g.role, g.replicas, g.tp) for g in recipe.workers] == [("both", 2, 1)]
    assert recipe.router == RouterSpec() and recipe.planner == PlannerSpec()
    assert recipe.source == "m.yaml"


def test_empty_group_means_one_replica() -> None:
    recipe = parse_recipe("name: m\nmodel: {path: /m}\nmode: disaggregated\nworkers:\n  decode:\n", "m.yaml")
    assert recipe.group("decode").replicas == 1 and recipe.group("prefill") is None


def test_mock_model_path_is_optional_and_named() -> None:
    recipe = parse_recipe("name: m\nmodel: {engine: mock, mock: {num_kv_blocks: 64}}\n"
                          "workers: {both: {}}\n", "m.yaml")
    assert recipe.model.path == "mock" and recipe.model.mock.num_kv_blocks == 64


def test_mock_stream_is_coalesced_unless_asked_per_step() -> None:
    base = "name: m\nmodel: {engine: mock%s}\nworkers: {both: {}}\n"
    assert parse_recipe(base % "", "m.yaml").model.mock_stream == "coalesced"
    assert parse_recipe(base % ", mock_stream: per_step", "m.yaml").model.mock_stream == "per_step"
    with pytest.raises(ConfigError, match="mock_stream"):
        parse_recipe(base % ", mock_stream: per_token", "m.yaml")


def test_mock_workers_per_process_only_for_the_mock_and_a_fixed_fleet() -> None:
    base = "name: m\nmodel: {path: /m, engine: %s, mock_workers_per_process: %d}\nworkers: {both: {replicas: 4}}\n%s"
    assert parse_recipe(base % ("mock", 4, ""), "m.yaml").model.mock_workers_per_process == 4
    assert parse_recipe("name: m\nmodel: {engine: mock}\nworkers: {both: {}}\n").model.mock_workers_per_process == 1
    with pytest.raises(ConfigError, match="model.mock_workers_per_process.*must be at least 1"):
        parse_recipe(base % ("mock", 0, ""), "m.yaml")
    with pytest.raises(ConfigError, match="only engine mock hosts several workers in one process"):
        parse_recipe(base % ("torch", 2, ""), "m.yaml")
    with pytest.raises(ConfigError, match="the planner starts and stops single workers"):
        parse_recipe(base % ("mock", 2, "planner: {enabled: true}\n"), "m.yaml")


def test_line_of_finds_keys_and_parents() -> None:
    recipe = parse_recipe("name: m\nmodel:\n  path: /m\nworkers:\n  both:\n    replicas: 2\n", "m.yaml")
    assert recipe.line_of("workers.both.replicas") == 6
    assert recipe.line_of("workers.both.tp") == 5


def test_planner_range_must_hold_the_starting_replicas() -> None:
    text = ("name: m\nmodel: {path: /m}\nmode: disaggregated\nworkers:\n  decode: {replicas: 9}\n"
            "planner: {enabled: true, max_decode: 4}\n")
    with pytest.raises(ConfigError, match="outside the planner's range 1..4") as info:
        parse_recipe(text, "m.yaml")
    assert info.value.line == 5


def test_trtllm_cannot_run_on_cpu() -> None:
    with pytest.raises(ConfigError, match="GPUs only"):
        parse_recipe("name: m\nmodel: {path: /m, engine: trtllm, device: cpu}\nworkers: {both: {}}\n", "m.yaml")


def test_nested_unknown_key_names_full_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_recipe("name: m\nmodel:\n  path: /m\n  mock: {prefil_base_s: 1}\nworkers: {both: {}}\n", "m.yaml")
    assert info.value.field == "model.mock.prefil_base_s" and info.value.line == 4
    assert "did you mean 'prefill_base_s'" in str(info.value)


@pytest.mark.parametrize("section, key, value, field", [
    ("router", "session_ttl_s", "0", "router.session_ttl_s"),
    ("router", "prediction_ttl_s", "1000000", "router.prediction_ttl_s"),
    ("kv_tiers", "ttl_s", "-5", "kv_tiers.ttl_s"),
    ("kv_tiers", "retention_ttl_s", "0", "kv_tiers.retention_ttl_s"),
    ("kv_tiers", "retention_priority", "500", "kv_tiers.retention_priority"),
    ("kv_tiers", "max_retention_priority", "5000", "kv_tiers.max_retention_priority"),
])
def test_ttl_retention_and_session_fields_are_range_checked_with_their_line(section, key, value, field) -> None:
    text = f"name: m\nmodel: {{path: /m}}\nworkers: {{both: {{}}}}\n{section}:\n  {key}: {value}\n"
    with pytest.raises(ConfigError) as info:
        parse_recipe(text, "m.yaml")
    assert info.value.field == field and info.value.line == 5


def test_ttl_retention_and_session_fields_parse() -> None:
    recipe = parse_recipe("name: m\nmodel: {path: /m}\nworkers: {both: {}}\n"
                          "router: {session_ttl_s: 120, prediction_ttl_s: 30}\n"
                          "kv_tiers: {ttl_s: 300, retention_ttl_s: null, retention_priority: 3, "
                          "max_retention_priority: 10}\n", "m.yaml")
    assert (recipe.router.session_ttl_s, recipe.router.prediction_ttl_s) == (120, 30)
    tiers = recipe.kv_tiers
    assert (tiers.ttl_s, tiers.retention_ttl_s, tiers.retention_priority, tiers.max_retention_priority) == \
        (300, None, 3, 10)


def test_weights_section_defaults_and_values() -> None:
    base = "name: m\nmodel: {path: /m}\nworkers: {both: {}}\n"
    recipe = parse_recipe(base, "m.yaml")
    assert (recipe.weights.source, recipe.weights.peer_bandwidth_share) == ("auto", 0.5)
    recipe = parse_recipe(base + "weights: {source: peer, peer_bandwidth_share: 0.25}\n", "m.yaml")
    assert (recipe.weights.source, recipe.weights.peer_bandwidth_share) == ("peer", 0.25)


@pytest.mark.parametrize("body, where", [
    ("weights:\n  source: nfs\n", "m.yaml:5: weights.source"),
    ("weights:\n  source: peer\n  peer_bandwidth_share: 0\n", "m.yaml:6: weights.peer_bandwidth_share: must be in (0, 1]"),
    ("weights:\n  peer_bandwidth_share: 1.5\n", "m.yaml:5: weights.peer_bandwidth_share: must be in (0, 1]"),
    ("weights:\n  sources: disk\n", "m.yaml:5: weights.sources: unknown key"),
])
def test_bad_weights_settings_name_file_line_and_key(body: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_recipe("name: m\nmodel: {path: /m}\nworkers: {both: {}}\n" + body, "m.yaml")
    assert str(info.value).startswith(where), str(info.value)


@pytest.mark.parametrize("section, key, value", [
    ("router", "relaunch_wait_s", "0"),
    ("router", "relaunch_wait_s", "4000"),
    ("router", "breaker_failures", "0"),
    ("router", "breaker_cooldown_s", "-1"),
    ("router", "max_migrations", "101"),
    ("planner", "max_restarts", "-1"),
    ("planner", "restart_window_s", "0"),
])
def test_recovery_fields_are_range_checked_with_their_line(section, key, value) -> None:
    text = f"name: m\nmodel: {{path: /m}}\nworkers: {{both: {{}}}}\n{section}:\n  {key}: {value}\n"
    with pytest.raises(ConfigError) as info:
        parse_recipe(text, "m.yaml")
    assert info.value.field == f"{section}.{key}" and info.value.line == 5


def test_recovery_fields_parse() -> None:
    recipe = parse_recipe("name: m\nmodel: {path: /m}\nworkers: {both: {}}\n"
                          "router: {relaunch_wait_s: 45, breaker_failures: 5, breaker_cooldown_s: 2,"
                          " max_migrations: 8}\nplanner: {max_restarts: 1000, restart_window_s: 60}\n", "m.yaml")
    r, p = recipe.router, recipe.planner
    assert (r.relaunch_wait_s, r.breaker_failures, r.breaker_cooldown_s, r.max_migrations) == (45, 5, 2, 8)
    assert (p.max_restarts, p.restart_window_s) == (1000, 60)
