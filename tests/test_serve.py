"""`vlpt serve`: the feature cache (reused, and invalidated when the checkpoint or the folder changes), each tab's
handler on a tiny trained checkpoint, bad input as a message, loopback binding, a malformed request answered with an
error and no traceback; and (marked `browser`) the page itself in Debian's Chromium driven by Playwright."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlpt.pretrain import pretrain
from vlpt.serve.demo import Demo, InputError
from vlpt.serve.index import index_folder
from helpers import TINY, config

gradio = pytest.importorskip("gradio", reason="vlpt serve needs Gradio: pip install 'vlpt[demo]'")

QUERY_STEPS = 400  # enough for the tiny model to find an image of the test split by one of its captions


@pytest.fixture(scope="module")
def pretrained(shapes_data, tmp_path_factory) -> Path:
    """A tiny ALBEF trained (ITC + ITM, ~15 s) on the test split's own pairs, so that a caption finds its image."""
    tmp = tmp_path_factory.mktemp("serve")
    records = json.loads((shapes_data / "retrieval_test.json").read_text())
    pairs = [{"image": r["image"], "caption": c, "image_id": i} for i, r in enumerate(records) for c in r["caption"]]
    (tmp / "pairs.json").write_text(json.dumps(pairs))
    out = tmp / "albef"
    pretrain(config(shapes_data, out, f"train.steps={QUERY_STEPS}", f"train.save_every={QUERY_STEPS}",
                    f"data.train={tmp / 'pairs.json'}", "optim.lr=1e-3", "method.losses=[itc,itm]"))
    return out


@pytest.fixture(scope="module")
def demo(pretrained, shapes_data, tmp_path_factory) -> Demo:
    return Demo(pretrained, shapes_data / "images" / "test", tmp_path_factory.mktemp("cache"), progress=False)


def short_captions(demo: Demo, limit: int = 20) -> list[tuple[str, str]]:
    """(image, caption) pairs whose caption fits the tiny model's 24 tokens."""
    return [(image, c) for image, captions in demo.captions.items() for c in captions
            if int(demo.tokenizer([c], 512)[1].sum()) <= demo.cfg.model.text.max_len][:limit]


# --- the cache ---------------------------------------------------------------------------------------------------
def test_the_index_is_reused_and_rebuilt_when_the_checkpoint_or_the_folder_changes(pretrained, shapes_data,
                                                                                    tmp_path):
    from vlpt.engine import checkpoint
    from vlpt.serve.index import checkpoint_key
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "images"
    shutil.copytree(shapes_data / "images" / "test", folder)
    cache = tmp_path / "cache"
    model, cfg, _ = checkpoint.load_method(pretrained)
    calls = []

    def build(ckpt_key):
        return index_folder(model, folder, cache, ckpt_key, image_size=cfg.model.vision.image_size,
                            progress=lambda done, total: calls.append((done, total)))

    key = checkpoint_key(checkpoint.resolve(pretrained))
    first = build(key)
    assert not first.reused and calls and calls[-1] == (16, 16) and first.features.shape == (16, 16)
    calls.clear()
    again = build(key)
    assert again.reused and not calls and torch.equal(again.features, first.features)  # restart: no encoding

    (folder / "extra.png").write_bytes((folder / "000000.png").read_bytes())        # an image added
    added = build(key)
    assert not added.reused and len(added.paths) == 17
    os.utime(folder / "000003.png", ns=(1, 1))                                       # an image rewritten
    assert not build(key).reused

    other = tmp_path / "ckpt"                                                        # other weights, same config
    shutil.copytree(checkpoint.resolve(pretrained), other)
    weights = load_file(str(other / "model.safetensors"))
    weights["vision_proj.bias"] = weights["vision_proj.bias"] + 1
    save_file(weights, str(other / "model.safetensors"))
    assert checkpoint_key(other) != key
    calls.clear()
    assert not build(checkpoint_key(other)).reused and calls
    # nothing outside the cache folder: the image folder holds only its images
    assert all(p.suffix == ".png" for p in folder.iterdir())
    assert {p.suffix for p in cache.iterdir()} <= {".json", ".safetensors"}


def test_a_restarted_demo_reuses_its_index_and_captions(demo, pretrained, shapes_data):
    again = Demo(pretrained, shapes_data / "images" / "test", demo.cache, progress=False)
    assert again.index.reused and torch.equal(again.index.features, demo.index.features)
    assert torch.equal(again.caption_features, demo.caption_features)
    assert "index reused" in again.summary()


# --- each tab's handler ----------------------------------------------------------------------------------------
def test_search_finds_the_image_of_a_caption_with_both_scores(demo):
    pairs = short_captions(demo)
    assert len(pairs) >= 8
    found = [image for image, c in pairs if demo.search(c, 1)[0]["file"] == image]
    assert len(found) >= len(pairs) // 4, (len(found), len(pairs))   # chance: 1 in 16
    rows = demo.search(pairs[0][1], 5)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and len({r["file"] for r in rows}) == 5
    assert all(0 <= r["itm"] <= 1 and -1 <= r["itc"] <= 1 and r["caption"] in demo.captions[r["file"]]
               for r in rows)
    plain = demo.search(pairs[0][1], 5, rerank=False)
    assert all(r["itm"] is None for r in plain) and [r["itc"] for r in plain] == sorted(
        [r["itc"] for r in plain], reverse=True)


def test_an_image_query_gets_captions_of_that_image(demo):
    image, _ = short_captions(demo)[0]
    rows = demo.captions_for(demo.index.folder / image, 5)
    assert len(rows) == 5 and all(r["caption"] in demo.caption_texts and 0 <= r["itm"] <= 1 for r in rows)
    owners = [r["image"] for r in demo.captions_for(demo.index.folder / image, 5, rerank=False)]
    assert image in owners


def test_look_gives_the_match_probability_and_a_heat_map_per_word(demo):
    image, caption = short_captions(demo)[0]
    out = demo.look(demo.index.folder / image, caption, 0)
    assert 0 <= out["match"] <= 1 and len(out["words"]) >= 3 and out["layer"] == 0
    assert out["picture"].width > 400 and out["picture"].height > 200
    with pytest.raises(InputError, match="fusion layer"):
        demo.look(demo.index.folder / image, caption, 5)


def test_classify_scores_every_class_by_itc_and_itm(demo):
    image = demo.index.paths[0]
    out = demo.classify(image, "circle, square\nstar", "")          # newlines win over commas
    assert [r["class"] for r in out["rows"]] != [] and len(out["rows"]) == 2
    out = demo.classify(image, "circle, square, star, triangle", "a picture of a {}\nan image of a {}")
    assert sorted(r["class"] for r in out["rows"]) == ["circle", "square", "star", "triangle"]
    assert sum(r["itc"] for r in out["rows"]) == pytest.approx(1, abs=1e-3)
    assert all(0 <= r["itm"] <= 1 for r in out["rows"]) and out["chart"].width > 300


@pytest.mark.parametrize("call, match", [
    (lambda d: d.search(""), "empty"),
    (lambda d: d.search("   \n "), "empty"),
    (lambda d: d.search(None), "must be text"),
    (lambda d: d.search(["a", "list"]), "must be text"),
    (lambda d: d.search("red " * 30), "tokens long"),
    (lambda d: d.search("x" * 5000), "characters long"),
    (lambda d: d.search("a red circle", 0), "between 1 and"),
    (lambda d: d.search("a red circle", "many"), "whole number"),
    (lambda d: d.look(None, "a red circle"), "no image"),
    (lambda d: d.look(Path(__file__), "a red circle"), "not an image"),
    (lambda d: d.look("/no/such/file.png", "a red circle"), "not there"),
    (lambda d: d.look({"path": __file__}, "a red circle"), "not an image"),
    (lambda d: d.classify(d.index.paths[0], " , ", ""), "class list is empty"),
    (lambda d: d.classify(d.index.paths[0], "a, a", ""), "twice"),
    (lambda d: d.classify(d.index.paths[0], "a, b", "no placeholder"), "'{}'"),
    (lambda d: d.set_folder("/no/such/folder"), "not found"),
    (lambda d: d.set_folder(""), "no image folder"),
    (lambda d: d.ask(d.index.paths[0], "what?"), "no VQA head"),
    (lambda d: d.describe(d.index.paths[0]), "no caption head"),
    (lambda d: d.codebook(), "no codebook"),
    (lambda d: d.reconstruct(d.index.paths[0], "a red circle"), "no reconstruction"),
])
def test_bad_input_is_one_line_for_the_page(demo, call, match):
    before = demo.index
    with pytest.raises(InputError, match=match) as err:
        call(demo)
    assert "\n" not in str(err.value) and demo.index is before  # the demo still serves its folder


def test_an_empty_folder_is_refused_and_the_demo_keeps_its_own(demo, tmp_path):
    with pytest.raises(InputError, match="no image files"):
        demo.set_folder(tmp_path)
    assert len(demo.search("a red circle", 3)) == 3


@pytest.fixture(scope="module")
def heads(pretrained, shapes_data, tmp_path_factory) -> list[Path]:
    """VQA and captioning finetuned from the tiny checkpoint for 2 steps."""
    from vlpt.cli import main
    out = tmp_path_factory.mktemp("heads")
    for task, extra in (("vqa", []), ("caption", ["task.max_len=4", "task.min_len=1", "task.baseline_images=0"])):
        main(["finetune", task, "--config", f"finetune/{task}_tiny.yaml", "--checkpoint", str(pretrained), *TINY,
              f"data.root={shapes_data}", f"train.out={out / task}", "train.steps=2", "train.eval_every=2",
              "train.save_every=2", "eval.batch_size=16", *extra])
    return [out / "vqa", out / "caption"]


def test_ask_and_describe_appear_with_their_heads(pretrained, shapes_data, heads, demo):
    d = Demo(pretrained, shapes_data / "images" / "test", demo.cache, heads=heads, progress=False)
    assert d.heads.has("vqa") and d.heads.has("caption")
    image = d.index.paths[0]
    out = d.ask(image, "what colour is the star?")
    assert len(out["ranked"]) == 5 and isinstance(out["generated"], str)
    probs = [p for _, p in out["ranked"]]
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    answers = json.loads((shapes_data / "answer_list.json").read_text())
    assert all(a in answers for a, _ in out["ranked"])
    assert isinstance(d.describe(image, beams=2, max_len=4, min_len=1), str)
    sampled = [d.describe(image, max_len=6, min_len=1, sample=True, temperature=1.5, seed=s) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1]                                   # seeded
    with pytest.raises(InputError, match="temperature"):
        d.describe(image, sample=True, temperature=0)
    # a task checkpoint alone serves its heads and its encoders' search
    alone = Demo(heads[0], shapes_data / "images" / "test", demo.cache, progress=False)
    assert alone.heads.has("vqa") and len(alone.search("a red circle", 2)) == 2


@pytest.mark.parametrize("method", ["maskvlm", "cbvila", "simla"])
def test_method_panels_only_where_the_method_has_them(method, shapes_data, tmp_path):
    extra = {"maskvlm": ["method.maskvlm.image_cross_layers=1", "method.maskvlm.decoder_layers=1",
                         "method.maskvlm.region=16"],
             "cbvila": ["method.codebook.size=32", "method.cbvila.warmup_steps=0"],
             "simla": ["method.simla.mim_min_block=1", "method.simla.tokens.codes=16"]}[method]
    out = tmp_path / method
    pretrain(config(shapes_data, out, "train.steps=2", "train.save_every=2", *extra,
                    preset=f"pretrain/{method}_tiny.yaml"))
    d = Demo(out, shapes_data / "images" / "test", tmp_path / "cache", progress=False)
    image = d.index.paths[0]
    app = pytest.importorskip("vlpt.serve.app").build(d)
    tabs = {getattr(b, "id", None) for b in app.blocks.values()}
    panels = {"maskvlm": "reconstruction", "cbvila": "codebook", "simla": "pseudo-labels"}
    assert panels[method] in tabs and not (set(panels.values()) - {panels[method]}) & tabs
    if method == "maskvlm":
        pictures = d.reconstruct(image, "a red circle")
        assert [label.split()[0] for _, label in pictures] == ["original", "masked", "reconstructed"]
        assert pictures[0][0].size == pictures[2][0].size and pictures[0][0].width >= 128
    elif method == "cbvila":
        picture, note = d.codebook(codewords=4, patches=3)
        assert picture.width > 0 and "codewords" in note
    else:
        out = d.pseudo_labels(image, "a red circle on the left")
        assert len(out["predicted"]) == 5 and all(isinstance(w, str) for w in out["keywords"])
    with pytest.raises(InputError):
        d.reconstruct(image, "x") if method != "maskvlm" else d.codebook()


# --- the server ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) of the sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).is_file():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # LISTEN
                found.add(address)
    return found


def test_the_server_binds_to_loopback_unless_told_otherwise(demo):
    from vlpt.cli import parser
    from vlpt.serve.app import build, launch
    args = parser().parse_args(["serve", "--checkpoint", "c", "--images", "i"])
    assert args.host == "127.0.0.1" and args.port == 7860
    if not Path("/proc/net/tcp").is_file():
        pytest.skip("no /proc/net/tcp to read the bound address from")
    for host, expected in (("127.0.0.1", {"0100007F"}), ("0.0.0.0", {"00000000"})):
        app, port = build(demo), free_port()
        launch(app, host, port, block=False)
        try:
            assert listening(port) == expected, (host, listening(port))
        finally:
            app.close()


@pytest.fixture(scope="module")
def server(demo):
    from vlpt.serve.app import build, launch
    app, port = build(demo), free_port()
    launch(app, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}"
    app.close()


def call(url: str, name: str, payload) -> tuple[int, str]:
    """Gradio's HTTP API: POST the call, then read its event stream; (status, text of the answer)."""
    import httpx
    start = httpx.post(f"{url}/gradio_api/call/{name}", content=payload if isinstance(payload, str) else None,
                       json=None if isinstance(payload, str) else payload, timeout=60,
                       headers={"content-type": "application/json"})
    if start.status_code != 200:
        return start.status_code, start.text
    event = start.json()["event_id"]
    answer = httpx.get(f"{url}/gradio_api/call/{name}/{event}", timeout=60)
    return answer.status_code, answer.text


def test_a_malformed_request_gets_an_error_not_a_traceback(server):
    ok_status, ok = call(server, "search", {"data": ["a red circle", 3, True]})
    assert ok_status == 200 and "event: complete" in ok and ".png" in ok
    for payload in ({"data": ["", 3, True]}, {"data": [None, 3, True]}, {"data": ["red " * 40, 3, True]}):
        status, text = call(server, "search", payload)
        data = json.loads(text.split("data:", 1)[1])
        assert status == 200 and data[-1].startswith("⚠ the query") and "Traceback" not in text, text
    for payload in ("{not json", {"data": "not a list"}, {"nothing": 1}, {"data": [1, 2]},
                    {"data": [{"x": 1}, "many", "maybe"]}):
        status, text = call(server, "search", payload)
        assert "Traceback" not in text and 'File "' not in text, text
        assert status >= 400 or "error" in text.lower(), (payload, status, text)
    status, text = call(server, "look", {"data": [{"path": __file__, "meta": {"_type": "gradio.FileData"}},
                                                  "a red circle", 0]})
    assert "Traceback" not in text and 'File "' not in text
    assert call(server, "search", {"data": ["a red circle", 3, True]})[0] == 200  # still serving


# --- the page in a browser -----------------------------------------------------------------------------------------
def files(folders: list[Path]) -> set[Path]:
    return {p for folder in folders for p in folder.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def served(pretrained, shapes_data, tmp_path_factory):
    """`vlpt serve` as a user starts it, on a free loopback port; yields (url, the folder's captions)."""
    port = free_port()
    cache = tmp_path_factory.mktemp("served-cache")
    watched = [pretrained, shapes_data, Path(__file__).parents[1] / "vlpt"]
    before = files(watched)
    log = tmp_path_factory.mktemp("served-log") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vlpt", "serve", "--checkpoint", str(pretrained), "--images",
                                 str(shapes_data / "images" / "test"), "--cache", str(cache), "--port", str(port),
                                 "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vlpt serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"vlpt serve did not answer within 120 s:\n{log.read_text()[-3000:]}")
    records = json.loads((shapes_data / "retrieval_test.json").read_text())
    captions = {Path(r["image"]).name: r["caption"] for r in records}
    yield url, captions, lambda: files(watched) - before
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.browser
def test_the_page_searches_looks_and_reports_bad_uploads(browser, screenshots, served, demo, tmp_path):
    url, captions, written = served
    shots = screenshots
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(url)
    # a caption the tiny model ranks its image first for (how often it does: the search handler's test)
    image, query = next((i, c) for i, c in short_captions(demo) if demo.search(c, 1)[0]["file"] == i)
    page.fill("#search-query textarea", query)
    page.click("#search-button")
    page.wait_for_selector("#search-results img")
    first = page.locator("#search-results .caption-label").first.inner_text()
    top_file = first.split("·")[-1].strip()
    assert query in captions[top_file], (query, first)            # the top image is one the query describes
    assert "ITC" in first and "ITM" in first
    assert query in page.inner_text("#search-table") or captions[top_file][0] in page.inner_text("#search-table")
    page.screenshot(path=str(shots / "search.png"), full_page=True)

    page.get_by_role("tab", name="Look").click()
    page.set_input_files("#look-image input[type=file]", str(demo.index.folder / image))
    page.fill("#look-text textarea", query)
    page.click("#look-button")
    page.wait_for_selector("#look-heatmap img")
    page.wait_for_function("document.querySelector('#look-heatmap img').naturalWidth > 0")
    assert "ITM match probability" in page.inner_text("#look-match")
    page.screenshot(path=str(shots / "look.png"), full_page=True)

    not_image = tmp_path / "notes.png"
    not_image.write_text("these are notes, not a picture")
    page.set_input_files("#look-image input[type=file]", str(not_image))
    page.click("#look-button")
    page.wait_for_function("document.querySelector('#look-message').innerText.includes('not an image')")
    assert "notes.png" in page.inner_text("#look-message")
    page.screenshot(path=str(shots / "bad_upload.png"), full_page=True)

    page.get_by_role("tab", name="Search").click()                 # the server still answers
    page.fill("#search-query textarea", "")
    page.click("#search-button")
    page.wait_for_function("document.querySelector('#search-message').innerText.includes('empty')")
    page.close()
    assert not written()  # uploads and pictures went to the cache folder: the checkpoint, data and package unchanged
