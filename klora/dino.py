"""DINO image embeddings for EST-LoRA's automatic beta (``klora.est_lora.beta_from_embeddings``).

As EST-LoRA's code does: a ViT (``facebook/dino-vits16`` by default, a hub id or a folder), the
preprocessing of that model's own ``preprocessor_config.json`` (224 x 224, mean = std = 0.5 for
DINO ViT-S/16), and the CLS token of ``last_hidden_state`` (after the final LayerNorm; no head).
"""

from __future__ import annotations

from .errors import KLoRAError

DEFAULT_MODEL = "facebook/dino-vits16"


class Embedder:
    def __init__(self, name_or_path: str = DEFAULT_MODEL, device="cpu"):
        from transformers import AutoImageProcessor, ViTModel

        try:
            self.processor = AutoImageProcessor.from_pretrained(name_or_path)
            self.model = ViTModel.from_pretrained(name_or_path, add_pooling_layer=False).to(device).eval()
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise KLoRAError(f"--dino_model '{name_or_path}': could not load a ViT and its image processor "
                             f"({first})") from None
        self.device = device

    def embed(self, image):
        """The CLS embedding of one PIL image, float32, on the CPU."""
        import torch

        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        with torch.no_grad():
            return self.model(**inputs).last_hidden_state[0, 0].float().cpu()
