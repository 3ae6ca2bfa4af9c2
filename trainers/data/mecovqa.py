"""The MeCoVQA sample format (LLaVA-style JSON), where its files lie, and how a dataset is read.

A sample is `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}, ...], "answer_type"?}`.
`<image>` opens the first human turn; a question marks a region as `<region>masks/x.png</region>`; a
grounding answer holds `<SEG>` followed by its mask, `<SEG><mask>masks/y.png</mask>` (the k-th `<SEG>`
of an answer goes with its k-th mask). Image and mask paths are relative to the dataset root and may
never leave it. Keys beyond LLaVA's (split, part, modality, structure, ...) are kept as they are.

A dataset is a folder (the root) holding one JSON list of samples per split (`train.json`, ...) and
the files they name; a released MeCoVQA file is such a list whose root is given separately.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from medplib.core.errors import InvalidInputError

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "<SEG>"
REGION_PATTERN = re.compile(r"<region>(.*?)</region>", re.S)
MASK_PATTERN = re.compile(r"<mask>(.*?)</mask>", re.S)
METADATA_FILE = "metadata.json"  # the dataset card's machine-readable half; not a list of samples

Part = Literal["C", "R", "G"]
PART_NAMES: dict[str, str] = {"C": "complex VQA", "R": "region VQA", "G": "grounding"}


class RecordTurn(BaseModel):
    model_config = ConfigDict(populate_by_name=True, coerce_numbers_to_str=True)

    speaker: Literal["human", "gpt"] = Field(alias="from")
    value: str


class Sample(BaseModel):
    """One MeCoVQA sample. Only LLaVA's keys are required; medplib's builder fills the others."""

    # Released files carry numeric ids and values; MedPLIB's own loader str()s them as well.
    model_config = ConfigDict(extra="allow", populate_by_name=True, coerce_numbers_to_str=True)

    id: str
    image: str | None = None
    conversations: list[RecordTurn] = Field(min_length=2)
    answer_type: str | None = Field(
        default=None, description="'closed' or 'open' (released: also 'OPEN', ...)"
    )
    split: str | None = None
    part: Part | None = Field(default=None, description="C complex VQA, R region VQA, G grounding")
    modality: str | None = None
    structure: str | None = Field(default=None, description="what a region or a grounding mask shows")
    plane: str | None = None
    question_kind: str | None = None
    template: str | None = Field(default=None, description="'<kind>/<number>' in trainers.data.templates")
    series: str | None = Field(
        default=None, description="what `position` is measured along, e.g. 'mni152/axial'"
    )
    position: tuple[int, int] | None = Field(
        default=None, description="[start, stop) the split was decided on"
    )
    mark: Literal["point", "box", "shape"] | None = Field(default=None, description="how a region was marked")

    @property
    def region_paths(self) -> list[str]:
        """Region mask paths, in the order the questions mark them."""
        return [
            p for t in self.conversations if t.speaker == "human" for p in REGION_PATTERN.findall(t.value)
        ]

    @property
    def mask_paths(self) -> list[str]:
        """Grounding mask paths, in answer order (one per `<SEG>` in a valid sample)."""
        return [p for t in self.conversations if t.speaker == "gpt" for p in MASK_PATTERN.findall(t.value)]

    @property
    def inferred_part(self) -> str:
        """`part` if given, else what the sample does: G with a mask, R with a region, C otherwise."""
        if self.part is not None:
            return self.part
        return "G" if self.mask_paths else "R" if self.region_paths else "C"

    def dump(self) -> dict:
        """The JSON object: 'from' for the speaker, unset optional keys left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def strip_references(text: str) -> str:
    """`text` with the image token and mask paths removed: what a model is shown or must say.

    `<region>masks/x.png</region>` becomes `<region></region>` and `<SEG><mask>m</mask>` becomes `<SEG>`.
    """
    text = MASK_PATTERN.sub("", REGION_PATTERN.sub("<region></region>", text))
    return text.replace(IMAGE_TOKEN, "").strip()


def path_problem(relative: str) -> str | None:
    """Why `relative` cannot name a file under a dataset root, judged on the text alone; None if it can.

    Absolute paths (POSIX, Windows drive or UNC), URIs and any `..` component are refused: a path
    that only dips out and back in (`masks/../masks/x.png`) is refused too, as no builder writes one.
    """
    if not relative.strip():
        return "empty path"
    if "\x00" in relative:
        return "path contains a NUL character"
    if "://" in relative or PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).anchor:
        return f"{relative!r} is absolute; paths must be relative to the dataset root"
    if ".." in PurePosixPath(relative.replace("\\", "/")).parts:
        return f"{relative!r} climbs out with '..'; paths must stay under the dataset root"
    return None


def resolve_under(root: Path, relative: str) -> Path:
    """`root / relative`, refused (InvalidInputError) when it leaves `root`, symlinks included."""
    problem = path_problem(relative)
    if problem is not None:
        raise InvalidInputError(problem)
    base = root.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise InvalidInputError(f"{relative!r} resolves to {target}, outside the dataset root {base}")
    return target


def split_files(root: Path) -> list[Path]:
    """The JSON files directly in `root` that hold a list of samples, by name; the card is skipped."""
    if not root.is_dir():
        raise InvalidInputError(f"{root} is not a folder")
    return sorted(p for p in root.glob("*.json") if p.name != METADATA_FILE and p.is_file())


def read_json_list(path: Path) -> list:
    """The JSON list in `path`; InvalidInputError if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, list):
        raise InvalidInputError(
            f"{path}: a MeCoVQA file holds a JSON list of samples, found {type(data).__name__}"
        )
    return data


def dataset_root(source: Path, image_root: Path | None = None) -> Path:
    """The folder a dataset's paths are relative to: `image_root`, else the dataset folder, else the
    folder of the one JSON file given."""
    if image_root is not None:
        return image_root
    return source if source.is_dir() else source.parent


def sample_files(source: Path) -> list[Path]:
    """The sample files of a dataset folder, or the one JSON file `source`."""
    if source.is_dir():
        return split_files(source)
    if source.is_file():
        return [source]
    raise InvalidInputError(f"{source} does not exist")
