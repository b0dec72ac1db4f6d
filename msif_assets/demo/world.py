"""A seeded synthetic fact world: fictional people, a pre-training corpus, QA data, ground truth.

People are split into *fine-tune* entities (their QA pairs form the fine-tuning set and may be
mixed into pre-training as QA documents) and *held-out* entities (their facts appear only in
pre-training prose; their QA pairs are the queries). A query's gold documents are exactly the
documents whose ``facts`` contain the queried ``(entity_id, relation)``.

Knowledge augmentation follows Allen-Zhu & Li ("Physics of LMs 3.1"): every fact is stated in
``docs_per_fact`` documents, each time with a randomly chosen phrasing, in shuffled sentence
order, grouped with other facts of the same person (and sometimes of a second person).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from faker import Faker

from msif_assets.demo.relations import (
    INTRO_TEMPLATES,
    PAIR_INTRO_TEMPLATES,
    QA_FORMAT,
    RELATIONS,
    answer_words,
    check_relations,
    template_words,
)

DOC_KINDS = ("bio", "mixed", "qa", "distractor")
FINETUNE, HELDOUT = "finetune", "heldout"


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a world; the same config always yields the same world.

    The default is sized so that generation plus both trainings (``TrainConfig()``) take a few
    minutes on two CPU cores.
    """

    seed: int = 0
    n_finetune_entities: int = 150
    n_heldout_entities: int = 50
    relations: tuple[str, ...] = ("birth_city", "employer", "occupation", "sport", "instrument")
    docs_per_fact: int = 4
    max_facts_per_doc: int = 3
    mixed_doc_fraction: float = 0.2
    intro_probability: float = 0.5
    qa_docs_per_finetune_fact: int = 0
    n_distractor_docs: int = 100
    n_shards: int = 4
    unique_name_parts: bool = True
    locale: str = "en_US"

    def __post_init__(self) -> None:
        object.__setattr__(self, "relations", tuple(self.relations))
        ints = {
            "n_finetune_entities": (self.n_finetune_entities, 1),
            "n_heldout_entities": (self.n_heldout_entities, 1),
            "docs_per_fact": (self.docs_per_fact, 1),
            "max_facts_per_doc": (self.max_facts_per_doc, 1),
            "qa_docs_per_finetune_fact": (self.qa_docs_per_finetune_fact, 0),
            "n_distractor_docs": (self.n_distractor_docs, 0),
            "n_shards": (self.n_shards, 1),
        }
        for name, (value, low) in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"WorldConfig.{name} must be an int >= {low}, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"WorldConfig.seed must be an int, got {self.seed!r}")
        for name in ("mixed_doc_fraction", "intro_probability"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be a number in [0, 1], got {value!r}")
        if not self.relations or len(set(self.relations)) != len(self.relations):
            raise ValueError(f"WorldConfig.relations must be non-empty and distinct, got {self.relations!r}")
        unknown = [r for r in self.relations if r not in RELATIONS]
        if unknown:
            raise ValueError(f"WorldConfig.relations: unknown {unknown}; choose from {sorted(RELATIONS)}")

    @property
    def n_entities(self) -> int:
        return self.n_finetune_entities + self.n_heldout_entities

    def to_dict(self) -> dict:
        d = asdict(self)
        d["relations"] = list(self.relations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WorldConfig":
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise ValueError(f"WorldConfig: unknown fields {sorted(extra)}")
        return cls(**{**d, "relations": tuple(d.get("relations", cls.relations))})


@dataclass(frozen=True)
class Entity:
    """A fictional person. ``facts`` maps relation name → answer word, in config order."""

    entity_id: str
    first_name: str
    last_name: str
    split: str  # FINETUNE or HELDOUT
    facts: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.last_name}"

    def answer(self, relation: str) -> str:
        return dict(self.facts)[relation]


@dataclass(frozen=True)
class Document:
    """A pre-training document. ``facts``: the ``(entity_id, relation)`` pairs its text states."""

    doc_id: str
    text: str
    kind: str  # one of DOC_KINDS
    shard: int
    facts: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class QAPair:
    """A question about one fact. ``completion`` starts with a space: ``" Paris"``.

    ``query_id`` is set for held-out queries and empty for fine-tuning pairs.
    """

    prompt: str
    completion: str
    entity_id: str
    relation: str
    query_id: str = ""


@dataclass(frozen=True)
class World:
    config: WorldConfig
    entities: tuple[Entity, ...]
    documents: tuple[Document, ...]
    finetune: tuple[QAPair, ...]
    queries: tuple[QAPair, ...]
    gold: tuple[tuple[str, str], ...]  # (query_id, doc_id), sorted
    _by_id: dict = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment]

    def entity(self, entity_id: str) -> Entity:
        if self._by_id is None:
            object.__setattr__(self, "_by_id", {e.entity_id: e for e in self.entities})
        return self._by_id[entity_id]

    def shard_documents(self, shard: int) -> list[Document]:
        return [d for d in self.documents if d.shard == shard]

    def gold_docs(self, query_id: str) -> list[str]:
        return [d for q, d in self.gold if q == query_id]


def qa_prompt(relation: str, name: str) -> str:
    """The QA prompt for ``relation`` of the person called ``name`` (no trailing space)."""
    return QA_FORMAT.format(question=RELATIONS[relation].question.format(name=name))


def _name_pool_bound(fake: Faker, banned: set[str], unique_parts: bool) -> int | None:
    """An upper bound on how many usable names the locale's lists allow (None if unknown)."""
    for provider in fake.get_providers():
        firsts, lasts = getattr(provider, "first_names", None), getattr(provider, "last_names", None)
        if firsts is None or lasts is None:
            continue
        firsts = {n for n in firsts if n.isalpha() and n.lower() not in banned}
        lasts = {n for n in lasts if n.isalpha() and n.lower() not in banned}
        if unique_parts:
            return min(len(firsts), len(lasts), len(firsts | lasts) // 2)
        return len(firsts) * len(lasts)
    return None


def _sample_names(fake: Faker, cfg: WorldConfig) -> list[tuple[str, str]]:
    """Distinct alphabetic (first, last) names that collide with no template or answer word."""
    banned = {w.lower() for w in template_words()} | {w.lower() for w in answer_words()}
    bound = _name_pool_bound(fake, banned, cfg.unique_name_parts)
    if bound is not None and cfg.n_entities > bound:
        raise ValueError(
            f"WorldConfig: {cfg.n_entities} entities exceed the at most {bound} distinct names that Faker "
            f"locale {cfg.locale!r} can give; lower the entity counts or set unique_name_parts=False"
        )
    names: list[tuple[str, str]] = []
    seen_full: set[tuple[str, str]] = set()
    parts: set[str] = set()
    misses = 0  # consecutive rejected draws; many in a row means the name pool is exhausted
    while len(names) < cfg.n_entities:
        if misses > 5_000:
            raise ValueError(
                f"WorldConfig: could not draw {cfg.n_entities} distinct names from Faker locale "
                f"{cfg.locale!r} (got {len(names)}); lower the entity counts or set "
                "unique_name_parts=False"
            )
        first, last = fake.first_name(), fake.last_name()
        ok = (first.isalpha() and last.isalpha() and not {first.lower(), last.lower()} & banned
              and (first, last) not in seen_full
              and not (cfg.unique_name_parts and (first in parts or last in parts)))
        if not ok:
            misses += 1
            continue
        misses = 0
        names.append((first, last))
        seen_full.add((first, last))
        parts |= {first, last}
    return names


def _fact_groups(entity: Entity, cfg: WorldConfig, rng: random.Random) -> list[tuple[Entity, tuple[str, ...]]]:
    """``docs_per_fact`` rounds; each round partitions the relations into groups of 1..max_facts."""
    groups = []
    for _ in range(cfg.docs_per_fact):
        rels = list(cfg.relations)
        rng.shuffle(rels)
        while rels:
            k = rng.randint(1, min(cfg.max_facts_per_doc, len(rels)))
            groups.append((entity, tuple(rels[:k])))
            rels = rels[k:]
    return groups


def _statement(entity: Entity, relation: str, rng: random.Random) -> str:
    template = rng.choice(RELATIONS[relation].statements)
    return template.format(name=entity.name, answer=entity.answer(relation))


def _fact_docs(entities: list[Entity], cfg: WorldConfig, rng: random.Random) -> list[tuple[str, str, tuple]]:
    """(kind, text, facts) for every bio and mixed document."""
    groups = [g for e in entities for g in _fact_groups(e, cfg, rng)]
    rng.shuffle(groups)
    n_mixed_target = int(round(cfg.mixed_doc_fraction * len(groups) / 2))
    docs = []
    i = 0
    while i < len(groups):
        (e1, rels1) = groups[i]
        if n_mixed_target > 0 and i + 1 < len(groups) and groups[i + 1][0] is not e1:
            (e2, rels2) = groups[i + 1]
            sentences = [_statement(e1, r, rng) for r in rels1] + [_statement(e2, r, rng) for r in rels2]
            rng.shuffle(sentences)
            intro = rng.choice(PAIR_INTRO_TEMPLATES).format(name=e1.name, other=e2.name)
            facts = tuple((e1.entity_id, r) for r in rels1) + tuple((e2.entity_id, r) for r in rels2)
            docs.append(("mixed", " ".join([intro, *sentences]), facts))
            n_mixed_target -= 1
            i += 2
            continue
        sentences = [_statement(e1, r, rng) for r in rels1]
        rng.shuffle(sentences)
        if rng.random() < cfg.intro_probability:
            sentences.insert(0, rng.choice(INTRO_TEMPLATES).format(name=e1.name))
        docs.append(("bio", " ".join(sentences), tuple((e1.entity_id, r) for r in rels1)))
        i += 1
    return docs


def _distractor_text(cfg: WorldConfig, rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 4)):
        rel = RELATIONS[rng.choice(cfg.relations)]
        sentences.append(rng.choice(rel.mentions).format(answer=rng.choice(rel.answers)))
    return " ".join(sentences)


def generate_world(cfg: WorldConfig | None = None) -> World:
    """Build the world described by ``cfg`` (default ``WorldConfig()``). Deterministic in ``cfg``."""
    cfg = cfg or WorldConfig()
    check_relations()
    rng = random.Random(cfg.seed)
    fake = Faker(cfg.locale)
    fake.seed_instance(cfg.seed)

    entities = []
    for i, (first, last) in enumerate(_sample_names(fake, cfg)):
        split = FINETUNE if i < cfg.n_finetune_entities else HELDOUT
        facts = tuple((r, rng.choice(RELATIONS[r].answers)) for r in cfg.relations)
        entities.append(Entity(f"p{i:04d}", first, last, split, facts))

    raw_docs = _fact_docs(entities, cfg, rng)
    finetune = [
        QAPair(qa_prompt(r, e.name), " " + e.answer(r), e.entity_id, r)
        for e in entities if e.split == FINETUNE for r in cfg.relations
    ]
    for qa in finetune:
        for _ in range(cfg.qa_docs_per_finetune_fact):
            raw_docs.append(("qa", qa.prompt + qa.completion, ((qa.entity_id, qa.relation),)))
    raw_docs += [("distractor", _distractor_text(cfg, rng), ()) for _ in range(cfg.n_distractor_docs)]
    rng.shuffle(raw_docs)
    if cfg.n_shards > len(raw_docs):
        raise ValueError(f"WorldConfig.n_shards={cfg.n_shards} exceeds the {len(raw_docs)} documents")
    documents = tuple(
        Document(f"d{i:05d}", text, kind, i % cfg.n_shards, facts)
        for i, (kind, text, facts) in enumerate(raw_docs)
    )

    rng.shuffle(finetune)
    queries = tuple(
        QAPair(qa_prompt(r, e.name), " " + e.answer(r), e.entity_id, r, query_id=f"q{j:04d}")
        for j, (e, r) in enumerate((e, r) for e in entities if e.split == HELDOUT for r in cfg.relations)
    )
    stated_in: dict[tuple[str, str], list[str]] = {}
    for d in documents:
        for fact in d.facts:
            stated_in.setdefault(fact, []).append(d.doc_id)
    gold = tuple(sorted((q.query_id, doc_id) for q in queries for doc_id in stated_in[(q.entity_id, q.relation)]))
    return World(cfg, tuple(entities), documents, tuple(finetune), queries, gold)
