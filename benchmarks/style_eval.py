"""Is the style recognisable, and is the content still there? Style transfer measured, method by method.

    .venv/bin/python benchmarks/style_eval.py [--steps 60] [--threads 2] [--sheet docs/style-transfer.jpg]

1. A judge: a small CNN trained here on 32×32 patches of the eight shipped paintings (at the
   128-pixel scale results are made at; random crops, scales and mirror images). The right
   quarter of every painting is held out to check the judge itself. A second judge sees
   only grey patches, so a method cannot pass it on the painting's palette alone.
2. Every content photo of ../shared/data/styles/content × every shipped style, by each method
   (and the photo unchanged, the baseline): the judge averages its probabilities over all
   patches of the result; a hit is the target painting. Chance is one in eight.
3. Content kept: the correlation of Sobel edge magnitudes of the result and of the photo
   (greyscale, same size, a light blur first): 1 for the photo itself, about 0 for an
   unrelated picture.
--sheet writes a contact sheet: the paintings across the top, each photo down the side,
the `patch` results between them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import atelier  # noqa: F401 — first, before torch: MKL's AVX-512 kernels on AMD processors too (atelier/__init__.py)
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atelier.images import style  # noqa: E402
from atelier.images.png import encode_png  # noqa: E402
from atelier.models.tagger import Tagger, TaggerConfig  # noqa: E402

CONTENT_DIR = ROOT.parent / "shared" / "data" / "styles" / "content"
SIDE, CROP = 128, 32


def painting_tensors() -> dict[str, torch.Tensor]:
    return {name: style.to_tensor(style.fit_size(style.load_style(name), SIDE)) for name in sorted(style.list_styles())}


def grey(x: torch.Tensor) -> torch.Tensor:
    return style.luminance(x).expand(-1, 3, -1, -1)


def crops(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n random CROP×CROP patches of (1, 3, H, W), each at a random scale 0.75–1.33 and maybe mirrored."""
    out = []
    for _ in range(n):
        f = float(torch.empty(1).uniform_(0.75, 1.33, generator=gen))
        h, w = x.shape[-2:]
        xs = F.interpolate(x, size=(max(CROP, round(h * f)), max(CROP, round(w * f))), mode="bilinear",
                           align_corners=False, antialias=True)
        i = int(torch.randint(xs.shape[-2] - CROP + 1, (1,), generator=gen))
        j = int(torch.randint(xs.shape[-1] - CROP + 1, (1,), generator=gen))
        p = xs[0, :, i:i + CROP, j:j + CROP]
        out.append(p.flip(-1) if torch.rand(1, generator=gen) < 0.5 else p)
    return torch.stack(out)


def all_patches(x: torch.Tensor) -> torch.Tensor:
    """Every CROP×CROP patch at stride CROP/2: (N, 3, CROP, CROP)."""
    p = F.unfold(x, CROP, stride=CROP // 2)[0].T
    return p.reshape(-1, 3, CROP, CROP)


def train_judge(paintings: dict[str, torch.Tensor], *, greyscale: bool, steps: int, seed: int = 0):
    """(model, held-out patch accuracy): trained on the left three quarters of each painting."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    names = list(paintings)
    train = {n: x[..., : x.shape[-1] * 3 // 4] for n, x in paintings.items()}
    held = {n: x[..., x.shape[-1] * 3 // 4:] for n, x in paintings.items()}
    prep = (lambda t: grey(t) * 2 - 1) if greyscale else (lambda t: t * 2 - 1)  # noqa: E731
    model = Tagger(TaggerConfig(image_size=CROP, widths=(32, 64, 128, 128), dropout=0.3,
                                labels=[{"keyword": n, "gloss": n} for n in names]))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3)
    for _ in range(steps):
        xs, ys = [], []
        for k, n in enumerate(names):
            xs.append(crops(train[n], 8, gen))
            ys += [k] * 8
        x = prep(torch.cat(xs))
        x = x * (0.8 + 0.4 * torch.rand(len(x), 1, 1, 1, generator=gen))  # contrast
        loss = F.cross_entropy(model(x), torch.tensor(ys))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    right = total = 0
    with torch.no_grad():
        for k, n in enumerate(names):
            p = all_patches(held[n]) if held[n].shape[-1] >= CROP else crops(held[n], 16, gen)
            right += int((model(prep(p)).argmax(1) == k).sum())
            total += len(p)
    return (model, prep), right / total


@torch.no_grad()
def judged(judge, x: torch.Tensor) -> int:
    """The painting the judge sees in a whole picture: its probabilities averaged over every patch."""
    model, prep = judge
    return int(F.softmax(model(prep(all_patches(x))), 1).mean(0).argmax())


def edges(x: torch.Tensor) -> torch.Tensor:
    g = F.avg_pool2d(style.luminance(x), 3, stride=1, padding=1, count_include_pad=False)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    gx, gy = F.conv2d(g, kx, padding=1), F.conv2d(g, kx.transpose(-1, -2), padding=1)
    return (gx ** 2 + gy ** 2).sqrt()[..., 2:-2, 2:-2].flatten()


def edge_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    ea, eb = edges(a), edges(b)
    return float(torch.corrcoef(torch.stack([ea, eb]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="gram steps (patch uses at most 12 passes)")
    ap.add_argument("--strength", type=float, default=0.8)
    ap.add_argument("--judge-steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sheet", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paintings = painting_tensors()
    names = list(paintings)
    started = time.perf_counter()
    judge, judge_acc = train_judge(paintings, greyscale=False, steps=args.judge_steps)
    grey_judge, grey_acc = train_judge(paintings, greyscale=True, steps=args.judge_steps)
    print(f"judges trained in {time.perf_counter() - started:.0f} s; on the held-out quarter of each painting, "
          f"patch accuracy {judge_acc:.1%} (colour), {grey_acc:.1%} (grey); chance {1 / len(names):.1%}\n")
    features = style.RandomFeatures.from_pretrained(ROOT / "atelier" / "assets" / "models" / "style-transfer")
    photos = {p.stem: Image.open(p).convert("RGB") for p in sorted(CONTENT_DIR.iterdir())}
    methods = ["photo", "color", "gram", "patch"]
    tally = {m: {"hit": 0, "grey_hit": 0, "edges": [], "seconds": []} for m in methods}
    sheet_rows = []
    for pname, photo in photos.items():
        c = style.to_tensor(style.fit_size(photo, SIDE))
        row = [c]
        for k, sname in enumerate(names):
            for m in methods:
                if m == "photo":
                    x, secs = c, 0.0
                else:
                    r = style.transfer(photo, style.load_style(sname), features, method=m, strength=args.strength,
                                       steps=args.steps, max_side=SIDE)
                    x, secs = style.to_tensor(r.image), r.seconds
                t = tally[m]
                t["hit"] += judged(judge, x) == k
                t["grey_hit"] += judged(grey_judge, x) == k
                t["edges"].append(edge_similarity(c, x))
                t["seconds"].append(secs)
                if m == "patch":
                    row.append(x)
        sheet_rows.append(row)
    n = len(photos) * len(names)
    print(f"{len(photos)} photos × {len(names)} paintings, strength {args.strength}, max side {SIDE} px\n")
    print("| method | judged as the target painting | by the grey judge | edge similarity to the photo | s/image |")
    print("| --- | --- | --- | --- | --- |")
    for m in methods:
        t = tally[m]
        print(f"| {m} | {t['hit'] / n:.0%} ({t['hit']}/{n}) | {t['grey_hit'] / n:.0%} | "
              f"{np.mean(t['edges']):.2f} | {np.mean(t['seconds']):.2f} |")
    print(f"\nchance: {1 / len(names):.1%}")
    if args.sheet:
        write_sheet(args.sheet, paintings, sheet_rows)
        print(f"sheet: {args.sheet}")


def write_sheet(path: Path, paintings: dict[str, torch.Tensor], rows: list[list[torch.Tensor]], cell: int = 112) -> None:
    """Paintings across the top (blank corner), then one row per photo: the photo, then its patch results."""
    def fit(x: torch.Tensor) -> np.ndarray:
        im = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        im.thumbnail((cell, cell), Image.LANCZOS)
        canvas = Image.new("RGB", (cell + 4, cell + 4), "white")
        canvas.paste(im, ((cell + 4 - im.width) // 2, (cell + 4 - im.height) // 2))
        return np.asarray(canvas)

    blank = np.full((cell + 4, cell + 4, 3), 255, np.uint8)
    grid = [[blank] + [fit(x) for x in paintings.values()]] + [[fit(x) for x in row] for row in rows]
    sheet = np.concatenate([np.concatenate(r, 1) for r in grid], 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):  # photographs: a fifth of the PNG's bytes
        Image.fromarray(sheet).save(path, quality=88, optimize=True)
    else:
        path.write_bytes(encode_png(sheet, parameters="top: the paintings; left: the photos; between: method=patch, "
                                                      "strength 0.8 (benchmarks/style_eval.py --sheet)"))


if __name__ == "__main__":
    main()
