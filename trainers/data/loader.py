"""Reading MeCoVQA samples for training and evaluation, with a choice of what a bad sample does.

`on_error="skip"` leaves bad samples out (and keeps their issues for a report); `"reject"` refuses the
whole dataset, naming the first problems. Either way the checks are those of `medplib data check`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medplib.core.errors import InvalidInputError
from medplib.trainers.data.check import Issue, all_issues, check_files
from medplib.trainers.data.mecovqa import Sample, dataset_root, resolve_under, sample_files

OnError = Literal["skip", "reject"]


@dataclass(frozen=True)
class LoadedSamples:
    root: Path
    samples: list[Sample]
    issues: list[Issue]  # of the samples left out (empty when nothing was wrong)

    def path(self, relative: str) -> Path:
        """The file a sample names (image, region or mask), resolved under the root."""
        return resolve_under(self.root, relative)


def load_samples(
    source: Path, *, split: str | None = None, image_root: Path | None = None, on_error: OnError = "skip"
) -> LoadedSamples:
    """Samples of a dataset folder (all splits, or `split`'s file) or of one MeCoVQA JSON file."""
    if on_error not in ("skip", "reject"):
        raise InvalidInputError(f"on_error must be 'skip' or 'reject', got {on_error!r}")
    files = sample_files(source)
    if split is not None:
        files = [path for path in files if path.stem == split]
        if not files:
            raise InvalidInputError(f"{source} has no {split}.json")
    root = dataset_root(source, image_root)
    checked, other = check_files(files, root)
    issues = all_issues(checked, other)
    if issues and on_error == "reject":
        shown = "; ".join(issue.line() for issue in issues[:3])
        more = f" (and {len(issues) - 3} more)" if len(issues) > 3 else ""
        raise InvalidInputError(f"{source}: {len(issues)} problems in its samples: {shown}{more}")
    return LoadedSamples(root, [sample for sample, sample_issues in checked if not sample_issues], issues)
