"""Progress lines say what they work on: ``<label>: <what> i/n (detail), elapsed``."""

import logging

from msif_assets.engine import traversal
from msif_assets.engine.traversal import Progress, progress_label, set_progress_label_source

LOGGER = "msif_assets.engine.traversal"


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_progress_lines_carry_the_label_of_the_work(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with progress_label("pt_covariance [shard-03]"):
            Progress("covariance: batch", 64, every=0.0).update(22, "detail")
        Progress("covariance: batch", 64, every=0.0).update(23)
    first, second = _lines(caplog)
    assert first.startswith("pt_covariance [shard-03]: covariance: batch 22/64 (detail), ")
    assert second.startswith("covariance: batch 23/64, ")  # no label: the line as before


def test_label_source_names_the_work_when_no_label_is_set(caplog, monkeypatch):
    monkeypatch.setattr(traversal, "_label_source", None)
    set_progress_label_source(lambda: "ft_factors")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        Progress("eigendecomposition: module", 4, every=0.0).update(1)
        with progress_label("explicit"):  # an explicit label wins
            Progress("scoring: batch", 2, every=0.0).update(1)
        set_progress_label_source(lambda: 1 / 0)  # a failing source never breaks the work
        Progress("scoring: batch", 2, every=0.0).update(2)
    assert [line.split(",")[0] for line in _lines(caplog)] == [
        "ft_factors: eigendecomposition: module 1/4", "explicit: scoring: batch 1/2", "scoring: batch 2/2"]


def test_progress_is_rate_limited_unless_forced(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        progress = Progress("step", 3, every=3600.0)
        progress.update(1)
        progress.update(2, force=True)
    assert [line.split(",")[0] for line in _lines(caplog)] == ["step 2/3"]
