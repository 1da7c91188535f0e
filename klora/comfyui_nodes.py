"""The ComfyUI nodes of K-LoRA (V1 node API): they read their inputs and call ``klora.comfyui``.

``KLoRALoader`` ("K-LoRA (content + style)"): MODEL + two LoRA files from ComfyUI's ``loras``
folder -> MODEL, the two fused by one of ``klora.methods.METHODS``. Its required inputs are the
public interface saved workflows refer to; later inputs come as optional inputs with defaults.
``KLoRASelectionMap`` ("K-LoRA selection map"): the MODEL a K-LoRA node made, plus the sampler's
LATENT (only so that it runs after the sampler) -> IMAGE of which LoRA each layer used at each
step of the last run.

ComfyUI's ``folder_paths`` is imported when a node runs, never when this module is imported.
"""

from __future__ import annotations

import math
import os

from . import methods, rule
from .errors import KLoRAError

CATEGORY = "loaders/K-LoRA"
PAPER_BETA = -1.0  # the beta input's value that means "the paper's beta for the chosen pattern"
INFINITE_MU = -1.0  # the np_mu input's value that means mu = infinity (NP-LoRA's hard projection)


class KLoRALoader:
    """K-LoRA of a content (subject) and a style LoRA: per layer and step, one of the two."""

    DESCRIPTION = ("K-LoRA (CVPR 2025): at every step each layer both LoRAs adapt uses either the content or the "
                   "style LoRA, whichever the rule picks (top-K magnitudes of the two updates, weighted by the "
                   "step). The method input offers EST-LoRA, LoRA Switch and NP-LoRA beside it, and the plain "
                   "merge. Other LoRA loaders before or after this node stay applied.")

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        names = folder_paths.get_filename_list("loras")
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the LoRAs are for."}),
                "content_lora": (names, {"tooltip": "The subject LoRA, from ComfyUI's loras folder."}),
                "style_lora": (names, {"tooltip": "The style LoRA, from ComfyUI's loras folder."}),
                "pattern": (["s*", "s"], {
                    "default": "s*",
                    "tooltip": "s*: scale = (alpha * p + beta) mod alpha, more style block and colour (the "
                               "command line's default); s: scale = alpha * p + beta, content early, style late."}),
                "alpha": ("FLOAT", {"default": rule.DEFAULT_ALPHA, "min": 0.01, "max": 100.0, "step": 0.05,
                                    "tooltip": "How fast the style side's weight grows with progress p."}),
                "beta": ("FLOAT", {"default": PAPER_BETA, "min": PAPER_BETA, "max": 100.0, "step": 0.025,
                                   "tooltip": "Style weight at p = 0 (klora and est). -1 = the paper's value for "
                                              "the pattern: 0.5 for s, 0.85 x alpha for s* (1.275 at alpha 1.5); "
                                              "otherwise 0 to 100."}),
                "method": (list(methods.METHODS), {
                    "tooltip": "klora: K-LoRA, per layer and step the LoRA the rule picks; est: EST-LoRA, the same "
                               "rule on the energies ||dW||^2 (beta as set, no auto); switch: LoRA Switch, the content "
                               "LoRA for switch_every steps, then the style LoRA, and so on; np: NP-LoRA, one static "
                               "merge with the content projected off the style's directions (np_mu); merge: both "
                               "LoRAs everywhere; content / style: that LoRA only (as LoraLoaderModelOnly)."}),
                "progress": (list(methods.COMFYUI_PROGRESS), {
                    "tooltip": "steps: p = step / steps of each sampler run (the paper's); percent: ComfyUI's "
                               "sampling percent of the step's sigma, which continues across split samplers "
                               "(Wan 2.2's two experts) and places denoise < 1 where its noise is."}),
                "selection_log": ("STRING", {"default": "", "tooltip": (
                    "File-name prefix in ComfyUI's output folder for the selection log (JSON, written when each "
                    "sampling run ends), e.g. klora/log. Empty: no log file.")}),
            },
            "optional": {
                "content_strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                               "tooltip": "Multiplies the content LoRA's delta (like strength_model); "
                                                          "the choice does not change with it."}),
                "style_strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                             "tooltip": "Multiplies the style LoRA's delta; the choice does not "
                                                        "change with it."}),
                "np_mu": ("FLOAT", {"default": methods.DEFAULT_NP_MU, "min": INFINITE_MU, "max": 1000.0, "step": 0.1,
                                    "tooltip": "Method np only: how hard the content is projected off the "
                                               "style's directions, c = mu / (1 + mu). 0 = the plain merge, 0.5 = "
                                               "the paper's; -1 = infinity, the hard projection (c = 1). Other "
                                               "negatives are refused."}),
                "switch_every": ("INT", {"default": methods.DEFAULT_SWITCH_EVERY, "min": 1, "max": 10000,
                                         "tooltip": "Method switch only: steps per block, content first, as the "
                                                    "paper's code runs it (steps 0 to N content, N+1 to 2N style, "
                                                    "...; split samplers count the run's steps from their start "
                                                    "step)."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with K-LoRA of the two LoRAs.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model, content_lora, style_lora, pattern, alpha, beta, method, progress, selection_log,
             content_strength=1.0, style_strength=1.0, np_mu=methods.DEFAULT_NP_MU,
             switch_every=methods.DEFAULT_SWITCH_EVERY):
        from . import comfyui

        if np_mu != INFINITE_MU and np_mu < 0:
            raise KLoRAError(f"np_mu must be -1 (infinity: the hard projection) or a number >= 0, got {np_mu}")
        paths = {role: _lora_path(role, name) for role, name in (("content", content_lora), ("style", style_lora))}
        labels = {"content": f"content LoRA '{content_lora}'", "style": f"style LoRA '{style_lora}'"}
        patched = comfyui.apply(model, paths["content"], paths["style"], pattern=pattern, alpha=alpha,
                                beta=None if beta == PAPER_BETA else beta, method=method, progress=progress,
                                content_strength=content_strength, style_strength=style_strength,
                                np_mu=math.inf if np_mu == INFINITE_MU else np_mu, switch_every=switch_every,
                                log_path=_log_path(selection_log), labels=labels)
        return (patched,)


class KLoRASelectionMap:
    """Which LoRA each layer used at each step of the last sampling run, as an image."""

    DESCRIPTION = ("The selection map of a K-LoRA model: one row per layer both LoRAs adapt, one column per step; "
                   "orange = content LoRA, blue = style LoRA.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL output of a K-LoRA (content + style) node."}),
                "samples": ("LATENT", {"tooltip": "The sampler's output; only makes this node run after it."}),
            },
            "optional": {
                "max_side": ("INT", {"default": 720, "min": 200, "max": 2000, "step": 10,
                                     "tooltip": "Longest side of the picture in pixels."}),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "render"
    CATEGORY = CATEGORY

    def render(self, model, samples, max_side=720):
        import numpy as np
        import torch

        from . import comfyui

        picture = comfyui.selection_map(model, max_side=max_side).convert("RGB")
        return (torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None],)


def _lora_path(role: str, name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path("loras", name) if name else None
    if path is None:
        raise KLoRAError(f"{role} LoRA '{name}': no such file in ComfyUI's loras folder")
    return path


def _log_path(prefix: str) -> str | None:
    """``<output>/<prefix>_NNNNN_.json`` with ComfyUI's next free counter, or None for an empty prefix."""
    if not prefix or not prefix.strip():
        return None
    import folder_paths

    output = folder_paths.get_output_directory()
    try:
        folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix.strip(), output)
    except Exception:
        raise KLoRAError(f"selection_log '{prefix}': must be a file-name prefix inside ComfyUI's output folder "
                         "(e.g. klora/log)") from None
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}_{counter:05}_.json")


NODE_CLASS_MAPPINGS = {"KLoRALoader": KLoRALoader, "KLoRASelectionMap": KLoRASelectionMap}
NODE_DISPLAY_NAME_MAPPINGS = {"KLoRALoader": "K-LoRA (content + style)", "KLoRASelectionMap": "K-LoRA selection map"}
