"""The configuration of the composed MedPLIB model: the only way configuration reaches the model.

`MedPLIBConfig` nests a `CLIPVisionConfig` (vision tower), a `LlamaConfig` (the LLM) and a
`MedPLIBSamConfig` (SAM image encoder, prompt encoder and mask decoder), plus what joins them: the
projector, the region encoder, the `<SEG>` head and the ids of the control tokens. It saves as one
`config.json` and round-trips through `AutoConfig`.
"""

from __future__ import annotations

from typing import ClassVar

from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# OpenAI CLIP's normalisation; its mean is also the colour an image is padded with to make it square.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
# SAM normalises 0..255 pixels with these.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class MedPLIBSamConfig(PreTrainedConfig):
    """SAM's three parts as segment-anything builds them (`_build_sam`), every size explicit.

    Defaults are ViT-B at 1024 px, the geometry of the public SAM checkpoints.
    """

    model_type = "medplib_sam"
    base_config_key = "sam_config"

    image_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    global_attn_indexes: list[int] | tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    use_rel_pos: bool = True
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: list[float] | tuple[float, ...] = SAM_PIXEL_MEAN
    pixel_std: list[float] | tuple[float, ...] = SAM_PIXEL_STD
    mask_threshold: float = 0.0
    # SAM-Med2D's adapter branch in every image-encoder block (hidden width; 0: none, as plain SAM).
    adapter_hidden_dim: int = 0
    # How low-res masks reach the original size: "sam" (upscale, crop the padding, resize) or "medplib"
    # (MedPLIB's crop of the low-res mask by the SAM-scale size, then one resize; see `compat.py`).
    mask_postprocess: str = "sam"

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        # JSON has no tuples: keep one spelling so a reloaded config compares equal to the saved one.
        self.global_attn_indexes = list(self.global_attn_indexes)
        self.pixel_mean = list(self.pixel_mean)
        self.pixel_std = list(self.pixel_std)
        if self.mask_postprocess not in ("sam", "medplib"):
            raise ValueError(f"unknown mask_postprocess {self.mask_postprocess!r}; use 'sam' or 'medplib'")
        if self.image_size % self.patch_size:
            raise ValueError(f"SAM image_size {self.image_size} is not a multiple of {self.patch_size}")

    @property
    def embedding_size(self) -> int:
        """Side of SAM's image-embedding grid; masks come out at four times this."""
        return self.image_size // self.patch_size


class MedPLIBConfig(PreTrainedConfig):
    """Configuration of `MedPLIBForCausalLM`.

    The token-id fields name the control tokens the model acts on. `region_token_id` is the
    placeholder between `<region>` and `</region>` whose embedding is replaced by the region token.
    """

    model_type = "medplib"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig),
        "text_config": SubConfigSpec(config_class=LlamaConfig),
        "sam_config": SubConfigSpec(config_class=MedPLIBSamConfig),
    }

    vision_config: dict | CLIPVisionConfig | None = None
    text_config: dict | LlamaConfig | None = None
    sam_config: dict | MedPLIBSamConfig | None = None
    projector_type: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    image_mean: list[float] | tuple[float, ...] = CLIP_IMAGE_MEAN
    image_std: list[float] | tuple[float, ...] = CLIP_IMAGE_STD
    region_max_cells: int = 512
    # A LayerNorm on the image and region tokens. A pretrained LLaVA's projector learned to match its
    # frozen LLM's embedding scale; a tower and LLM trained together from scratch do not: the tiny
    # preset's image tokens grew to 100-700 times the norm of its word embeddings, and its attention
    # stayed diffuse (plane and which-half questions near chance). Off for LLaVA checkpoints.
    visual_token_norm: bool = False
    # Standardise each CLIP feature channel over the images and patches seen (BatchNorm) before the
    # projector. MNI152 slices share most of their features (a sagittal and an axial slice's mean image
    # tokens have cosine 0.95 in the tiny preset's stage II), so what tells images apart is a small part
    # of each token, and the LLM did not learn the plane even on its training images. An option no preset
    # sets (benchmarks/results/pipeline.md, "Session 10"); off for LLaVA.
    image_feature_standardize: bool = False
    # Word vectors the input embeddings of the tokenizer's word pieces start from when a preset is built
    # from scratch (`word_vectors.WORD_VECTORS`); read only by `build_medplib`. None: random rows.
    word_vectors: str | None = None
    # The word vectors' share of each such row's squared norm, the rest the row's random init
    # (`init_from_word_vectors`): below 1, antonyms that GloVe puts together start apart.
    word_vector_share: float = 1.0
    # The `<SEG>` prompt also modulates SAM's dense prompt (`grounding.DensePromptFiLM`). A SAM trained
    # from scratch has no absolute position in its mask features and learns to ignore a sparse prompt;
    # the tiny and small presets need it to tell left from right. Off for SAM checkpoints.
    seg_dense_film: bool = False
    # The region token's content and place (box and centroid) each get a LayerNorm before they are
    # added (`RegionEncoder`), so "which hemisphere holds this region" becomes learnable. An option:
    # no preset sets it (benchmarks/results/pipeline.md, "Session 8", for why not yet).
    region_location_norm: bool = False
    # The region token also gets what the region's pixels look like (`RegionEncoder.appearance`: each
    # channel's mean and spread inside the mask, at the CLIP input's resolution). The tiny CLIP's patch
    # features, sampled inside a thin region such as the cortical ribbon, name its structure for 0.60
    # of the test regions (linear probe); the pixels' mean and spread for 1.00. Not under `compat`.
    region_appearance: bool = False
    # The `<SEG>` state reads the request's token states before the head (`RequestReader`): a trunk
    # trained from scratch may not carry the structure's name to the `<SEG>` position. Switched on by
    # the tiny schedule's grounding stages (`StageSpec.seg_read_request`); off for loaded checkpoints
    # whose config lacks it and for the 7B preset.
    seg_read_request: bool = False
    # With `seg_read_request`: the reader's keys and values also carry the request tokens' input
    # embeddings (the words' identity; `StageSpec.seg_read_embeddings`). Off unless a stage sets it.
    seg_read_embeddings: bool = False
    # The reader reads each request token's input embedding as the model's build made it (kept in the
    # buffer `build_word_rows`), not as stage II trained it: stage II pulled " grey" and " white" to
    # cosine 0.81-0.89 from 0.41, and on the trunk at 0.89 no stage III start split grey from white
    # (benchmarks/results/pipeline.md, "Session 12"). Set at the build (`--option`); an option no
    # preset sets.
    seg_read_build_rows: bool = False
    # The `<SEG>` prompt also scales SAM's image embedding channel-wise (`grounding.ImageFiLM`), for
    # structures told apart by intensity, not place. Off unless a stage sets it (`StageSpec.seg_image_film`).
    seg_image_film: bool = False
    image_token_id: int = -1
    im_start_token_id: int = -1
    im_end_token_id: int = -1
    region_start_token_id: int = -1
    region_token_id: int = -1
    region_end_token_id: int = -1
    seg_token_id: int = -1
    tie_word_embeddings: bool = False
    # "medplib": a converted MedPLIB checkpoint that answers as MedPLIB's own code does (its template,
    # tokenisation, image padding, region sampling and mask rules; `compat.py`). None: medplib's own.
    compat: str | None = None
    # Experts stored in the checkpoint's routed MLPs (a converted MedPLIB checkpoint):
    # {"kind": "dense" | "lora", "layers": [...], "num_experts": K, "top_k": k, "names": [...], "rank": r}.
    # None: plain MLPs (medplib composes its own LoRA experts at load time, `router.moe`).
    routed_experts: dict | None = None
    # The experts the checkpoint holds, each with its head (`core/expert_heads.py`), built through its
    # spec's factory; and each head's trigger tokens' ids (token text -> id). A checkpoint from before
    # they were recorded holds the two built-ins, its `<SEG>` at `seg_token_id`.
    experts: list[str] | tuple[str, ...] = ("vision_language", "pixel_grounding")
    expert_token_ids: dict | None = None

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        self.experts = list(self.experts)
        self.expert_token_ids = dict(self.expert_token_ids or {})
        if "pixel_grounding" in self.experts and "<SEG>" not in self.expert_token_ids:
            self.expert_token_ids["<SEG>"] = self.seg_token_id
        self.image_mean = list(self.image_mean)
        self.image_std = list(self.image_std)
        if self.projector_type != "mlp2x_gelu":
            raise ValueError(f"unknown projector_type {self.projector_type!r}; only 'mlp2x_gelu' exists")
        if self.compat not in (None, "medplib"):
            raise ValueError(f"unknown compat profile {self.compat!r}; only 'medplib' exists")
        if self.region_max_cells < 1:
            raise ValueError(f"region_max_cells must be at least 1, got {self.region_max_cells}")
        if not 0 < self.word_vector_share <= 1:
            raise ValueError(f"word_vector_share must be in (0, 1], got {self.word_vector_share}")
        if self.region_appearance and self.compat is not None:
            raise ValueError(
                "region_appearance is medplib's own region encoding; "
                "a compat profile samples regions as MedPLIB does"
            )

    @property
    def num_image_tokens(self) -> int:
        """How many `<image>` placeholders one image takes: the CLIP patch grid, CLS dropped."""
        return self.patch_grid_size**2

    @property
    def patch_grid_size(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def control_token_ids(self) -> dict[str, int]:
        """Every token id the model gives a meaning beyond its embedding, by config field name."""
        return {
            name: getattr(self, name)
            for name in (
                "image_token_id",
                "im_start_token_id",
                "im_end_token_id",
                "region_start_token_id",
                "region_token_id",
                "region_end_token_id",
                "seg_token_id",
            )
        }
