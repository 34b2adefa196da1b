#!/usr/bin/env bash
# The celebctl demo on the built-in offline `tiny` model. Run it with `make demo`.
#
# It builds the basis, adds two people from photos, refits them together, renders a prompt that
# names both, exports one of them for other tools, fits a small cast with add-many and renders a
# prompts file. The tiny model has random weights: it
# exercises every step of the real pipeline, but its pictures are noise.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$PWD/demo-output"
export CELEBCTL_HOME="${CELEBCTL_HOME:-$OUT/home}"
CELEBCTL=(.venv/bin/celebctl)
MODEL=(--model tiny)
mkdir -p "$OUT"
started=$(date +%s)
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "celebctl $(${CELEBCTL[@]} --version | cut -d' ' -f2); data home: $CELEBCTL_HOME"

step "Photos: a second, tighter shot of 'alice', and a face for 'bob' (mirrored, recoloured)"
.venv/bin/python - "$OUT/alice-2.png" "$OUT/bob.png" <<'PY'
import sys
from PIL import Image, ImageOps
image = Image.open("tests/data/astronaut.png").convert("RGB")
w, h = image.size
image.crop((w // 8, 0, w - w // 8, h - h // 4)).resize((w, h)).save(sys.argv[1])
r, g, b = ImageOps.mirror(image).split()
Image.merge("RGB", (b, r, g)).save(sys.argv[2])
PY
echo "wrote $OUT/alice-2.png and $OUT/bob.png"

step "celebctl basis build ${MODEL[*]}"
"${CELEBCTL[@]}" basis build "${MODEL[@]}"

step "celebctl add alice tests/data/astronaut.png $OUT/alice-2.png ${MODEL[*]} --replace  (several photos of one person)"
"${CELEBCTL[@]}" add alice tests/data/astronaut.png "$OUT/alice-2.png" "${MODEL[@]}" --replace

step "celebctl add bob $OUT/bob.png ${MODEL[*]} --replace"
"${CELEBCTL[@]}" add bob "$OUT/bob.png" "${MODEL[@]}" --replace

step "celebctl joint alice bob"
"${CELEBCTL[@]}" joint alice bob

step "celebctl list"
"${CELEBCTL[@]}" list

step "celebctl render \"(alice:1.2) shaking hands with bob, [blurry background]\" --dry-run  (how the prompt is read: WebUI syntax)"
"${CELEBCTL[@]}" render "(alice:1.2) shaking hands with bob, [blurry background]" --dry-run

step "celebctl render \"alice shaking hands with bob\" -n 4 --grid"
"${CELEBCTL[@]}" render "alice shaking hands with bob" -n 4 --grid --out "$OUT/renders"

step "celebctl export alice (WebUI/ComfyUI, diffusers, and a .celeb bundle)"
"${CELEBCTL[@]}" export alice --format a1111 -o "$OUT/alice.safetensors" --force
"${CELEBCTL[@]}" export alice --format diffusers -o "$OUT/alice-diffusers" --force
"${CELEBCTL[@]}" export alice --format celeb -o "$OUT/alice.celeb" --force

step "Batch: celebctl add-many $OUT/cast ${MODEL[*]}  (a folder per person; resumable)"
.venv/bin/python - "$OUT/cast" <<'PY'
import sys
from pathlib import Path
from PIL import Image, ImageEnhance, ImageOps
image = Image.open("tests/data/astronaut.png").convert("RGB")
cast = {"carol": ImageEnhance.Color(image).enhance(0.4), "dave": ImageOps.mirror(image).rotate(4)}
for name, photo in cast.items():
    (Path(sys.argv[1]) / name).mkdir(parents=True, exist_ok=True)
    photo.save(Path(sys.argv[1]) / name / "photo.png")
PY
"${CELEBCTL[@]}" add-many "$OUT/cast" "${MODEL[@]}" --steps 40
printf 'carol at the beach\ndave shaking hands with carol\n' > "$OUT/prompts.txt"

step "celebctl render --prompts $OUT/prompts.txt --seeds 2  (one prompt a line, batched, resumable)"
"${CELEBCTL[@]}" render --prompts "$OUT/prompts.txt" --seeds 2 "${MODEL[@]}" --out "$OUT/renders/batch"

step "SDXL: celebctl add xena tests/data/astronaut.png --model tiny-xl, then render"
"${CELEBCTL[@]}" add xena tests/data/astronaut.png --model tiny-xl --replace --steps 40
"${CELEBCTL[@]}" render "xena riding a bike" --model tiny-xl -n 2 --out "$OUT/renders"
"${CELEBCTL[@]}" export xena --format a1111 -o "$OUT/xena-sdxl.safetensors" --force

elapsed=$(( $(date +%s) - started ))
step "Done in ${elapsed} s. Everything is under $OUT:"
echo "  registry (identities, basis, tiny model): $CELEBCTL_HOME"
echo "  renders and contact sheet:                $OUT/renders"
echo "  batch (add-many, render --prompts):       $OUT/cast, $OUT/renders/batch"
echo "  exports:                                  $OUT/alice.safetensors, $OUT/alice-diffusers/, $OUT/alice.celeb"
echo "  SDXL (tiny-xl) export, clip_l + clip_g:   $OUT/xena-sdxl.safetensors"
echo
echo "The built-in tiny model has random weights, so its pictures are noise: the demo shows the"
echo "whole pipeline working, not a likeness. For real pictures use a real model, e.g."
echo "  celebctl add alice photo.jpg --model stable-diffusion-v1-5/stable-diffusion-v1-5"
echo "(see README.md)."
