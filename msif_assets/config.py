"""One config file (TOML) plus environment variables, read and validated once.

Looked up in ``$MSIF_CONFIG``, else ``./msif.toml``; with neither, msif runs on the embedded
default world. Sections: ``[lake] root`` (a directory, or an object-store URI such as
``s3://bucket/prefix``), ``[inputs] inbox/pretrained_model/finetuned_model/
finetune_data/queries`` (all five, or none for the default world; optional ``text_column`` /
``id_column`` name the corpus text and id fields), ``[compute] …`` (any
``ComputeSettings`` field), ``[demo] dir/size``. ``MSIF_LAKE`` overrides the lake root. Every
bad key or value is a :class:`ConfigError` naming the file and key, before anything runs.
"""


import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .lake.inputs import CorpusColumns
from .lake.storage import LakeStorageError, lake_path
from .pipeline.settings import ComputeSettings, SettingsError

class ConfigError(ValueError):
    """msif.toml says something msif cannot use; the message names the file and key."""


INPUT_FIELDS = ("inbox", "pretrained_model", "finetuned_model", "finetune_data", "queries")
COLUMN_FIELDS = ("text_column", "id_column")  # optional [inputs] keys: the corpus fields (lake.inputs.CorpusColumns)


@dataclass(frozen=True)
class MsifConfig:
    """Where the lake is, what the user brought, and how to compute.

    ``compute`` may be given as a mapping of ``[compute]`` values: it is validated into
    :class:`ComputeSettings` here, over the default world's defaults when no inputs are given.
    """

    lake_root: str = "lake"
    inputs: dict[str, str] = field(default_factory=dict)
    compute: ComputeSettings | Mapping[str, Any] = field(default_factory=dict)
    demo_dir: str = ".msif/demo"
    demo_size: str = "default"
    source: str = "defaults"
    columns: CorpusColumns = field(default_factory=CorpusColumns)

    def __post_init__(self) -> None:
        if isinstance(self.compute, ComputeSettings):
            return
        raw = dict(self.compute)
        if self.is_demo:
            from .demo.settings import demo_compute_defaults

            try:
                raw = {**demo_compute_defaults(self.demo_size), **raw}
            except ValueError as err:
                raise ConfigError(f"{self.source}: {err}") from None
        try:
            object.__setattr__(self, "compute", ComputeSettings.from_config(raw, f"{self.source}: [compute]"))
        except SettingsError as err:
            raise ConfigError(str(err)) from None

    @property
    def is_demo(self) -> bool:
        return not self.inputs

    def demo_inputs(self) -> dict[str, str]:
        """Where the default world's producers write what the lineage then observes."""
        root = Path(self.demo_dir).expanduser().resolve()
        return {
            "inbox": str(root / "world" / "corpus"),
            "pretrained_model": str(root / "models" / "pretrained"),
            "finetuned_model": str(root / "models" / "finetuned"),
            "finetune_data": str(root / "world" / "finetune.jsonl"),
            "queries": str(root / "world" / "lake_queries.jsonl"),
        }

    def resolved_inputs(self) -> dict[str, str]:
        return self.demo_inputs() if self.is_demo else dict(self.inputs)


def load_config(path: str | os.PathLike | None = None) -> MsifConfig:
    candidate = Path(path or os.environ.get("MSIF_CONFIG") or "msif.toml")
    raw: dict = {}
    if candidate.is_file():
        try:
            raw = tomllib.loads(candidate.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{candidate}: {err} — fix the TOML syntax") from err
    elif path or os.environ.get("MSIF_CONFIG"):
        raise ConfigError(f"config file {candidate} does not exist")
    unknown = set(raw) - {"lake", "inputs", "compute", "demo", "counterfactual"}  # [counterfactual]: msif validate reads it
    if unknown:
        raise ConfigError(f"{candidate}: unknown section(s) {sorted(unknown)}; use lake, inputs, compute, demo, counterfactual")
    for section, keys in (("lake", {"root"}), ("demo", {"dir", "size"})):
        extra = set(raw.get(section, {})) - keys
        if extra:
            raise ConfigError(f"{candidate}: [{section}] unknown key(s) {sorted(extra)}; valid: {sorted(keys)}")
    inputs = dict(raw.get("inputs", {}))
    columns = _columns(candidate, {k: inputs.pop(k) for k in COLUMN_FIELDS if k in inputs})
    if columns != CorpusColumns() and not inputs:
        raise ConfigError(f"{candidate}: [inputs] {'/'.join(COLUMN_FIELDS)} name the fields of your own corpus; give "
                          f"the inbox and the other inputs too ({list(INPUT_FIELDS)}), or remove them for the default world")
    if inputs and set(inputs) != set(INPUT_FIELDS):
        missing, extra = set(INPUT_FIELDS) - set(inputs), set(inputs) - set(INPUT_FIELDS)
        raise ConfigError(f"{candidate}: [inputs] needs exactly {list(INPUT_FIELDS)}; missing {sorted(missing)}, unknown {sorted(extra)}")
    base = candidate.parent.resolve() if candidate.is_file() else Path.cwd()
    absolute = lambda p: str((base / Path(p).expanduser()).resolve())  # noqa: E731
    lake_root = os.environ.get("MSIF_LAKE") or _lake_root(candidate, raw.get("lake", {}).get("root", "lake"), base)
    demo = raw.get("demo", {})
    return MsifConfig(
        lake_root=lake_root,
        inputs={k: absolute(v) for k, v in inputs.items()},
        compute=raw.get("compute", {}),
        demo_dir=absolute(demo.get("dir", ".msif/demo")),
        demo_size=demo.get("size", "default"),
        source=str(candidate) if candidate.is_file() else "defaults",
        columns=columns,
    )


def _lake_root(source: Path, root: object, base: Path) -> str:
    """``[lake] root``: a URI (s3://bucket/prefix) as it is, a path relative to the config file."""
    if not isinstance(root, str) or not root.strip():
        raise ConfigError(f"{source}: [lake] root = {root!r} — give a directory or a URI such as \"s3://bucket/msif-lake\"")
    try:
        return str(lake_path(root if "://" in root else base / Path(root).expanduser(), "[lake] root"))
    except LakeStorageError as err:
        raise ConfigError(f"{source}: {err}") from None


def _columns(source: Path, given: dict[str, Any]) -> CorpusColumns:
    for key, value in given.items():
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{source}: [inputs] {key} = {value!r} — give a column name as a non-empty string, e.g. "
                              f"{key} = \"{'text' if key == 'text_column' else 'doc_id'}\"")
    return CorpusColumns(text=given.get("text_column", "text"), id=given.get("id_column"))
