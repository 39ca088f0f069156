"""Reciprocal rank fusion on hand-made rankings; configuration resolution; Search parameter rules."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from rerankd import config as cfg
from rerankd.config import (
    SECTIONS,
    BatchConfig,
    IndexConfig,
    LimitsConfig,
    ModelConfig,
    ServerConfig,
    Settings,
    add_arguments,
    env_name,
    flag_name,
    markdown_table,
    settings_from_args,
)
from rerankd.errors import ConfigError, InvalidArgument
from rerankd.stages.fusion import rrf
from rerankd.validation import resolve_search

# -- rrf --------------------------------------------------------------------------------------------------


def test_rrf_doc_in_both_legs():
    fused = dict(rrf([[7, 8, 9], [5, 6, 7]], k=60))
    assert fused[7] == pytest.approx(1 / 61 + 1 / 63)
    assert fused[8] == pytest.approx(1 / 62)
    assert fused[9] == pytest.approx(1 / 63)
    assert fused[5] == pytest.approx(1 / 61)
    assert fused[6] == pytest.approx(1 / 62)


def test_rrf_order_and_values():
    # a: ranks 1 and 2 -> 1/61 + 1/62; b: ranks 2 and 1 -> same score, same best rank 1: label order.
    # c: rank 3 in leg 1 only -> 1/63; d: rank 3 in leg 2 only -> 1/63 (tie -> label order).
    out = rrf([[10, 20, 40], [20, 10, 30]], k=60)
    assert [lb for lb, _ in out] == [10, 20, 30, 40]
    assert out[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert out[0][1] == out[1][1]
    assert out[2][1] == out[3][1] == pytest.approx(1 / 63)


def test_rrf_small_k():
    out = rrf([[1, 2], [2, 3]], k=1)
    assert dict(out) == pytest.approx({1: 1 / 2, 2: 1 / 3 + 1 / 2, 3: 1 / 3})
    assert [lb for lb, _ in out] == [2, 1, 3]


def test_rrf_tie_broken_by_best_single_leg_rank_then_label():
    # k=0: doc 50 at rank 2 in one leg scores 1/2; doc 30 at ranks 3 and 6 scores 1/3 + 1/6 == 1/2.
    assert 1 / 3 + 1 / 6 == 1 / 2  # an exact float tie
    legs = [[10, 50, 30], [11, 12, 13, 14, 15, 30]]
    out = rrf(legs, k=0)
    labels = [lb for lb, _ in out]
    assert dict(out)[50] == dict(out)[30] == 0.5
    assert labels.index(50) < labels.index(30)  # best rank 2 beats best rank 3, despite the label
    # Deterministic regardless of leg order.
    assert rrf(list(reversed(legs)), k=0) == out


def test_rrf_ties_by_label_are_independent_of_input_order():
    a = rrf([[3], [1], [2]], k=60)
    b = rrf([[2], [3], [1]], k=60)
    assert a == b
    assert [lb for lb, _ in a] == [1, 2, 3]


def test_rrf_label_listed_twice_in_a_leg_counts_once_at_its_best_rank():
    out = dict(rrf([[4, 5, 4, 6], [6]], k=60))
    assert out[4] == pytest.approx(1 / 61)  # not 1/61 + 1/63
    assert out[5] == pytest.approx(1 / 62)
    # Ranks are positions in the leg: the duplicate still takes position 3, so 6 is at rank 4.
    assert out[6] == pytest.approx(1 / 64 + 1 / 61)


def test_rrf_empty_legs_and_limit():
    assert rrf([]) == []
    assert rrf([[], []]) == []
    assert rrf([[], [3, 1]], k=60) == [(3, pytest.approx(1 / 61)), (1, pytest.approx(1 / 62))]
    out = rrf([[1, 2, 3, 4], [4, 3, 2, 1]], k=60)
    assert rrf([[1, 2, 3, 4], [4, 3, 2, 1]], k=60, limit=2) == out[:2]
    assert rrf([[1, 2, 3]], limit=0) == []
    assert rrf([[1, 2, 3]], limit=10) == rrf([[1, 2, 3]])


def test_rrf_matches_the_reference_on_random_rankings():
    """The numpy RRF against the plain dict-and-sort definition it replaced: same labels, same
    order (ties included), bit-identical scores, on random legs with overlaps, repeats and ties."""
    import random

    def reference(rankings, k=60, limit=None):
        scores, best = {}, {}
        for ranking in rankings:
            seen = set()
            for rank, label in enumerate(ranking, start=1):
                if label in seen:
                    continue
                seen.add(label)
                scores[label] = scores.get(label, 0.0) + 1.0 / (k + rank)
                best[label] = min(best.get(label, rank), rank)
        fused = sorted(scores.items(), key=lambda kv: (-kv[1], best[kv[0]], kv[0]))
        return fused[:limit] if limit is not None else fused

    rng = random.Random(5)
    for _ in range(500):
        pool = rng.randint(1, 60)
        legs = [[rng.randrange(pool) for _ in range(rng.randint(0, 40))] for _ in range(rng.randint(1, 3))]
        k, limit = rng.choice([0, 1, 20, 60]), rng.choice([None, 1, 5, 50])
        assert rrf(legs, k=k, limit=limit) == reference(legs, k=k, limit=limit), (legs, k, limit)
    import numpy as np

    assert rrf([np.array([3, 1]), np.array([1, 2])], k=20) == reference([[3, 1], [1, 2]], k=20)  # array legs


def test_rrf_single_leg_keeps_its_order():
    leg = [9, 3, 7, 1]
    out = rrf([leg], k=60)
    assert [lb for lb, _ in out] == leg
    assert [s for _, s in out] == pytest.approx([1 / 61, 1 / 62, 1 / 63, 1 / 64])


# -- config -----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def _settings(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    return settings_from_args(_parser().parse_args(argv), env=env or {})


def _all_fields():
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield section, f


def test_defaults_without_flags_or_env():
    assert _settings([]) == Settings()
    assert settings_from_args(None, env={}) == Settings()


def test_precedence_flag_over_env_over_default():
    env = {"RERANKD_EF_SEARCH": "64", "RERANKD_MAX_QUEUE": "99"}
    s = _settings(["--ef-search", "128"], env)
    assert s.index.ef_search == 128  # flag beats env
    assert s.batch.max_queue == 99  # env beats default
    assert s.index.hnsw_m == IndexConfig().hnsw_m  # default
    assert _settings([], env).index.ef_search == 64


@pytest.mark.parametrize(
    "raw, want",
    [("1", True), ("true", True), ("YES", True), (" on ", True), ("0", False), ("False", False), ("no", False), ("off", False)],
)
def test_bool_env(raw, want):
    assert _settings([], {"RERANKD_WARMUP": raw}).batch.warmup is want


def test_bool_env_invalid():
    with pytest.raises(ConfigError, match="RERANKD_WARMUP"):
        _settings([], {"RERANKD_WARMUP": "maybe"})


def test_bool_flag_beats_env():
    assert _settings(["--no-warmup"], {"RERANKD_WARMUP": "true"}).batch.warmup is False
    assert _settings(["--warmup"], {"RERANKD_WARMUP": "0"}).batch.warmup is True


def test_tuple_env_and_flag():
    assert _settings([], {"RERANKD_BATCH_SIZES": "1,2, 4 8"}).batch.batch_sizes == (1, 2, 4, 8)
    s = _settings(["--seq-buckets", "16", "48"], {"RERANKD_SEQ_BUCKETS": "1 2"})
    assert s.batch.seq_buckets == (16, 48)
    assert isinstance(s.batch.seq_buckets, tuple)
    assert _settings([]).batch.batch_sizes == BatchConfig().batch_sizes


def test_path_float_int_str_parsing(tmp_path):
    s = _settings(
        ["--data-dir", str(tmp_path / "d")],
        {
            "RERANKD_MODELS_DIR": str(tmp_path / "m"),
            "RERANKD_GRACE_PERIOD_S": "2.5",
            "RERANKD_THREADS": "3",
            "RERANKD_LISTEN": "unix:///tmp/x.sock",
        },
    )
    assert s.index.data_dir == tmp_path / "d" and isinstance(s.index.data_dir, Path)
    assert s.model.models_dir == tmp_path / "m" and isinstance(s.model.models_dir, Path)
    assert s.server.grace_period_s == 2.5
    assert s.model.threads == 3
    assert s.server.listen == "unix:///tmp/x.sock"
    with pytest.raises(ConfigError, match="RERANKD_THREADS"):
        _settings([], {"RERANKD_THREADS": "many"})


def test_every_field_has_a_flag_and_env_and_roundtrips():
    """Each field set through its env var (and through its flag) lands in that field only."""
    for section, f in _all_fields():
        default = getattr(getattr(Settings(), section), f.name)
        if isinstance(default, bool):
            raw, want, argv = ("0" if default else "1"), (not default), [f"--{'no-' if default else ''}{f.name.replace('_', '-')}"]
        elif isinstance(default, tuple):
            raw, want, argv = "3 5", (3, 5), [flag_name(f.name), "3", "5"]
        elif isinstance(default, Path):
            raw, want, argv = "/x/y", Path("/x/y"), [flag_name(f.name), "/x/y"]
        elif isinstance(default, (int, float)):
            raw, want, argv = "7", type(default)(7), [flag_name(f.name), "7"]
        else:
            raw, want, argv = "zz", "zz", [flag_name(f.name), "zz"]
        via_env = _settings([], {env_name(f.name): raw})
        via_flag = _settings(argv)
        for s in (via_env, via_flag):
            assert getattr(getattr(s, section), f.name) == want, (section, f.name)
            assert s == Settings().replace(**{section: {f.name: want}})


def test_env_and_flag_names_are_unique_across_sections():
    names = [f.name for _, f in _all_fields()]
    envs = [env_name(n) for n in names]
    assert len(set(envs)) == len(envs), sorted({e for e in envs if envs.count(e) > 1})
    assert all(e.startswith("RERANKD_") for e in envs)
    flags = [flag_name(n) for n in names]
    assert len(set(flags)) == len(flags)
    assert env_name("ef_search") == "RERANKD_EF_SEARCH" and flag_name("ef_search") == "--ef-search"


def test_markdown_table_lists_every_field():
    table = markdown_table()
    lines = table.splitlines()
    fields = list(_all_fields())
    assert len(lines) == 2 + len(fields)
    for line, (_, f) in zip(lines[2:], fields):
        assert f"`{flag_name(f.name)}`" in line and f"`{env_name(f.name)}`" in line
        assert f.metadata["help"].replace("|", "\\|") in line
        # exactly four cells: a "|" inside a help text is escaped, never a column break
        assert len(re.split(r"(?<!\\)\|", line)) == 6, line
    assert "`1 2 4 8 16 32`" in table  # tuples shown space-separated


def test_readme_embeds_the_current_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme, "README's configuration table is stale: paste `rerankd config`"


def test_settings_replace():
    s = Settings().replace(index={"ef_search": 64}, limits={"max_items": 3})
    assert s.index.ef_search == 64 and s.limits.max_items == 3
    assert s.index.hnsw_m == IndexConfig().hnsw_m
    assert Settings().index.ef_search == IndexConfig().ef_search  # original untouched


def test_sections_are_frozen_and_keyword_only():
    for cls in (ServerConfig, ModelConfig, BatchConfig, IndexConfig, LimitsConfig):
        with pytest.raises(TypeError):
            cls(1)  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cls(), dataclasses.fields(cls)[0].name, None)
    assert set(SECTIONS) == {f.name for f in dataclasses.fields(Settings)}
    assert cfg.DEFAULT_EMBEDDER == ModelConfig().embedder


# -- validation.resolve_search ---------------------------------------------------------------------------


LIMITS = LimitsConfig(max_candidates=1000, max_top_n=1000)


@pytest.mark.parametrize(
    "top_n, candidates, want",
    [
        (None, None, (10, 50)),
        (5, None, (5, 50)),
        (50, None, (50, 50)),
        (200, None, (200, 200)),
        (None, 10, (10, 10)),
        (None, 30, (10, 30)),
        (None, 5, (5, 5)),  # unset top_n: min(10, candidates) (a mutation audit: untested)
        (None, 1, (1, 1)),
        (3, 7, (3, 7)),
        (1, 1, (1, 1)),
        (1000, 1000, (1000, 1000)),
        (1000, None, (1000, 1000)),
    ],
)
def test_resolve_search_defaults(top_n, candidates, want):
    assert resolve_search(top_n, candidates, LIMITS) == want


def test_resolve_search_default_candidates_capped_by_limit():
    assert resolve_search(None, None, LimitsConfig(max_candidates=20)) == (10, 20)
    assert resolve_search(15, None, LimitsConfig(max_candidates=20, max_top_n=100)) == (15, 20)


@pytest.mark.parametrize(
    "top_n, candidates, field",
    [
        (0, None, "top_n"),
        (-1, None, "top_n"),
        (1001, None, "top_n"),
        (None, 0, "candidates"),
        (5, -3, "candidates"),
        (None, 1001, "candidates"),
        (20, 10, "top_n"),  # top_n larger than candidates
    ],
)
def test_resolve_search_errors_name_the_field(top_n, candidates, field):
    with pytest.raises(InvalidArgument) as ei:
        resolve_search(top_n, candidates, LIMITS)
    assert ei.value.field == field
    assert str(ei.value).startswith(f"{field}:")


def test_max_queue_below_the_largest_admitted_call_is_refused_at_start():
    """A queue smaller than the largest call the limits admit would answer such calls with a
    retryable RESOURCE_EXHAUSTED forever (found by a review): refused before any model loads."""
    import dataclasses

    from rerankd.errors import ConfigError
    from rerankd.pipeline import Pipeline

    s = Settings()
    small = dataclasses.replace(s, batch=dataclasses.replace(s.batch, max_queue=600))
    with pytest.raises(ConfigError, match=r"--max-queue 600 .*--max-candidates 1000"):
        Pipeline(small)


@pytest.mark.parametrize("section,name,value", [
    ("index", "rrf_k", -1),  # every hybrid Search failed with INTERNAL (division by zero)
    ("server", "max_concurrent_search", 0),  # every reranked Search: RESOURCE_EXHAUSTED forever
    ("server", "max_concurrent_calls", 0),
    ("limits", "max_candidates", 0),  # every default Search refused on top_n
    ("index", "hybrid_depth", 0),
    ("index", "auto_compact_ratio", float("nan")),
    ("index", "first_stage", "Hybrid"),  # every Search without first_stage refused, naming a field it never sent
    ("batch", "seq_buckets", (0, 64)),  # warmup: ZeroDivisionError
    ("batch", "batch_sizes", ()),
])
def test_settings_no_call_could_work_with_are_refused_at_start(section, name, value):
    """A review found settings that started a server which then failed every affected call:
    refused before any model loads, naming the flag."""
    from rerankd.config import check_settings, flag_name
    from rerankd.errors import ConfigError
    from rerankd.pipeline import Pipeline

    bad = Settings().replace(**{section: {name: value}})
    with pytest.raises(ConfigError, match=flag_name(name)):
        check_settings(bad)
    with pytest.raises(ConfigError, match=flag_name(name)):
        Pipeline(bad)
    check_settings(Settings())  # the defaults pass
    check_settings(Settings().replace(index={"rrf_k": 0, "snapshot_every": 0}, server={"max_concurrent_search": 1}))


def test_every_numeric_setting_has_a_minimum():
    """A new numeric setting must say its smallest value (MINIMUM), or check_settings skips it."""
    from rerankd.config import MINIMUM, SECTIONS

    numeric = {f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)
               if type(getattr(cls(), f.name)) in (int, float)}
    assert numeric - {"rerank_fusion_weight"} == set(MINIMUM)  # that one: check_fusion_weight (finite, >= 0)


def test_serve_with_a_bad_flag_exits_at_once_naming_it(tmp_path, capsys):
    from rerankd.cli import main

    rc = main(["serve", "--models-dir", str(tmp_path / "none"), "--data-dir", str(tmp_path / "data"),
               "--listen", "127.0.0.1:0", "--rrf-k", "-1"])
    assert rc == 2 and "--rrf-k (RERANKD_RRF_K) must be at least 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # refused before anything was opened


@pytest.mark.parametrize("flag,value", [
    ("--batch-order", "longest"), ("--score-activation", "softmax"), ("--openvino-compile", "per_shape"),
    ("--log-level", "chatty"), ("--backend", "tensorrt"), ("--precision", "int4"), ("--gpu-provider", "rocm"),
    ("--first-stage", "Hybrid"),
])
def test_serve_with_a_word_outside_its_choices_exits_at_once(tmp_path, capsys, flag, value):
    """A review found --batch-order/--score-activation/--openvino-compile typos binding the port and
    loading the models before failing with exit 1 and the field's name (and --log-level typos
    served at INFO)."""
    from rerankd.cli import main

    rc = main(["serve", "--models-dir", str(tmp_path / "none"), "--data-dir", str(tmp_path / "data"),
               "--listen", "127.0.0.1:0", flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and f"{flag} (" in err and f"got {value!r}" in err, err
    assert not (tmp_path / "data").exists()


def test_every_choice_names_a_string_setting_and_defaults_are_choices():
    from rerankd.config import CHOICES, SECTIONS, check_settings

    fields = {f.name: getattr(cls(), f.name) for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    for name, words in CHOICES.items():
        assert isinstance(fields[name], str) and fields[name] in words, name
    check_settings(Settings().replace(server={"log_level": "debug"}))  # levels are case-insensitive


@pytest.mark.parametrize("var,raw,says", [
    ("RERANKD_MAX_CANDIDATES", "abc", "as a whole number"),
    ("RERANKD_WARMUP", "maybe", "as a boolean"),
    ("RERANKD_SEQ_BUCKETS", "64,x", "as whole numbers"),
    ("RERANKD_EF_SEARCH", "", "as a whole number"),
])
def test_serve_with_an_unreadable_environment_value_names_the_variable(tmp_path, capsys, monkeypatch, var, raw, says):
    """Was a traceback ending in "invalid literal for int()", naming no variable."""
    from rerankd.cli import main

    monkeypatch.setenv(var, raw)
    rc = main(["serve", "--models-dir", str(tmp_path / "none"), "--data-dir", str(tmp_path / "data"),
               "--listen", "127.0.0.1:0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"rerankd serve: {var}: cannot read {raw!r} {says}"), err


def test_batch_token_budget_auto_resolves_per_backend():
    """0 = auto: 2048 on CPU backends (a Search's query waits for at most one 8 x 256 batch of an
    Upsert's documents; a review measured 15 s behind a 128-document Upsert), 8192 on cuda; an
    explicit budget is kept."""
    from rerankd.config import BatchConfig, resolve_batch

    assert BatchConfig().max_batch_tokens == 0
    assert resolve_batch(BatchConfig(), "openvino").max_batch_tokens == 2048
    assert resolve_batch(BatchConfig(), "onnxruntime").max_batch_tokens == 2048
    assert resolve_batch(BatchConfig(), "cuda").max_batch_tokens == 8192
    assert resolve_batch(BatchConfig(max_batch_tokens=4096), "cuda").max_batch_tokens == 4096
    # never below one sequence: a 4096-token embedder failed to start on the auto budget (a review)
    assert resolve_batch(BatchConfig(), "openvino", 4096).max_batch_tokens == 4096
    from rerankd.batcher import Batcher  # where the stages' batchers resolve it

    def forward(ids, mask, types):
        return ids[:, 0]

    assert Batcher("t", forward, BatchConfig(), max_length=256, static_shapes=False, backend="cuda").config.max_batch_tokens == 8192
    assert Batcher("t", forward, BatchConfig(), max_length=256, static_shapes=False).config.max_batch_tokens == 2048


def test_every_limit_admits_its_exact_value_and_refuses_one_more():
    """Each check was tested only far over its limit, so refusing the limit itself (">" turned
    ">=") went unnoticed (a mutation audit): the exact limit passes, one more names the field."""
    from rerankd.config import check_settings
    from rerankd.errors import ConfigError, InvalidArgument
    from rerankd.validation import (MAX_FILTER_CONDITIONS, MAX_FILTER_VALUES, check_count, check_filter,
                                    check_ids, check_metadata, check_query, check_text)

    lim = LimitsConfig(max_items=4, max_text_bytes=10, max_query_bytes=8, max_id_bytes=3, max_metadata_bytes=6)
    cases = [
        (lambda n: check_query("q" * n, lim), 8, "query"),
        (lambda n: check_count(n, lim, "items"), 4, "items"),
        (lambda n: check_text("t" * n, lim, "items[0].text"), 10, "items[0].text"),
        (lambda n: check_ids(["i" * n], lim, "items"), 3, "items[0].id"),
        (lambda n: check_metadata({"k": "v" * (n - 1)}, lim, "documents[0].metadata"), 6, "documents[0].metadata"),
        (lambda n: check_filter([("k", "v")] * n, lim), MAX_FILTER_CONDITIONS, "filter"),
        (lambda n: check_filter([("k", [str(i % 10) for i in range(n)])], lim), MAX_FILTER_VALUES, "filter[0].values"),
    ]
    for check, limit, field in cases:
        check(limit)  # the limit itself is allowed
        with pytest.raises(InvalidArgument) as ei:
            check(limit + 1)
        assert ei.value.field == field
    # --max-queue may equal the largest call the limits admit ("at least"), not one less
    s = Settings().replace(limits={"max_candidates": 100, "max_items": 300}, batch={"max_queue": 300})
    check_settings(s)
    with pytest.raises(ConfigError, match="--max-queue"):
        check_settings(s.replace(batch={"max_queue": 299}))
