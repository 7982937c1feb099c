"""Build the evaluation set: 30 real photographs the embedded default model never saw, square crops at 128 and 256 px.

    python data/eval_set.py                 # -> data/eval/{128,256}/<name>.png and data/eval/manifest.json
    python data/eval_set.py --check         # verify what is there against data/eval_manifest.json, build nothing

Sources are two Debian packages (the classic OpenCV test photos of ``opencv-doc``'s ``examples/data`` and the
nature photos of ``mate-backgrounds``); neither is among the training photos of deqir/weights/README.md
(scikit-image/scikit-learn photos and ``lomiri-wallpapers-16.04``). Their licences differ per file (GPL-2+ for
the MATE photos, various for the OpenCV test images), so the images are not committed: this script takes them from
the installed package, or downloads the ``.deb`` with ``apt-get download`` (no root needed) and unpacks it with
``dpkg-deb -x`` into ``data/eval/.cache``. Every source file is checked against the sha256 in
``data/eval_manifest.json``; a mismatch (another package version) is an error naming the file. Outputs are
rebuilt only when missing or when their hash differs (idempotent); ``data/eval/manifest.json`` lists what was built.

Crops: the largest centred square, resized with Pillow's Lanczos filter (antialiased) to each size, RGB, 8 bit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "eval_manifest.json"
SIZES = (128, 256)
OCV = "usr/share/doc/opencv-doc/examples/"
MATE = "usr/share/backgrounds/mate/nature/"

#: (output name, Debian package, path inside the package)
SOURCES: tuple[tuple[str, str, str], ...] = (
    ("baboon", "opencv-doc", OCV + "data/baboon.jpg"),
    ("fruits", "opencv-doc", OCV + "data/fruits.jpg"),
    ("butterfly", "opencv-doc", OCV + "data/butterfly.jpg"),
    ("messi", "opencv-doc", OCV + "data/messi5.jpg"),
    ("apple", "opencv-doc", OCV + "data/apple.jpg"),
    ("orange", "opencv-doc", OCV + "data/orange.jpg"),
    ("building", "opencv-doc", OCV + "data/building.jpg"),
    ("home", "opencv-doc", OCV + "data/home.jpg"),
    ("aerial", "opencv-doc", OCV + "data/aero1.jpg"),
    ("leuven", "opencv-doc", OCV + "data/leuvenA.jpg"),
    ("graffiti", "opencv-doc", OCV + "data/graf1.png"),
    ("rubberwhale", "opencv-doc", OCV + "data/rubberwhale1.png"),
    ("squirrel", "opencv-doc", OCV + "data/squirrel_cls.jpg"),
    ("street_sign", "opencv-doc", OCV + "text/scenetext01.jpg"),
    ("parking_sign", "opencv-doc", OCV + "text/scenetext02.jpg"),
    ("barrier", "opencv-doc", OCV + "text/scenetext05.jpg"),
    ("shopfront", "opencv-doc", OCV + "text/scenetext06.jpg"),
    ("robin", "opencv-doc", OCV + "hfs/data/000.jpg"),
    ("plant", "opencv-doc", OCV + "alphamat/input_images/plant.jpg"),
    ("circuit", "opencv-doc", OCV + "data/board.jpg"),
    ("dog", "opencv-doc", OCV + "data/chicky_512.png"),
    ("aloe", "opencv-doc", OCV + "data/aloeL.jpg"),
    ("dune", "mate-backgrounds", MATE + "Dune.jpg"),
    ("fresh_flower", "mate-backgrounds", MATE + "FreshFlower.jpg"),
    ("garden", "mate-backgrounds", MATE + "Garden.jpg"),
    ("meadow", "mate-backgrounds", MATE + "GreenMeadow.jpg"),
    ("ladybird", "mate-backgrounds", MATE + "LadyBird.jpg"),
    ("raindrops", "mate-backgrounds", MATE + "RainDrops.jpg"),
    ("two_wings", "mate-backgrounds", MATE + "TwoWings.jpg"),
    ("yellow_flower", "mate-backgrounds", MATE + "YellowFlower.jpg"),
)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def square_crop(img: Image.Image, size: int) -> Image.Image:
    """The largest centred square of ``img`` (RGB), resized to size x size with Lanczos."""
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)


def package_root(package: str, cache: Path) -> Path:
    """A directory holding ``package``'s files: ``/`` when it is installed, else its unpacked ``.deb`` in ``cache``."""
    if shutil.which("dpkg-query"):
        res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
        if res.returncode == 0 and "installed" in res.stdout.split():
            return Path("/")
    root = cache / package
    if root.is_dir() and (root / ".complete").is_file():
        return root
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            raise SystemExit(f"error: {package} is not installed and {tool} is missing: install the package "
                             f"(apt-get install {package}) or run this on a Debian/Ubuntu machine")
    cache.mkdir(parents=True, exist_ok=True)
    debs = list(cache.glob(f"{package}_*.deb"))
    if not debs:
        res = subprocess.run(["apt-get", "download", package], cwd=cache, capture_output=True, text=True)
        debs = list(cache.glob(f"{package}_*.deb"))
        if res.returncode != 0 or not debs:
            msg = (res.stderr.strip().splitlines() or ["no .deb downloaded"])[-1]
            raise SystemExit(f"error: apt-get download {package} failed ({msg}); run 'apt-get update' first or "
                             f"install it (apt-get install {package})")
    if root.exists():
        shutil.rmtree(root)
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
    (root / ".complete").write_text(debs[0].name)
    return root


def build(out: Path, check_only: bool = False) -> dict:
    """Build (or, with ``check_only``, verify) the set under ``out``; returns the manifest written."""
    expected = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}
    roots: dict[str, Path] = {}
    manifest: dict = {"sizes": list(SIZES), "images": {}}
    problems = []
    for name, package, rel in SOURCES:
        want = expected.get("images", {}).get(name, {})
        outputs = {str(s): out / str(s) / f"{name}.png" for s in SIZES}
        have = {s: sha256(p) for s, p in outputs.items() if p.is_file()}
        if want and all(have.get(s) == want.get("outputs", {}).get(s) for s in outputs):
            manifest["images"][name] = want  # built before, unchanged
            continue
        if check_only:
            problems.append(name)
            continue
        if package not in roots:
            roots[package] = package_root(package, out / ".cache")
        src = roots[package] / rel
        if not src.is_file():
            raise SystemExit(f"error: {src} is missing from {package}: a different package version? "
                             f"(expected {rel})")
        src_hash = sha256(src)
        if want and src_hash != want.get("source_sha256"):
            raise SystemExit(f"error: {rel} of {package} has sha256 {src_hash[:12]}..., the manifest expects "
                             f"{want['source_sha256'][:12]}... (another package version); delete data/eval/.cache "
                             f"or update data/eval_manifest.json deliberately")
        with Image.open(src) as img:
            img.load()
            entries = {}
            for s, p in outputs.items():
                p.parent.mkdir(parents=True, exist_ok=True)
                square_crop(img, int(s)).save(p)
                entries[s] = sha256(p)
        manifest["images"][name] = {"package": package, "path": rel, "source_sha256": src_hash, "outputs": entries}
        changed = [s for s in entries if want and entries[s] != want.get("outputs", {}).get(s)]
        if changed:
            print(f"note: {name}: the {'/'.join(changed)} px crop differs from the manifest's (another Pillow "
                  f"version resamples differently); the source file matches", file=sys.stderr)
    if check_only:
        if problems:
            raise SystemExit(f"error: {len(problems)} image(s) missing or changed under {out}: "
                             f"{', '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}; run "
                             f"python data/eval_set.py")
        return expected
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "eval", help="output folder (default data/eval)")
    ap.add_argument("--check", action="store_true", help="verify the built set against the manifest only")
    ap.add_argument("--write-manifest", action="store_true",
                    help="also write the result as data/eval_manifest.json (maintainers, after a deliberate change)")
    args = ap.parse_args(argv)
    manifest = build(args.out, check_only=args.check)
    if args.write_manifest:
        MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
    n = len(manifest.get("images", {}))
    print(f"{n} photos at {', '.join(map(str, SIZES))} px under {args.out}" + (" (verified)" if args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
