"""scikit-image's medical photographs: a fundus photograph and an immunohistochemistry stain.

Neither has masks, so they bring modality, body-region and description questions only. Each is one
image, so it is in the training split only. What they show is from scikit-image's documentation: a
normal left eye's fundus (CC0), and colonic glands stained for FHL2 with DAB and hematoxylin.
"""

from __future__ import annotations

from collections.abc import Iterator

from medplib.core.io import load_image
from medplib.core.io.registry_data import skimage_file
from medplib.trainers.data.sources.common import SINGLE_IMAGE_WORDINGS, SourceImage, fit_image

PHOTOS = {  # name in SKIMAGE_FILES: (modality, body region, subject)
    "retina": ("fundus photography", "eye", "a fundus photograph of a normal left eye"),
    "ihc": ("histopathology", "colon", "an immunohistochemistry-stained section of colonic glands"),
}


def photo_images() -> Iterator[SourceImage]:
    for name, (modality, body_region, subject) in PHOTOS.items():
        yield SourceImage(
            key=f"skimage_{name}",
            pixels=fit_image(load_image(skimage_file(name)).pixels),
            split="train",
            series=f"skimage/{name}",
            position=(0, 1),
            modality=modality,
            subject=subject,
            body_region=body_region,
            wordings=SINGLE_IMAGE_WORDINGS,
        )
