from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from msif_assets.demo.relations import RELATIONS, check_relations
from msif_assets.demo.world import FINETUNE, HELDOUT, WorldConfig, generate_world
from msif_assets.demo.world_io import load_world, save_world


def _units(doc) -> list[str]:
    """Sentences of prose documents; a QA document (question + answer) is one unit."""
    if doc.kind == "qa":
        return [doc.text]
    return re.split(r"(?<=[.?!])\s+", doc.text)


def _stated_facts(doc, world) -> set[tuple[str, str]]:
    """Facts read off the text: a unit naming a person and one of that relation's answers."""
    by_name = {e.name: e for e in world.entities}
    names = re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(by_name, key=len, reverse=True)) + r")\b")
    stated = set()
    for unit in _units(doc):
        unit_words = set(re.findall(r"\w+", unit))
        for name in set(names.findall(unit)):
            e = by_name[name]
            for relation, answer in e.facts:
                if answer in unit_words:
                    stated.add((e.entity_id, relation))
    return stated


@pytest.fixture(scope="module")
def default_world():
    return generate_world(WorldConfig())


def test_relation_table_is_consistent():
    check_relations()


def test_same_seed_same_world_and_other_seed_differs(tiny_world_cfg):
    a, b = generate_world(tiny_world_cfg), generate_world(tiny_world_cfg)
    assert a == b
    c = generate_world(replace(tiny_world_cfg, seed=tiny_world_cfg.seed + 1))
    assert [e.name for e in c.entities] != [e.name for e in a.entities]
    assert [d.text for d in c.documents] != [d.text for d in a.documents]


def test_finetune_and_heldout_entities_are_disjoint(default_world):
    w = default_world
    ft = {e.entity_id for e in w.entities if e.split == FINETUNE}
    ho = {e.entity_id for e in w.entities if e.split == HELDOUT}
    assert len(ft) == w.config.n_finetune_entities and len(ho) == w.config.n_heldout_entities
    assert not ft & ho
    names = {e.name for e in w.entities}
    assert len(names) == len(w.entities)
    assert {q.entity_id for q in w.finetune} == ft
    assert {q.entity_id for q in w.queries} == ho
    # No held-out fact ever appears as a QA document, and no held-out prompt is a training text.
    held_prompts = {q.prompt for q in w.queries}
    for d in w.documents:
        if d.kind == "qa":
            assert all(e in ft for e, _ in d.facts)
        assert not any(p in d.text for p in held_prompts)
    assert not held_prompts & {q.prompt for q in w.finetune}


def test_every_fact_is_in_docs_per_fact_documents(default_world):
    w = default_world
    counts: dict = {}
    for d in w.documents:
        if d.kind in ("bio", "mixed"):
            assert len(set(d.facts)) == len(d.facts)
            for f in d.facts:
                counts[f] = counts.get(f, 0) + 1
    assert set(counts.values()) == {w.config.docs_per_fact}
    assert len(counts) == w.config.n_entities * len(w.config.relations)
    assert {d.kind for d in w.documents} >= {"bio", "mixed", "distractor"}


def test_doc_facts_match_what_the_text_states(default_world):
    """Each document's ``facts`` is exactly what its text states; so gold docs state the queried
    fact and every non-gold document does not."""
    w = default_world
    stated = {d.doc_id: _stated_facts(d, w) for d in w.documents}
    for d in w.documents:
        assert stated[d.doc_id] == set(d.facts), d
    gold = {}
    for q, doc_id in w.gold:
        gold.setdefault(q, set()).add(doc_id)
    for q in w.queries:
        fact = (q.entity_id, q.relation)
        stating = {doc_id for doc_id, facts in stated.items() if fact in facts}
        assert stating == gold[q.query_id]
        assert len(stating) == w.config.docs_per_fact


def test_qa_pairs_are_well_formed(default_world):
    w = default_world
    for q in (*w.finetune, *w.queries):
        entity = w.entity(q.entity_id)
        assert q.completion == " " + entity.answer(q.relation)
        assert entity.name in q.prompt and q.prompt.endswith("Answer:")
    assert len({q.query_id for q in w.queries}) == len(w.queries)
    # Answers are shared: every relation has some answer held by several people.
    for relation in w.config.relations:
        answers = [e.answer(relation) for e in w.entities]
        assert max(answers.count(a) for a in RELATIONS[relation].answers) >= 5


def test_qa_mixing_adds_finetune_qa_documents(tiny_world_cfg):
    w = generate_world(replace(tiny_world_cfg, qa_docs_per_finetune_fact=1))
    qa_docs = [d for d in w.documents if d.kind == "qa"]
    assert len(qa_docs) == len(w.finetune)
    assert {d.text for d in qa_docs} == {q.prompt + q.completion for q in w.finetune}
    for d in qa_docs:
        assert _stated_facts(d, w) == set(d.facts)


def test_save_load_round_trip(tmp_path, tiny_world_cfg):
    w = generate_world(tiny_world_cfg)
    save_world(w, tmp_path)
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == ["shard-00.jsonl", "shard-01.jsonl"]
    assert load_world(tmp_path) == w
    first = json.loads((tmp_path / "corpus" / "shard-00.jsonl").read_text().splitlines()[0])
    assert {"doc_id", "text", "facts", "kind"} <= set(first)
    gold_rows = [json.loads(x) for x in (tmp_path / "gold.jsonl").read_text().splitlines()]
    assert {(r["query_id"], r["doc_id"]) for r in gold_rows} == set(w.gold)
    q = json.loads((tmp_path / "queries.jsonl").read_text().splitlines()[0])
    assert {"query_id", "prompt", "completion"} <= set(q)
    # Saving a world with fewer shards removes the stale shard files.
    save_world(generate_world(replace(tiny_world_cfg, n_shards=1)), tmp_path)
    assert [p.name for p in (tmp_path / "corpus").iterdir()] == ["shard-00.jsonl"]


def test_load_reports_bad_line_and_field(tmp_path, tiny_world_cfg):
    save_world(generate_world(tiny_world_cfg), tmp_path)
    path = tmp_path / "queries.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({"query_id": "q9", "prompt": "x"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"queries\.jsonl:3: missing field\(s\) \['completion'"):
        load_world(tmp_path)
    (tmp_path / "world.json").unlink()
    with pytest.raises(FileNotFoundError, match="world.json"):
        load_world(tmp_path)


@pytest.mark.parametrize("bad", [
    dict(n_heldout_entities=0), dict(relations=("birth_city", "colour")), dict(relations=()),
    dict(mixed_doc_fraction=1.5), dict(docs_per_fact=0), dict(seed="1"), dict(n_shards=0),
])
def test_config_validation_names_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        WorldConfig(**bad)


def test_too_many_entities_for_the_name_pool_is_a_clear_error():
    with pytest.raises(ValueError, match="unique_name_parts"):
        generate_world(WorldConfig(n_finetune_entities=900, n_heldout_entities=100))
