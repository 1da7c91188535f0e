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
        self.device, self.name = device, str(name_or_path)

    def embed(self, image):
        """The CLS embedding of one PIL image, float32, on the CPU."""
        import torch

        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        with torch.no_grad():
            return self.model(**inputs).last_hidden_state[0, 0].float().cpu()


def auto_beta(pipe, klora, embedder: Embedder, prompt: str, seed: int = 0, call=None, **kwargs) -> float:
    """EST-LoRA's beta for ``klora`` on ``pipe``: ``1 - cos`` of the DINO embeddings of a content-only and a
    style-only picture, same ``prompt``, ``seed`` and settings (``kwargs``: the pipeline call's). Sets it
    (``klora.set_schedule``, method ``est``), records how (``klora.beta_auto``) and returns it. ``call``:
    how to run the pipeline (default: ``pipe(**arguments)``)."""
    import torch

    from .est_lora import beta_from_embeddings

    call = call or (lambda arguments: pipe(**arguments))
    embeddings = {}
    for role in ("content", "style"):
        klora.set_method(role)
        arguments = dict(kwargs, prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed))
        embeddings[role] = embedder.embed(call(arguments).images[0])
    klora.set_method("est")
    beta = beta_from_embeddings(embeddings["content"], embeddings["style"])
    klora.set_schedule(klora.pattern, klora.alpha, beta)
    klora.beta_auto = {"dino_model": embedder.name, "seed": seed, "cosine": 1.0 - beta}
    return beta
