"""The selection map: cells say what the log says, labels fit, any size stays readable.

Logs are built here in the shape of ``KLoRA.selection_log()``, with layer paths as SDXL,
FLUX and Wan 2.2 (two experts) name them, so no model is needed.
"""

import random
import re

import pytest
from PIL import ImageFont, features

from klora import selection_map
from klora.selection_map import CONTENT, NOT_RUN, STYLE, block_of, layout, render

COLOUR = {"content": CONTENT, "style": STYLE}


# --- synthetic logs -------------------------------------------------------------------------

ATTENTION = [f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")]


def sdxl_paths() -> list[str]:
    """The 560 attention projections of the SDXL UNet, in named_modules() order."""
    where = [("down_blocks.1", 2, 2), ("down_blocks.2", 2, 10), ("mid_block", 1, 10),
             ("up_blocks.0", 3, 10), ("up_blocks.1", 3, 2)]
    return [f"{block}.attentions.{a}.transformer_blocks.{t}.{p}"
            for block, attentions, depth in where for a in range(attentions) for t in range(depth) for p in ATTENTION]


def flux_paths(double: int = 19, single: int = 38) -> list[str]:
    double_parts = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.2", "ff_context.net.2"]
    single_parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"]
    return (["context_embedder", "x_embedder"]
            + [f"transformer_blocks.{i}.{p}" for i in range(double) for p in double_parts]
            + [f"single_transformer_blocks.{i}.{p}" for i in range(single) for p in single_parts]
            + ["norm_out.linear", "proj_out"])


def wan_paths(blocks: int = 40) -> list[str]:
    return [f"blocks.{i}.{p}" for i in range(blocks) for p in ATTENTION + ["ffn.net.0.proj", "ffn.net.2"]]


def choice(layer: int, n_layers: int, step: int, n_steps: int, seed: int) -> str:
    """Style early and in deep layers, content later, with some noise: a K-LoRA-like picture."""
    wobble = random.Random(seed * 1_000_003 + layer * 1009 + step).random() * 0.25
    return "content" if (step + 1) / n_steps + 0.6 * layer / n_layers + wobble > 0.9 else "style"


def make_log(paths, n_steps=20, generations=1, only=None, **extra) -> dict:
    log = {"pattern": "s*", "alpha": 1.5, "beta": 1.275, "gamma": 0.93, "method": "klora",
           "content": "content LoRA '/data/loras/lora-dog/pytorch_lora_weights.safetensors'",
           "style": "style LoRA '/data/loras/watercolor_painting_style_v2.safetensors'",
           "layers": {p: {"k": 64, "content_topk_sum": 0.8, "style_topk_sum": 0.7} for p in paths},
           "only": only or {}, "generations": []}
    log.update(extra)
    for g in range(generations):
        log["generations"].append({"num_inference_steps": n_steps, "steps": [
            {"step": s, "progress": s / n_steps, "scale": 1.0,
             "choices": {p: choice(i, len(paths), s, n_steps, g) for i, p in enumerate(paths)}}
            for s in range(n_steps)]})
    return log


def make_two_expert_log(blocks=40, n_steps=40, switch_at=16) -> dict:
    """Wan 2.2 A14B: ``transformer`` runs the high-noise steps, ``transformer_2`` the rest."""
    paths = wan_paths(blocks)
    keys = {c: [f"{c}.{p}" for p in paths] for c in ("transformer", "transformer_2")}
    log = make_log(keys["transformer"] + keys["transformer_2"], n_steps=0)
    log.update(denoisers=["transformer", "transformer_2"], gamma={"transformer": 0.9, "transformer_2": 1.1},
               only={"transformer.patch_embedding": "style"})
    steps = []
    for s in range(n_steps):
        component = "transformer" if s < switch_at else "transformer_2"
        steps.append({"step": s, "progress": s / n_steps, "scale": 1.0, "component": component,
                      "choices": {k: choice(i, len(paths), s, n_steps, 0) for i, k in enumerate(keys[component])}})
    log["generations"] = [{"num_inference_steps": n_steps, "steps": steps}]
    return log


# --- helpers ------------------------------------------------------------------------------

def step_choices(log, generation, step):
    return next(s for s in log["generations"][generation]["steps"] if s["step"] == step)["choices"]


def assert_cells_match(log, image, at, samples=200, generation=-1, seed=0):
    """The pixel at the centre of sampled cells has the colour the log gives (grey when absent)."""
    rng = random.Random(seed)
    keys = list(at.rows)
    for _ in range(samples):
        key = rng.choice(keys)
        step, x0, x1 = rng.choice(at.columns)
        y0, y1 = at.rows[key]
        want = COLOUR.get(step_choices(log, generation, step).get(key), NOT_RUN)
        assert image.getpixel(((x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2)) == want, (key, step)


def assert_geometry(log, at, max_side):
    rows = [at.rows[k] for k in at.rows]
    assert sorted(at.rows) == sorted(log["layers"])  # every shared layer is a row, once
    assert all(y1 - y0 >= 1 for y0, y1 in rows)
    assert len({y1 - y0 for y0, y1 in rows}) == 1  # all cells the same height
    assert all(a[1] <= b[0] for a, b in zip(rows, rows[1:]))  # ordered, never overlapping
    cols = at.columns
    assert [n for n, _, _ in cols] == [s["step"] for s in log["generations"][-1]["steps"]]
    assert all(x1 - x0 >= 1 for _, x0, x1 in cols)
    assert all(a[2] == b[1] for a, b in zip(cols, cols[1:]))  # contiguous columns
    assert 0 < cols[0][1] and cols[-1][2] <= at.width and rows[-1][1] <= at.height
    assert max(at.width, at.height) <= max(max_side, 2000)


def group_covers(label: str, path: str) -> bool:
    """Whether a label names the block of ``path``: "down_blocks.1", "transformer_blocks.4-7",
    "x_embedder, transformer_blocks.0-1", or "…, blocks.0-3" (the "…" stands for small blocks)."""
    block = block_of(path)
    for part in label.split(", "):
        ranged = re.fullmatch(r"(.+)\.(\d+)-(\d+)", part)
        if part == "…" or part == block:
            return True
        if ranged and block.rpartition(".")[0] == ranged.group(1):
            if int(ranged.group(2)) <= int(block.rpartition(".")[2]) <= int(ranged.group(3)):
                return True
    return False


# --- tests --------------------------------------------------------------------------------

def test_block_of_names_the_block():
    assert block_of("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == "down_blocks.1"
    assert block_of("mid_block.attentions.0.transformer_blocks.3.attn2.to_k") == "mid_block"
    assert block_of("single_transformer_blocks.37.proj_out") == "single_transformer_blocks.37"
    assert block_of("blocks.12.ffn.net.2") == "blocks.12"
    assert block_of("x_embedder") == "x_embedder"
    assert block_of("noise_refiner.1.attention.to_q") == "noise_refiner.1"


def test_font_is_truetype_when_freetype_is_there(monkeypatch):
    assert features.check("freetype2")  # this environment has it; the map must use it
    assert isinstance(selection_map.font(), ImageFont.FreeTypeFont)
    assert selection_map.font(20).size == 20
    log = make_log(sdxl_paths()[:40], n_steps=5, content="content LoRA 'chien_été→.safetensors'")

    def header_shades(image):  # TrueType text is anti-aliased: many greys; a bitmap font has one ink
        return len(set(image.crop((0, 0, image.width, 30)).getdata()))

    assert header_shades(render(log)) > 10
    monkeypatch.setattr(selection_map.features, "check", lambda name: False)
    assert not isinstance(selection_map.font(), ImageFont.FreeTypeFont)
    image = render(log)  # the bitmap font draws too, odd characters included
    assert image.size == (layout(log).width, layout(log).height)
    assert header_shades(image) == 2


@pytest.mark.parametrize("label, shown", [
    ("content LoRA '/data/loras/lora-dog/pytorch_lora_weights.safetensors'", "lora-dog/pytorch_lora_weights"),
    ("content LoRA '/root/.cache/huggingface/hub/models--alice--dog-lora/snapshots/0a1b/"
     "pytorch_lora_weights.safetensors'", "alice/dog-lora"),
    ("content LoRA '/root/.cache/huggingface/hub/models--alice--loras/snapshots/0a1b/dog_v3.safetensors'",
     "alice/loras/dog_v3"),
    ("content LoRA (state dict)", "(state dict)"),
    ("content LoRA 'C:\\loras\\my_dog.safetensors'", "my_dog"),
])
def test_lora_labels_are_shortened(label, shown):
    at = layout(make_log(sdxl_paths()[:8], n_steps=2, content=label))
    assert f"content LoRA: {shown}" in [t for _, _, t, _ in at.texts]


def test_long_lora_names_are_cut_in_the_middle():
    name = "a_very_long_style_name_" * 6
    at = layout(make_log(sdxl_paths()[:8], n_steps=2, style=f"style LoRA '/x/{name}.safetensors'"))
    (shown,) = [t for _, _, t, _ in at.texts if t.startswith("style LoRA: ")]
    shown = shown[len("style LoRA: "):]
    assert len(shown) <= 40 and "…" in shown
    head, tail = shown.split("…")
    assert name.startswith(head) and name.endswith(tail)


def test_sdxl_map_cells_groups_and_size():
    log = make_log(sdxl_paths(), n_steps=20, only={"conv_in": "content", "time_embedding.linear_1": "style"})
    at = layout(log)
    image = render(log)
    assert image.size == (at.width, at.height)
    assert_geometry(log, at, 720)
    assert_cells_match(log, image, at)
    (panel,) = at.panels
    assert [g.label for g in panel.groups] == ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0",
                                              "up_blocks.1"]
    for group in panel.groups:
        assert {block_of(k) for k in group.keys} == {group.label}
        assert at.rows[group.keys[0]][0] == group.top and at.rows[group.keys[-1]][1] == group.bottom
    # a thin separator line between groups, in the gap, across the grid
    for y in panel.separators:
        assert image.getpixel((at.columns[0][1] + 1, y)) == selection_map.SEPARATOR
    texts = " ".join(t for _, _, t, _ in at.texts)
    assert "560 layers" in texts and "2 adapted by one LoRA only" in texts and "20 steps" in texts
    assert "pattern s*" in texts and "alpha 1.5" in texts and "beta 1.275" in texts and "gamma 0.93" in texts
    assert "content LoRA: lora-dog/pytorch_lora_weights" in texts
    assert "style LoRA: watercolor_painting_style_v2" in texts
    assert "left = noisiest" in texts
    assert_labels_apart(at)


def test_flux_labels_never_overlap_and_name_their_rows():
    log = make_log(flux_paths(), n_steps=28)
    at = layout(log)
    image = render(log)
    assert_geometry(log, at, 720)
    assert_cells_match(log, image, at)
    line = selection_map._line_height(selection_map.font())
    (panel,) = at.panels
    assert len(panel.groups) > 10  # blocks merged into runs, but still many labels
    for group in panel.groups:
        assert group.bottom - group.top >= line  # room for its label: labels never overlap
        assert all(group_covers(group.label, k) for k in group.keys), group.label
    assert [k for g in panel.groups for k in g.keys] == list(log["layers"])  # model order kept
    assert_labels_apart(at)


def assert_labels_apart(at):
    """Group labels sit left of the grid, inside the picture, and no two of them overlap."""
    text_font = selection_map.font()
    line = selection_map._line_height(text_font)
    boxes = []
    for panel in at.panels:
        for group in panel.groups:
            x, y = group.label_xy
            boxes.append((x, y, x + text_font.getlength(group.label), y + line))
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 and x1 <= at.columns[0][1] and 0 <= y0 and y1 <= at.height
    boxes.sort(key=lambda b: b[1])
    assert all(a[3] <= b[1] + 3 for a, b in zip(boxes, boxes[1:]))  # at most the font's spare pixels touch


def test_rows_go_by_block_index_when_the_log_is_sorted_as_text():
    log = make_log(sorted(wan_paths(12)), n_steps=4)  # "blocks.10..." < "blocks.2..." as text
    at = layout(log)
    tops = {}
    for key, (y0, _) in at.rows.items():
        tops.setdefault(int(key.split(".")[1]), y0)
    assert sorted(tops, key=tops.get) == list(range(12))
    in_block = [k for k in at.rows if k.startswith("blocks.3.")]
    assert in_block == [k for k in log["layers"] if k.startswith("blocks.3.")]  # log order inside a block
    assert_cells_match(log, render(log), at)


def test_two_experts_are_two_panels_grey_where_they_did_not_run():
    log = make_two_expert_log(blocks=40, n_steps=40, switch_at=16)
    at = layout(log)
    image = render(log)
    assert_geometry(log, at, 720)
    assert [p.component for p in at.panels] == ["transformer", "transformer_2"]
    first, second = at.panels
    assert first.bottom < second.top  # stacked, apart
    assert all(k.startswith("transformer.") for g in first.groups for k in g.keys)
    assert all(k.startswith("transformer_2.") for g in second.groups for k in g.keys)
    assert first.groups[0].label == "blocks.0" or first.groups[0].label.startswith("blocks.0-")
    assert "ran steps 0-15" in first.title and "gamma 0.9" in first.title
    assert "ran steps 16-39" in second.title and "gamma 1.1" in second.title
    assert_cells_match(log, image, at, samples=300)
    # every cell of the expert that did not run is grey, the one that ran never is
    for step, x0, x1 in at.columns:
        x = (x0 + x1 - 1) // 2
        idle, busy = (second, first) if step < 16 else (first, second)
        for panel, grey in ((idle, True), (busy, False)):
            for key in (panel.groups[0].keys[0], panel.groups[-1].keys[-1]):
                y0, y1 = at.rows[key]
                assert (image.getpixel((x, (y0 + y1 - 1) // 2)) == NOT_RUN) is grey
    texts = " ".join(t for _, _, t, _ in at.texts)
    assert "gamma transformer 0.9, transformer_2 1.1" in texts
    assert "not run in this step" in texts and "1 adapted by one LoRA only" in texts
    assert_labels_apart(at)


def test_single_denoiser_listed_in_denoisers_is_one_panel():
    log = make_log(wan_paths(4), n_steps=6, denoisers=["transformer"])
    at = layout(log)
    (panel,) = at.panels
    assert panel.component is None and panel.title == ""
    assert_cells_match(log, render(log), at)


def test_one_step_one_layer():
    log = make_log(["transformer_blocks.0.attn.to_q"], n_steps=1)
    at = layout(log)
    image = render(log)
    assert_geometry(log, at, 720)
    assert_cells_match(log, image, at, samples=1)
    assert max(image.size) <= 720
    assert [t for _, _, t in at.tick_labels] == ["0"]
    texts = " ".join(t for _, _, t, _ in at.texts)
    assert "1 layer both" in texts and "1 step" in texts and "1 steps" not in texts


def test_150_steps_ticks_thinned_and_legible():
    log = make_log(sdxl_paths()[:64], n_steps=150)
    at = layout(log)
    image = render(log)
    assert_geometry(log, at, 720)
    assert max(image.size) <= 720
    assert_cells_match(log, image, at)
    text_font = selection_map.font()
    labels = at.tick_labels
    assert 3 <= len(labels) < 40 and labels[0][2] == "0"
    for (xa, _, a), (xb, _, _) in zip(labels, labels[1:]):
        assert xa + text_font.getlength(a) < xb  # never touching
    assert labels[-1][0] + text_font.getlength(labels[-1][2]) <= at.width


def test_1000_layers_150_steps_stays_under_2000_pixels():
    paths = [f"layers.{i // 8}.{p}" for i, p in enumerate(ATTENTION * 125)]
    log = make_log(paths, n_steps=150)
    at = layout(log)
    image = render(log)
    assert_geometry(log, at, 720)
    assert max(image.size) <= 2000
    assert {y1 - y0 for y0, y1 in at.rows.values()} == {1}
    assert_labels_apart(at)
    assert_cells_match(log, image, at, samples=500)


def test_max_side_shrinks_and_grows_cells():
    log = make_log(sdxl_paths()[:64], n_steps=20)
    small, large = layout(log, max_side=400), layout(log, max_side=1400)
    def height(at):
        y0, y1 = next(iter(at.rows.values()))
        return y1 - y0
    assert height(small) < height(large)
    assert max(small.width, small.height) <= 400 + 40  # the header's lines cannot shrink below their text
    assert max(large.width, large.height) <= 1400


def test_chosen_generation_is_drawn():
    log = make_log(sdxl_paths()[:64], n_steps=12, generations=3)
    for generation in (0, 1, -1):
        at = layout(log, generation=generation)
        assert_cells_match(log, render(log, generation=generation), at, generation=generation, seed=generation)
    assert any("generation 1 of 3" in t for _, _, t, _ in layout(log, generation=0).texts)
    with pytest.raises(IndexError, match="3 recorded"):
        layout(log, generation=3)


@pytest.mark.parametrize("method, says", [("klora", "generate an image"), ("merge", "'merge'")])
def test_no_generations_says_so(method, says):
    log = make_log(sdxl_paths()[:64], n_steps=0, method=method)
    log["generations"] = []
    at = layout(log)
    image = render(log)
    assert at.message and says in at.message and not at.rows
    assert image.size == (at.width, at.height) and 300 <= image.width <= 720 and image.height < 300
    drawn = [t for _, _, t, _ in at.texts]
    assert any(says in t for t in drawn) or says in " ".join(drawn)
    # something is written in the message area: not a blank picture
    assert len(set(image.getdata())) > 2
