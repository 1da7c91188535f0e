"""K-LoRA as a ComfyUI node pack: ComfyUI imports this file when the repository is in ``ComfyUI/custom_nodes/``.

Loading it imports only the node classes (``klora/comfyui_nodes.py``); the adapter and its torch work
load when a node runs. Nothing here is used by the command lines or the diffusers engine. pytest,
which imports every ``__init__.py`` above a test as a bare module, gets the empty mappings.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

if __package__:  # imported as a package, as ComfyUI's loader does
    from .klora.comfyui_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
