"""Stage specs: each stage marks exactly its parameters trainable, and takes its samples and losses
from the experts' own specs."""

from __future__ import annotations

import pytest
import torch

from medplib.core.errors import InvalidInputError, PluginError
from medplib.core.expert_spec import ExpertSpec, LoraSpec, LossWeights, SampleFilter
from medplib.core.hookspecs import hookimpl
from medplib.core.model import build_medplib
from medplib.experts.pixel_grounding import SPEC as GROUNDING
from medplib.experts.vision_language import SPEC as VISION_LANGUAGE
from medplib.trainers.sampling import schedule_lengths
from medplib.trainers.stage_folder import StageStart, prepare
from medplib.trainers.stages import PARAMETER_GROUPS, ROW_GROUPS, stage_spec


def trainable(stage: str, schedule: str, expert: str | None = None) -> set[str]:
    torch.manual_seed(0)
    prepared = prepare(stage_spec(stage, schedule, expert), StageStart("tiny", build_medplib("tiny")))
    return {name for name, _ in prepared.trainable_parameters()}


def groups_of(names: set[str]) -> set[str]:
    """Which groups the trainable names fall in; LoRA and experts by their own key."""
    import re

    whole = {group: pattern for group, pattern in PARAMETER_GROUPS.items() if group not in ROW_GROUPS}
    return {group for group, pattern in whole.items() for n in names if re.search(pattern, n)}


def test_paper_stage_one_trains_the_projector_only() -> None:
    names = trainable("1", "paper")
    assert names and all(name.startswith("projector.") for name in names)


def test_tiny_stage_one_also_trains_clip_and_the_llm() -> None:
    assert groups_of(trainable("1", "tiny")) >= {"projector", "vision_tower", "attention", "mlp"}
    assert not any(n.startswith("sam.") for n in trainable("1", "tiny"))


def test_paper_stage_two_trains_its_lora_and_the_shared_text_parts() -> None:
    names = trainable("2", "paper")
    assert groups_of(names) == {"lora", "embeddings", "lm_head", "norms", "projector", "region_adapter"}
    assert not any(".base_layer." in n or "self_attn" in n for n in names)


def test_tiny_stage_two_runs_five_epochs_and_the_paper_schedule_keeps_its_one() -> None:
    tiny, paper = stage_spec("2", "tiny").optim, stage_spec("2", "paper").optim
    assert (tiny.epochs, tiny.lr, tiny.warmup_fraction) == (5, 1e-3, 0.25)
    assert (paper.epochs, paper.lr, paper.warmup_fraction) == (1, 1e-4, 0.01)
    # The length is the schedule's: 1119 VQA and region samples in batches of 8 make 700 steps.
    _, per_epoch, warmup = schedule_lengths(stage_spec("2", "tiny"), 1119, world=1)
    assert (round(tiny.epochs * per_epoch), warmup) == (700, 35)


def test_stage_three_trains_lora_seg_head_and_mask_decoder_but_no_shared_llm_weight() -> None:
    paper = trainable("3", "paper")
    # and the `<SEG>` rows alone of the embeddings and the LM head (see the next test)
    seg_rows = {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight"}
    assert seg_rows <= paper and groups_of(paper - seg_rows) == {"lora", "seg_head", "mask_decoder"}
    # The tiny schedule adds SAM's encoder (no pretrained one here) and the `<SEG>` head's request
    # reader (`seg_read_request`), never a weight the II expert uses.
    tiny = trainable("3", "tiny")
    added = ("sam.image_encoder.", "seg_head.request.")
    assert tiny - paper and all(n.startswith(added) for n in tiny - paper)
    assert any(n.startswith("seg_head.request.") for n in tiny - paper)


def test_stage_three_moves_only_the_seg_rows_of_the_embeddings_and_lm_head() -> None:
    torch.manual_seed(0)
    prepared = prepare(stage_spec("3"), StageStart("tiny", build_medplib("tiny")))
    model = prepared.model
    matrices = [model.get_input_embeddings().weight, model.language_model.lm_head.weight]
    before = [m.detach().clone() for m in matrices]
    optimizer = torch.optim.AdamW(matrices, lr=0.1, weight_decay=0.0)
    sum(m.sum() for m in matrices).backward()
    optimizer.step()
    seg = model.config.seg_token_id
    for old, new in zip(before, matrices, strict=True):
        changed = (old != new).any(dim=1).nonzero().flatten().tolist()
        assert changed == [seg]
    # Stage II trains the whole matrices, and the joint baseline (II's groups and III's) does too.
    assert stage_spec("joint").trained_rows("language_model.lm_head.weight") == []
    assert stage_spec("3").trained_rows("language_model.lm_head.weight") == ["seg_token_id"]


def test_stage_four_trains_router_experts_and_heads_not_the_shared_mlp() -> None:
    names = trainable("4", "paper")
    assert groups_of(names) == {
        "router",
        "experts",
        "lm_head",
        "embeddings",
        "seg_head",
        "mask_decoder",
        "region_adapter",
    }
    assert not any(
        n.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")) for n in names
    )
    # The tiny stage IV trains what the paper's does; the last prompt token's extra routing weight
    # and the class-balanced routing loss are options (measured, not the recipe: pipeline.md).
    tiny = stage_spec("4")
    assert tiny.trains == stage_spec("4", "paper").trains
    assert tiny.routing_decision_weight == 0.0 and not tiny.routing_balanced


def test_expert_stages_take_samples_losses_and_lora_from_the_expert_specs() -> None:
    two, three = stage_spec("2"), stage_spec("3")
    assert two.expert.name == VISION_LANGUAGE.name and two.tasks == VISION_LANGUAGE.trains_on
    assert two.loss == VISION_LANGUAGE.loss_weights
    assert three.expert.name == GROUNDING.name and three.loss == LossWeights(ce=1, bce=1, dice=5, focal=1)
    assert (two.expert.adapter.r, two.expert.adapter.alpha, three.expert.adapter.r) == (16, 16, 8)
    assert stage_spec("4").loss == LossWeights(ce=1, bce=2, dice=0.5, head=1)  # + plugin heads
    assert stage_spec("2", "paper").optim.lr == 1e-4 and stage_spec("3", "paper").optim.lr == 3e-4
    assert stage_spec("2", "paper").optim.betas == (0.9, 0.95) and stage_spec("4").optim.grad_clip == 1.0
    joint = stage_spec("joint")
    assert set(joint.tasks.tasks) == {"vqa", "region_vqa", "grounding"}
    assert set(joint.trains) == set(stage_spec("2").trains) | set(stage_spec("3").trains)


def test_a_plugin_expert_stage_trains_its_own_lora(register_plugin) -> None:
    spec = ExpertSpec(
        name="modality_test",
        capabilities=("vqa",),
        adapter=LoraSpec(r=4, alpha=8, target_modules=("up_proj",)),
        trains_on=SampleFilter(tasks=("vqa",), answer_types=("closed",)),
    )

    class Plugin:
        @hookimpl
        def medplib_register_experts(self, register) -> None:
            register(spec)

    register_plugin(Plugin(), "modality-test-plugin")
    stage = stage_spec("expert", expert="modality_test")
    assert stage.tasks.accepts("vqa", "closed") and not stage.tasks.accepts("vqa", "open")
    names = trainable("expert", "paper", expert="modality_test")
    lora = {n for n in names if ".lora_" in n}
    assert lora and all(".mlp.up_proj.lora_" in n for n in lora)  # the plugin's own LoRA targets
    assert names == lora  # no head, no tokens: its LoRA alone, never the shared embeddings


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("5",), InvalidInputError),
        (("2", "fast"), InvalidInputError),
        (("4", "tiny", "vision_language"), InvalidInputError),
        (("expert", "tiny", "no_such_expert"), PluginError),
        (("2", "tiny", "vision_language"), InvalidInputError),  # stages 2 and 3 are the paper's recipe
        (("3", "tiny", "pixel_grounding"), InvalidInputError),
        (("expert", "tiny", None), InvalidInputError),
    ],
)
def test_bad_stage_arguments_are_refused(args: tuple, error: type) -> None:
    with pytest.raises(error):
        stage_spec(*args)


def test_the_tiny_stage_iv_gate_is_supervised_and_fitted_the_papers_is_not() -> None:
    tiny, paper = stage_spec("4", "tiny"), stage_spec("4", "paper")
    assert tiny.router.top1_output == "supervised" and tiny.routing_weight == 5.0
    assert tiny.router_fit is not None and tiny.router_fit.prefix_expert == "vision_language"
    assert paper.router.top1_output == "probability" and paper.router_fit is None
    assert paper.routing_weight == 0.0
