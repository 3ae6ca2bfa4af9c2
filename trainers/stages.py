"""The MedPLIB training recipe as data: what each stage trains, on which samples, with which losses.

One `StageSpec` per stage, read by the one training loop (`loop.py`); no stage has code of its own
beyond how its model is set up (`setup`): a plain model (I), one expert's LoRA on the shared trunk
(II, III, a plugin's expert, the joint baseline), or the trained experts composed by the router (IV).

Two schedules hold the numbers:

- `paper`: MedPLIB's values (DESIGN.md): stage I trains the projector only; LoRA r16 alpha 16 (II) and
  r8 alpha 16 (III), dropout 0.05; CE/BCE/Dice weights 1/1/5 (+ focal 1) in III and 1/2/0.5 in IV; AdamW
  betas (0.9, 0.95), no weight decay, gradient clipping at 1, warm-up over 1% of an epoch then linear
  decay; learning rates 1e-4 (II), 3e-4 (III, IV). It assumes pretrained CLIP, LLM and SAM weights.
- `tiny`: the same recipe for the `tiny` preset on 2 CPU cores. Its deviations, and why (`TINY_NOTES`).

Trainable parameters are named by group (`PARAMETER_GROUPS`: a regular expression over parameter
names as they are after the stage's setup: peft names a LoRA `...mlp.up_proj.lora_A.<expert>.weight`,
the router names its experts `...mlp.experts.<k>.lora_A.up_proj.weight`). Which samples an expert stage
trains on and with which loss weights comes from the expert's own `ExpertSpec` (`trains_on`,
`loss_weights`, `adapter`), so a plugin's expert trains through the same stage as the built-in ones.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medplib.core.errors import InvalidInputError
from medplib.core.expert_spec import ExpertSpec, LoraSpec, LossWeights, SampleFilter
from medplib.core.plugins import require_experts
from medplib.router.config import RouterConfig
from medplib.trainers.head_refit import HeadRefit
from medplib.trainers.prompt_contrast import PromptContrast
from medplib.trainers.restarts import Restarts
from medplib.trainers.router_fit import RouterFit

PARAMETER_GROUPS: dict[str, str] = {
    "vision_tower": r"^vision_tower\.",
    "projector": r"^projector\.",
    "region_adapter": r"^region_encoder\.",
    "embeddings": r"^language_model\.model\.embed_tokens\.",
    "lm_head": r"^language_model\.lm_head\.",
    "norms": r"^language_model\.model\.(layers\.\d+\.\w*layernorm|norm)\.",
    "attention": r"^language_model\.model\.layers\.\d+\.self_attn\.",
    "mlp": r"^language_model\.model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.(base_layer\.)?(weight|bias)$",
    "lora": r"_proj\.lora_[AB]\.",  # peft's: the stage's own adapter (one is attached at a time)
    "router": r"\.mlp\.router\.",
    "experts": r"\.mlp\.experts\.",
    "seg_head": r"^seg_head\.",
    # Every plugin expert's head (`<expert>_head.`); "expert_head" is the stage's own expert's alone.
    "expert_heads": r"^(?!seg_head\.)[a-z][a-z0-9_]*_head\.",
    "expert_head": r"(?!)",  # matches nothing here: per stage `^<expert>_head\.` (`StageSpec.pattern`)
    # The `<SEG>` token's own rows of the input embeddings and the LM head (`ROW_GROUPS`).
    "seg_token": r"^language_model\.(model\.embed_tokens|lm_head)\.weight$",
    # The stage's expert's trigger tokens' rows (its `special_tokens`, `config.expert_token_ids`).
    "expert_tokens": r"^language_model\.(model\.embed_tokens|lm_head)\.weight$",
    "sam_image_encoder": r"^sam\.image_encoder\.",
    "mask_decoder": r"^sam\.mask_decoder\.",
}
LLM = ("embeddings", "lm_head", "norms", "attention", "mlp")
# Groups that train only some rows of their matrices. `<SEG>` is new to the vocabulary: the grounding
# stage must learn to say it (LISA trains its [SEG] embedding) without moving the rows every other
# token, and so the stage II expert, reads. A stage that also trains the whole matrix trains every row.
ROW_GROUPS: dict[str, str] = {"seg_token": "seg_token_id", "expert_tokens": "expert_token_ids"}

StageKey = Literal["1", "2", "3", "4", "joint", "expert"]
STAGE_KEYS: tuple[str, ...] = ("1", "2", "3", "4", "joint", "expert")
DEFAULT_EXPERTS = {"2": "vision_language", "3": "pixel_grounding"}
ALL_TASKS = ("vqa", "region_vqa", "grounding")


class Optimization(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    warmup_fraction: float = Field(0.01, ge=0)  # of an epoch, as MedPLIB
    epochs: float = Field(gt=0)
    batch_size: int = Field(8, ge=1)  # per micro-batch and worker
    grad_accum: int = Field(1, ge=1)


class PairContrast(BaseModel):
    """A loss that makes two requests about one image give different masks (`losses.pair_contrast`).

    For each sample A whose batch holds a request B about the other structure of a pair on the same
    image: weight * relu(margin + softDice(pred_A, target_B) - softDice(pred_A, target_A)), summed
    over such samples and divided by the global batch as every loss is.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(3.0, ge=0)
    margin: float = Field(0.3, ge=0)
    pairs: tuple[tuple[str, str], ...] = (
        ("left hemisphere", "right hemisphere"),
        ("grey matter", "white matter"),
    )


class StageSpec(BaseModel):
    """One stage: its setup, what trains, which samples, which losses, how it is optimised."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    title: str
    setup: Literal["plain", "adapter", "compose"]
    trains: tuple[str, ...]  # keys of PARAMETER_GROUPS
    tasks: SampleFilter
    loss: LossWeights
    optim: Optimization
    expert: ExpertSpec | None = None  # the adapter an "adapter" stage trains
    routing_weight: float = Field(0.0, ge=0)  # stage IV: gates supervised by the experts' `trains_on`
    # Stage IV: the routing loss's extra weight on each sample's last prompt token, whose expert
    # decides between words and `<SEG>`; and samples weighed by their expert's inverse batch share.
    routing_decision_weight: float = Field(0.0, ge=0)
    routing_balanced: bool = False
    router: RouterConfig = RouterConfig()  # stage IV: top-k, capacity, load balancing, routed layers
    # Stage IV: fit each gate to the routing targets before training (`router_fit.fit_routers`).
    router_fit: RouterFit | None = None
    # Batches hold two grounding requests about different structures of one image side by side
    # (`sampling.paired_order`), so a mask loss can only fall if the two masks differ.
    same_image_pairs: bool = False
    contrast: PairContrast | None = None  # needs `same_image_pairs` to find its pairs
    prompt_contrast: PromptContrast | None = None  # on the `<SEG>` prompts, by structure
    # Each step mirrors each axial or coronal image of its batch with this probability, "left" and
    # "right" swapped in its text (`mirror.py`).
    mirror: float = Field(0.0, ge=0, le=1)
    # Each step asks each grounding request and presence question of its batch in an extra training
    # wording with this probability (`rewording.py`).
    reword: float = Field(0.0, ge=0, le=1)
    # Each step shrinks the slice of each hemisphere request of its batch, with its target, with this
    # probability (`zoom.py`).
    zoom: float = Field(0.0, ge=0, le=1)
    # Probe a few starts (seeds) for a few steps and keep one whose signal has fallen (`restarts.py`).
    restarts: Restarts | None = None
    # The `<SEG>` state reads the request's token states (`MedPLIBConfig.seg_read_request`): a model
    # without the reader gets a fresh one before training (`stage_folder.prepare`).
    seg_read_request: bool = False
    # The reader's keys and values also carry the request tokens' input embeddings
    # (`MedPLIBConfig.seg_read_embeddings`); applies where the stage adds the reader.
    seg_read_embeddings: bool = False
    # The `<SEG>` prompt also scales SAM's image embedding channel-wise (`MedPLIBConfig.seg_image_film`):
    # a model without it gets a zero-gain one before training (`stage_folder.prepare`).
    seg_image_film: bool = False
    # Learning-rate multipliers by parameter group: a parameter of a listed group trains at `optim.lr`
    # times its scale (the first listed group it belongs to), every other one at `optim.lr`.
    lr_scales: dict[str, float] = {}
    # Stage IV: weight of the anchor loss that keeps each generic expert head's input state (the one
    # predicting its trigger token) where the composed model had it before training, routed wholly
    # to the head's expert, i.e. where its expert stage left it (`expert_training.anchor_states`).
    head_anchor: float = Field(0.0, ge=0)
    # Stage IV: after training, fit each generic expert head to the states the mixture gives it, so
    # it decides as it did on its expert stage's states (`head_refit.refit_heads`).
    head_refit: HeadRefit | None = None

    @field_validator("lr_scales")
    @classmethod
    def _known_groups(cls, scales: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(scales) - set(PARAMETER_GROUPS))
        if unknown:
            groups = ", ".join(PARAMETER_GROUPS)
            raise ValueError(f"lr_scales names unknown groups {unknown}; the groups: {groups}")
        if any(scale <= 0 for scale in scales.values()):
            raise ValueError(f"lr_scales must be positive, got {scales}")
        return scales

    def pattern(self, group: str) -> str:
        if group == "expert_head":
            return rf"^{self.expert.name}_head\." if self.expert is not None else r"^$"
        return PARAMETER_GROUPS[group]

    def trainable(self, parameter_name: str) -> bool:
        return any(re.search(self.pattern(group), parameter_name) for group in self.trains)

    def lr_scale(self, parameter_name: str) -> float:
        """The multiplier of `optim.lr` that `parameter_name` trains at (`lr_scales`)."""
        for group, scale in self.lr_scales.items():
            if re.search(self.pattern(group), parameter_name):
                return scale
        return 1.0

    def trained_rows(self, parameter_name: str) -> list[str]:
        """Config fields of the token ids whose rows alone `parameter_name` trains; [] for all rows."""
        whole = [g for g in self.trains if g not in ROW_GROUPS]
        if any(re.search(self.pattern(group), parameter_name) for group in whole):
            return []
        return [
            ROW_GROUPS[g]
            for g in self.trains
            if g in ROW_GROUPS and re.search(PARAMETER_GROUPS[g], parameter_name)
        ]

    def trained_row_ids(self, parameter_name: str, config: object) -> list[int]:
        """The token ids whose rows alone `parameter_name` trains ([] for all rows or none)."""
        ids = []
        for field in self.trained_rows(parameter_name):
            value = getattr(config, field)
            if isinstance(value, dict):  # expert_token_ids: this stage's expert's tokens
                ids += [value[token] for token in self.expert.special_tokens if token in value]
            else:
                ids.append(value)
        return ids

    @property
    def caches_clip(self) -> bool:
        """The CLIP tower is frozen: its features are computed once per image and reused."""
        return "vision_tower" not in self.trains

    @property
    def caches_sam(self) -> bool:
        return "sam_image_encoder" not in self.trains


# The joint-training baseline: one adapter with the larger of the two experts' shapes, on all data.
JOINT_EXPERT = ExpertSpec(
    name="joint",
    description="One adapter trained on all data at once: the baseline the MoE is compared with.",
    capabilities=("vqa", "region_vqa", "grounding"),
    adapter=LoraSpec(r=16, alpha=16, dropout=0.05),
    trains_on=SampleFilter(tasks=ALL_TASKS),
)
# The paper's IV weights; a plugin head's loss (head 1) still reaches its input states through the
# head, which stage IV leaves as its expert stage trained it (not in PAPER_TRAINS["4"]).
MOE_LOSS = LossWeights(ce=1.0, bce=2.0, dice=0.5, head=1.0)
# Stage IV keeps each plugin head's input state near its expert stage's (`StageSpec.head_anchor`; not
# in the paper, which has no plugin heads): without it the tiny MoE's modality head moved from -14 to
# +10 points from chain to chain; with it (and the head frozen) it scored what its expert stage scored
# on two of three seeds and 2 of 102 decisions fewer on the third (benchmarks/results/modality_expert.md);
# the tiny recipe's head refit after training (`TINY_STAGE_IV`) takes those back.
HEAD_ANCHOR = 5.0

PAPER_OPTIM = {
    "1": Optimization(lr=1e-3, epochs=1),  # LLaVA-1.5's alignment learning rate; MedPLIB reuses it
    "2": Optimization(lr=1e-4, epochs=1),
    "3": Optimization(lr=3e-4, epochs=1),
    "4": Optimization(lr=3e-4, epochs=1),
    "joint": Optimization(lr=3e-4, epochs=3),  # the pipeline sets its steps to II + III + IV's
}
PAPER_TRAINS = {
    "1": ("projector",),
    "2": ("lora", "embeddings", "lm_head", "norms", "projector", "region_adapter"),
    "3": ("lora", "seg_token", "seg_head", "mask_decoder"),
    "4": (
        "router",
        "experts",
        "lm_head",
        "embeddings",
        "seg_head",
        "mask_decoder",
        "region_adapter",
        # Not "expert_heads": the anchor keeps a plugin head's input where its expert stage trained the
        # head; retrained on the few anchored states, the head moved decisions the anchor had kept.
    ),
}
# A plugin's expert stage: its LoRA, its head and its tokens' rows, on the frozen shared trunk.
EXPERT_TRAINS = ("lora", "expert_head", "expert_tokens")

# The tiny preset is randomly initialised: no pretrained CLIP, LLM or SAM exists here.
TINY_TRAINS = {
    "1": ("projector", "vision_tower", *LLM),
    "2": (*PAPER_TRAINS["2"], "vision_tower", *LLM),
    "3": (*PAPER_TRAINS["3"], "sam_image_encoder"),
    "4": PAPER_TRAINS["4"],
}
TINY_OPTIM = {
    "1": Optimization(lr=2e-3, epochs=12, warmup_fraction=0.5),
    "2": Optimization(lr=1e-3, epochs=5, warmup_fraction=0.25),
    "3": Optimization(lr=1e-3, epochs=12, warmup_fraction=0.25),
    "4": Optimization(lr=5e-4, epochs=2, warmup_fraction=0.1),
    "joint": Optimization(lr=1e-3, epochs=5, warmup_fraction=0.25),  # the pipeline sets its steps
}
# Stage IV's gates learn which expert's `trains_on` each sample belongs to, from the routing loss
# alone (the supervised top-1 gate), starting from a fit to those targets; after training each plugin
# head is refitted to the states the mixture gives it (see TINY_NOTES).
TINY_ROUTING_WEIGHT = 5.0
TINY_STAGE_IV = {
    "routing_weight": TINY_ROUTING_WEIGHT,
    "router": RouterConfig(top1_output="supervised"),
    "router_fit": RouterFit(prefix_expert="vision_language"),
    "head_refit": HeadRefit(),
}
# The stages that ask which hemisphere holds a region see half their brain slices mirrored.
TINY_MIRROR = 0.5
# The stages that train on grounding requests or presence questions ask half of them in an extra wording.
TINY_REWORD = 0.5
TINY_REWORDED_STAGES = ("2", "3", "4", "joint")
# Stage III shrinks the slices of half its hemisphere requests.
TINY_ZOOM = 0.5
# The stages that train the grounding head pair requests on one image and contrast left with right
# and grey with white.
TINY_GROUNDING = {
    "same_image_pairs": True,
    "contrast": PairContrast(),
    "seg_read_request": True,
    "seg_read_embeddings": True,
}
TINY_NOTES = (
    "Stage I trains the CLIP tower and the whole LLM with the projector, and stage II trains the CLIP "
    "tower and the LLM's attention, MLP, norms, embeddings and LM head with the expert's LoRA: the tiny "
    "preset starts from random weights, and the paper's stages freeze what was pretrained elsewhere. "
    "Stage III also trains the SAM image encoder (the paper's comes from SAM-Med2D); the LLM stays "
    "frozen but for the expert's LoRA, so the stage II expert is unchanged.",
    "Learning rates are 2e-3 / 1e-3 / 1e-3 / 5e-4 (paper 1e-3 / 1e-4 / 3e-4 / 3e-4): weights trained "
    "from scratch for minutes need larger steps.",
    "Epochs are 12 / 5 / 12 / 2 over the embedded dataset's 108 captions, 1119 VQA and region samples, "
    "254 grounding samples and all 1373 samples (the paper: one epoch of far larger sets); warm-up is a "
    "tenth to a half of an epoch (paper 1%), since 1% of an epoch of this dataset is under one step. "
    "Stage III runs 12 epochs (384 steps): from-scratch grounding splits left from right only after "
    "about 200 steps (at 128 the learning rate has already decayed when it starts). Stage I "
    "runs 12 epochs, not 6: on the validation split the stage II expert after it answered 0.89 of the "
    "closed questions against 0.87 (24 epochs: 0.82). Stage II runs 5 epochs (700 steps), not 3: on "
    "three seeds its closed accuracy rose from 0.69 to 0.75 on the test split (0.65-0.72 to 0.73-0.79), "
    "mostly on questions that need the image (which half is larger, the plane) and on fluorescence "
    "microscopy (docs/training.md, 'Stage II length').",
    "The tiny and small presets put a LayerNorm on the image and region tokens (`visual_token_norm`; "
    "LLaVA's projector has none): trained from scratch together with the LLM, the image tokens grew to "
    "100-700 times the norm of the word embeddings and the LLM's attention stayed diffuse.",
    "Grounding (stages III, IV, joint) follows the words only with three changes together: SAM and the "
    "<SEG> head start from their modules' own initialisation; the <SEG> prompt also modulates SAM's "
    "dense prompt, FiLM-style (`seg_dense_film`); and batches pair two requests about different "
    "structures of one image, with a contrast loss on left/right and grey/white pairs (weight 3, "
    "margin 0.3; not in the paper, whose decoder arrives pretrained to follow prompts). Without them "
    "the decoder returned one mask per image by step 8 and both hemispheres scored the whole brain's "
    "Dice.",
    "Stage III probes its starts (`restarts`, not in the paper): from a given stage II trunk, one stage "
    "III seed in three or four kept one mask per image for left and right (the pair contrast at its "
    "margin for all 384 steps) while another seed from the same trunk grounded. Each start runs 140 "
    "steps; the first whose contrast has fallen below 0.1 (a third of the margin) continues, so a start "
    "that learns costs nothing extra.",
    "The contrast covers grey/white pairs as well as left/right ones (session 12): on two mirrored stage "
    "II trunks white matter rose from 0.739 / 0.738 to 0.749 / 0.776 and grey matter from 0.803 / 0.844 "
    "to 0.848 / 0.861; the third start kept grey and white as one mask, which the restarts catch.",
    "Stages II and IV mirror half their axial and coronal slices, 'left' and 'right' swapped in the "
    "text (`mirror`, not in the paper): on the symmetric template only a region's place says which "
    "hemisphere holds it, and without mirrored copies two trunks of three answered 0.66 of the training "
    "questions about it and 4-5 of 18 test questions (below chance).",
    "Stages II, III, IV and joint ask half their grounding requests and presence questions in one of "
    "twelve extra training wordings per kind (`reword`, not in the paper), the same openings ('Can "
    "you', 'Do you', 'Please', 'I want') in front of both kinds, none using a word only the held-out test "
    "wordings use: without them the MoE answered 7 / 1 / 1 held-out grounding requests in words and 0 / "
    "0 / 8 held-out presence questions with a mask on seeds 0 / 1 / 2; with them 0 / 0 / 0 and 0 / 0 / 0 "
    "(session 13).",
    "Stage III shrinks the slice of half its hemisphere requests about the centre, by a factor drawn "
    "from [0.5, 1), target with it (`zoom`, not in the paper): the test split's smallest coronal slice "
    "(318 pixels per hemisphere, past the training split's range) got a right-hemisphere mask of both "
    "sides on one seed (IoU 0.26); with the zoom the largest left/right swap is 0.00 / 0.15 / 0.07 on "
    "seeds 0 / 1 / 2. Shrinking grey and white matter requests too cost white matter on every seed "
    "(session 13).",
    "The same grounding stages give the <SEG> head a request reader (`seg_read_request`): the "
    "<SEG>-predicting state attends over the request's own last-layer token states before the head. "
    "On the pipeline seeds' stage II the state that predicts <SEG> is the same for 'left' and 'right' "
    "(relative difference 0.2-0.9 %) while the words' own states differ by 34-97 %; stage III trains "
    "no attention, so without the reader nothing can carry the name to the head.",
    "The reader's keys and values also carry the request tokens' input embeddings "
    "(`seg_read_embeddings`): reading the last-layer states alone, stage III split one pair of "
    "structures per seed (left/right on seeds 0 and 1, grey/white on seed 2), since the word's "
    "last-layer state differs by only 15-27 % between grey and white; with the words' own embeddings "
    "it split both pairs on all three seeds (benchmarks/results/pipeline.md, 'Session 6').",
    "Stage IV adds a routing loss (weight 5, not in the paper): cross-entropy of each routed layer's "
    "gate, on the question and answer tokens, against the expert whose `trains_on` accepts the sample. "
    "The gate is the supervised top-1 gate (`top1_output='supervised'`: the chosen expert at 1.0, the "
    "gate trained by the routing loss alone), fitted to the routing targets before training "
    "(`router_fit`, the system prompt and image tokens to the vision-language expert). With the "
    "language loss reaching the gate, 90-100 % of the grounding requests' tokens went to the VQA expert "
    "and the MoE answered some grounding requests in words; with the probability-scaled gate of "
    "weight 1 a seed lost a hemisphere or white matter (mDice 0.747 worst of three, against 0.870; "
    "benchmarks/results/pipeline.md, session 6).",
    "After stage IV trains, each plugin head is refitted (`head_refit`, not in the paper, which has no "
    "plugin heads): with the composed model frozen, the head is fitted to its own outputs on its "
    "expert stage's states of its training samples, on the states the final mixture gives them. The "
    "head anchor alone left the drift that flipped the modality head's borderline decisions on one "
    "seed of three (2 of 63 test decisions, taken at p 0.55 and 0.52 by its expert stage); fitted to "
    "the labels instead, it lost one or two of the 21 test images there and, from 500 steps on, "
    "decisions on the other seeds; fitted to its outputs for 2000 steps it decided as its expert "
    "stage did on all 102 test and validation decisions of all three seeds "
    "(benchmarks/results/head_refit.md, modality_expert.md).",
)


def stage_spec(stage: str, schedule: str = "tiny", expert: str | None = None) -> StageSpec:
    """The spec of `stage` ('1'..'4', 'joint' or 'expert') under `schedule` ('tiny' or 'paper').

    Stages II and III are the paper's recipe for its two experts. `expert` names the registered
    expert the 'expert' stage trains: a built-in one by its paper stage's recipe, a plugin's its
    LoRA, head and token rows on the frozen trunk, with its own `trains_on` and `loss_weights`.
    """
    spec = _stage_spec(stage, schedule, expert)
    if schedule != "tiny":
        return spec
    if spec.tasks.accepts("grounding"):
        spec = spec.model_copy(update=TINY_GROUNDING)
    if stage == "3":
        spec = spec.model_copy(update={"restarts": Restarts(), "zoom": TINY_ZOOM})
    if spec.tasks.accepts("region_vqa"):
        spec = spec.model_copy(update={"mirror": TINY_MIRROR})
    if stage in TINY_REWORDED_STAGES:
        spec = spec.model_copy(update={"reword": TINY_REWORD})
    if stage == "4":
        return spec.model_copy(update=TINY_STAGE_IV)
    return spec


def _stage_spec(stage: str, schedule: str, expert: str | None) -> StageSpec:
    if stage not in STAGE_KEYS:
        raise InvalidInputError(f"unknown stage {stage!r}; choose one of {', '.join(STAGE_KEYS)}")
    if schedule not in ("tiny", "paper"):
        raise InvalidInputError(f"unknown schedule {schedule!r}; choose 'tiny' or 'paper'")
    if expert is not None and stage != "expert":
        raise InvalidInputError(
            f"--expert applies to --stage expert, not stage {stage} (stages 2 and 3 train "
            f"{DEFAULT_EXPERTS['2']} and {DEFAULT_EXPERTS['3']} by the paper's recipe)"
        )
    if expert is None and stage == "expert":
        raise InvalidInputError("--stage expert needs --expert NAME (a registered expert: `medplib experts`)")
    trains = TINY_TRAINS if schedule == "tiny" else PAPER_TRAINS
    optim = TINY_OPTIM if schedule == "tiny" else PAPER_OPTIM
    if stage == "1":
        return StageSpec(
            key="1",
            title="I align",
            setup="plain",
            trains=trains["1"],
            tasks=SampleFilter(tasks=("caption",)),
            loss=LossWeights(ce=1.0),
            optim=optim["1"],
        )
    if stage == "4":
        return StageSpec(
            key="4",
            title="IV mixture of experts",
            setup="compose",
            trains=trains["4"],
            tasks=SampleFilter(tasks=ALL_TASKS),
            loss=MOE_LOSS,
            optim=optim["4"],
            head_anchor=HEAD_ANCHOR,
        )
    if stage == "joint":
        # Whatever II and III train between them, on all data, with stage IV's loss weights.
        union = tuple(dict.fromkeys((*trains["2"], *trains["3"])))
        return StageSpec(
            key="joint",
            title="joint baseline",
            setup="adapter",
            trains=union,
            tasks=JOINT_EXPERT.trains_on,
            loss=MOE_LOSS,
            optim=optim["joint"],
            expert=JOINT_EXPERT,
        )
    (spec,) = require_experts([expert or DEFAULT_EXPERTS[stage]])
    paper_stage = {name: key for key, name in DEFAULT_EXPERTS.items()}.get(spec.name)
    if stage in DEFAULT_EXPERTS or paper_stage is not None:
        base = paper_stage or stage
        title = {"2": "II vision-language expert", "3": "III pixel-grounding expert"}[base]
        return StageSpec(
            key=stage,
            title=title,
            setup="adapter",
            trains=trains[base],
            tasks=spec.trains_on,
            loss=spec.loss_weights,
            optim=optim[base],
            expert=spec,
        )
    # A plugin's expert trains on the frozen trunk (as the grounding expert does): its LoRA, its head
    # and its tokens' rows, so the shared trunk and the other experts stay exactly as they were.
    return StageSpec(
        key=stage,
        title=f"expert {spec.name}",
        setup="adapter",
        trains=EXPERT_TRAINS,
        tasks=spec.trains_on,
        loss=spec.loss_weights,
        optim=optim["3"],
        expert=spec,
    )
