"""screen.py: ok/ng by keep and reject tags, relative paths kept, no overwrite, errors set aside, the CSV
report, dry runs, and resuming after a crash or a kill -9 with nothing lost or placed twice."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from _inference_model import png_bytes, shapes, trained_model, truncated_png
from alt_i2v.cli import main
from alt_i2v.errors import UsageError
from alt_i2v.tagging.screening import REPORT, decide, screen

ROOT = Path(__file__).resolve().parent.parent
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def model_dir(built_data, tmp_path_factory) -> Path:
    return trained_model(built_data, tmp_path_factory)


def _folder(root: Path, n: int, seed: int = 0, size: int = 48) -> Path:
    """``n`` shape pictures spread over ``root`` and two sub-folders."""
    for i, img in enumerate(shapes(n, seed, size)):
        sub = ("", "a", "a/b")[i % 3]
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / f"img{i:04d}.png").write_bytes(png_bytes(img))
    return root


def _digests(root: Path) -> Counter:
    return Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _report(out: Path) -> list[dict]:
    with open(out / REPORT, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_decide_applies_reject_before_keep():
    names = ["red", "blue", "square"]
    thr = np.full(3, 0.5, np.float32)
    assert decide(np.array([0.9, 0.1, 0.7]), [0], [2], thr, names) == ("ng", "square", pytest.approx(0.7), "reject tag")
    assert decide(np.array([0.9, 0.6, 0.2]), [0, 1], [2], thr, names)[:3] == ("ok", "red", pytest.approx(0.9))
    assert decide(np.array([0.3, 0.4, 0.2]), [0, 1], [2], thr, names)[:2] == ("ng", "blue")  # best keep tag, too low
    assert decide(np.array([0.3, 0.4, 0.2]), [], [2], thr, names)[:2] == ("ok", "square")  # only --reject given


def test_screen_sorts_copies_reports_and_sets_errors_aside(model_dir, tmp_path):
    from alt_i2v.tagging.tagger import Tagger

    src = _folder(tmp_path / "raw", 24)
    tagger = Tagger(model_dir)
    red, square = tagger.vocab.index["red"], tagger.vocab.index["square"]
    images = sorted(p for p in src.rglob("img*.png"))
    probs = tagger.probabilities([str(p) for p in images])
    # thresholds inside the model's own range, so both piles and both rules are used whatever it learned
    t_red, t_square = float(np.quantile(probs[:, red], 0.3)), float(np.quantile(probs[:, square], 0.8))
    threshold = {"red": t_red, "square": t_square}
    (src / "a" / "broken.png").write_bytes(truncated_png(shapes(1, 5)[0]))
    (src / "notes.txt").write_text("not an image")
    before = _digests(src)
    out = tmp_path / "sorted"
    result = screen(src, model_dir, out, keep=["red"], reject=["square"], threshold=threshold, quiet=True)

    assert _digests(src) == before  # a copy leaves the source alone
    rows = {r["file"]: r for r in _report(out)}
    assert len(rows) == 25 and result.counts == {"ok": result.counts["ok"], "ng": 24 - result.counts["ok"], "error": 1}
    for p, pr in zip(images, probs):
        rel = p.relative_to(src).as_posix()
        row = rows[rel]
        rejected = pr[square] >= t_square
        want = "ng" if rejected else ("ok" if pr[red] >= t_red else "ng")
        assert row["decision"] == want
        assert row["tag"] == ("square" if rejected else "red")
        assert float(row["probability"]) == pytest.approx(float(pr[square if rejected else red]), abs=1e-3)
        assert row["rule"] == ("reject tag" if rejected else "keep tag" if want == "ok" else "no keep tag")
        assert row["destination"] == f"{want}/{rel}"
        assert (out / row["destination"]).read_bytes() == p.read_bytes()  # relative path kept
    assert 0 < result.counts["ok"] < 24 and {r["rule"] for r in rows.values()} >= {"reject tag", "keep tag"}
    err = rows["a/broken.png"]
    assert err["decision"] == "error" and err["destination"] == "error/a/broken.png" and "truncated" in err["rule"]
    assert (out / "error" / "a" / "broken.png").is_file()
    assert not (out / "ok" / "notes.txt").exists() and not (out / "ng" / "notes.txt").exists()

    again = screen(src, model_dir, out, keep=["red"], reject=["square"], threshold=threshold, quiet=True)
    assert again.resumed == 25 and again.counts == result.counts  # nothing redone
    assert sum(1 for p in out.rglob("*") if p.is_file() and ".screen" not in p.parts) == 26  # 25 + report


def test_a_name_taken_in_out_is_never_overwritten(model_dir, tmp_path):
    src = _folder(tmp_path / "raw", 3)
    out = tmp_path / "sorted"
    for pile in ("ok", "ng"):
        (out / pile).mkdir(parents=True)
        (out / pile / "img0000.png").write_bytes(b"someone else's file")
    screen(src, model_dir, out, reject=["square"], threshold=THRESHOLD, quiet=True)
    row = next(r for r in _report(out) if r["file"] == "img0000.png")
    assert row["destination"] == f"{row['decision']}/img0000-2.png"
    assert (out / row["decision"] / "img0000.png").read_bytes() == b"someone else's file"
    assert (out / row["destination"]).read_bytes() == (src / "img0000.png").read_bytes()


def test_dry_run_writes_only_the_report(model_dir, tmp_path):
    src = _folder(tmp_path / "raw", 6)
    out = tmp_path / "sorted"
    result = screen(src, model_dir, out, keep=["red"], threshold=THRESHOLD, move=True, dry_run=True, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == [REPORT]
    assert len(_report(out)) == 6 and sum(result.counts.values()) == 6
    assert len(list(src.rglob("*.png"))) == 6  # --move ignored: nothing moved


def test_a_crash_between_copy_and_journal_is_completed_without_duplicates(model_dir, tmp_path, monkeypatch):
    import alt_i2v.tagging.screening as screen_module

    src = _folder(tmp_path / "raw", 40)
    before = _digests(src)
    out = tmp_path / "sorted"
    real, calls = screen_module._carry, {"n": 0}

    def crash_on_the_fifth(*args, **kwargs):
        calls["n"] += 1
        dirs = real(*args, **kwargs)
        if calls["n"] == 5:
            raise KeyboardInterrupt  # after a verified copy and remove, before the journal says done
        return dirs

    monkeypatch.setattr(screen_module, "_carry", crash_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        screen(src, model_dir, out, keep=["red"], move=True, quiet=True)
    monkeypatch.setattr(screen_module, "_carry", real)
    result = screen(src, model_dir, out, keep=["red"], move=True, quiet=True)
    assert result.recovered > 0
    assert _digests(out / "ok") + _digests(out / "ng") == before
    assert not list(src.rglob("*.png")) and len(_report(out)) == 40


def test_other_settings_on_a_screened_folder_are_refused(model_dir, tmp_path):
    src = _folder(tmp_path / "raw", 3)
    out = tmp_path / "sorted"
    screen(src, model_dir, out, keep=["red"], quiet=True)
    with pytest.raises(UsageError, match="other settings.*keep"):
        screen(src, model_dir, out, keep=["blue"], quiet=True)
    with pytest.raises(UsageError, match="vocabulary"):
        screen(src, model_dir, tmp_path / "o2", keep=["no_such_tag"], quiet=True)


def test_cli_usage_errors(model_dir, tmp_path, capsys):
    src = _folder(tmp_path / "raw", 2)
    base = ["--screen", str(src), "--model", str(model_dir), "--out", str(tmp_path / "o"), "--quiet"]
    assert main(base) == 2  # neither --keep nor --reject
    assert main(base + ["--keep", "red", "--copy", "--move"]) == 2
    assert main(base + ["--keep", "red", "--top-k", "3"]) == 2
    assert main(["--screen", str(src), "--keep", "red", "--out", str(tmp_path / "o")]) == 2  # no --model
    assert "usage" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_in_the_middle_of_moving_1000_images_loses_and_duplicates_nothing(model_dir, tmp_path):
    src = _folder(tmp_path / "raw", 1000, seed=21, size=32)
    before = _digests(src)
    assert sum(before.values()) == 1000
    out = tmp_path / "sorted"
    cmd = [sys.executable, "-m", "alt_i2v", "--screen", str(src), "--model", str(model_dir), "--keep", "red",
           "--reject", "triangle", "--out", str(out), "--move", "--quiet", "--batch-size", "32"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    journal = out / ".screen" / "journal.jsonl"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_bytes().count(b'"op":"done"') >= 200:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    moved = sum(_digests(out / p).total() for p in ("ok", "ng", "error") if (out / p).is_dir())
    assert 200 <= moved < 1000  # killed in the middle
    assert _digests(src) + sum((_digests(out / p) for p in ("ok", "ng") if (out / p).is_dir()), Counter()) \
        >= before  # nothing lost even right after the kill (a file may briefly be in both places)

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = _digests(out / "ok") + _digests(out / "ng")
    assert after == before  # every file exactly once
    assert not list(src.rglob("*.png"))
    rows = _report(out)
    assert len(rows) == 1000 and len({r["file"] for r in rows}) == 1000
    assert sum(1 for p in out.rglob("*.png")) == 1000
    assert not [p for p in out.rglob("*.part*")]


# ------------------------------------------------------------------------------- issue 22: hostile folders

def test_src_inside_out_keeps_the_users_hidden_part_files(model_dir, tmp_path):
    """Case 1: ``--screen t/raw --out t`` deleted ``t/raw/.video.mkv.part`` (the stale-temp sweep)."""
    t = tmp_path / "t"
    src = _folder(t / "raw", 3)
    (src / ".video.mkv.part").write_text("x")
    (t / ".movie.part").write_text("y")
    screen(src, model_dir, t, keep=["red"], threshold=THRESHOLD, quiet=True)
    assert (src / ".video.mkv.part").read_text() == "x" and (t / ".movie.part").read_text() == "y"
    assert len(_report(t)) == 3


def test_two_screens_into_one_folder_at_once_copy_each_picture_once(model_dir, tmp_path):
    """Case 3: two identical ``--screen --copy`` runs at once both succeeded, nearly doubling the copies.
    The second is refused while the first holds OUT; the first leaves exactly one copy of each picture."""
    from alt_i2v.errors import AltI2VError
    from alt_i2v.tagging.tagger import Tagger

    src = _folder(tmp_path / "raw", 300, size=32)
    out = tmp_path / "sorted"
    tagger = Tagger(model_dir)  # loaded before: the second run reaches OUT's lock at once
    cmd = [sys.executable, "-m", "alt_i2v", "--screen", str(src), "--model", str(model_dir), "--out", str(out),
           "--keep", "red", "--threshold", str(THRESHOLD), "--quiet"]
    first = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    journal = out / ".screen" / "journal.jsonl"
    deadline = time.monotonic() + 120
    while not (journal.exists() and journal.stat().st_size) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first screening ended before the second could start"
    with pytest.raises(AltI2VError, match="another --screen is writing into this folder"):
        screen(src, tagger, out, keep=["red"], threshold=THRESHOLD, quiet=True)
    assert first.wait(300) == 0, first.stdout.read()
    copies = [p for p in out.rglob("*.png") if ".screen" not in p.parts]
    assert len(copies) == 300
    assert Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in copies) == _digests(src)


def test_fifos_and_devices_are_left_in_place_never_read(model_dir, tmp_path):
    """Case 6: a FIFO named ``p.png`` or a symlink to /dev/zero was read for ever (file_digest)."""
    src = _folder(tmp_path / "raw", 2)
    os.mkfifo(src / "p.png")
    (src / "z.png").symlink_to("/dev/zero")
    out = tmp_path / "sorted"
    result = screen(src, model_dir, out, keep=["red"], threshold=THRESHOLD, quiet=True)
    rows = {r["file"]: r for r in _report(out)}
    assert rows["p.png"]["decision"] == rows["z.png"]["decision"] == "error"
    assert "not a regular file" in rows["p.png"]["rule"] and not rows["p.png"]["destination"]
    assert sorted(u["file"] for u in result.unreadable) == ["p.png", "z.png"]
    assert (src / "p.png").exists() and (src / "z.png").is_symlink()
    assert not list((out / "error").rglob("*")) if (out / "error").exists() else True


def test_a_name_that_is_not_utf8_is_screened_reported_and_resumed(model_dir, tmp_path):
    """Case 7: a non-UTF-8 file name aborted after 32 files ("surrogates not allowed"), with no report,
    and every rerun aborted the same way."""
    src = _folder(tmp_path / "raw", 40, size=32)
    odd = os.fsdecode(b"caf\xe9.png")
    (src / "img0000.png").rename(src / odd)
    out = tmp_path / "sorted"
    result = screen(src, model_dir, out, keep=["red"], threshold=THRESHOLD, quiet=True)
    assert result.images == 40
    rows = {r["file"]: r for r in _report(out)}
    assert "caf\\xe9.png" in rows and rows["caf\\xe9.png"]["destination"].endswith("caf\\xe9.png")
    assert (out / rows["caf\\xe9.png"]["decision"] / odd).read_bytes() == (src / odd).read_bytes()
    again = screen(src, model_dir, out, keep=["red"], threshold=THRESHOLD, quiet=True)
    assert again.resumed == 40 and again.images == 40
