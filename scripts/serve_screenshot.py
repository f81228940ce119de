"""The README's picture of the page (docs/serve.png): the demo's model and index served, one demo
picture uploaded in headless Chromium, its most probable tag clicked for the heat map, the page saved.

    python scripts/serve_screenshot.py [--demo alt-i2v-demo] [--out docs/serve.png]

Runs ``--demo --quick`` into DEMO first when it holds no model yet (about a minute on 2 cores). Needs
Debian's chromium and chromium-driver and the test extra (selenium).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from PIL import Image  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default="alt-i2v-demo", help="demo directory (--demo DIR --quick is run if needed)")
    p.add_argument("--out", default=str(ROOT / "docs" / "serve.png"))
    p.add_argument("--post", type=int, default=None, help="demo post id to upload (default: the demo's query)")
    p.add_argument("--tag", help="the tag to click (default: night_sky if shown, else the most probable)")
    args = p.parse_args()

    from _browser import chromium, show_heat_map, thumbnails_loaded, upload

    from alt_i2v.config import ServeConfig
    from alt_i2v.demo import run_demo
    from alt_i2v.serve import create_app
    from alt_i2v.serve.server import running
    from alt_i2v.tagging.tagger import predict_tags

    run = Path(args.demo) / "quick"
    if not (run / "demo.json").exists():
        run_demo(args.demo, quick=True, quiet=True)
    summary = json.loads((run / "demo.json").read_text())
    query = Path(summary["similar"]["query"])
    if args.post is not None:
        from alt_i2v.data.posts import iter_posts, post_image_path

        post = next(p for p in iter_posts(run / "data") if p["id"] == args.post)
        query = post_image_path(post, run / "data")
    model, index = run / "model", run / "similar.index"
    tags = predict_tags(query, model=model)
    tag = args.tag or ("night_sky" if "night_sky" in tags else next(iter(tags)))
    with running(create_app(model, index, ServeConfig(top_k=7))) as url, tempfile.TemporaryDirectory() as profile:
        browser = chromium(Path(profile), 1280, 1000)
        try:
            wait = upload(browser, url, query)
            show_heat_map(browser, wait, tag)
            wait.until(thumbnails_loaded)
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.set_window_size(1280, height + 100)  # the whole page, similar images included
            png = browser.get_screenshot_as_png()
        finally:
            browser.quit()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import io

    shot = Image.open(io.BytesIO(png)).convert("RGB")
    shot.quantize(256, method=Image.Quantize.FASTOCTREE).save(out, optimize=True)  # ~90 KiB, not ~370
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB): {query.name}, heat map of {tag!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
