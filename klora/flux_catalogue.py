"""Community FLUX.1-dev LoRAs from the hub that the paper's FLUX examples used.

Plain data: a repo id, the file inside it, and the trigger words its author
trained with. ``inference_flux.py --list`` prints this table, and
``--content_index`` / ``--style_index`` pick from it. The prompt is the
original's template, "<content trigger> in <style trigger> style.".
The files are downloaded from the hub on first use (they are not part of
this repository).
"""

from __future__ import annotations

from dataclasses import dataclass

BASE_MODEL = "black-forest-labs/FLUX.1-dev"


@dataclass(frozen=True)
class CommunityLoRA:
    repo_id: str
    weight_name: str
    trigger: str


SUBJECTS = (
    CommunityLoRA("ginipick/flux-lora-eric-cat", "flux-lora-eric-cat.safetensors", "eric cat"),
    CommunityLoRA("glif-loradex-trainer/antix82_flux_dev_marv_simplecap_v1",
                  "flux_dev_marv_simplecap_v1.safetensors", "marv frog man marv"),
    CommunityLoRA("glif-loradex-trainer/festerbitcoin_86601_cats", "cats.safetensors", "Cat rule the world,"),
    CommunityLoRA("glif-loradex-trainer/fabian3000_chillguy", "chillguy.safetensors", "chillguy"),
)

STYLES = (
    CommunityLoRA("glif-loradex-trainer/bingbangboom_flux_surf", "flux_surf.safetensors", "SRFNGV01"),
    CommunityLoRA("glif-loradex-trainer/mindlywork_AcrylicWorld", "AcrylicWorld.safetensors", "Acryl!ck"),
    CommunityLoRA("glif-loradex-trainer/an303042_Seiwert_Industrial_v1",
                  "Seiwert_Industrial_v1.safetensors", "swrind"),
    CommunityLoRA("glif-loradex-trainer/maxxd4240_BlueDraw", "BlueDraw.safetensors", "BluD!!"),
    CommunityLoRA("glif-loradex-trainer/maxxd4240_SketchOnWater", "SketchOnWater.safetensors",
                  "SkeWat, water color sketch style"),
    CommunityLoRA("glif-loradex-trainer/araminta_k_flux_dev_leonardlesliebrookes",
                  "flux_dev_leonardlesliebrookes.safetensors", "illustration style"),
    CommunityLoRA("glif-loradex-trainer/araminta_k_flux_dev_karl_weiner",
                  "flux_dev_karl_weiner.safetensors", "collage style"),
    CommunityLoRA("glif-loradex-trainer/araminta_k_flux_dev_tarot_test_1",
                  "flux_dev_tarot_test_1.safetensors", "illustration style"),
    CommunityLoRA("glif-loradex-trainer/i12_appelsiensam_fanimals_v1",
                  "appelsiensam_fanimals_v1.safetensors", "FNMLS_PPLSNSM"),
    CommunityLoRA("glif-loradex-trainer/goldenark__WaterColorSketchStyle",
                  "WaterColorSketchStyle.safetensors", "WaterColorSketchStyle"),
    CommunityLoRA("glif-loradex-trainer/fabian3000_henrymajor", "henrymajor.safetensors", "henrymajorstyle"),
    CommunityLoRA("glif-loradex-trainer/fabian3000_impressionism2", "impressionism2.safetensors", "impressionist"),
)


def prompt_for(subject: CommunityLoRA, style: CommunityLoRA) -> str:
    """The original script's prompt: '<content trigger> in <style trigger> style.'"""
    return f"{subject.trigger} in {style.trigger} style."


def table() -> str:
    """The catalogue as text, one LoRA a line, with the index to pass."""
    lines = [f"Community FLUX LoRAs (base model {BASE_MODEL}); the prompt is "
             "'<content trigger> in <style trigger> style.'", "",
             "--content_index  (subjects)"]
    lines += [f"  {i:>2}  {e.repo_id} / {e.weight_name}   trigger: {e.trigger!r}" for i, e in enumerate(SUBJECTS)]
    lines += ["", "--style_index  (styles)"]
    lines += [f"  {i:>2}  {e.repo_id} / {e.weight_name}   trigger: {e.trigger!r}" for i, e in enumerate(STYLES)]
    return "\n".join(lines)
