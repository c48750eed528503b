"""The web page of `vlpt serve`: a Gradio Blocks app over a `Demo` (`demo.py`), one tab per thing the checkpoint
can do. Every handler goes through `guarded`: a `VlptError` (bad input) becomes a message in the tab, any other
exception a one-line "internal error" message in the page (its traceback only in the server's console), and the
server keeps serving. Gradio's own files (uploads, pictures it sends) go under the cache folder.
"""

import logging
import os
import traceback
from pathlib import Path

from vlpt.data.annotations import load_image
from vlpt.errors import VlptError

log = logging.getLogger("vlpt.serve")

CSS = """
#search-results .caption-label {white-space: normal}
.message {min-height: 1.5em}
.message p {color: #b42318; font-weight: 600}
"""


def import_gradio(cache: Path):
    """Gradio, its temporary files under `cache`, its usage analytics off; a VlptError saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ["GRADIO_TEMP_DIR"] = str(Path(cache) / "gradio")
    try:
        import gradio as gr
    except ImportError:
        raise VlptError("vlpt serve needs Gradio: pip install 'vlpt[demo]'") from None
    return gr


def image_input(gr, elem_id: str, label: str = "Image"):
    """An image upload whose file reaches the handler even when it is no image (Gradio's own Image would fail before
    the handler with a bare "Error"): the handler then says what is wrong in the page. (The instance's `preprocess`
    is wrapped rather than subclassing: Gradio writes a .pyi stub beside the module of every component class.)"""
    component = gr.Image(type="filepath", label=label, sources=["upload", "clipboard"], elem_id=elem_id, height=260)
    plain = component.preprocess

    def preprocess(payload):
        try:
            return plain(payload)
        except Exception:
            return getattr(payload, "path", None)
    component.preprocess = preprocess
    return component


def message(text: str) -> str:
    return f"⚠ {text}" if text else ""


def guarded(fn, outputs: int):
    """`fn` for Gradio: its outputs and an empty message, or on an error `outputs` unchanged values and the message."""
    import gradio as gr

    def run(*args):
        try:
            values = fn(*args)
        except VlptError as err:
            return (*[gr.update() for _ in range(outputs)], message(str(err)))
        except Exception as err:  # a bug: the page says so in one line, the console has the traceback
            log.error("handler %s failed:\n%s", getattr(fn, "__name__", fn), traceback.format_exc())
            return (*[gr.update() for _ in range(outputs)],
                    message(f"internal error ({type(err).__name__}: {err}); the server's console has the details"))
        values = values if isinstance(values, tuple) else (values,)
        return (*values, "")
    run.__name__ = getattr(fn, "__name__", "handler")
    return run


def enlarged(path, side: int = 192):
    """An image file enlarged without smoothing to at least `side` pixels (64 px shapes are readable)."""
    from PIL import Image
    img = load_image(path)
    scale = max(1, side // max(img.size))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def score_line(row: dict) -> str:
    itm = "" if row.get("itm") is None else f" · ITM {row['itm']:.3f}"
    return f"#{row['rank']}  ITC {row['itc']:.3f}{itm}"


def build(demo, title: str = "vlpt demo"):
    """The Blocks app of `demo` (not launched)."""
    gr = import_gradio(demo.cache)
    from vlpt.serve.demo import default_prompts, default_classes

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## vlpt: {demo.name}\n{demo.summary()}", elem_id="summary")

        # --- Search -------------------------------------------------------------------------------------------------
        with gr.Tab("Search", id="search"):
            with gr.Row():
                query = gr.Textbox(label="Text query", placeholder="a red circle on the left", scale=4,
                                   elem_id="search-query")
                top = gr.Slider(1, 50, value=8, step=1, label="Results", scale=1, elem_id="search-top")
                rerank = gr.Checkbox(value=True, label="ITM rerank", scale=1, elem_id="search-rerank")
            search_button = gr.Button("Search", variant="primary", elem_id="search-button")
            search_message = gr.Markdown(elem_id="search-message", elem_classes=["message"])
            results = gr.Gallery(label="Top images (ITC cosine; ITM match probability when reranked); select one to "
                                 "look at it", columns=6,
                                 height="auto", object_fit="contain", elem_id="search-results", allow_preview=False,
                                 format="png")
            table = gr.Dataframe(headers=["rank", "file", "caption", "ITC", "ITM"], label="Results (caption: the "
                                 "caption file's first for the image)", interactive=False, elem_id="search-table",
                                 wrap=True, column_widths=["6%", "12%", "62%", "10%", "10%"])
            rows_state = gr.State([])

            def do_search(text, n, rr):
                rows = demo.search(text, n, rr)
                gallery = [(enlarged(r["path"]), f"{score_line(r)} · {r['file']}") for r in rows]
                frame = [[r["rank"], r["file"], r["caption"], r["itc"], "" if r["itm"] is None else r["itm"]]
                         for r in rows]
                return gallery, frame, rows

            search_inputs = [query, top, rerank]
            search_outputs = [results, table, rows_state, search_message]
            search_button.click(guarded(do_search, 3), search_inputs, search_outputs, api_name="search")
            query.submit(guarded(do_search, 3), search_inputs, search_outputs, api_name=False)

            with gr.Accordion("Image query: its best captions from the caption file", open=False):
                with gr.Row():
                    caption_image = image_input(gr, "caption-query-image")
                    with gr.Column():
                        caption_top = gr.Slider(1, 20, value=5, step=1, label="Captions")
                        caption_rerank = gr.Checkbox(value=True, label="ITM rerank")
                        caption_button = gr.Button("Find captions", elem_id="caption-button")
                caption_message = gr.Markdown(elem_id="caption-message", elem_classes=["message"])
                caption_table = gr.Dataframe(headers=["rank", "caption", "its image", "ITC", "ITM"],
                                             interactive=False, elem_id="caption-table", wrap=True)

                def do_captions(image, n, rr):
                    return [[r["rank"], r["caption"], r["image"], r["itc"], "" if r["itm"] is None else r["itm"]]
                            for r in demo.captions_for(image, n, rr)]
                caption_button.click(guarded(do_captions, 1), [caption_image, caption_top, caption_rerank],
                                     [caption_table, caption_message], api_name="captions")

            with gr.Accordion("Image folder", open=False):
                folder = gr.Textbox(value=str(demo.index.folder), label="Folder to index (cached per checkpoint "
                                    "and folder content)", elem_id="folder")
                folder_button = gr.Button("Index", elem_id="folder-button")
                folder_message = gr.Markdown(elem_id="folder-message", elem_classes=["message"])
                folder_status = gr.Markdown(demo.summary(), elem_id="folder-status")

                def do_folder(path, progress=gr.Progress()):
                    return demo.set_folder(path, progress=lambda done, total: progress(done / total,
                                                                                       desc="indexing"))
                folder_button.click(guarded(do_folder, 1), [folder], [folder_status, folder_message],
                                    api_name="index")

        # --- Look ------------------------------------------------------------------------------------------------
        with gr.Tab("Look", id="look"):
            gr.Markdown("Where the model looks for each word: Grad-CAM of the ITM match on a fusion layer's "
                        "cross-attention. Pick a search result to bring it here.")
            with gr.Row():
                look_image = image_input(gr, "look-image")
                with gr.Column():
                    look_text = gr.Textbox(label="Text", placeholder="a red circle", elem_id="look-text")
                    layers = list(range(demo.fusion_layers)) or [-1]
                    look_layer = gr.Dropdown(choices=layers, value=layers[-1], label="Fusion layer",
                                             elem_id="look-layer")
                    look_button = gr.Button("Look", variant="primary", elem_id="look-button")
            look_message = gr.Markdown(elem_id="look-message", elem_classes=["message"])
            look_match = gr.Markdown(elem_id="look-match")
            look_picture = gr.Image(label="Grad-CAM: the average over the words, then each word", type="pil",
                                    interactive=False, elem_id="look-heatmap", format="png")

            def do_look(image, text, layer):
                out = demo.look(image, text, layer)
                return f"**ITM match probability {out['match']:.3f}** (fusion layer {out['layer']})", out["picture"]
            look_button.click(guarded(do_look, 2), [look_image, look_text, look_layer],
                              [look_match, look_picture, look_message], api_name="look")

            def pick(rows, text, evt: gr.SelectData):
                if not rows or evt.index is None or evt.index >= len(rows):
                    return gr.update(), gr.update()
                return load_image(rows[evt.index]["path"]), text
            results.select(pick, [rows_state, query], [look_image, look_text])

        # --- Ask ---------------------------------------------------------------------------------------------------
        if demo.heads.has("vqa"):
            with gr.Tab("Ask", id="ask"):
                with gr.Row():
                    ask_image = image_input(gr, "ask-image")
                    with gr.Column():
                        question = gr.Textbox(label="Question", placeholder="what colour is the circle?",
                                              elem_id="ask-question")
                        ask_button = gr.Button("Ask", variant="primary", elem_id="ask-button")
                ask_message = gr.Markdown(elem_id="ask-message", elem_classes=["message"])
                generated = gr.Markdown(elem_id="ask-generated")
                answers = gr.Dataframe(headers=["answer", "probability"], label="Top answers (ranked over the "
                                       "answer list)", interactive=False, elem_id="ask-answers")

                def do_ask(image, text):
                    out = demo.ask(image, text)
                    return f"**Generated answer:** {out['generated'] or '(empty)'}", [list(r) for r in out["ranked"]]
                ask_button.click(guarded(do_ask, 2), [ask_image, question], [generated, answers, ask_message],
                                 api_name="ask")

        # --- Describe ------------------------------------------------------------------------------------------
        if demo.heads.has("caption"):
            with gr.Tab("Describe", id="describe"):
                with gr.Row():
                    describe_image = image_input(gr, "describe-image")
                    with gr.Column():
                        beams = gr.Slider(1, 10, value=3, step=1, label="Beams")
                        max_len = gr.Slider(1, 60, value=20, step=1, label="Longest caption (tokens)")
                        min_len = gr.Slider(0, 30, value=5, step=1, label="Shortest caption (tokens)")
                        sample = gr.Checkbox(value=False, label="Sample instead of beam search")
                        temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Temperature (sampling)")
                        top_k = gr.Slider(0, 100, value=0, step=1, label="Top-k (sampling; 0: all tokens)")
                        seed = gr.Number(value=0, precision=0, label="Seed (sampling)")
                        describe_button = gr.Button("Describe", variant="primary", elem_id="describe-button")
                describe_message = gr.Markdown(elem_id="describe-message", elem_classes=["message"])
                caption = gr.Markdown(elem_id="describe-caption")

                def do_describe(image, b, hi, lo, s, temp, k, sd):
                    return f"**{demo.describe(image, b, hi, min(lo, hi), s, temp, k, sd)}**"
                describe_button.click(guarded(do_describe, 1),
                                      [describe_image, beams, max_len, min_len, sample, temperature, top_k, seed],
                                      [caption, describe_message], api_name="describe")

        # --- Classify ----------------------------------------------------------------------------------------------
        with gr.Tab("Classify", id="classify"):
            with gr.Row():
                classify_image = image_input(gr, "classify-image")
                with gr.Column():
                    classes = gr.Textbox(value="\n".join(default_classes(demo)), lines=6,
                                         label="Classes (one per line, or separated by commas)",
                                         elem_id="classify-classes")
                    prompts = gr.Textbox(value="\n".join(default_prompts()), lines=3,
                                         label="Prompts ('{}' is the class; their features are averaged)",
                                         elem_id="classify-prompts")
                    classify_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
            classify_message = gr.Markdown(elem_id="classify-message", elem_classes=["message"])
            with gr.Row():
                chart = gr.Image(label="ITC and ITM probability per class", type="pil", interactive=False,
                                 elem_id="classify-chart", format="png")
                class_table = gr.Dataframe(headers=["class", "ITC", "ITM"], interactive=False,
                                           elem_id="classify-table")

            def do_classify(image, names, templates):
                out = demo.classify(image, names, templates)
                return out["chart"], [[r["class"], r["itc"], r["itm"]] for r in out["rows"]]
            classify_button.click(guarded(do_classify, 2), [classify_image, classes, prompts],
                                  [chart, class_table, classify_message], api_name="classify")

        # --- method panels: only what the method has --------------------------------------------------------------
        if "codebook" in demo.capabilities:
            with gr.Tab("Codebook", id="codebook"):
                gr.Markdown("CB-ViLA's visual codebook: each row is one codeword, with patches of the indexed "
                            "images quantised to it (Fig. 3).")
                with gr.Row():
                    n_codewords = gr.Slider(1, 32, value=8, step=1, label="Codewords (rows)")
                    n_patches = gr.Slider(1, 32, value=10, step=1, label="Patches per codeword")
                    codebook_button = gr.Button("Draw", variant="primary", elem_id="codebook-button")
                codebook_message = gr.Markdown(elem_id="codebook-message", elem_classes=["message"])
                codebook_note = gr.Markdown(elem_id="codebook-note")
                codebook_picture = gr.Image(type="pil", interactive=False, elem_id="codebook-picture",
                                            format="png", label="Codewords")
                codebook_button.click(guarded(lambda c, p: demo.codebook(c, p)[::-1], 2), [n_codewords, n_patches],
                                      [codebook_note, codebook_picture, codebook_message], api_name="codebook")

        if "reconstruction" in demo.capabilities:
            with gr.Tab("Reconstruction", id="reconstruction"):
                gr.Markdown("MaskVLM: the image with patches masked as in training, reconstructed from the visible "
                            "patches and the caption.")
                with gr.Row():
                    recon_image = image_input(gr, "recon-image")
                    with gr.Column():
                        recon_text = gr.Textbox(label="Caption", elem_id="recon-text")
                        recon_seed = gr.Number(value=0, precision=0, label="Mask seed")
                        recon_button = gr.Button("Reconstruct", variant="primary", elem_id="recon-button")
                recon_message = gr.Markdown(elem_id="recon-message", elem_classes=["message"])
                recon_gallery = gr.Gallery(columns=3, height="auto", elem_id="recon-gallery", allow_preview=False,
                                           format="png",
                                           label="original | masked | reconstructed")
                recon_button.click(guarded(demo.reconstruct, 1), [recon_image, recon_text, recon_seed],
                                   [recon_gallery, recon_message], api_name="reconstruct")

        if "pseudo_labels" in demo.capabilities:
            with gr.Tab("Pseudo-labels", id="pseudo-labels"):
                gr.Markdown("SIMLA: the caption's keywords its multimodal [CLS] attends to most (the pseudo-label "
                            "targets) and the momentum concept head's words from the image alone.")
                with gr.Row():
                    psl_image = image_input(gr, "psl-image")
                    with gr.Column():
                        psl_text = gr.Textbox(label="Caption", elem_id="psl-text")
                        psl_button = gr.Button("Show", variant="primary", elem_id="psl-button")
                psl_message = gr.Markdown(elem_id="psl-message", elem_classes=["message"])
                psl_keywords = gr.Markdown(elem_id="psl-keywords")
                psl_table = gr.Dataframe(headers=["concept word", "probability"], interactive=False,
                                         elem_id="psl-table")

                def do_psl(image, text):
                    out = demo.pseudo_labels(image, text)
                    return f"**Keywords:** {', '.join(out['keywords']) or '-'}", [list(p) for p in out["predicted"]]
                psl_button.click(guarded(do_psl, 2), [psl_image, psl_text], [psl_keywords, psl_table, psl_message],
                                 api_name="pseudo_labels")
    return app


def launch(app, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve `app` on `host:port` (loopback by default); with `block` False, return once it is up."""
    return app.launch(server_name=host, server_port=port, show_error=False, prevent_thread_lock=not block,
                      ssr_mode=False, quiet=not block, css=CSS, footer_links=[], mcp_server=False)
