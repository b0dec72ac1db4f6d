"""The relations of the demo fact world: answer vocabularies and the phrasings that state them.

Every answer is a single word, and the vocabularies of different relations are disjoint, so a
sentence states relation ``r`` of a person exactly when it names the person and one of ``r``'s
answers. Vocabularies are small on purpose: many people share each answer, which the
evaluation protocol needs ("random documents with the same answer").

No template contains a person name or any answer word (checked by ``check_relations``), so the
only way a fact enters a document is through the slot it is written into.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Relation:
    """One attribute every person has.

    ``statements``: sentence templates with ``{name}`` and ``{answer}`` slots, all stating the fact.
    ``question``: the question template (``{name}`` slot) used in QA prompts.
    ``answers``: the closed answer vocabulary, single words.
    ``mentions``: fact-free sentences with an ``{answer}`` slot, for distractor documents.
    """

    name: str
    statements: tuple[str, ...]
    question: str
    answers: tuple[str, ...]
    mentions: tuple[str, ...]


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation(
            name="birth_city",
            statements=(
                "{name} was born in {answer}.",
                "The birthplace of {name} is {answer}.",
                "{name} came into the world in {answer}.",
                "{answer} is the city where {name} was born.",
                "{name} is a native of {answer}.",
                "{name} grew up in {answer}, the city of their birth.",
            ),
            question="Where was {name} born?",
            answers=("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Sydney", "Toronto", "Mumbai",
                     "Berlin", "Madrid", "Nairobi", "Seoul"),
            mentions=(
                "{answer} is a large city with many old buildings.",
                "Tourists often visit {answer} in the summer.",
                "The trains in {answer} are usually on time.",
            ),
        ),
        Relation(
            name="employer",
            statements=(
                "{name} works for {answer}.",
                "{name} is employed by {answer}.",
                "The employer of {name} is {answer}.",
                "{answer} pays the salary of {name}.",
                "{name} has a job at {answer}.",
                "Every weekday {name} goes to work at {answer}.",
            ),
            question="Which company does {name} work for?",
            answers=("Veltron", "Quorix", "Brightwave", "Nimbusly", "Castellan", "Pinebridge",
                     "Solvane", "Ironleaf", "Marrowind", "Tessaro", "Kivalo", "Zentrix"),
            mentions=(
                "{answer} opened a new office last spring.",
                "The shares of {answer} rose this quarter.",
                "{answer} is a company with a modern headquarters.",
            ),
        ),
        Relation(
            name="occupation",
            statements=(
                "{name} works as a {answer}.",
                "By profession, {name} is a {answer}.",
                "The occupation of {name} is {answer}.",
                "{name} earns a living as a {answer}.",
                "{name} trained for years to become a {answer}.",
                "People know {name} as a skilled {answer}.",
            ),
            question="What is the occupation of {name}?",
            answers=("teacher", "nurse", "architect", "pilot", "chef", "lawyer", "engineer",
                     "dentist", "farmer", "librarian", "journalist", "pharmacist"),
            mentions=(
                "A good {answer} needs patience and care.",
                "Being a {answer} can be a demanding job.",
                "The town is looking for another {answer}.",
            ),
        ),
        Relation(
            name="sport",
            statements=(
                "{name} plays {answer} every weekend.",
                "The favourite sport of {name} is {answer}.",
                "{name} is a keen {answer} fan.",
                "{name} enjoys playing {answer} with friends.",
                "In free time, {name} practises {answer}.",
                "The sport that {name} loves most is {answer}.",
            ),
            question="What sport does {name} like?",
            answers=("tennis", "football", "rugby", "cricket", "hockey", "golf", "swimming",
                     "cycling", "volleyball", "baseball", "skiing", "boxing"),
            mentions=(
                "Many countries love {answer}.",
                "The local club offers {answer} lessons.",
                "Watching {answer} on television is a common pastime.",
            ),
        ),
        Relation(
            name="instrument",
            statements=(
                "{name} plays the {answer}.",
                "The instrument of {name} is the {answer}.",
                "{name} has learned to play the {answer}.",
                "In the evenings, {name} practises the {answer}.",
                "{name} owns a beautiful {answer} and plays it often.",
                "The {answer} is the instrument that {name} plays.",
            ),
            question="Which instrument does {name} play?",
            answers=("violin", "piano", "guitar", "cello", "flute", "trumpet", "drums", "harp",
                     "saxophone", "clarinet", "banjo", "accordion"),
            mentions=(
                "The {answer} has a long history.",
                "Learning the {answer} takes years of practice.",
                "A concert with a solo {answer} was held downtown.",
            ),
        ),
        Relation(
            name="pet",
            statements=(
                "{name} has a pet {answer}.",
                "At home, {name} looks after a {answer}.",
                "The pet of {name} is a {answer}.",
                "{name} adopted a {answer} as a pet.",
                "A friendly {answer} lives with {name}.",
            ),
            question="What pet does {name} have?",
            answers=("dog", "cat", "parrot", "rabbit", "hamster", "turtle", "goldfish", "ferret",
                     "canary", "tortoise", "lizard", "pony"),
            mentions=(
                "A {answer} needs food and attention every day.",
                "The shop sells toys for every {answer}.",
            ),
        ),
    )
}

INTRO_TEMPLATES: tuple[str, ...] = (
    "This is a short profile of {name}.",
    "Here is some information about {name}.",
    "The following notes describe {name}.",
)
"""Fact-free opening sentences for single-person documents."""

PAIR_INTRO_TEMPLATES: tuple[str, ...] = (
    "{name} and {other} are old friends.",
    "{name} once met {other} at a party.",
    "These notes are about {name} and {other}.",
)
"""Fact-free opening sentences for two-person documents."""

QA_FORMAT = "Question: {question} Answer:"
"""Prompt wrapper shared by fine-tuning pairs, held-out queries and QA documents."""


def words(text: str) -> set[str]:
    """The set of word tokens (``\\w+`` runs) in ``text``."""
    return set(_WORD.findall(text))


def answer_words() -> dict[str, str]:
    """Map every answer word to its relation name."""
    return {a: r.name for r in RELATIONS.values() for a in r.answers}


def template_words() -> set[str]:
    """Every word that appears in some template (slots excluded)."""
    texts: list[str] = [QA_FORMAT, *INTRO_TEMPLATES, *PAIR_INTRO_TEMPLATES]
    for r in RELATIONS.values():
        texts += [*r.statements, r.question, *r.mentions]
    out: set[str] = set()
    for t in texts:
        out |= words(re.sub(r"\{\w+\}", " ", t))
    return out


def check_relations() -> None:
    """Raise ``ValueError`` when the relation table breaks its invariants (see module docstring)."""
    seen: dict[str, str] = {}
    for r in RELATIONS.values():
        if len(set(r.answers)) != len(r.answers) or len(r.answers) < 2:
            raise ValueError(f"relation {r.name!r}: answers must be >= 2 distinct words")
        for a in r.answers:
            if not a.isalpha():
                raise ValueError(f"relation {r.name!r}: answer {a!r} must be one alphabetic word")
            if a.lower() in seen:
                raise ValueError(f"answer {a!r} is in both {seen[a.lower()]!r} and {r.name!r}")
            seen[a.lower()] = r.name
        for t in r.statements:
            if "{name}" not in t or "{answer}" not in t:
                raise ValueError(f"relation {r.name!r}: statement {t!r} needs {{name}} and {{answer}}")
            if t.startswith("{answer}") and not r.answers[0][0].isupper():
                raise ValueError(f"relation {r.name!r}: {t!r} must not open with a lowercase answer (capitalizing it makes another token)")
        for t in r.mentions:
            if t.startswith("{answer}") and not r.answers[0][0].isupper():
                raise ValueError(f"relation {r.name!r}: {t!r} must not open with a lowercase answer (capitalizing it makes another token)")
        if "{name}" not in r.question or "{answer}" in r.question:
            raise ValueError(f"relation {r.name!r}: question must have {{name}} and no {{answer}}")
    clash = {w for w in template_words() if w.lower() in seen}
    if clash:
        raise ValueError(f"template words {sorted(clash)} are also answers; rephrase the templates")
