"""The project's own text, from which the tiny and small presets' tokenizer (package data) is built.

Medical VQA vocabulary (modalities, anatomy, structures, findings) and the question and answer
phrasings of MeCoVQA-style data, expanded deterministically from templates, so that the text the
project trains and evaluates on tokenises into few tokens. The control tokens (`<SEG>`, `<image>`, …)
never appear here: they are added to the tokenizer afterwards, outside the learned vocabulary.

Run `python -m medplib.core.model.corpus` after editing it: that retrains and rewrites `tiny_tokenizer.json`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Word lists, packed (one word per line would make this data the longest module in the tree).
# fmt: off
MODALITIES = (
    "CT", "MRI", "MR", "T1-weighted MRI", "T2-weighted MRI", "FLAIR MRI", "diffusion-weighted MRI", "PET",
    "PET-CT", "X-ray", "chest X-ray", "radiograph", "computed radiography", "mammography", "ultrasound",
    "echocardiography", "endoscopy", "colonoscopy", "dermoscopy", "fundus photography", "OCT",
    "fluorescence microscopy", "light microscopy", "histopathology", "immunohistochemistry",
    "electron microscopy", "angiography", "fluoroscopy", "nuclear medicine", "SPECT",
)
ORGANS = (
    "brain", "skull", "head", "neck", "chest", "lung", "lungs", "heart", "aorta", "liver", "spleen", "kidney",
    "kidneys", "pancreas", "stomach", "bowel", "colon", "bladder", "prostate", "uterus", "ovary", "breast",
    "thyroid", "spine", "vertebra", "pelvis", "hip", "knee", "shoulder", "tibia", "femur", "hand", "foot",
    "abdomen", "retina", "eye", "skin", "gallbladder", "adrenal gland", "esophagus", "trachea", "bone",
)
STRUCTURES = (
    "grey matter", "gray matter", "white matter", "cerebrospinal fluid", "ventricle", "lateral ventricle",
    "cortex", "cerebellum", "brainstem", "thalamus", "hippocampus", "corpus callosum", "hemisphere",
    "left hemisphere", "right hemisphere", "cerebral hemisphere", "basal ganglia", "optic disc", "optic cup",
    "macula", "blood vessel", "vessel", "artery", "vein", "nucleus", "nuclei", "cell", "cells",
    "cell nucleus", "gland", "tissue", "stroma", "epithelium", "lymph node", "muscle", "fat", "rib",
    "diaphragm", "pleura", "airway", "bronchus", "left lung", "right lung", "left kidney", "right kidney",
    "liver lobe", "portal vein", "mass", "organ", "background", "brain mask", "region",
)
FINDINGS = (
    "lesion", "tumor", "tumour", "nodule", "cyst", "mass", "polyp", "fracture", "effusion", "edema",
    "hemorrhage", "haemorrhage", "infarct", "stroke", "calcification", "metastasis", "abscess", "atrophy",
    "inflammation", "pneumonia", "pneumothorax", "cardiomegaly", "consolidation", "opacity", "stenosis",
    "aneurysm", "carcinoma", "melanoma", "glioma", "meningioma", "hematoma", "ulcer", "scar", "overlay",
    "abnormality", "normal anatomy", "no abnormality",
)
PLANES = (
    "axial", "coronal", "sagittal", "transverse", "frontal", "lateral", "oblique",
)
ADJECTIVES = (
    "left", "right", "upper", "lower", "central", "peripheral", "anterior", "posterior", "medial", "superior",
    "inferior", "small", "large", "bright", "dark", "hyperintense", "hypointense", "hyperdense", "hypodense",
    "round", "irregular", "enhancing", "diffuse", "focal", "bilateral", "single", "multiple",
)
QUESTIONS = (
    "What modality is used to take this image?", "What is the modality of this image?",
    "Which imaging technique was used?", "Is this a {modality} image?", "Which organ is shown in this image?",
    "What part of the body is shown?", "Is the {organ} visible in this image?",
    "Is there a {finding} in the {organ}?", "Does this image show a {finding}?",
    "Where is the {finding} located?", "What abnormality is seen in the {organ}?",
    "In which plane is this {modality} image taken?", "Is this an {plane} slice?",
    "How many {structure} are visible?", "What is the structure in this region?",
    "What is shown in the marked region?", "Which organ does this region belong to?",
    "Is the region {adjective} or not?", "Describe the region.", "Describe the image in detail.",
    "Please segment the {structure} in this image.", "Please segment the {finding}.",
    "Can you segment the {structure}?", "Segment the {structure} of the {organ}.",
    "Where is the {structure}? Please output the segmentation mask.", "Show me the {finding} in the {organ}.",
)
ANSWERS = (
    "Yes.", "No.", "yes", "no", "It is {modality}.", "This is a {modality} image of the {organ}.",
    "The image shows the {organ}.", "The {finding} is in the {adjective} {organ}.", "It is the {structure}.",
    "This region is the {structure} of the {organ}.", "The region shows a {adjective} {finding}.",
    "There is a {adjective} {finding} in the {organ}.", "No {finding} is seen.",
    "The image is an {plane} {modality} slice of the {organ}.", "Sure, it is the segmentation result.",
    "Sure, here is the segmentation of the {structure}.", "Sure, the {finding} is segmented.",
    "It is located in the {adjective} part of the {organ}.",
)
CONVERSATION = (
    "You are MedPLIB, a medical imaging assistant.",
    "Answer questions about the image, about regions the user marks, and segment what is asked.", "USER:",
    "ASSISTANT:", "The answer is", "The mask shows", "Sure,", "Please", "image", "region", "mask",
    "segmentation", "segment", "question", "answer", "closed", "open",
)
# Everyday words of questions and requests, so that they tokenise whole.
WORDS = (
    "a", "an", "the", "this", "that", "these", "those", "it", "its", "is", "are", "was", "were", "be", "been",
    "being", "do", "does", "did", "can", "could", "would", "should", "will", "may", "might", "must", "shall",
    "has", "have", "had", "and", "or", "but", "not", "no", "yes", "of", "in", "on", "at", "by", "for", "with",
    "within", "inside", "from", "into", "onto", "over", "under", "between", "through", "along", "across",
    "about", "above", "below", "left", "right", "upper", "lower", "half", "side", "what", "which", "who",
    "where", "when", "why", "how", "whether", "there", "here", "any", "some", "each", "every", "all", "both",
    "either", "one", "show", "shows", "shown", "showing", "see", "seen", "visible", "appear", "appears",
    "contain", "contains", "containing", "include", "includes", "present", "find", "found", "locate",
    "located", "lie", "lies", "lying", "hold", "holds", "cover", "covers", "mark", "marks", "marked", "point",
    "outline", "segment", "identify", "identified", "name", "named", "tell", "describe", "description",
    "list", "give", "provide", "draw", "highlight", "please", "image", "images", "picture", "scan", "view",
    "section", "slice", "photo", "photograph", "kind", "type", "method", "technique", "modality", "plane",
    "orientation", "part", "body", "region", "area", "structure", "structures", "anatomy", "organ", "tissue",
    "larger", "smaller", "bigger", "more", "less", "acquired", "taken", "imaged", "produced", "made", "cut",
    "captured", "obtained", "summarise", "summarize", "summary", "brief", "briefly", "short", "say", "you",
    "me", "your", "my", "i", "we", "us", "comparing", "compare", "content", "signs", "sign", "evidence",
    "let",
)
# fmt: on


def _fill(template: str, combo: dict[str, str]) -> str:
    return template.format(**combo)


def corpus_lines() -> Iterator[str]:
    """Every line of the corpus, always in the same order (tokenizer training is deterministic)."""
    yield from CONVERSATION
    for words in (MODALITIES, ORGANS, STRUCTURES, FINDINGS, PLANES, ADJECTIVES, WORDS):
        yield " ".join(words)
        yield from words
    # Twice each (the tokenizer merges only pairs seen twice), capitalised mid-sentence (' Which') and
    # as a question starts, right after the turn's newline with no space ('Which'): to a byte-level BPE
    # these are three different words, and a start it never saw splits into pieces no word vector
    # reaches ('H' + 'ighlight').
    for _ in range(2):
        yield " " + " ".join(WORDS)
        yield " " + " ".join(word.capitalize() for word in WORDS)
        yield from (word.capitalize() for word in WORDS)
    # Round-robin over the vocabularies, so every word meets every template without a full product.
    cycles = [itertools.cycle(v) for v in (MODALITIES, ORGANS, STRUCTURES, FINDINGS, PLANES, ADJECTIVES)]
    keys = ("modality", "organ", "structure", "finding", "plane", "adjective")
    for _ in range(max(map(len, (MODALITIES, ORGANS, STRUCTURES, FINDINGS)))):
        combo = {key: next(cycle) for key, cycle in zip(keys, cycles, strict=True)}
        for question, answer in zip(QUESTIONS, itertools.cycle(ANSWERS), strict=False):
            yield _fill(question, combo)
            yield f"USER: {_fill(question, combo)} ASSISTANT: {_fill(answer, combo)}"
        yield from (_fill(answer, combo) for answer in ANSWERS)


TINY_VOCAB_SIZE = 2048


def build_tiny_tokenizer_json(vocab_size: int = TINY_VOCAB_SIZE) -> str:
    """The tiny presets' BPE trained on `corpus_lines` (deterministic: same corpus, same ids)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer)
    return tokenizer.to_str()


if __name__ == "__main__":  # rebuild the shipped tokenizer after editing the corpus
    from medplib.core.model.tokenizer import TINY_TOKENIZER_FILE

    TINY_TOKENIZER_FILE.write_text(build_tiny_tokenizer_json(), encoding="utf-8")
    print(f"wrote {TINY_TOKENIZER_FILE}")
