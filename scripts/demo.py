"""The pack's main job, end to end: a headless ComfyUI with this pack runs every example workflow
through its HTTP API (POST /prompt), and the files the workflows write are collected.

The ``reducio_tiny_*`` workflows run on the pack's embedded tiny *trained* models (``models/reducio``,
docs/embedded_models.md) and its shipped sample inputs: real results, measured and shown in contact
sheets. The other workflows name full-size models: with ``--models DIR`` (a ComfyUI-style models folder
holding e.g. ``reducio/reducio-ft4-fs32-attn23.safetensors``) they run on your real weights. Without it,
the full-size Reducio VAE workflows run as shipped with only their model file and input clip swapped
for the embedded trained VAE and its sample clip, and the full-size image-to-video workflow with its
model files, content image and caption swapped for the embedded tiny models' (real results, labelled
so); the others (the text-to-video graph needs a text-to-image model for its first stage) get
tiny stand-in files *in the real formats* (random or golden tiny weights: those outputs show that the
graphs run, not what the models can do, and are labelled so), because no full-size weights can be
downloaded here. Run with a ComfyUI's own Python from the repository root as ``python -m scripts.demo`` (scripts/demo.sh does).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from testkit.comfyui import InProcessComfy, locate_comfyui
from testkit.golden import GOLDEN_DIR
from testkit.server import ComfyServer, PromptFailed
from testkit.workflows import API_DIR, load

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# Recipes: what each example workflow needs before it runs (inputs, stand-ins) and how its shipped
# graph is adapted to the stand-ins (nothing is adapted when real models are used).
# ---------------------------------------------------------------------------------------------------
class Recipes:
    def __init__(self, server: ComfyServer, real_models: bool, comfy: InProcessComfy | None):
        self.server, self.real_models, self.comfy = server, real_models, comfy

    def prepare_reducio_vae(self) -> None:
        from testkit.workflows import VIDEO_NAME, write_test_video

        video = self.server.input_dir / VIDEO_NAME
        if not video.exists():
            write_test_video(video, 24, 64, 80)   # small: stand-ins run on the CPU
        if self.real_models:
            return
        from safetensors.torch import load_file, save_file

        base = GOLDEN_DIR / "reducio"
        config = json.loads((base / "tiny_config.json").read_text())["constructor_kwargs"]
        folder = self.server.models_dir / "reducio"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(load_file(str(base / "tiny_weights.safetensors")),
                  str(folder / "reducio-ft4-fs32-attn23.safetensors"),
                  metadata={"reducio_config": json.dumps(config), "format": "pt"})

    def prepare_reducio_dit(self) -> None:
        from testkit import reducio_dit_standins as standins

        if self.real_models:
            return
        standins.write_all(self.server.models_dir, self.server.input_dir, GOLDEN_DIR,
                           self.comfy.install.root)

    def prepare_ditfastattn(self) -> None:
        if self.real_models:
            return
        from testkit import fastattn_tiny as tiny
        from testkit.workflows import FASTATTN_MODEL_FILE as MODEL_FILE

        folder = self.server.models_dir / "diffusion_models"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / MODEL_FILE).exists():
            tiny.write_diffusion_model_file(tiny.tiny_cosmos_predict2(seed=0), folder / MODEL_FILE)

    def adapt(self, name: str, prompt: dict) -> dict:
        if self.real_models or uses_embedded_models(name):
            return prompt
        if name in EMBEDDED_VAE_SWAP:
            from reducio import embedded

            for node in prompt.values():
                if node["class_type"] == "ReducioVAELoader":
                    node["inputs"]["checkpoint"] = embedded.VAE_FILE
                if node["class_type"] == "LoadVideo":
                    node["inputs"]["file"] = embedded.SAMPLE_CLIP
            return prompt
        if name in EMBEDDED_DIT_SWAP:
            return swap_to_embedded_dit(prompt)
        if name.startswith("reducio_dit_"):
            from testkit import reducio_dit_standins as standins

            return standins.adapt_prompt_to_standins(prompt, steps=4)
        if name.startswith("ditfastattn_"):
            # The tests' small settings (size, steps) for a CPU; the graph itself is the shipped one.
            from testkit.workflows import COMMON_OVERRIDES, OVERRIDES

            for overrides in (COMMON_OVERRIDES, OVERRIDES.get(name, {})):
                for node_id, values in overrides.items():
                    prompt[node_id]["inputs"].update(values)
        return prompt

    def before(self, name: str) -> None:
        if uses_embedded_models(name):
            return   # the pack provides the models and copies the sample inputs when ComfyUI loads it
        if name.startswith("reducio_vae_") and (self.real_models or name not in EMBEDDED_VAE_SWAP):
            self.prepare_reducio_vae()
        if name == "reducio_vae_decode_from_latent":
            # Decode the latent file the encode workflow wrote (LoadLatent reads from input/).
            latents = sorted((self.server.output_dir).rglob("*.latent"), key=os.path.getmtime)
            contents = sorted((self.server.output_dir).rglob("*content*.png"), key=os.path.getmtime)
            if latents:
                shutil.copy(latents[-1], self.server.input_dir / "reducio_motion.latent")
            if contents:
                shutil.copy(contents[-1], self.server.input_dir / "reducio_content.png")
        if name.startswith("reducio_dit_") and (self.real_models or name not in EMBEDDED_DIT_SWAP):
            self.prepare_reducio_dit()
        if name.startswith("ditfastattn_"):
            self.prepare_ditfastattn()


# ---------------------------------------------------------------------------------------------------
# Quality: each Reducio workflow's output measured from its files, with a contact sheet beside it.
# ---------------------------------------------------------------------------------------------------
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov")
EMBEDDED_PREFIX = "reducio_tiny_"
# without --models these run on the embedded trained VAE (Recipes.adapt swaps the model file and clip)
EMBEDDED_VAE_SWAP = ("reducio_vae_roundtrip", "reducio_vae_encode_to_latent", "reducio_vae_decode_from_latent")


# without --models this runs on the embedded trained DiT and VAE (swap_to_embedded_dit); the text-to-video
# graph cannot: its first stage needs a text-to-image model, which the pack does not train
EMBEDDED_DIT_SWAP = ("reducio_dit_image_to_video",)


def swap_to_embedded_dit(prompt: dict) -> dict:
    """The shipped full-size image-to-video graph on the embedded tiny models: the model files, the content
    image, its size and the caption swapped for those of the tiny example workflow; the optional CLIP
    vision branch left out (the tiny DiT reads no CLIP image tokens, docs/embedded_models.md)."""
    from reducio import embedded

    tiny = load(API_DIR / "reducio_tiny_image_to_video.json")
    files = {"ReducioDiTLoader": ("dit_name", embedded.DIT_FILE), "ReducioVAELoader": ("checkpoint", embedded.VAE_FILE),
             "CLIPLoader": ("clip_name", embedded.TEXT_ENCODER.file_name),
             "VAELoader": ("vae_name", embedded.IMAGE_VAE.file_name), "LoadImage": ("image", embedded.SAMPLE_CONTENT)}
    for node_id, node in list(prompt.items()):
        if node["class_type"] in files:
            key, value = files[node["class_type"]]
            node["inputs"][key] = value
        elif node["class_type"] == "CLIPVisionLoader":
            del prompt[node_id]
    video = _node(prompt, "ReducioImageToVideo")
    video["inputs"].pop("clip_vision", None)
    video["inputs"].update(width=embedded.SAMPLE_SIZE, height=embedded.SAMPLE_SIZE)
    prompt[video["inputs"]["positive"][0]]["inputs"]["text"] = \
        tiny[_node(tiny, "ReducioImageToVideo")["inputs"]["positive"][0]]["inputs"]["text"]
    return prompt


def uses_embedded_models(name: str) -> bool:
    return name.startswith(EMBEDDED_PREFIX)


def _node(prompt: dict, class_type: str) -> dict | None:
    return next((n for n in prompt.values() if n["class_type"] == class_type), None)


def _output(files: list[Path], marker: str, suffixes=VIDEO_SUFFIXES) -> Path | None:
    found = [f for f in files if marker in f.name and f.suffix.lower() in suffixes]
    return found[-1] if found else None


def measure(name: str, prompt: dict, files: list[Path], input_dir: Path, dest: Path, title: str,
            vae_clip: str) -> dict | None:
    """The figures of one workflow's output (None for workflows that make no clip to judge); ``vae_clip``:
    the clip the VAE encode workflow loaded (what a decoded latent is compared with)."""
    from reducio.output_quality import generation_report, reconstruction_report

    if name.endswith("vae_roundtrip") or name == "reducio_vae_decode_from_latent":
        roundtrip = name.endswith("vae_roundtrip")
        source = input_dir / _node(prompt, "LoadVideo")["inputs"]["file"] if roundtrip else input_dir / vae_clip
        output = _output(files, "reconstruction" if roundtrip else "decoded")
        if output is None or not source.exists():
            return None
        return reconstruction_report(source, output, dest / "contact_sheet.png", title=title)
    if _node(prompt, "ReducioImageToVideo") is not None:
        node = _node(prompt, "ReducioImageToVideo")
        caption = prompt[node["inputs"]["positive"][0]]["inputs"].get("text", "")
        content_node = prompt[node["inputs"]["content_image"][0]]
        content = (input_dir / content_node["inputs"]["image"] if content_node["class_type"] == "LoadImage"
                   else _output(files, "content", (".png",)))
        output = _output(files, "")
        if output is None or content is None or not content.exists():
            return None
        return generation_report(content, output, dest / "contact_sheet.png", caption=caption, title=title)
    return None


def describe(figures: dict | None) -> str:
    if not figures:
        return ""
    if "psnr_db" in figures:
        return (f"PSNR {figures['psnr_db']} dB, SSIM {figures['ssim']} (content repeated "
                f"{figures['repeat_content']['psnr_db']} dB)")
    text = f"frame-7 PSNR {figures['frame7_psnr_db']} dB, camera moves {figures['camera_direction']}"
    if figures["caption_direction"]:
        text += f" (caption: {figures['caption_direction']})"
    return text


def vae_clip(embedded_vae: bool) -> str:
    """The clip the Reducio VAE workflows load in this run."""
    if embedded_vae:
        from reducio import embedded

        return embedded.SAMPLE_CLIP
    from testkit.workflows import VIDEO_NAME

    return VIDEO_NAME


# Encode-to-file runs before decode-from-file; everything else in name order.
ORDER_FIRST = ["reducio_vae_roundtrip", "reducio_vae_encode_to_latent", "reducio_vae_decode_from_latent"]


def workflow_names() -> list[str]:
    names = sorted(p.stem for p in API_DIR.glob("*.json"))
    return [n for n in ORDER_FIRST if n in names] + [n for n in names if n not in ORDER_FIRST]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="a ComfyUI models folder with real weights")
    parser.add_argument("--out", type=Path, default=REPO / "demo_output", help="where the outputs are copied")
    parser.add_argument("--only", nargs="*", help="run only these workflows (file names in workflows/api without .json)")
    args = parser.parse_args(argv)

    install = locate_comfyui()
    if install is None:
        print("No ComfyUI found: run scripts/setup_comfyui.sh or set COMFYUI_PATH.", file=sys.stderr)
        return 2
    if args.models is None and not GOLDEN_DIR.is_dir():
        print(f"Stand-in models need the golden tiny weights in {GOLDEN_DIR} (restore it with "
              "`git checkout -- tests/golden`, or pass --models).", file=sys.stderr)
        return 2

    base = REPO / "build" / "demo"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    if args.models is not None:
        os.symlink(args.models.resolve(), base / "models", target_is_directory=True)
    # Stand-ins are built from ComfyUI's own classes, so ComfyUI is imported here too.
    comfy = InProcessComfy(install, base / "inprocess") if args.models is None else None
    server = ComfyServer(install, base)
    recipes = Recipes(server, args.models is not None, comfy)
    print(f"Starting ComfyUI {install.version} (headless, CPU) with the pack ...", flush=True)
    server.start()
    results = []
    try:
        for name in workflow_names():
            if args.only and name not in args.only:
                continue
            recipes.before(name)
            prompt = recipes.adapt(name, load(API_DIR / f"{name}.json"))
            started = time.time()
            try:
                entry = server.run_prompt(prompt, timeout=1800)
            except PromptFailed as err:
                results.append((name, "FAILED", time.time() - started, [str(err).splitlines()[0]]))
                continue
            dest = args.out / name
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            copied = []
            for path in server.output_files(entry):
                if path.is_file():
                    shutil.copy(path, dest / path.name)
                    copied.append(dest / path.name)
            seconds = time.time() - started
            swapped = args.models is None and name in EMBEDDED_VAE_SWAP + EMBEDDED_DIT_SWAP
            stand_in = args.models is None and not uses_embedded_models(name) and not swapped
            embedded_label = "embedded tiny VAE" if name in EMBEDDED_VAE_SWAP else "embedded tiny DiT and VAE"
            title = (f"{name} (random stand-in weights)" if stand_in else
                     f"{name} (on the {embedded_label})" if swapped else name)
            figures = measure(name, prompt, copied, server.input_dir, dest, title, vae_clip(args.models is None))
            if figures:
                copied.append(Path(figures["sheet"]))
                (dest / "quality.json").write_text(json.dumps(figures, indent=1) + "\n")
            files = [str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in copied]
            note = (" -- random stand-in weights" if stand_in else
                    f" -- the {embedded_label} and {'its sample clip' if name in EMBEDDED_VAE_SWAP else 'their sample image and caption'}"
                    if swapped else "")
            results.append((name, "ok", seconds, files, describe(figures) + (note if figures else "")))
    finally:
        server.stop()
    print("\nworkflow results" + ("" if args.models is not None else
                                  f" ({EMBEDDED_PREFIX}*: the embedded trained tiny models; reducio_vae_* and "
                                  "reducio_dit_image_to_video: the embedded trained models in the shipped graphs; the "
                                  "others: stand-in weights, which show that the graph runs, not a model's quality)"))
    for name, status, seconds, files, *quality in results:
        print(f"  {status:6s} {name:40s} {seconds:6.1f}s  " + ", ".join(files))
        if quality and quality[0]:
            print(f"         quality: {quality[0]}")
    failed = [r for r in results if r[1] != "ok"]
    print(f"demo: {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
