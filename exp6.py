import sys, time, statistics, tempfile
from pathlib import Path
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/benchmarks")
import torch
torch.set_num_threads(2)
import comfyui_speed as cs
comfy = cs.import_comfyui("/work/comfyui")
import folder_paths
from klora import comfyui as kc
from klora.comfyui_nodes import KLoRALoader
for scale in (0.1, 0.5):
    config = cs.sdxl_config(scale)
    m = cs.build(comfy, config)
    folder = Path(tempfile.mkdtemp())
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    c, s = cs.write_loras(m, folder, 8)
    (km,) = KLoRALoader().load(m, c, s, "s*", 1.5, -1.0, "klora", "steps", "")
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([km])
    k = kc.attached(km)
    calls = [0]
    orig = kc.KLoRAPatch.add_into
    def counting(self, w): calls[0] += 1; return orig(self, w)
    kc.KLoRAPatch.add_into = counting
    fast = cs.full_repatch_seconds(k, km)
    print("calls", calls[0])
    kc.KLoRAPatch.add_into = orig
    kc.KLoRAPatch.plain = property(lambda self: False)
    slow = cs.full_repatch_seconds(k, km)
    del kc.KLoRAPatch.plain
    kc.KLoRAPatch.plain = property(lambda self: all(p.plain for p in self.unit.keys[self.key]))
    print(f"width {scale}: full re-patch fast {fast*1000:.1f} ms, slow {slow*1000:.1f} ms")
    comfy.model_management.unload_all_models()
